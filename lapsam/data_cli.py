"""``lapsam data ...``: look at challenge cases (``inspect``) and convert them to the 2025 format (``to2025``).

Errors that stop a command are raised as :class:`~lapsam.errors.UsageError`: ``lapsam`` reports them
as one ``error: MESSAGE`` line on stderr (exit 2), like every command.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .case import load_case, require_cases
from .errors import CaseError, UsageError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="inspect challenge-format cases (npz)", description="Inspect challenge-format cases.")
    p.set_defaults(part_parser=p)
    dsub = p.add_subparsers(dest="data_command", metavar="<command>")
    ins = dsub.add_parser(
        "inspect",
        help="print format, modality, shape, dtype, spacing and boxes of each case",
        description="Print what each case contains and any validation problem (one line per case). "
        "Exit codes: 0 every case valid, 1 a case has an error (the others are still checked), "
        "2 a path does not exist or holds no .npz.",
    )
    ins.add_argument("paths", type=Path, nargs="+", help=".npz case files or folders of them")
    ins.add_argument("--json", action="store_true", help="one JSON object per case instead of text")
    ins.set_defaults(func=cmd_inspect)
    _register_to2025(dsub)


def _line(s: dict) -> str:
    sp = "-" if s["spacing"] is None else "x".join(f"{v:g}" for v in s["spacing"])
    parts = [
        f"{s['name']}: {s['format']} {s['kind']} {s['modality']}",
        f"shape={tuple(s['shape'])} dtype={s['dtype']} spacing={sp} boxes={s['boxes']}",
    ]
    if s["clicks"] is not None:
        parts.append(f"click-classes={s['clicks']}")
    if s["prev_pred"]:
        parts.append("prev_pred")
    for msg in s["box_errors"].values():
        parts.append(f"| box error: {msg}")
    for w in s["warnings"]:
        parts.append(f"| warning: {w}")
    return " ".join(parts)


def cmd_inspect(args: argparse.Namespace) -> int:
    files = []
    for path in args.paths:
        files.extend(require_cases(path))
    failed = 0
    for f in files:
        try:
            s = load_case(f).summary()
        except Exception as exc:  # noqa: BLE001 - any failure on one case is that case's error
            failed += 1
            problem = exc.problem if isinstance(exc, CaseError) else f"{type(exc).__name__}: {exc}"
            print(json.dumps({"name": f.name, "error": problem}) if args.json else f"{f.name}: ERROR {problem}")
            continue
        print(json.dumps(s) if args.json else _line(s))
    if len(files) > 1:
        print(f"{len(files)} case(s), {len(files) - failed} ok, {failed} with errors")
    return 1 if failed else 0


def _register_to2025(dsub: argparse._SubParsersAction) -> None:
    t = dsub.add_parser(
        "to2025",
        help="build CVPR 2025 interactive-format cases (box dicts) from 2024-format 3D cases and their references",
        description="For every 3D case of INPUT (a .npz or a folder): the per-class box dicts of the 2025 format "
        "(z range, median-voxel middle slice, that slice's 2D box, as the organisers' get_boxes.py) from the "
        "reference. Writes OUT/imgs/<name>.npz (imgs, spacing, boxes) and OUT/gts/<name>.npz (gts relabelled "
        "1..K in box order, spacing). 2D cases are skipped. Exit code 1 if any case failed (the others are written).",
    )
    t.add_argument("input", type=Path, help="a 2024-format 3D case (.npz) or a folder of them")
    t.add_argument("output", type=Path, help="output folder (imgs/ and gts/ are created in it)")
    t.add_argument("-g", "--gts", type=Path, default=None,
                   help="folder of references (key 'gts', same names); default: the 'gts' key of each case")
    t.add_argument("--box-shift", type=int, default=5,
                   help="each box side moves out by a random 0..N pixels at 256 px scale, as the organisers "
                        "(default 5; 0: tight boxes)")
    t.add_argument("--seed", type=int, default=2025, help="seed of the box shifts (default 2025)")
    t.set_defaults(func=cmd_to2025)


def cmd_to2025(args: argparse.Namespace) -> int:
    from .format2025 import convert_to_2025

    if not args.input.exists():
        raise UsageError(f"{args.input} does not exist")
    if args.gts is not None and not args.gts.is_dir():
        raise UsageError(f"reference folder {args.gts} does not exist")
    if args.box_shift < 0:
        raise UsageError("--box-shift must be >= 0")
    s = convert_to_2025(args.input, args.output, args.gts, max_shift=args.box_shift, seed=args.seed,
                        progress=not getattr(args, "quiet", False))
    for name in s.written:
        print(f"{name}: written")
    for name, why in s.skipped.items():
        print(f"{name}: skipped ({why})")
    for name, why in s.failed.items():
        print(f"FAILED {name}: {why}")  # the summary form of lapsam predict
    print(f"{len(s.written)} written to {args.output}/imgs and {args.output}/gts, {len(s.skipped)} skipped, "
          f"{len(s.failed)} failed")
    return 1 if s.failed else 0
