"""``lapsam export model|check|random`` and ``lapsam bench export``.

``lapsam export CHECKPOINT ...`` is short for ``lapsam export model CHECKPOINT ...``: the
command line is rewritten before parsing (:func:`expand_argv`), so the parser itself has three
plain subcommands. Heavy imports (torch, onnx, openvino) happen inside the command functions.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from lapsam.runtime.backends import BACKEND_METAVAR, BACKENDS, backend_arg, file_backend, positive_int

from lapsam.manifest import FILL_SHAPES

log = logging.getLogger(__name__)

SUBCOMMANDS = ("model", "check", "random")

USAGE = (
    "lapsam export model CHECKPOINT --out DIR [options]   (short: lapsam export CHECKPOINT --out DIR)\n"
    "       lapsam export check MODEL_DIR --cases DIR [options]\n"
    "       lapsam export random --backbone NAME --input-size S --out DIR [options]"
)

DESCRIPTION = """\
Turn a LapSam checkpoint into the files the runtime loads, and check them.

  lapsam export model CHECKPOINT --out models/NAME/     (or: lapsam export CHECKPOINT --out ...)
      encoder.onnx + decoder.onnx (fp32, weights inline), OpenVINO IR of both
      (openvino/{encoder,decoder}_{fp32,fp16}.xml/.bin), optionally an INT8 encoder
      (encoder_int8.onnx, openvino/encoder_int8.xml), and manifest.json (preprocessing,
      tensor names and shapes, sha256 of every file, package versions).

  lapsam export check models/NAME --cases DIR
      PyTorch vs every exported variant on slices of real cases with the same box prompts,
      run through the runtime's engines: max/mean abs error of embeddings and mask logits,
      mask DSC; exit code 1 if a bar fails.

  lapsam export random --backbone repvit_m0_9 --input-size 512 --out DIR
      a randomly initialised LapSam exported the same way: a model for speed benchmarks
      (`lapsam bench runtime --model DIR`); its masks mean nothing.

