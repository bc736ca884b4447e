"""``lapsam export CHECKPOINT --out DIR`` and ``lapsam export check DIR --cases DIR``; ``lapsam bench export``.

The two commands share the word ``export``: its first argument is either the subcommand
``check`` or a checkpoint path (then ``model`` is implied; ``lapsam export model CKPT`` is the
explicit spelling, for a checkpoint file literally named ``check``). Heavy imports (torch,
onnx, openvino) happen inside the command functions.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

USAGE = (
    "lapsam export CHECKPOINT --out DIR [--precision fp32 fp16] [--int8 --calib-cases DIR] [--no-simplify]\n"
    "       lapsam export check MODEL_DIR --cases DIR [--checkpoint CKPT]"
)

DESCRIPTION = """\
Turn a LapSam checkpoint into the files the runtime loads, and check them.

  lapsam export CHECKPOINT --out models/NAME/
      encoder.onnx + decoder.onnx (fp32, weights inline), OpenVINO IR of both
      (openvino/{encoder,decoder}_{fp32,fp16}.xml/.bin), optionally an INT8 encoder
      (encoder_int8.onnx, openvino/encoder_int8.xml), and manifest.json (preprocessing,
      tensor names and shapes, sha256 of every file, package versions).
      Run `lapsam export model --help` for all options.

  lapsam export check models/NAME --cases DIR
      PyTorch vs every exported variant on slices of real cases with the same box prompts:
      max/mean abs error of embeddings and mask logits, mask DSC; exit code 1 if a bar fails.
      Run `lapsam export check --help` for all options.
"""


class _AnyName(dict):
    """``choices`` that let any first word past argparse's choices check (see below)."""

    def __contains__(self, key: object) -> bool:
        return True


class _DefaultSubcommand(argparse._SubParsersAction):
    """Subparsers that treat an unknown first word as the argument of a default subcommand.

    argparse validates the first word against ``choices`` before calling the action, so
    ``choices`` accepts any word; ``__call__`` then inserts ``model`` when the word is not a
    subcommand name.
    """

    default_command = "model"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.choices = _AnyName()

    def __call__(self, parser, namespace, values, option_string=None):
        if values and values[0] not in self._name_parser_map:
            values = [self.default_command, *values]
        super().__call__(parser, namespace, values, option_string)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a checkpoint to ONNX/OpenVINO (+manifest), or check an export against PyTorch",
        usage=USAGE,
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(part_parser=p)
    sub = p.add_subparsers(dest="export_command", metavar="{CHECKPOINT,check}", action=_DefaultSubcommand,
                           prog="lapsam export")

    m = sub.add_parser(
        "model",
        help="(default) export CHECKPOINT to a model folder",
        description="Export a LapSam checkpoint to ONNX + OpenVINO IR with a manifest. The output is built "
        "in a hidden temporary folder and moved into --out only when complete; files of a previous "
        "export in --out (those its manifest lists) are replaced, other files are left alone.",
    )
    m.add_argument("checkpoint", type=Path, help="LapSam checkpoint (.pt written by lapsam distill)")
    m.add_argument("--out", type=Path, required=True, help="model folder to write, e.g. models/NAME/")
    m.add_argument("--name", default=None, help="model name recorded in the manifest (default: folder name)")
    m.add_argument("--backend", nargs="+", choices=("onnx", "openvino"), default=["onnx", "openvino"],
                   help="backends to export (default: both)")
    m.add_argument("--precision", nargs="+", choices=("fp32", "fp16"), default=["fp32"],
                   help="OpenVINO IR weight precisions (default: fp32); ONNX files are always fp32")
    m.add_argument("--int8", action="store_true",
                   help="add an INT8 encoder per backend (NNCF post-training quantisation); needs --calib-cases")
    m.add_argument("--calib-cases", type=Path, default=None,
                   help="folder of challenge .npz cases whose slices calibrate the INT8 encoder")
    m.add_argument("--calib-images", type=int, default=32, help="number of calibration slices (default: 32)")
    m.add_argument("--no-simplify", dest="simplify", action="store_false",
                   help="skip onnxslim simplification (by default applied when it removes nodes and "
                   "leaves outputs unchanged)")
    m.set_defaults(func=_cmd_export)

    c = sub.add_parser(
        "check",
        help="compare each exported variant with PyTorch on real cases",
        description="Run PyTorch and every exported variant on slices of real cases with the same box prompts; "
        "print per variant the max/mean abs error of the embeddings (three encoder maps) and mask logits, "
        "and the mask DSC vs PyTorch (worst case). OpenVINO runs with INFERENCE_PRECISION_HINT=f32; bf16 "
        "rows are added when the CPU supports bf16. Bars: fp32 >= 0.999, fp16 IR and bf16 >= 0.99, int8 "
        "reported (target 0.98). Exit code 1 when a bar fails. The PyTorch model comes from --checkpoint, "
        "else the path recorded in MODEL_DIR/export_info.json, else MODEL_DIR/checkpoint.pt; its sha256 "
        "must match the one in the manifest notes.",
    )
    c.add_argument("model_dir", type=Path, help="exported model folder (with manifest.json)")
    c.add_argument("--cases", type=Path, required=True, help="folder (or one .npz) of challenge cases")
    c.add_argument("--checkpoint", type=Path, default=None, help="the PyTorch checkpoint the export came from")
    c.add_argument("--threads", type=int, default=2, help="threads for every engine (default: 2)")
    c.add_argument("--max-slices", type=int, default=3, help="slices per 3D case (default: 3)")
    c.add_argument("--max-boxes", type=int, default=64, help="boxes per slice (default: 64)")
    c.add_argument("--no-bf16", dest="bf16", action="store_false", default=None,
                   help="skip the bf16 rows even when the CPU supports bf16")
    c.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    c.set_defaults(func=_cmd_check)


