"""``lapsam eval model``: a model on a folder of cases, next to the trivial box-fill reference.

For a cases folder with ``imgs/`` and ``gts/`` (the challenge layout) it

1. segments every case with the exported model through the torch-free runtime (the code
   ``lapsam predict`` runs), timing each case;
2. builds the "box-fill" reference: every pixel inside each box is that box's label (for 3D,
   every slice of its z-range; later boxes overwrite earlier ones, as in ``segs``), and the
   "ellipse-fill" reference: every pixel inside the ellipse inscribed in each 2D box, or the
   ellipsoid inscribed in each 3D box (a stronger trivial answer: round objects fill pi/4 of
   their box);
3. scores both with the organisers' metrics (:mod:`lapsam.eval.metrics`, challenge mode);
4. writes ``OUT/model_vs_boxfill.md`` and ``.csv`` (case, DSC, NSD, seconds, box-fill DSC and
   NSD, ellipse-fill DSC; means per modality and overall) and one PNG per case in ``OUT/png/``: a slice (for 3D
   the one with the most reference pixels) with the reference's contours in green and the
   prediction's in magenta;

and prints the table. ``make demo`` runs it on ``demo/data``. Exit code 1 when a case failed.
"""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lapsam.case import Case, list_cases, load_case
from lapsam.writers import atomic_write, write_segs

from .metrics import MetricsConfig, evaluate_folder

if TYPE_CHECKING:
    from lapsam.runtime.run import PredictOptions

log = logging.getLogger(__name__)


def boxfill_segs(case: Case) -> np.ndarray:
    """Box-fill prediction of a case: each box filled with its label (inclusive bounds)."""
    segs = case.empty_segs()
    for i in case.valid_box_indices:
        b = [int(v) for v in case.boxes[i]]
        if case.is_3d:
            x0, y0, z0, x1, y1, z1 = b
            segs[z0:z1 + 1, y0:y1 + 1, x0:x1 + 1] = i + 1
        else:
            x0, y0, x1, y1 = b
            segs[y0:y1 + 1, x0:x1 + 1] = i + 1
    return segs


def ellipsefill_segs(case: Case) -> np.ndarray:
    """Ellipse-fill prediction of a case: each box's inscribed ellipse (2D) or ellipsoid (3D) filled
    with its label; centre at the box's centre, semi-axes half its side in pixels (inclusive bounds),
    a pixel in when its centre lies on or inside; later boxes overwrite earlier ones."""
    segs = case.empty_segs()
    for i in case.valid_box_indices:
        b = [int(v) for v in case.boxes[i]]
        lo, hi = (b[:3], b[3:]) if case.is_3d else (b[:2], b[2:])
        # per axis (x, y[, z]): squared distance from the centre in semi-axes
        terms = [((np.arange(a, c + 1) - (a + c) / 2) / ((c - a + 1) / 2)) ** 2 for a, c in zip(lo, hi)]
        if case.is_3d:
            tx, ty, tz = terms
            inside = tz[:, None, None] + ty[None, :, None] + tx[None, None, :] <= 1.0
            view = segs[lo[2]:hi[2] + 1, lo[1]:hi[1] + 1, lo[0]:hi[0] + 1]
        else:
            tx, ty = terms
            inside = ty[:, None] + tx[None, :] <= 1.0
            view = segs[lo[1]:hi[1] + 1, lo[0]:hi[0] + 1]
        view[inside[tuple(slice(0, n) for n in view.shape)]] = i + 1
    return segs


@dataclass
class Row:
    case: str
    modality: str
    dsc: float
    nsd: float
    seconds: float
    box_dsc: float
    box_nsd: float
    status: str
    ell_dsc: float = math.nan


def _fmt(v: float, nd: int = 3) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{nd}f}"


def _mean(vals: list[float]) -> float:
    vals = [v for v in vals if not math.isnan(v)]
    return float(np.mean(vals)) if vals else math.nan


def summary_rows(rows: list[Row]) -> list[Row]:
    """Per-modality means, then the overall mean (plain means over cases)."""
    out = []
    mods = sorted({r.modality for r in rows})
    groups = [(f"mean {m} ({sum(r.modality == m for r in rows)})", [r for r in rows if r.modality == m]) for m in mods]
    groups.append((f"mean, all {len(rows)} cases", rows))
    for name, rs in groups:
        out.append(Row(name, "", _mean([r.dsc for r in rs]), _mean([r.nsd for r in rs]),
                       _mean([r.seconds for r in rs]), _mean([r.box_dsc for r in rs]), _mean([r.box_nsd for r in rs]), "",
                       _mean([r.ell_dsc for r in rs])))
    return out


