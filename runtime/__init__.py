"""lapsam.runtime: the torch-free CPU predictor (ONNX Runtime or OpenVINO).

Entry points: :class:`Predictor` (``Predictor.from_model_dir(path).predict(case)``),
:func:`predict_folder`, and the CLI ``lapsam predict`` / ``lapsam bench runtime``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .cpus import available_cpus
    from .predictor import CaseReport, Predictor, PredictorConfig
    from .run import FolderSummary, PredictOptions, predict_folder

# Imported on first use (PEP 562): `lapsam.runtime.cli` and `lapsam.runtime.backends` are light,
# and importing them must not load numpy and the predictor (`lapsam --help`, `lapsam predict`'s
# own timing of its imports).
_LAZY = {
    "available_cpus": ".cpus",
    "CaseReport": ".predictor",
    "Predictor": ".predictor",
    "PredictorConfig": ".predictor",
    "FolderSummary": ".run",
    "PredictOptions": ".run",
    "predict_folder": ".run",
}


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(mod, __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "CaseReport",
    "FolderSummary",
    "PredictOptions",
    "Predictor",
    "PredictorConfig",
    "available_cpus",
    "predict_folder",
]
