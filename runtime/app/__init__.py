"""``lapsam app``: a local web page to segment scans with boxes on the laptop CPU.

Modules (all torch-free; the web and image libraries are the optional ``[app]`` extra and are
imported inside functions, so ``lapsam --help`` does not need them):

* :mod:`.volume`: open NIfTI / DICOM / PNG / JPG / challenge npz as a :class:`~.volume.Volume`,
  intensity windows, masks written back with the input's geometry;
* :mod:`.segmenter`: the runtime :class:`~lapsam.runtime.Predictor` over an engine whose slice
  embeddings are cached (a new box on a slice decodes only), with progress and cancel;
* :mod:`.session`: what one page works on: the image, objects, prompts, masks, undo, jobs;
* :mod:`.server`: the Starlette app (JSON API + static page) served by uvicorn;
* :mod:`.cli`: ``lapsam app``.
"""
