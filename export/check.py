"""``lapsam export check``: exported variants against PyTorch on slices of real cases.

The PyTorch model is rebuilt from the checkpoint the export came from: ``--checkpoint`` if
given, else the path recorded in ``export_info.json``, else ``checkpoint.pt`` inside the model
folder. Its sha256 must equal the one the manifest notes record (otherwise the comparison
would be meaningless and the check stops with an error).

Each variant (backend x encoder precision, plus bf16 execution of the OpenVINO IRs when the
CPU has bf16) runs encoder + decoder end to end on the same preprocessed slices with the same
box prompts as PyTorch, through the runtime's own engine layer (:func:`lapsam.runtime.engines.load_engine`:
the same sessions, settings and file selection as ``lapsam predict``). Reported per variant: max / mean absolute error of the three encoder
maps ("embeddings") and of the low-res mask logits, and the DSC between the PyTorch mask and
the variant's mask on the original image grid, pooled over the boxes of each case; the bar
applies to the worst case.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from lapsam.runtime.engines import (
    Engine,
    EngineOptions,
    backend_name,
    cpu_has_bf16,
    load_engine,
    read_manifest,
)

from lapsam.errors import CaseError
from lapsam.manifest import ModelManifest, sha256_file
from lapsam.preprocess import postprocess_masks

from .exporter import EXPORT_INFO_NAME, ExportError
from .slices import PromptedSlice, iter_case_slices

log = logging.getLogger(__name__)

# Mask DSC bars against PyTorch (worst case). None: reported only.
BARS: dict[str, float] = {"fp32": 0.999, "fp16": 0.99, "bf16": 0.99}
INT8_TARGET = 0.98


@dataclass
class VariantResult:
    backend: str  # openvino | onnxruntime
    precision: str  # weights precision of the encoder file
    execution: str  # f32 / bf16 (OpenVINO hint); "-" for ONNX Runtime
    bar: float | None
    embed_max: float = 0.0
    embed_mean: float = 0.0
    logits_max: float = 0.0
    logits_mean: float = 0.0
    dsc: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    @property
    def name(self) -> str:
        ex = "" if self.execution in ("-", "f32") else f"@{self.execution}"
        return f"{self.backend}/{self.precision}{ex}"

    @property
    def dsc_min(self) -> float:
        return min(self.dsc.values()) if self.dsc else float("nan")

    @property
    def dsc_mean(self) -> float:
        return float(np.mean(list(self.dsc.values()))) if self.dsc else float("nan")

    @property
    def passed(self) -> bool:
        if self.error is not None:
            return False
        return self.bar is None or (bool(self.dsc) and self.dsc_min >= self.bar)


def find_checkpoint(model_dir: Path, checkpoint: str | Path | None, manifest: ModelManifest) -> Path:
    """The PyTorch checkpoint this export came from (see module docstring), sha256-checked."""
    candidates: list[Path] = []
    if checkpoint is not None:
        candidates.append(Path(checkpoint))
    else:
        info_path = model_dir / EXPORT_INFO_NAME
        if info_path.is_file():
            try:
                recorded = json.loads(info_path.read_text()).get("checkpoint")
            except json.JSONDecodeError:
                recorded = None
            if recorded:
                candidates.append(Path(recorded))
        candidates.append(model_dir / "checkpoint.pt")
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        tried = ", ".join(str(p) for p in candidates)
        raise ExportError(f"no PyTorch checkpoint found for {model_dir} (tried {tried}); pass --checkpoint")
    expected = None
    for note in manifest.notes:
        m = re.match(r"source checkpoint sha256 ([0-9a-f]{64})", note)
        if m:
            expected = m.group(1)
    if expected is not None and sha256_file(path) != expected:
        raise ExportError(f"{path}: sha256 differs from the checkpoint {model_dir} was exported from")
    return path


def _dsc_counts(ref: np.ndarray, out: np.ndarray) -> tuple[int, int]:
    return int(np.logical_and(ref, out).sum()), int(ref.sum()) + int(out.sum())


def _dsc(inter: int, total: int) -> float:
    return 1.0 if total == 0 else 2.0 * inter / total


@dataclass
class _Reference:
    slice: PromptedSlice
    feats: list[np.ndarray]
    logits: np.ndarray  # (B, 1, L, L)
    masks: np.ndarray  # (B, H, W) bool


def _box_prompts(boxes: np.ndarray, low: int) -> tuple[np.ndarray, ...]:
    """Decoder inputs for box prompts alone: boxes, no clicks, no mask input."""
    b = boxes.shape[0]
    return (boxes.astype(np.float32), np.zeros((b, 0, 2), np.float32), np.zeros((b, 0), np.float32),
            np.zeros((b, 1, low, low), np.float32), np.zeros((b,), np.float32))


def _pytorch_reference(model, slices: list[PromptedSlice], threshold: float) -> list[_Reference]:
    import torch

    refs = []
    with torch.no_grad():
        for s in slices:
            feats = model.encode(torch.from_numpy(s.image))
            if s.boxes.shape[0]:
                logits, _ = model.decode(*feats, boxes=torch.from_numpy(s.boxes), repeat_image=True)
                logits = logits.numpy()
                masks = postprocess_masks(logits[:, 0], s.transform, threshold)
            else:
                logits = np.zeros((0, 1, 1, 1), np.float32)
                masks = np.zeros((0,) + (s.transform.orig_h, s.transform.orig_w), bool)
            refs.append(_Reference(s, [f.numpy() for f in feats], logits, masks))
    return refs


def _run_variant(res: VariantResult, engine: Engine, refs: list[_Reference], low: int, threshold: float) -> None:
    e_max = l_max = 0.0
    e_sum = l_sum = 0.0
    e_n = l_n = 0
    counts: dict[str, list[int]] = {}
    for r in refs:
        feats = engine.encode(r.slice.image)
        for out, ref in zip(feats, r.feats, strict=True):
            d = np.abs(out - ref)
            e_max = max(e_max, float(d.max()))
            e_sum += float(d.sum(dtype=np.float64))
            e_n += d.size
        c = counts.setdefault(r.slice.case, [0, 0])
        if r.slice.boxes.shape[0] == 0:
            continue
        logits, _ = engine.decode(feats, *_box_prompts(r.slice.boxes, low))
        d = np.abs(logits - r.logits)
        l_max = max(l_max, float(d.max()))
        l_sum += float(d.sum(dtype=np.float64))
        l_n += d.size
        masks = postprocess_masks(logits[:, 0], r.slice.transform, threshold)
        i, t = _dsc_counts(r.masks, masks)
        c[0] += i
        c[1] += t
    res.embed_max, res.embed_mean = e_max, e_sum / max(e_n, 1)
    res.logits_max, res.logits_mean = l_max, l_sum / max(l_n, 1)
    res.dsc = {case: _dsc(i, t) for case, (i, t) in counts.items()}


_ORDER = {"fp32": 0, "fp16": 1, "int8": 2}


def planned_variants(manifest: ModelManifest, bf16: bool) -> list[VariantResult]:
    """One row per (backend, encoder precision), fp32 first; bf16 rows for OpenVINO when asked."""
    variants = sorted(((backend_name(b), p) for b, p in manifest.variants()), key=lambda v: (v[0], _ORDER.get(v[1], 9)))
    out: list[VariantResult] = []
    for backend, precision in variants:
        bar = BARS.get(precision)
        out.append(VariantResult(backend, precision, "f32" if backend == "openvino" else "-", bar))
    if bf16:
        for backend, precision in variants:
            if backend == "openvino":
                out.append(VariantResult(backend, precision, "bf16", None if precision == "int8" else BARS["bf16"]))
    return out


def run_check(
    model_dir: str | Path,
    cases: str | Path | list[Path],
    *,
    checkpoint: str | Path | None = None,
    threads: int = 2,
    max_slices: int = 3,
    max_boxes: int = 64,
    bf16: bool | None = None,
) -> list[VariantResult]:
    """Compare every exported variant in ``model_dir`` with PyTorch; see the module docstring.

    ``bf16=None`` adds bf16 rows when the CPU supports bf16. Unreadable cases are skipped with
    an error logged; at least one case must be usable.
    """
    model_dir = Path(model_dir)
    manifest = read_manifest(model_dir)  # a folder that is not a model fails before torch loads

    import torch
    from lapsam.distill.modeling import load_lapsam

    ckpt = find_checkpoint(model_dir, checkpoint, manifest)
    torch.set_num_threads(threads)
    model = load_lapsam(ckpt)
    pp = manifest.preprocessing
    # min_mask_fill / fill_shape are post-processing rules chosen at export (``lapsam export
    # --min-mask-fill / --fill-shape``), not part of the checkpoint or the graphs: the rest must match
    if replace(model.preprocessing, min_mask_fill=pp.min_mask_fill, fill_shape=pp.fill_shape) != pp:
        raise ExportError(f"{ckpt}: preprocessing {model.preprocessing} differs from the manifest's {pp}")

    slices: list[PromptedSlice] = []
    for _path, sl in iter_case_slices(cases, pp, max_slices=max_slices, max_boxes=max_boxes):
        if isinstance(sl, CaseError):
            log.error("skipping case: %s", sl)
            continue
        slices.extend(sl)
    if not slices:
        raise ExportError(f"no usable case slices in {cases}")
    refs = _pytorch_reference(model, slices, pp.mask_threshold)
    log.info("PyTorch reference: %d slices from %d cases", len(slices), len({s.case for s in slices}))

    if bf16 is None:
        bf16 = cpu_has_bf16()
    results = planned_variants(manifest, bf16)
    low = pp.low_res_size
    for res in results:
        try:
            opts = EngineOptions(backend=res.backend, precision=res.precision, threads=threads,
                                 precision_hint="bf16" if res.execution == "bf16" else "f32")
            _run_variant(res, load_engine(model_dir, manifest, opts), refs, low, pp.mask_threshold)
        except Exception as exc:  # one broken variant must not hide the others' figures
            log.error("%s: %s", res.name, exc)
            res.error = str(exc)
    return results


def format_results(results: list[VariantResult]) -> str:
    head = f"{'variant':<20} {'embed max':>10} {'embed mean':>10} {'logit max':>10} {'logit mean':>10} " \
           f"{'DSC min':>8} {'DSC mean':>8} {'bar':>6}  result"
    lines = [head, "-" * len(head)]
    for r in results:
        if r.error is not None:
            lines.append(f"{r.name:<20} ERROR: {r.error}")
            continue
        bar = "-" if r.bar is None else f"{r.bar:.3f}"
        if r.bar is None:
            verdict = "report" + (f" (target {INT8_TARGET})" if r.precision == "int8" else "")
        else:
            verdict = "pass" if r.passed else "FAIL"
        lines.append(
            f"{r.name:<20} {r.embed_max:>10.2e} {r.embed_mean:>10.2e} {r.logits_max:>10.2e} {r.logits_mean:>10.2e} "
            f"{r.dsc_min:>8.5f} {r.dsc_mean:>8.5f} {bar:>6}  {verdict}"
        )
    worst = {}
    for r in results:
        if r.dsc:
            case = min(r.dsc, key=r.dsc.get)
            worst[r.name] = f"{case} ({r.dsc[case]:.5f})"
    if worst:
        lines.append("")
        lines.append("worst case per variant: " + "; ".join(f"{k}: {v}" for k, v in worst.items()))
    return "\n".join(lines)


def results_json(results: list[VariantResult]) -> list[dict]:
    out = []
    for r in results:
        d = asdict(r)
        d.update(name=r.name, dsc_min=r.dsc_min, dsc_mean=r.dsc_mean, passed=r.passed)
        out.append(d)
    return out
