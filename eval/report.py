"""One markdown report joining metrics and running time, per case and per modality, with PNG plots.

Inputs: a ``metrics.csv`` (``case,dsc,nsd``, from ``lapsam eval metrics`` or the organisers'
script) and optionally one or two ``NAME_running_time.csv`` (``CaseName,RunningTime``).
Outputs in the report folder: ``report.md``, ``metrics_by_modality.png``, ``time_per_case.png``
and, with a second timing, ``time_a_vs_b.png``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lapsam.modality import parse_modality

from .metrics import OK, OVERALL, MetricsRow, read_metrics_csv
from .tables import atomic_write_text, markdown_table
from .timing import read_timing_csv, timing_label

log = logging.getLogger(__name__)


@dataclass
class ReportRow:
    case: str
    modality: str
    dsc: float
    nsd: float
    status: str
    time_a: float | None
    time_b: float | None

    @property
    def ratio(self) -> float | None:
        if self.time_a is None or self.time_b is None or self.time_a <= 0:
            return None
        return self.time_b / self.time_a


def _key(name: str) -> str:
    return name if name.endswith(".npz") else f"{name}.npz"


def _mean(vals: list[float]) -> float:
    v = [x for x in vals if x is not None and not math.isnan(x)]
    return float(np.mean(v)) if v else float("nan")


def join_rows(metrics: list[MetricsRow], time_a: dict[str, float] | None, time_b: dict[str, float] | None) -> tuple[list[ReportRow], list[str]]:
    """Per-case rows (metrics cases first, then timed-only cases) and notes about mismatches."""
    ta = {_key(k): v for k, v in (time_a or {}).items()}
    tb = {_key(k): v for k, v in (time_b or {}).items()}
    rows = []
    seen = set()
    for m in metrics:
        k = _key(m.case)
        seen.add(k)
        rows.append(ReportRow(m.case, parse_modality(k), m.dsc, m.nsd, m.status, ta.get(k), tb.get(k)))
    notes = []
    timed_only = sorted((set(ta) | set(tb)) - seen)
    for k in timed_only:
        rows.append(ReportRow(k, parse_modality(k), float("nan"), float("nan"), "no metrics", ta.get(k), tb.get(k)))
    if timed_only:
        notes.append(f"{len(timed_only)} timed case(s) have no metrics: {', '.join(timed_only[:10])}")
    if time_a is not None:
        untimed = [r.case for r in rows if r.time_a is None]
        if untimed:
            notes.append(f"{len(untimed)} case(s) have no running time (A): {', '.join(untimed[:10])}")
    return rows, notes


@dataclass
class ModalityRow:
    modality: str
    n: int
    dsc: float
    nsd: float
    time_a: float
    time_b: float
    ratio: float  # total B time / total A time over cases timed by both


def by_modality(rows: list[ReportRow]) -> list[ModalityRow]:
    groups: dict[str, list[ReportRow]] = {}
    for r in rows:
        groups.setdefault(r.modality, []).append(r)

    def one(name: str, items: list[ReportRow]) -> ModalityRow:
        scored = [r for r in items if r.status != "no metrics"]
        both = [r for r in items if r.time_a is not None and r.time_b is not None]
        sa, sb = sum(r.time_a for r in both), sum(r.time_b for r in both)  # type: ignore[misc]
        return ModalityRow(
            name, len(scored), _mean([r.dsc for r in scored]), _mean([r.nsd for r in scored]),
            _mean([r.time_a for r in items if r.time_a is not None]),
            _mean([r.time_b for r in items if r.time_b is not None]),
            sb / sa if both and sa > 0 else float("nan"),
        )

    return [one(m, groups[m]) for m in sorted(groups)] + [one(OVERALL, rows)]


# --------------------------------------------------------------------------- plots

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metrics(mods: list[ModalityRow], rows: list[ReportRow], path: Path) -> Path:
    """Bars of mean DSC and NSD per modality (and overall), with each case as a dot."""
    plt = _plt()
    names = [m.modality for m in mods]
    x = np.arange(len(names))
    w = 0.38
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(names) + 2), 4.5), dpi=110)
    ax.bar(x - w / 2, [0 if math.isnan(m.dsc) else m.dsc for m in mods], w, label="DSC", color="#4C72B0")
    ax.bar(x + w / 2, [0 if math.isnan(m.nsd) else m.nsd for m in mods], w, label="NSD", color="#DD8452")
    rng = np.random.default_rng(0)
    for i, name in enumerate(names):
        items = [r for r in rows if (name == OVERALL or r.modality == name) and r.status != "no metrics"]
        for off, vals in ((-w / 2, [r.dsc for r in items]), (w / 2, [r.nsd for r in items])):
            v = np.array([a for a in vals if not math.isnan(a)])
            if v.size:
                ax.scatter(i + off + rng.uniform(-w / 5, w / 5, v.size), v, s=12, color="black", alpha=0.6, zorder=3)
    for i, m in enumerate(mods):
        ax.text(i, 1.03, f"n={m.n}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, names, rotation=20 if len(names) > 5 else 0)
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("score")
    ax.set_title("DSC and NSD per modality (bars: mean, dots: cases)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_times(rows: list[ReportRow], label_a: str, label_b: str | None, path: Path) -> Path:
    """Horizontal bars: running time per case (A, and B beside it)."""
    plt = _plt()
    timed = [r for r in rows if r.time_a is not None or r.time_b is not None]
    names = [r.case.removesuffix(".npz") for r in timed]
    y = np.arange(len(timed))
    h = 0.4 if label_b else 0.7
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.38 * len(timed) + 1.2)), dpi=110)
    ax.barh(y - (h / 2 if label_b else 0), [r.time_a or 0 for r in timed], h, label=label_a, color="#4C72B0")
    if label_b:
        ax.barh(y + h / 2, [r.time_b or 0 for r in timed], h, label=label_b, color="#DD8452")
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("running time per case (s, docker run wall clock)")
    ax.set_title("Running time per case")
    ax.legend(loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_a_vs_b(rows: list[ReportRow], label_a: str, label_b: str, path: Path) -> Path:
    """Scatter of per-case time B against A, with the y = x line."""
    plt = _plt()
    both = [r for r in rows if r.time_a is not None and r.time_b is not None]
    a = np.array([r.time_a for r in both], float)
    b = np.array([r.time_b for r in both], float)
    fig, ax = plt.subplots(figsize=(5.5, 5), dpi=110)
    mods = sorted({r.modality for r in both})
    for m in mods:
        sel = np.array([r.modality == m for r in both])
        ax.scatter(a[sel], b[sel], label=m, s=30)
    if a.size:
        lo, hi = float(min(a.min(), b.min())) * 0.8, float(max(a.max(), b.max())) * 1.25
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        if hi / max(lo, 1e-9) > 20:
            ax.set_xscale("log")
            ax.set_yscale("log")
        ratio = b.sum() / a.sum() if a.sum() > 0 else float("nan")
        ax.set_title(f"{label_b} vs {label_a}: total B/A = {ratio:.2f}")
    ax.set_xlabel(f"{label_a} (s)")
    ax.set_ylabel(f"{label_b} (s)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- report

def _t(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.2f}"


def build_report(
    metrics_csv: str | Path,
    out_dir: str | Path,
    timing_csv: str | Path | None = None,
    compare_timing_csv: str | Path | None = None,
) -> Path:
    """Write ``report.md`` and its PNGs into ``out_dir``; return the report's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = read_metrics_csv(metrics_csv)
    if not metrics:
        raise ValueError(f"{metrics_csv} holds no cases")
    if compare_timing_csv is not None and timing_csv is None:
        raise ValueError("--compare-timing needs --timing")
    ta = read_timing_csv(timing_csv) if timing_csv else None
    tb = read_timing_csv(compare_timing_csv) if compare_timing_csv else None
    la = timing_label(timing_csv) if timing_csv else None
    lb = timing_label(compare_timing_csv) if compare_timing_csv else None
    if la is not None and la == lb:
        la, lb = f"A: {la}", f"B: {lb}"
    rows, notes = join_rows(metrics, ta, tb)
    mods = by_modality(rows)

    plots = [plot_metrics(mods, rows, out / "metrics_by_modality.png")]
    if ta is not None:
        plots.append(plot_times(rows, la or "A", lb, out / "time_per_case.png"))
    if tb is not None:
        plots.append(plot_a_vs_b(rows, la or "A", lb or "B", out / "time_a_vs_b.png"))

    parts = ["# lapsam evaluation report\n\n", f"- metrics: `{metrics_csv}`\n"]
    if timing_csv:
        parts.append(f"- running time A ({la}): `{timing_csv}`\n")
    if compare_timing_csv:
        parts.append(f"- running time B ({lb}): `{compare_timing_csv}`\n")
    parts += [f"- note: {n}\n" for n in notes]

    mh = ["modality", "cases", "DSC", "NSD"]
    if ta is not None:
        mh.append(f"time {la} (s)")
    if tb is not None:
        mh += [f"time {lb} (s)", "B/A"]
    mrows = []
    for m in mods:
        r: list[object] = [m.modality, str(m.n), m.dsc, m.nsd]
        if ta is not None:
            r.append(_t(m.time_a))
        if tb is not None:
            r += [_t(m.time_b), _t(m.ratio)]
        mrows.append(r)
    note = "Means over cases" + ("; B/A is total B time over total A time" if tb is not None else "") + ".\n\n"
    parts += ["\n## Per modality\n\n", note, markdown_table(mh, mrows)]
    parts.append("\n![DSC and NSD per modality](metrics_by_modality.png)\n")
    if ta is not None:
        parts.append("\n![Running time per case](time_per_case.png)\n")
    if tb is not None:
        parts.append("\n![Running time, B against A](time_a_vs_b.png)\n")

    ch = ["case", "modality", "DSC", "NSD"]
    if ta is not None:
        ch.append(f"{la} (s)")
    if tb is not None:
        ch += [f"{lb} (s)", "B/A"]
    ch.append("status")
    crows = []
    for row in rows:
        c: list[object] = [row.case, row.modality, row.dsc, row.nsd]
        if ta is not None:
            c.append(_t(row.time_a))
        if tb is not None:
            c += [_t(row.time_b), _t(row.ratio)]
        c.append(row.status)
        crows.append(c)
    parts += ["\n## Per case\n\n",
              markdown_table(ch, crows, align_right=[False, False] + [True] * (len(ch) - 3) + [False])]
    failures = [m for m in metrics if m.status != OK]
    if failures:
        parts += ["\n## Failures\n\n"] + [f"- `{m.case}` ({m.status}): {m.error}\n" for m in failures]
    report = atomic_write_text(out / "report.md", "".join(parts))
    log.info("report: %s (%d plots)", report, len(plots))
    return report
