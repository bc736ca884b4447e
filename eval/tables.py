"""Small helpers shared by the eval commands: number formatting, markdown tables, atomic text files."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from lapsam.writers import atomic_write


def fmt(x: Any, digits: int = 4) -> str:
    """A number for a table: fixed decimals, ``nan`` for NaN, ``-`` for None."""
    if x is None:
        return "-"
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.{digits}f}"
    return str(x)


def csv_float(x: float | None, digits: int | None = 4) -> str:
    """A float as pandas would write it after ``np.round(x, digits)``: ``0.9545``, ``1.0``, NaN -> empty."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    v = float(x) if digits is None else round(float(x), digits)
    return repr(v)


def parse_float(s: str) -> float:
    s = (s or "").strip()
    if not s or s.lower() == "nan":
        return float("nan")
    return float(s)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], align_right: Sequence[bool] | None = None) -> str:
    """A GitHub markdown table; cells are formatted with :func:`fmt` unless already strings."""
    cells = [[c if isinstance(c, str) else fmt(c) for c in row] for row in rows]
    if align_right is None:
        align_right = [i > 0 for i in range(len(headers))]
    sep = ["---:" if r else "---" for r in align_right]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(sep) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
    return "\n".join(lines) + "\n"


def text_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain aligned table for the terminal."""
    cells = [[c if isinstance(c, str) else fmt(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    def line(vals: Sequence[str]) -> str:
        return "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(vals, widths, strict=True)))
    out = [line(list(headers)), line(["-" * w for w in widths])]
    out += [line(row) for row in cells]
    return "\n".join(out) + "\n"


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write a text file so that it is either absent, the old one, or complete."""
    with atomic_write(path, "w", encoding="utf-8", newline="") as fp:
        fp.write(text)
    return Path(path)


def atomic_write_texts(files: Mapping[Path, str]) -> list[Path]:
    """Write several text files so that each is the old file or complete, and a failure on any
    of them (disk full, a folder in the way) leaves every one of them as it was."""
    with ExitStack() as stack:
        fps = [(stack.enter_context(atomic_write(p, "w", encoding="utf-8", newline="")), text)
               for p, text in files.items()]
        for fp, text in fps:
            fp.write(text)
    return [Path(p) for p in files]


def csv_text(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(headers)
    for row in rows:
        w.writerow(row)
    return buf.getvalue()


def read_csv_rows(path: str | Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fp:
        return list(csv.DictReader(fp))
