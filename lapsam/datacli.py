"""``lapsam data ...``: look at challenge cases."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .case import list_cases, load_case
from .errors import CaseError


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
        try:
            found = list_cases(path)
        except FileNotFoundError as exc:
            print(f"error: {exc}")
            return 2
        if not found:
            print(f"error: {path}: no .npz files")
            return 2
        files.extend(found)
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