def _cmd_export(args: argparse.Namespace) -> int:
    from .api import export_model

    manifest = export_model(
        args.checkpoint,
        args.out,
        backends=tuple(args.backend),
        precisions=tuple(args.precision),
        int8=args.int8,
        calib_cases=args.calib_cases,
        simplify=args.simplify,
        name=args.name,
        calib_max_images=args.calib_images,
    )
    print(f"wrote {args.out / 'manifest.json'}")
    for f in manifest.files:
        size = sum((args.out / rel).stat().st_size for rel in f.files) / 1e6
        print(f"  {f.role:<8} {f.backend:<9} {f.precision:<5} {f.path:<28} {size:7.1f} MB")
    for note in manifest.notes:
        if "onnxslim" in note:
            print(f"  {note}")
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
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def register_bench(bench_subparsers) -> None:
    b = bench_subparsers.add_parser(
        "export",
        help="encoder latency of every exported variant: default student vs SAM2.1-Tiny teacher",
        description="Export the default student (random weights) and the SAM2.1-Tiny teacher image encoder "
        "the same way (ONNX fp32, OpenVINO IR fp32/fp16, optional INT8) and time one image through each "
        "encoder variant x backend x execution precision, side by side in one run. Prints ms per image.",
    )
    b.add_argument("--backbone", default="repvit_m0_9", help="student backbone (default: repvit_m0_9)")
    b.add_argument("--student-size", type=int, default=512, help="student input size (default: 512)")
    b.add_argument("--teacher", default="sam2.1_hiera_t", help="SAM2 config of the teacher (default: sam2.1_hiera_t)")
    b.add_argument("--teacher-size", type=int, default=1024, help="teacher input size (default: 1024)")
    b.add_argument("--no-teacher", dest="teacher_enabled", action="store_false", help="time the student only")
    b.add_argument("--threads", type=int, default=2, help="threads per engine (default: 2)")
    b.add_argument("--repeats", type=int, default=10, help="timed runs per variant (median reported)")
    b.add_argument("--warmup", type=int, default=2, help="untimed runs first")
    b.add_argument("--int8", action="store_true", help="also quantise the encoders (needs --calib-cases)")
    b.add_argument("--calib-cases", type=Path, default=None, help="cases for INT8 calibration")
    b.add_argument("--calib-images", type=int, default=16, help="calibration slices (default: 16)")
    b.add_argument("--work-dir", type=Path, default=None, help="keep the exported files here (default: temp)")
    b.add_argument("--json", type=Path, default=None, help="also write the figures as JSON here")
    b.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench

    return run_bench(args)
