"""``lapsam predict`` (run a model on a folder of cases) and ``lapsam bench runtime``.

Light module: numpy/onnxruntime/openvino are imported inside the commands.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from lapsam.errors import LapsamError

from .backends import BACKEND_METAVAR, OV_PRECISIONS, backend_arg, positive_int

if TYPE_CHECKING:
    from .run import PredictOptions

MODEL_ENV = "LAPSAM_MODEL_DIR"


def default_model_dir() -> Path:
    """``$LAPSAM_MODEL_DIR``, else the bundled ``models/default`` (next to the package), else an error."""
    env = os.environ.get(MODEL_ENV)
    if env:
        return Path(env)
    import lapsam

    bundled = Path(lapsam.__file__).resolve().parents[1] / "models" / "default"
    if (bundled / "manifest.json").is_file():
        return bundled
    raise LapsamError(
        f"no model given: pass --model DIR, set {MODEL_ENV}, or export one to {bundled} "
        "(lapsam export ...)"
    )


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", type=backend_arg, default="openvino", metavar=BACKEND_METAVAR,
                   help="inference engine (default: openvino)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads (default: CPUs available to this process: affinity and cgroup quota)")
    p.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp32",
                   help="which exported files to run: their weight precision (default: fp32)")
    p.add_argument("--ov-precision", dest="precision_hint", choices=OV_PRECISIONS, default=None,
                   help="OpenVINO execution precision, its INFERENCE_PRECISION_HINT (default: f32 on every CPU; "
                        "bf16 is faster on CPUs with AMX/AVX512-BF16, masks differ slightly); independent of --precision")
    p.add_argument("--precision-hint", dest="precision_hint", choices=OV_PRECISIONS, default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)  # the former name of --ov-precision
    p.add_argument("--cache-dir", default=None,
                   help="OpenVINO compiled-model cache folder (default: $LAPSAM_OV_CACHE_DIR; unset: no cache)")


def add_propagation_args(p: argparse.ArgumentParser) -> None:
    """3D propagation options and the progress switch, shared by ``predict`` and ``segment``."""
    p.add_argument("--prompt-3d", choices=("ellipsoid", "given", "propagate"), default="ellipsoid",
                   help="3D boxes: prompt every slice with its cross-section of the ellipsoid inscribed in the "
                   "given box, weak masks replaced by the fill shape (ellipsoid, the default), with the given box "
                   "(given) or with the previous slice's mask box (propagate)")
    p.add_argument("--margin", type=int, default=2,
                   help="3D with --prompt-3d propagate: pixels added around the previous slice's mask box for the next "
                   "prompt (default 2)")
    p.add_argument("--on-empty", choices=("box", "stop"), default="box",
                   help="3D with --prompt-3d propagate: when a mask vanishes, prompt the next slice with the given box "
                   "(default) or stop")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def engine_options(args: argparse.Namespace, **extra: object) -> PredictOptions:
    """:class:`PredictOptions` from :func:`add_engine_args` options (plus ``extra`` fields)."""
    from .run import PredictOptions

    return PredictOptions(backend=args.backend, threads=args.threads, precision=args.precision,  # type: ignore[arg-type]
                          precision_hint=args.precision_hint, cache_dir=args.cache_dir, **extra)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="segment every .npz case of a folder with an exported model (torch-free)",
        description="Run an exported lapsam model on every challenge .npz in INPUT_DIR and write "
        "OUTPUT_DIR/<same name>.npz with key 'segs' (written atomically). 3D cases encode each slice "
        "at most once and propagate every box from its middle slice. The output folder is checked (created, "
        "writable) before the model loads. Exit codes: 0 every case written, 1 a case failed or the model "
        "could not load, 2 bad input/output/model folder, 130/143 stopped by SIGINT/SIGTERM (finished cases kept).",
    )
    p.add_argument("-i", "--input", required=True, type=Path, help="folder of .npz cases (or one .npz file)")
    p.add_argument("-o", "--output", required=True, type=Path, help="folder for the segs .npz files")
    p.add_argument("--model", type=Path, default=None,
                   help=f"exported model folder with manifest.json (default: ${MODEL_ENV}, else models/default)")
    add_engine_args(p)
    p.add_argument("--decoder-batch", type=positive_int, default=16, help="boxes per decoder call (default 16)")
    add_propagation_args(p)
    p.add_argument("--overlap", choices=("nested", "logit"), default="nested",
                   help="where two masks claim a pixel: a box lying wholly inside another box keeps its own mask "
                   "there, otherwise the higher logit wins (nested, default); or the higher logit only (logit)")
    p.add_argument("--timings", action="store_true",
                   help="print the time of each phase (imports, model load steps, read, encoder, decoder, "
                        "write) to stderr, plus one timings-json line; LAPSAM_TIMINGS=1 does the same")
    p.set_defaults(func=cmd_predict, exit_fast=True)


def cmd_predict(args: argparse.Namespace) -> int:
    from lapsam import timings

    with timings.phase("imports: runtime (numpy, lapsam.runtime)"):
        from .engines import read_manifest
        from .run import predict_folder

    model = args.model or default_model_dir()
    with timings.phase("model folder check (manifest.json)"):
        read_manifest(model)  # a folder that is not a model: one error line, exit code 2
    opts = engine_options(args, decoder_batch=args.decoder_batch, margin_px=args.margin, on_empty=args.on_empty,
                          prompt_3d=args.prompt_3d, overlap=args.overlap, progress=not args.no_progress)
    # The loaded engines stay referenced from args until the process ends: `lapsam predict` run as a
    # program then exits without tearing them down (lapsam.cli.main, exit_fast).
    args.keep_alive = []
    summary = predict_folder(args.input, args.output, model, opts, on_loaded=args.keep_alive.append)
    print("\n".join(summary.lines()))
    return summary.exit_code


def register_bench(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser(
        "runtime",
        help="speed of the runtime: engines, per-case wall time, overhead, RSS, naive-pipeline speed-up, cold start",
        description="Build challenge-sized cases (the shapes and object counts of the challenge's validation "
        "cases) by resampling the real cases in demo/data, run them through the predictor and through a naive pipeline (every slice "
        "re-encoded for every box, one decoder call per box and slice) with the same model, each case in a "
        "child process, and print the figures (optionally appending them to BENCHMARKS.md).",
    )
    p.add_argument("--model", type=Path, default=None,
                   help=f"exported model folder (default: ${MODEL_ENV}, else models/default); before a trained "
                        "model exists, `lapsam export random --out DIR` gives one with random weights")
    p.add_argument("--backends", default="openvino,onnxruntime", help="comma list (default: both)")
    p.add_argument("--ov-precisions", default="f32,bf16",
                   help="comma list of OpenVINO execution precisions to try (default f32,bf16; bf16 only "
                        "where the CPU has it)")
    p.add_argument("--hints", dest="ov_precisions", default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)  # the former name of --ov-precisions
    p.add_argument("--cases", default=None,
                   help="comma list of case names to run (e.g. 3DBox_MR_0121,2DBox_US); default: all 14")
    p.add_argument("--quick", action="store_true",
                   help="a small subset (3 light cases), no naive run on 3D cases above 60 (box, slice) pairs")
    p.add_argument("--naive-max-pairs", type=int, default=None,
                   help="skip the naive pipeline on cases with more (box, slice) pairs than this "
                        "(its time is then estimated from the engine timings and marked 'est')")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: available CPUs)")
    p.add_argument("--data", type=Path, default=None, help="folder of real cases to resample (default demo/data/imgs)")
    p.add_argument("--write", type=Path, default=None, help="append the figures as markdown to this file")
    p.add_argument("--note", default="", help="text added to the markdown (machine load, what else ran)")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench

    return run_bench(args)
