"""Minimal ONNX Runtime / OpenVINO runners for the export check and benchmark.

These are deliberately small (the production runtime lives in ``lapsam.runtime``): open one
manifest entry after verifying its sha256, feed named arrays, get named arrays back.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from lapsam.manifest import ModelFile, verify_file

log = logging.getLogger(__name__)


def cpu_has_bf16() -> bool:
    """Whether OpenVINO can execute in bf16 on this CPU (AVX512-BF16 or AMX)."""
    import openvino as ov

    try:
        return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except RuntimeError:
        return False


class Runner:
    """Callable: ``runner(feeds) -> {output name: array}``."""

    input_names: list[str]
    output_names: list[str]

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:  # pragma: no cover - interface
        raise NotImplementedError


class OrtRunner(Runner):
    """ONNX Runtime CPU session; ``spinning=False`` stops idle worker threads from busy-waiting
    (used by the benchmark so one variant's spinning does not slow the next one timed)."""

    def __init__(self, path: Path, threads: int = 2, spinning: bool = True):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        if not spinning:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self.session.run(self.output_names, {k: feeds[k] for k in self.input_names})
        return dict(zip(self.output_names, outs, strict=True))


class OvRunner(Runner):
    """OpenVINO CPU, latency mode; ``precision`` is the execution precision hint (f32 or bf16)."""

    def __init__(self, path: Path, threads: int = 2, precision: str = "f32"):
        import openvino as ov

        core = ov.Core()
        config = {
            "INFERENCE_PRECISION_HINT": precision,
            "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "LATENCY",
        }
        self.compiled = core.compile_model(str(path), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.input_names = [i.get_any_name() for i in self.compiled.inputs]
        self.outputs = {o.get_any_name(): o for o in self.compiled.outputs}
        self.output_names = list(self.outputs)

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.request.infer({k: feeds[k] for k in self.input_names})
        return {n: self.request.get_tensor(o).data.copy() for n, o in self.outputs.items()}


def open_runner(model_dir: str | Path, entry: ModelFile, threads: int = 2, ov_precision: str = "f32",
                spinning: bool = True) -> Runner:
    """Verify ``entry``'s files against their sha256, then open it with its backend."""
    model_dir = Path(model_dir)
    verify_file(model_dir, entry)
    path = model_dir / entry.path
    if entry.backend == "onnx":
        return OrtRunner(path, threads, spinning)
    return OvRunner(path, threads, ov_precision)