def render_table(rows: list[Row]) -> str:
    head = ("| case | DSC | NSD | seconds | box-fill DSC | box-fill NSD | DSC - box-fill | ellipse-fill DSC |\n"
            "|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows + summary_rows(rows):
        diff = r.dsc - r.box_dsc if not (math.isnan(r.dsc) or math.isnan(r.box_dsc)) else math.nan
        name = r.case if not r.status or r.status == "ok" else f"{r.case} ({r.status})"
        lines.append(f"| {name} | {_fmt(r.dsc, 4)} | {_fmt(r.nsd, 4)} | {_fmt(r.seconds, 2)} | {_fmt(r.box_dsc, 4)} | "
                     f"{_fmt(r.box_nsd, 4)} | {'-' if math.isnan(diff) else f'{diff:+.4f}'} | {_fmt(r.ell_dsc, 4)} |")
    return head + "\n".join(lines) + "\n"


def _contour_png(path: Path, case: Case, gt: np.ndarray, pred: np.ndarray, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if case.is_3d:
        area = (gt > 0).reshape(gt.shape[0], -1).sum(1)
        z = int(np.argmax(area))
        img, g, p = case.image[z], gt[z], pred[z]
        title += f" (slice {z})"
    else:
        img, g, p = case.image, gt, pred
    step = max(1, int(math.ceil(max(img.shape[:2]) / 1024)))  # keep the PNG small for huge 2D images
    img, g, p = img[::step, ::step], g[::step, ::step], p[::step, ::step]
    h, w = img.shape[:2]
    fig = plt.figure(figsize=(6.0, 6.0 * h / w + 0.5), dpi=100)
    ax = fig.add_axes([0, 0, 1, 1 - 0.5 / (6.0 * h / w + 0.5)])
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None, interpolation="nearest")
    for lab in np.unique(g[g > 0]):
        ax.contour(g == lab, levels=[0.5], colors=["lime"], linewidths=1.0)
    for lab in np.unique(p[p > 0]):
        ax.contour(p == lab, levels=[0.5], colors=["magenta"], linewidths=1.0, linestyles="dashed")
    ax.set_axis_off()
    fig.suptitle(title + "  (green: reference, magenta: prediction)", fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as fp:
        fig.savefig(fp, format="png")
    plt.close(fig)


def evaluate_model(cases_dir: str | Path, out_dir: str | Path, model_dir: str | Path,
                   opts: PredictOptions | None = None, pngs: bool = True) -> tuple[list[Row], int]:
    """Run the steps of the module doc with ``lapsam predict``'s options; returns (rows, failed cases)."""
    from lapsam.runtime.run import PredictOptions, predict_folder

    cases_dir, out = Path(cases_dir), Path(out_dir)
    imgs = cases_dir / "imgs" if (cases_dir / "imgs").is_dir() else cases_dir
    gts = cases_dir / "gts" if (cases_dir / "gts").is_dir() else cases_dir.parent / "gts"
    if not gts.is_dir():
        raise FileNotFoundError(f"{cases_dir}: no gts/ folder with references")
    files = list_cases(imgs)
    if not files:
        raise FileNotFoundError(f"{imgs}: no .npz cases")
    out.mkdir(parents=True, exist_ok=True)
    summary = predict_folder(imgs, out / "segs", model_dir, opts or PredictOptions())
    for f in files:
        try:
            case = load_case(f)
            write_segs(out / "boxfill" / f.name, boxfill_segs(case), case.num_objects)
            write_segs(out / "ellipsefill" / f.name, ellipsefill_segs(case), case.num_objects)
        except Exception as exc:  # noqa: BLE001 - reported by the metrics as a failed box-fill
            log.error("%s: box-fill: %s", f.name, exc)
    cfg = MetricsConfig(mode="challenge")
    model_res = {r.case: r for r in evaluate_folder(out / "segs", gts, cfg, progress=False).cases}
    box_res = {r.case: r for r in evaluate_folder(out / "boxfill", gts, cfg, progress=False).cases}
    ell_res = {r.case: r for r in evaluate_folder(out / "ellipsefill", gts, cfg, progress=False).cases}
    rows: list[Row] = []
    for name in sorted(model_res):
        m, b, e = model_res[name], box_res.get(name), ell_res.get(name)
        rows.append(Row(name[:-4] if name.endswith(".npz") else name, m.modality, m.dsc, m.nsd,
                        summary.case_seconds.get(name, math.nan), b.dsc if b else math.nan,
                        b.nsd if b else math.nan, m.status, e.dsc if e else math.nan))
        if pngs and m.status == "ok":
            try:
                case = load_case(imgs / name)
                from lapsam.safe_npz import load_npz

                gt = load_npz(gts / name)["gts"]
                pred = load_npz(out / "segs" / name)["segs"]
                _contour_png(out / "png" / f"{case.name}.png", case, gt, pred, f"{case.name}: DSC {m.dsc:.3f}")
            except Exception as exc:  # noqa: BLE001 - a picture must not fail the evaluation
                log.warning("%s: no PNG: %s", name, exc)
    failed = summary.failed + sum(r.status != "ok" for r in model_res.values() if r.case not in summary.failures)
    table = render_table(rows)
    with atomic_write(out / "model_vs_boxfill.md", "w") as fp:
        fp.write(f"Model `{model_dir}` on `{cases_dir}` (challenge-mode metrics; box-fill: every pixel of each box; "
                 "ellipse-fill: every pixel of the ellipse / ellipsoid inscribed in each box)\n\n")
        fp.write(table)
    with atomic_write(out / "model_vs_boxfill.csv", "w") as fp:
        w = csv.writer(fp)
        w.writerow(["case", "modality", "dsc", "nsd", "seconds", "boxfill_dsc", "boxfill_nsd", "status",
                    "ellipsefill_dsc"])
        for r in rows:
            w.writerow([r.case, r.modality, f"{r.dsc:.4f}", f"{r.nsd:.4f}", f"{r.seconds:.3f}", f"{r.box_dsc:.4f}",
                        f"{r.box_nsd:.4f}", r.status, f"{r.ell_dsc:.4f}"])
    return rows, failed
