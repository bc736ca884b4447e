"""PyTorch -> ONNX, simplification with onnxslim, ONNX -> OpenVINO IR.

All functions here are deterministic: the same module and options give byte-identical files.
"""

from __future__ import annotations

import io
import logging
import re
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

OPSET = 17
PRODUCER = "lapsam.export"


@dataclass
class SimplifyReport:
    """What simplification changed in one graph (kept only when it helped and outputs agree)."""

    file: str
    applied: bool
    nodes_before: int
    nodes_after: int
    ops_removed: dict[str, int]
    ops_added: dict[str, int]
    max_abs_diff: float
    reason: str = ""

    def note(self) -> str:
        if not self.applied:
            return f"{self.file}: onnxslim not applied ({self.reason})"
        removed = ", ".join(f"{k} -{v}" for k, v in sorted(self.ops_removed.items()))
        added = ", ".join(f"{k} +{v}" for k, v in sorted(self.ops_added.items()))
        parts = [f"{self.file}: onnxslim {self.nodes_before} -> {self.nodes_after} nodes"]
        if removed:
            parts.append(f"removed {removed}")
        if added:
            parts.append(f"added {added}")
        parts.append(f"max |output diff| {self.max_abs_diff:.2e}")
        return "; ".join(parts)


def torch_to_onnx(
    module,
    args: tuple,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: dict[str, dict[int, str]] | None = None,
):
    """Trace ``module`` to an in-memory ``onnx.ModelProto`` (TorchScript exporter, opset 17).

    The TorchScript-based exporter is used (``dynamo=False``): it handles dimensions that may be
    0 (no clicks) without specialising them, and its output is deterministic.
    """
    import onnx
    import torch

    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            args,
            buf,
            dynamo=False,
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes=dynamic_axes or {},
            opset_version=OPSET,
            do_constant_folding=True,
        )
    model = onnx.load_from_string(buf.getvalue())
    model.producer_name = PRODUCER
    model.producer_version = ""
    model.doc_string = ""
    return model


def _op_counts(model) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def _random_feeds(model, dims: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    init_names = {i.name for i in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in init_names:
            continue
        shape = []
        for d in inp.type.tensor_type.shape.dim:
            shape.append(d.dim_value if d.HasField("dim_value") else dims.get(d.dim_param, 2))
        feeds[inp.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _run_onnx(model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def simplify_onnx(model, file: str, dims: dict[str, int] | None = None, feeds: dict[str, np.ndarray] | None = None,
                  tol: float = 1e-3):
    """Run onnxslim; keep the result only if it has fewer nodes and the same outputs.

    Returns (model to use, :class:`SimplifyReport`). ``feeds`` (or random inputs with dynamic
    dims from ``dims``) are run through both graphs to compare outputs.
    """
    import onnx
    import onnxslim

    before = _op_counts(model)
    n_before = sum(before.values())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            slim = onnxslim.slim(onnx.ModelProto.FromString(model.SerializeToString()))
        onnx.checker.check_model(slim)
    except Exception as exc:  # onnxslim failures must not break the export
        log.warning("%s: onnxslim failed (%s); keeping the unsimplified graph", file, exc)
        return model, SimplifyReport(file, False, n_before, n_before, {}, {}, 0.0, f"onnxslim failed: {exc}")
    after = _op_counts(slim)
    n_after = sum(after.values())
    if n_after >= n_before:
        return model, SimplifyReport(file, False, n_before, n_after, {}, {}, 0.0, "no fewer nodes")
    feeds = feeds if feeds is not None else _random_feeds(model, dims or {})
    ref = _run_onnx(model, feeds)
    out = _run_onnx(slim, feeds)
    diff = max(float(np.max(np.abs(a - b))) if a.size else 0.0 for a, b in zip(ref, out, strict=True))
    scale = max(float(np.max(np.abs(a))) if a.size else 0.0 for a in ref)
    if not diff <= tol * max(1.0, scale):
        log.warning("%s: onnxslim changed outputs by %.3g; keeping the unsimplified graph", file, diff)
        return model, SimplifyReport(file, False, n_before, n_after, {}, {}, diff, f"outputs changed by {diff:.3g}")
    removed = {k: before[k] - after.get(k, 0) for k in before if before[k] > after.get(k, 0)}
    added = {k: after[k] - before.get(k, 0) for k in after if after[k] > before.get(k, 0)}
    slim.producer_name = PRODUCER
    slim.producer_version = ""
    return slim, SimplifyReport(file, True, n_before, n_after, removed, added, diff)


def save_onnx(model, path: Path) -> None:
    """One self-contained file (weights inline)."""
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=False)


def onnx_to_openvino(onnx_path: Path, xml_path: Path, fp16: bool) -> None:
    """Convert an ONNX file to OpenVINO IR (.xml + .bin); ``fp16`` compresses weights to FP16.

    The conversion records the source path in the IR's runtime info; it is removed so the IR
    does not depend on where the export ran (determinism).
    """
    import openvino as ov

    save_openvino(ov.convert_model(str(onnx_path)), xml_path, fp16)


def save_openvino(model, xml_path: Path, fp16: bool = False) -> None:
    """Save an OpenVINO model as IR (.xml + .bin), independent of where and in which process it ran.

    Drops the ``conversion_parameters`` runtime info (it records the source path) and renames the
    nodes OpenVINO numbered from a process-wide counter (:func:`_stable_names`).
    """
    import openvino as ov

    rt = model.get_rt_info()
    if "conversion_parameters" in rt:
        del rt["conversion_parameters"]
    _stable_names(model)
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(xml_path), compress_to_fp16=fp16)


_AUTO_NAME = re.compile(r"[A-Za-z0-9]+_\d+")


def _stable_names(model) -> None:
    """Rename nodes that OpenVINO named from a process-wide counter (``Constant_44413``).

    Those names depend on what ran before in the process, so two exports in one process
    would differ; they become ``<Type>_o<position>`` from the graph's topological order.
    """
    for i, op in enumerate(model.get_ordered_ops()):
        if _AUTO_NAME.fullmatch(op.get_friendly_name()):
            op.set_friendly_name(f"{op.get_type_name()}_o{i}")
