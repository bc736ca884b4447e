"""lapsam.eval: score segmentations and time submission images as the CVPR 2024 organisers do.

- :mod:`.metrics`: DSC/NSD per case and label (``challenge`` mode reproduces the organisers'
  compute_metrics.py, ``exact`` mode is the corrected metric), means per modality;
- :mod:`.timing`: the official per-case ``docker container run`` protocol, one or two images;
- :mod:`.report`: markdown report joining both, with PNG plots;
- :mod:`.surface_compat`: DeepMind's surface-distance made to run on numpy 2.

Command line: ``lapsam eval metrics|timing|report`` (see :mod:`.cli`). No torch here.
"""
