"""lapsam: promptable medical image segmentation that runs fast on a laptop CPU.

The core package (case I/O, model manifest, numpy preprocessing, CLI) imports neither
torch nor any training dependency; only ``lapsam.distill`` and the torch side of
``lapsam.export`` do.
"""

__version__ = "0.1.0"
