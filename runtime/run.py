"""Run a predictor over a folder of cases: progress, per-case log, summary, atomic outputs."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from lapsam.case import list_cases, load_case
from lapsam.errors import LapsamError
from lapsam.io import write_segs

from .predictor import Predictor, PredictorConfig

log = logging.getLogger(__name__)


@dataclass
class PredictOptions:
    backend: str = "openvino"
    threads: int | None = None
    precision: str = "fp32"
    precision_hint: str | None = None
    cache_dir: str | None = None
    decoder_batch: int = 16
    margin_px: int = 2
    on_empty: str = "box"
    progress: bool = True


@dataclass
class FolderSummary:
    total: int = 0
    ok: int = 0
    failed: int = 0
    seconds: float = 0.0
    load_seconds: float = 0.0
    failures: dict[str, str] = field(default_factory=dict)
    case_seconds: dict[str, float] = field(default_factory=dict)


def predict_folder(input_dir: str | Path, output_dir: str | Path, model_dir: str | Path, opts: PredictOptions,
                   predictor: Predictor | None = None) -> FolderSummary:
    """Segment every ``.npz`` in ``input_dir`` into ``output_dir``; a failing case does not stop the others."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    summary = FolderSummary()
    try:
        files = list_cases(input_dir)
    except FileNotFoundError as exc:
        raise LapsamError(str(exc)) from None
    summary.total = len(files)
    if not files:
        log.error("%s: no .npz cases", input_dir)
        return summary
    if predictor is None:
        cfg = PredictorConfig(decoder_batch=opts.decoder_batch, margin_px=opts.margin_px, on_empty=opts.on_empty)
        predictor = Predictor.from_model_dir(model_dir, backend=opts.backend, threads=opts.threads,
                                             precision=opts.precision, cache_dir=opts.cache_dir,
                                             precision_hint=opts.precision_hint, config=cfg)
    summary.load_seconds = time.perf_counter() - t0
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bar = tqdm(files, unit="case", disable=not opts.progress or len(files) < 2, dynamic_ncols=True)
    for f in bar:
        bar.set_postfix_str(f.name[:40])
        tc = time.perf_counter()
        try:
            case = load_case(f)
            segs = predictor.predict(case)
            write_segs(out_dir / f"{case.name}.npz", segs, case.num_objects)
        except Exception as exc:  # noqa: BLE001 - one bad case must not stop the others
            summary.failed += 1
            summary.failures[f.name] = str(exc)
            log.error("%s: FAILED: %s", f.name, exc)
            continue
        dt = time.perf_counter() - tc
        summary.ok += 1
        summary.case_seconds[f.name] = dt
        r = predictor.last_report
        extra = ""
        if r is not None:
            extra = f" (encoder calls {r.encoder_calls}, decoder calls {r.decoder_calls}"
            if r.skipped_boxes:
                extra += f", skipped boxes {sorted(i + 1 for i in r.skipped_boxes)}"
            extra += ")"
        log.info("%s: %.2f s%s", f.name, dt, extra)
    summary.seconds = time.perf_counter() - t0
    log.info("%d case(s): %d ok, %d failed; total %.2f s (model load %.2f s)", summary.total, summary.ok,
             summary.failed, summary.seconds, summary.load_seconds)
    for name, why in summary.failures.items():
        log.error("failed: %s: %s", name, why)
    return summary
