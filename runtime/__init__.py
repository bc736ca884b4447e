"""lapsam.runtime: the torch-free CPU predictor (ONNX Runtime or OpenVINO).

Entry points: :class:`Predictor` (``Predictor.from_model_dir(path).predict(case)``),
:func:`predict_folder`, and the CLI ``lapsam predict`` / ``lapsam bench runtime``.
"""

from .cpus import available_cpus
from .predictor import CaseReport, Predictor, PredictorConfig
from .run import FolderSummary, PredictOptions, predict_folder

__all__ = [
    "CaseReport",
    "FolderSummary",
    "PredictOptions",
    "Predictor",
    "PredictorConfig",
    "available_cpus",
    "predict_folder",
]
