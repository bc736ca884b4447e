"""DeepMind's ``surface-distance`` package, made to run on numpy 2 and recent SciPy.

The released package (0.1) still uses ``np.Inf`` / ``np.NaN`` (removed in numpy 2.0) and the
``scipy.ndimage.filters`` / ``scipy.ndimage.morphology`` namespaces (deprecated, to be removed
in SciPy 2.0). Site-packages is not edited: instead, :func:`surface_metrics` rebinds the
``np`` and ``ndimage`` globals of ``surface_distance.metrics`` to thin proxies that forward
everything to the real modules and answer the removed names. Results are unchanged: the
proxies only map old names to the same numpy constants and SciPy functions.
"""

from __future__ import annotations

import types
from typing import Any

import numpy as np
from scipy import ndimage

_NUMPY_ALIASES: dict[str, Any] = {"Inf": np.inf, "NaN": np.nan, "Infinity": np.inf, "PINF": np.inf, "NAN": np.nan}


class _NumpyCompat(types.ModuleType):
    """Forwards to :mod:`numpy`; also answers the aliases numpy 2 removed."""

    def __getattr__(self, name: str) -> Any:
        if name in _NUMPY_ALIASES:
            return _NUMPY_ALIASES[name]
        return getattr(np, name)


class _NdimageCompat(types.ModuleType):
    """Forwards to :mod:`scipy.ndimage`; ``filters``/``morphology`` resolve to ``ndimage`` itself."""

    def __getattr__(self, name: str) -> Any:
        if name in ("filters", "morphology"):
            return ndimage
        return getattr(ndimage, name)


_patched: types.ModuleType | None = None


def surface_metrics() -> types.ModuleType:
    """Return ``surface_distance.metrics`` ready for numpy 2 (patched once per process)."""
    global _patched
    if _patched is None:
        from surface_distance import metrics

        if not isinstance(metrics.np, _NumpyCompat):
            metrics.np = _NumpyCompat("numpy")
        if not isinstance(metrics.ndimage, _NdimageCompat):
            metrics.ndimage = _NdimageCompat("scipy.ndimage")
        _patched = metrics
    return _patched