Run `lapsam export <command> --help` for the options of each.
"""


def expand_argv(argv: Sequence[str]) -> list[str]:
    """``lapsam [opts] export CKPT ...`` -> ``lapsam [opts] export model CKPT ...``; anything else unchanged.

    The part name is the first word that is not an option (lapsam's own options take no value).
    """
    out = list(argv)
    i = next((k for k, a in enumerate(out) if not a.startswith("-")), None)
    if i is None or out[i] != "export" or i + 1 >= len(out):
        return out
    word = out[i + 1]
    if word.startswith("-") or word in SUBCOMMANDS:
        return out
    return [*out[: i + 1], "model", *out[i + 1 :]]


def _add_export_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="model folder to write, e.g. models/NAME/")
    p.add_argument("--name", default=None, help="model name recorded in the manifest (default: folder name)")
    p.add_argument("--backend", nargs="+", type=backend_arg, default=list(BACKENDS), metavar=BACKEND_METAVAR,
                   help="backends to export files for (default: both)")
    p.add_argument("--precision", nargs="+", choices=("fp32", "fp16"), default=["fp32"],
                   help="precision of the OpenVINO IR weights (default: fp32); ONNX files are always fp32")
    p.add_argument("--no-simplify", dest="simplify", action="store_false",
                   help="skip onnxslim simplification (by default applied when it removes nodes and "
                   "leaves outputs unchanged)")


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return v


def register(subparsers) -> None:  # type: ignore[no-untyped-def]
    p = subparsers.add_parser(
        "export",
        help="export a checkpoint to ONNX/OpenVINO (+manifest), or check an export against PyTorch",
        usage=USAGE,
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(part_parser=p)
    sub = p.add_subparsers(dest="export_command", metavar="{model,check,random}")

    m = sub.add_parser(
        "model",
        help="export CHECKPOINT to a model folder (short form: lapsam export CHECKPOINT ...)",
        description="Export a LapSam checkpoint to ONNX + OpenVINO IR with a manifest. The output is built "
        "in a hidden temporary folder and moved into --out only when complete; files of a previous "
        "export in --out (those its manifest lists) are replaced, other files are left alone. "
        "`lapsam export CHECKPOINT ...` is the same command.",
    )
    m.add_argument("checkpoint", type=Path, help="LapSam checkpoint (.pt written by lapsam distill)")
    _add_export_options(m)
    m.add_argument("--int8", action="store_true",
                   help="add an INT8 encoder per backend (NNCF post-training quantisation); needs --calib-cases")
    m.add_argument("--calib-cases", type=Path, default=None,
                   help="folder of challenge .npz cases whose slices calibrate the INT8 encoder")
    m.add_argument("--calib-images", type=positive_int, default=32, help="number of calibration slices (default: 32)")
    m.add_argument("--min-mask-fill", type=_fraction, default=None, metavar="F",
                   help="2D boxes: a mask covering less than this fraction of its box is replaced by the box "
                   "(recorded in the manifest's preprocessing; default: 0, off)")
    m.add_argument("--fill-shape", choices=FILL_SHAPES, default=None,
                   help="what replaces such a mask: the whole box, or the ellipse inscribed in it "
                   "(recorded in the manifest's preprocessing; default: box)")
    m.set_defaults(func=_cmd_export)

    c = sub.add_parser(
        "check",
        help="compare each exported variant with PyTorch on real cases",
        description="Run PyTorch and every exported variant on slices of real cases with the same box prompts; "
        "the variants run through the runtime's engine layer (the sessions `lapsam predict` uses). Prints per "
        "variant the max/mean abs error of the embeddings (three encoder maps) and mask logits, and the mask "
        "DSC vs PyTorch (worst case). OpenVINO runs with --ov-precision f32; bf16 rows are added when the CPU "
        "supports bf16. Bars: fp32 >= 0.999, fp16 IR and bf16 >= 0.99, int8 reported (target 0.98). Exit "
        "code 1 when a bar fails. The PyTorch model comes from --checkpoint, else the path recorded in "
        "MODEL_DIR/export_info.json, else MODEL_DIR/checkpoint.pt; its sha256 must match the one in the "
        "manifest notes.",
    )
    c.add_argument("model_dir", type=Path, help="exported model folder (with manifest.json)")
    c.add_argument("--cases", type=Path, required=True, help="folder (or one .npz) of challenge cases")
    c.add_argument("--checkpoint", type=Path, default=None, help="the PyTorch checkpoint the export came from")
    c.add_argument("--threads", type=positive_int, default=2, help="threads for every engine (default: 2)")
    c.add_argument("--max-slices", type=positive_int, default=3, help="slices per 3D case (default: 3)")
    c.add_argument("--max-boxes", type=positive_int, default=64, help="boxes per slice (default: 64)")
    c.add_argument("--no-bf16", dest="bf16", action="store_false", default=None,
                   help="skip the bf16 rows even when the CPU supports bf16")
    c.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    c.set_defaults(func=_cmd_check)

    r = sub.add_parser(
        "random",
        help="export a randomly initialised LapSam (a model for speed benchmarks)",
        description="Build a LapSam with random weights (torch seed --seed) and export it like `lapsam export "
        "model`. Speed does not depend on weight values, so this is what `lapsam bench runtime --model DIR` "
        "measures before a trained model exists; its masks mean nothing.",
    )
    r.add_argument("--backbone", default="repvit_m0_9", help="student backbone (default: repvit_m0_9)")
    r.add_argument("--input-size", type=positive_int, default=512, help="student input size (default: 512)")
    r.add_argument("--seed", type=int, default=0, help="torch seed of the random weights (default: 0)")
    r.add_argument("--checkpoint", type=Path, default=None,
                   help="also keep the random checkpoint here (default: a temporary file, removed)")
    _add_export_options(r)
    r.set_defaults(func=_cmd_random)


def _print_manifest(out: Path, manifest) -> None:  # type: ignore[no-untyped-def]
    print(f"wrote {out / 'manifest.json'}")
    for f in manifest.files:
        size = sum((out / rel).stat().st_size for rel in f.files) / 1e6
        print(f"  {f.role:<8} {f.backend:<9} {f.precision:<5} {f.path:<28} {size:7.1f} MB")
    for note in manifest.notes:
        if "onnxslim" in note:
            print(f"  {note}")


def _cmd_export(args: argparse.Namespace) -> int:
    from .exporter import export_model

    manifest = export_model(
        args.checkpoint,
        args.out,
        backends=tuple(file_backend(b) for b in args.backend),
        precisions=tuple(args.precision),
        int8=args.int8,
        calib_cases=args.calib_cases,
        simplify=args.simplify,
        name=args.name,
        calib_max_images=args.calib_images,
        min_mask_fill=args.min_mask_fill,
        fill_shape=args.fill_shape,
    )
    _print_manifest(args.out, manifest)
    return 0


def _cmd_random(args: argparse.Namespace) -> int:
    from .bench import export_random

    manifest = export_random(args.out, backbone=args.backbone, input_size=args.input_size, seed=args.seed,
                             backends=tuple(file_backend(b) for b in args.backend),
                             precisions=tuple(args.precision), simplify=args.simplify, name=args.name,
                             keep_checkpoint=args.checkpoint)
    _print_manifest(args.out, manifest)
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from .check import format_results, results_json, run_check

    results = run_check(
        args.model_dir,
        args.cases,
        checkpoint=args.checkpoint,
        threads=args.threads,
        max_slices=args.max_slices,
        max_boxes=args.max_boxes,
        bf16=args.bf16,
    )
    print(format_results(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results_json(results), indent=2) + "\n")
    failed = [r.name for r in results if not r.passed]
    if failed:
        log.error("variants below their bar: %s", ", ".join(failed))
        return 1
    return 0


def register_bench(bench_subparsers) -> None:  # type: ignore[no-untyped-def]
    b = bench_subparsers.add_parser(
        "export",
        help="encoder latency of every exported variant: default student vs SAM2.1-Tiny teacher",
        description="Export the default student (random weights) and the SAM2.1-Tiny teacher image encoder "
        "the same way (ONNX fp32, OpenVINO IR fp32/fp16, optional INT8) and time one image through each "
        "encoder variant x backend x execution precision, side by side in one run, opened with the "
        "runtime's engine layer. Prints ms per image.",
    )
    b.add_argument("--backbone", default="repvit_m0_9", help="student backbone (default: repvit_m0_9)")
    b.add_argument("--student-size", type=positive_int, default=512, help="student input size (default: 512)")
    b.add_argument("--teacher", default="sam2.1_hiera_t", help="SAM2 config of the teacher (default: sam2.1_hiera_t)")
    b.add_argument("--teacher-size", type=positive_int, default=1024, help="teacher input size (default: 1024)")
    b.add_argument("--no-teacher", dest="teacher_enabled", action="store_false", help="time the student only")
    b.add_argument("--threads", type=positive_int, default=2, help="threads per engine (default: 2)")
    b.add_argument("--repeats", type=positive_int, default=10, help="timed runs per variant (median reported)")
    b.add_argument("--warmup", type=int, default=2, help="untimed runs first")
    b.add_argument("--int8", action="store_true", help="also quantise the encoders (needs --calib-cases)")
    b.add_argument("--calib-cases", type=Path, default=None, help="cases for INT8 calibration")
    b.add_argument("--calib-images", type=positive_int, default=16, help="calibration slices (default: 16)")
    b.add_argument("--work-dir", type=Path, default=None, help="keep the exported files here (default: temp)")
    b.add_argument("--json", type=Path, default=None, help="also write the figures as JSON here")
    b.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench

    return run_bench(args)


if __name__ == "__main__":  # pragma: no cover
    from lapsam.cli import main

    sys.exit(main(["export", *sys.argv[1:]]))
