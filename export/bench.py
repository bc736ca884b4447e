"""``lapsam bench export``: encoder latency per variant x backend x precision, student vs teacher.

Both encoders (random weights: speed does not depend on weight values) are exported with the
same code as ``lapsam export`` (:func:`lapsam.export.exporter.export_encoder_files`) and opened with the
runtime's engine layer (:func:`lapsam.runtime.engines.open_graph`, the sessions ``lapsam predict``
uses), then one image at a time is timed through each file: ONNX Runtime (fp32, int8), OpenVINO with
``INFERENCE_PRECISION_HINT=f32`` (fp32/fp16/int8 IR) and, where the CPU has bf16, with bf16.
PyTorch eager is the first row. All variants of both models are opened first and then run in
interleaved rounds (one run of each per round, so load changes on a shared machine hit all
alike); the median over ``--repeats`` rounds after ``--warmup`` rounds is reported in ms per
image. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lapsam.errors import UsageError

log = logging.getLogger(__name__)


Timed = tuple[str, str, Callable[[], object]]  # (model label, variant, one inference)


def export_random(out: Path, *, backbone: str = "repvit_m0_9", input_size: int = 512, seed: int = 0,
                  backends: Sequence[str] = ("onnx", "openvino"), precisions: Sequence[str] = ("fp32",),
                  simplify: bool = True, name: str | None = None, keep_checkpoint: Path | None = None):
    """A randomly initialised LapSam exported to ``out`` like ``lapsam export`` (``lapsam export random``).

    For speed measurements (speed does not depend on weight values): ``lapsam bench runtime --model out``.
    The checkpoint is written to ``keep_checkpoint`` if given, else to a temporary file removed afterwards.
    Returns the :class:`~lapsam.manifest.ModelManifest`.
    """
    import torch
    from lapsam.distill.modeling import LapSamConfig, StudentConfig, build_lapsam, save_checkpoint

    from .exporter import ExportError, export_model

    torch.manual_seed(seed)
    try:
        model = build_lapsam(LapSamConfig(student=StudentConfig(backbone=backbone, input_size=input_size)))
    except (ValueError, KeyError, RuntimeError) as exc:
        raise ExportError(f"cannot build a {backbone}@{input_size} student: {exc}") from None
    with tempfile.TemporaryDirectory(prefix="lapsam-random-") as tmp:
        ckpt = Path(keep_checkpoint) if keep_checkpoint else Path(tmp) / f"random_{backbone}_{input_size}.pt"
        save_checkpoint(ckpt, model.eval())
        return export_model(ckpt, out, backends=tuple(backends), precisions=tuple(precisions), simplify=simplify,
                            name=name)


def _prepare_encoder(label: str, module, size: int, root: Path, args: argparse.Namespace,
                     calib_cases: Path | None, bf16: bool) -> list[Timed]:
    """Export ``module`` and open every variant; returns one inference callable per variant."""
    import torch
    from lapsam.runtime.engines import EngineOptions, backend_name, open_graph

    from lapsam.manifest import ENCODER_INPUT, Preprocessing

    from .exporter import export_encoder_files

    calib = None
    if args.int8:
        from .slices import calibration_images

        calib = calibration_images(calib_cases, Preprocessing(input_size=size), max_images=args.calib_images)
    t0 = time.perf_counter()
    entries, _ = export_encoder_files(module, size, root, backends=("onnx", "openvino"),
                                      precisions=("fp32", "fp16"), int8=args.int8, calib_images=calib)
    log.info("%s: exported %d encoder files in %.0f s", label, len(entries), time.perf_counter() - t0)
    x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    xt = torch.from_numpy(x)

    def torch_run(module=module, xt=xt):
        with torch.no_grad():
            return module(xt)

    out: list[Timed] = [(label, "pytorch/fp32", torch_run)]
    for e in entries:
        for ex in (["f32", "bf16"] if (e.backend == "openvino" and bf16) else ["f32"]):
            name = f"{backend_name(e.backend)}/{e.precision}"
            name += f"@{ex}" if e.backend == "openvino" else ""
            graph = open_graph(root, e, EngineOptions(backend=e.backend, precision_hint=ex), threads=args.threads)
            feeds = {ENCODER_INPUT: x}
            out.append((label, name, lambda graph=graph, feeds=feeds: graph.run(feeds)))
    return out


def _time_round_robin(timed: list[Timed], warmup: int, repeats: int) -> dict[str, dict[str, float]]:
    """Median ms per callable; runs are interleaved (one of each per round) so that load
    changes on a shared machine hit every variant alike."""
    for _ in range(warmup):
        for _, _, fn in timed:
            fn()
    samples: dict[tuple[str, str], list[float]] = {(lbl, v): [] for lbl, v, _ in timed}
    for _ in tqdm(range(repeats), desc="timing rounds", leave=False):
        for lbl, v, fn in timed:
            t0 = time.perf_counter()
            fn()
            samples[(lbl, v)].append(time.perf_counter() - t0)
    out: dict[str, dict[str, float]] = {}
    for (lbl, v), ts in samples.items():
        out.setdefault(lbl, {})[v] = 1000.0 * statistics.median(ts)
    return out


def run_bench(args: argparse.Namespace) -> int:
    import torch
    from lapsam.distill.modeling import LapSamConfig, StudentConfig, build_lapsam
    from lapsam.runtime.engines import cpu_has_bf16

    from .graphs import EncoderGraph

    if args.int8 and args.calib_cases is None:
        raise UsageError("--int8 needs --calib-cases DIR")
    bf16 = cpu_has_bf16()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="lapsam-bench-export-"))
    torch.manual_seed(0)
    timed: list[Timed] = []
    student = build_lapsam(LapSamConfig(student=StudentConfig(backbone=args.backbone, input_size=args.student_size)))
    s_label = f"student {args.backbone}@{args.student_size}"
    timed += _prepare_encoder(s_label, EncoderGraph(student).eval(), args.student_size, work / "student",
                              args, args.calib_cases, bf16)
    if args.teacher_enabled:
        from lapsam.distill.teacher import Teacher

        teacher = Teacher(args.teacher, None, args.teacher_size).eval()
        t_label = f"teacher {teacher.name}@{args.teacher_size}"
        timed += _prepare_encoder(t_label, teacher, args.teacher_size, work / "teacher", args,
                                  args.calib_cases, bf16)
    torch.set_num_threads(args.threads)
    results = _time_round_robin(timed, args.warmup, args.repeats)
    del timed

    labels = list(results)
    rows = list(dict.fromkeys(k for r in results.values() for k in r))
    print(f"encoder latency, ms per image (median of {args.repeats} interleaved rounds), {args.threads} threads, "
          f"random weights; "
          f"bf16 {'available' if bf16 else 'not available'} on this CPU")
    head = f"{'variant':<24}" + "".join(f"{lbl:>36}" for lbl in labels)
    if len(labels) == 2:
        head += f"{'teacher/student':>17}"
    print(head)
    print("-" * len(head))
    for row in rows:
        vals = [results[lbl].get(row) for lbl in labels]
        line = f"{row:<24}" + "".join(f"{'-' if v is None else f'{v:.1f}':>36}" for v in vals)
        if len(labels) == 2 and None not in vals:
            line += f"{vals[1] / vals[0]:>16.1f}x"
        print(line)
    if args.json is not None:
        args.json.write_text(json.dumps({"threads": args.threads, "repeats": args.repeats, "bf16": bf16,
                                         "ms_per_image": results}, indent=2) + "\n")
    if args.work_dir is None:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0
