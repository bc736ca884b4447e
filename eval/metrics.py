"""DSC and NSD per case and per label, as the CVPR 2024 organisers compute them, or exactly.

Two modes:

``challenge`` (default) reproduces ``evaluation/compute_metrics.py`` + ``SurfaceDice.py``:

* labels ``1..max(gt)``; per label DSC = 2|A∩B|/(|A|+|B|), NaN when both masks are empty;
  case DSC = plain mean over labels (one NaN label makes the case NaN);
* NSD (tolerance 2.0) only when the case DSC > 0.2 (a NaN DSC is not), else the case NSD is 0;
* 2D cases are scored as one-slice 3D slabs (trailing singleton axis) with spacing [1, 1, 1],
  so every foreground pixel is a surface element (a lenient "2D NSD");
* 3D cases get ``spacing`` in the order it is stored (x, y, z) against (z, y, x) arrays;
* CSV values rounded to 4 decimals (columns ``case,dsc,nsd``, sorted by case).

``exact`` is the metric people think they get: 2D cases as true 2D contours (spacing 1, 1),
3D spacing reordered to the array's (z, y, x) axes, NSD computed for every label whatever the
DSC, and labels empty in both masks left out of the case mean (NaN only if all are).

Both modes call DeepMind's ``surface-distance`` package (via :mod:`.surface_compat`). A missing
or unreadable prediction, a missing ``segs`` key, a wrong shape: the case is a failure scored 0
(the organisers' evaluation would have crashed or scored nothing), never an exception. An
unreadable reference is a ``gt_error`` case: NaN, reported, left out of the means.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from lapsam.case import list_cases
from lapsam.errors import CaseError, LapsamError
from lapsam.modality import parse_modality, split_name
from lapsam.safe_npz import load_npz
from lapsam.writers import check_output_file

from .surface_compat import surface_metrics
from .tables import (
    atomic_write_texts,
    csv_float,
    csv_text,
    markdown_table,
    parse_float,
    read_csv_rows,
    text_table,
)

log = logging.getLogger(__name__)

MODES: tuple[str, ...] = ("challenge", "exact")
OK, FAILED, GT_ERROR = "ok", "failed", "gt_error"
NSD_DSC_THRESHOLD = 0.2  # the organisers compute NSD only above this case DSC


@dataclass(frozen=True)
class MetricsConfig:
    """How cases are scored."""

    mode: str = "challenge"
    tolerance: float = 2.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not (self.tolerance >= 0 and math.isfinite(self.tolerance)):
            raise ValueError(f"tolerance must be a finite number >= 0, got {self.tolerance}")


@dataclass
class LabelScore:
    label: int
    dsc: float
    nsd: float | None  # None: not computed (challenge mode, case DSC <= 0.2)


@dataclass
class CaseResult:
    """Scores of one case. ``case`` is the file name (``X.npz``) as in the organisers' CSV."""

    case: str
    modality: str
    kind: str
    dsc: float
    nsd: float
    labels: list[LabelScore] = field(default_factory=list)
    status: str = OK
    error: str | None = None
    warnings: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- scoring arrays

def _nanmean(values: Sequence[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def _plain_mean(values: Sequence[float]) -> float:
    # np.mean([]) is NaN (with a warning); the organisers' code gives NaN for a gt without labels.
    return float(np.mean(values)) if len(values) else float("nan")


def label_dsc(mask_gt: np.ndarray, mask_pred: np.ndarray) -> float:
    """DSC of two boolean masks (the package's ``compute_dice_coefficient``): NaN when both are empty."""
    return float(surface_metrics().compute_dice_coefficient(mask_gt, mask_pred))


def label_nsd(mask_gt: np.ndarray, mask_pred: np.ndarray, spacing: Sequence[float], tolerance: float = 2.0) -> float:
    """NSD of two boolean masks (2D or 3D, ``spacing`` per array axis) with DeepMind's surface-distance.

    0 when exactly one mask is empty; NaN when both are (0/0, returned without the warning).
    """
    if not mask_gt.any() and not mask_pred.any():
        return float("nan")
    sd = surface_metrics()
    dist = sd.compute_surface_distances(mask_gt, mask_pred, spacing_mm=tuple(float(s) for s in spacing))
    return float(sd.compute_surface_dice_at_tolerance(dist, tolerance))


def score_arrays(
    gt: np.ndarray,
    seg: np.ndarray,
    *,
    is_3d: bool,
    spacing: Sequence[float] | None = None,
    config: MetricsConfig = MetricsConfig(),
) -> tuple[float, float, list[LabelScore]]:
    """Case DSC, case NSD and per-label scores for one reference/prediction pair.

    ``gt`` and ``seg`` have the same shape: (D, H, W) for 3D, (H, W) for 2D. ``spacing`` is the
    3D spacing as stored in the case file (x, y, z); it is ignored for 2D.
    """
    if gt.shape != seg.shape:
        raise ValueError(f"shape mismatch: gt {gt.shape} vs seg {seg.shape}")
    for what, arr in (("gt", gt), ("seg", seg)):
        if arr.dtype.kind not in "biu":
            raise ValueError(f"{what} has dtype {arr.dtype}; expected integer labels")
        if arr.size and arr.dtype.kind == "i" and int(arr.min()) < 0:
            raise ValueError(f"{what} has negative labels")
    if is_3d and gt.ndim != 3:
        raise ValueError(f"3D case needs 3D arrays, got shape {gt.shape}")
    if not is_3d and gt.ndim != 2:
        raise ValueError(f"2D case needs 2D arrays, got shape {gt.shape}")
    # int(): numpy 2 keeps uint8 in gt.max() + 1, which wraps to 0 at label 255.
    n_labels = int(gt.max()) if gt.size else 0
    labels = range(1, n_labels + 1)
    # Per-label DSC from voxel counts in one pass (2|A∩B| / (|A| + |B|), NaN when both are empty,
    # as compute_dice_coefficient): a label absent from both masks is never visited, so one stray
    # large label (65535 in a uint16 CT) costs nothing instead of 65535 full-volume passes.
    dsc_values, present = _label_dscs(gt, seg, n_labels)
    sp3 = tuple(float(s) for s in (spacing if spacing is not None else (1.0, 1.0, 1.0)))

    if config.mode == "challenge":
        if is_3d:
            nsd_gt, nsd_seg, nsd_spacing = gt, seg, sp3  # stored order (x, y, z), as the organisers pass it
        else:
            nsd_gt, nsd_seg, nsd_spacing = gt[..., None], seg[..., None], (1.0, 1.0, 1.0)
    else:
        if is_3d:
            nsd_gt, nsd_seg, nsd_spacing = gt, seg, (sp3[2], sp3[1], sp3[0])  # (z, y, x) like the array
        else:
            nsd_gt, nsd_seg, nsd_spacing = gt, seg, (1.0, 1.0)

    dscs: list[float] = dsc_values.tolist()

    def nsd_of(i: int) -> float:
        return label_nsd(nsd_gt == i, nsd_seg == i, nsd_spacing, config.tolerance)

    if config.mode == "challenge":
        dsc = _plain_mean(dscs)
        if dsc > NSD_DSC_THRESHOLD:  # NaN > 0.2 is False: NSD 0, as in compute_metrics.py
            # (DSC > 0.2 means no label was NaN, i.e. every label 1..max(gt) is present.)
            nsds: list[float | None] = [nsd_of(i) for i in labels]
            nsd = _plain_mean([v for v in nsds if v is not None])
        else:
            nsds = [None] * len(dscs)
            nsd = 0.0
    else:
        nsds = [float("nan")] * len(dscs)
        for i in present:  # labels absent from both masks stay NaN without being visited
            nsds[i - 1] = nsd_of(int(i))
        dsc = _nanmean(dscs)
        nsd = _nanmean([v for v in nsds if v is not None])
    per_label = [LabelScore(i, d, n) for i, d, n in zip(labels, dscs, nsds, strict=True)]
    return dsc, nsd, per_label


def _label_counts(arr: np.ndarray, n: int) -> np.ndarray:
    """Number of elements equal to each label 0..n (labels above n ignored), in one pass."""
    flat = arr.ravel()
    if flat.size and int(flat.max()) > n:
        flat = flat[flat <= n]
    if flat.dtype.kind == "b" or flat.dtype == np.uint64:
        flat = flat.astype(np.int64)
    return np.bincount(flat, minlength=n + 1)[: n + 1]


def _label_dscs(gt: np.ndarray, seg: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """DSC of labels 1..n (NaN where a label is in neither array) and the labels present in either.

    Both arrays hold non-negative integer labels (checked when read).
    """
    sums = _label_counts(gt, n) + _label_counts(seg, n)
    inter = _label_counts(gt[gt == seg], n)
    present = np.flatnonzero(sums[1:] > 0) + 1
    dscs = np.full(n, np.nan)
    dscs[present - 1] = 2.0 * inter[present] / sums[present]
    return dscs, present


# --------------------------------------------------------------------------- one case from files

MAX_LABEL = 65535  # the largest label a segs file can hold (uint16)

def _kind_of(name: str, gt: np.ndarray) -> str:
    tag, _ = split_name(name)
    if tag is not None:
        return tag
    return "3D" if gt.ndim == 3 else "2D"


def _read_gt(path: Path) -> tuple[np.ndarray, tuple[float, float, float] | None]:
    arrays = load_npz(path)
    if "gts" not in arrays:
        raise CaseError(path, f"no 'gts' key (keys present: {sorted(arrays)})")
    gt = np.asarray(arrays["gts"])
    if gt.dtype == bool:
        gt = gt.astype(np.uint8)
    elif gt.dtype.kind == "f":
        if not (np.isfinite(gt).all() and np.all(np.floor(gt) == gt)):
            raise CaseError(path, f"'gts' has non-integer float values (dtype {gt.dtype})")
        gt = gt.astype(np.int64)
    elif gt.dtype.kind not in "iu":
        raise CaseError(path, f"'gts' has dtype {gt.dtype}; expected integer labels")
    if gt.size and int(gt.min()) < 0:
        raise CaseError(path, "'gts' has negative labels")
    if gt.size and int(gt.max()) > MAX_LABEL:
        raise CaseError(path, f"'gts' has label {int(gt.max())}, above {MAX_LABEL} (the most a segs file can hold)")
    spacing = None
    if "spacing" in arrays:
        sp = np.asarray(arrays["spacing"])
        if sp.dtype.kind in "iuf" and sp.size == 3 and np.all(np.isfinite(sp)) and np.all(sp > 0):
            spacing = tuple(float(s) for s in sp.ravel())
        else:
            raise CaseError(path, f"'spacing' must be 3 positive numbers, got {sp.tolist()!r}")
    return gt, spacing  # type: ignore[return-value]


def _read_seg(path: Path, shape: tuple[int, ...], warnings: list[str] | None = None) -> np.ndarray:
    """The prediction's labels: integers >= 0 of the reference's shape (a float array of whole
    numbers is accepted with a warning); anything else is a :class:`CaseError`."""
    if not path.exists():
        raise CaseError(path, "prediction file is missing")
    arrays = load_npz(path)
    if "segs" not in arrays:
        raise CaseError(path, f"no 'segs' key (keys present: {sorted(arrays)})")
    seg = np.asarray(arrays["segs"])
    if seg.dtype == bool:
        seg = seg.astype(np.uint8)
    if seg.dtype.kind not in "iuf":
        raise CaseError(path, f"'segs' has dtype {seg.dtype}; expected integer labels")
    if seg.shape != shape:
        raise CaseError(path, f"'segs' has shape {seg.shape}; the reference has {shape}")
    if seg.dtype.kind == "f":
        if not np.isfinite(seg).all():
            raise CaseError(path, f"'segs' has NaN or infinite values (dtype {seg.dtype}); expected integer labels")
        if not np.all(np.floor(seg) == seg):
            raise CaseError(path, f"'segs' has non-integer values (dtype {seg.dtype}); expected integer labels")
        if seg.size and (float(seg.min()) < 0 or float(seg.max()) > MAX_LABEL):
            raise CaseError(path, f"'segs' has labels outside 0..{MAX_LABEL}")
        if warnings is not None:
            warnings.append(f"prediction: 'segs' has dtype {seg.dtype}; its whole-number values are read as labels")
        seg = seg.astype(np.int64)
    if seg.size and int(seg.min()) < 0:
        raise CaseError(path, f"'segs' has negative labels (min {int(seg.min())})")
    return seg


def _why(exc: BaseException) -> str:
    """The problem without the file name (the case column already names the file)."""
    return exc.problem if isinstance(exc, CaseError) else str(exc)


def evaluate_case(gt_path: str | Path, seg_path: str | Path, config: MetricsConfig = MetricsConfig()) -> CaseResult:
    """Score one prediction file against one reference file. Never raises for bad files."""
    gt_path, seg_path = Path(gt_path), Path(seg_path)
    name = gt_path.name
    modality = parse_modality(name)
    try:
        gt, spacing = _read_gt(gt_path)
    except (CaseError, OSError) as exc:
        return CaseResult(name, modality, split_name(name)[0] or "?", math.nan, math.nan, status=GT_ERROR,
                          error=f"reference: {_why(exc)}")
    kind = _kind_of(name, gt)
    warnings: list[str] = []
    if (kind == "3D" and gt.ndim != 3) or (kind == "2D" and gt.ndim != 2):
        return CaseResult(name, modality, kind, math.nan, math.nan, status=GT_ERROR,
                          error=f"reference: {kind} case with 'gts' of shape {gt.shape}")
    if kind == "3D" and spacing is None:
        warnings.append("reference has no spacing; (1, 1, 1) assumed")
        log.warning("%s: reference has no spacing; (1, 1, 1) assumed", name)
    try:
        seg = _read_seg(seg_path, gt.shape, warnings)
    except (CaseError, OSError) as exc:
        return CaseResult(name, modality, kind, 0.0, 0.0, status=FAILED, error=f"prediction: {_why(exc)}",
                          warnings=warnings)
    try:
        dsc, nsd, labels = score_arrays(gt, seg, is_3d=kind == "3D", spacing=spacing, config=config)
    except (ValueError, MemoryError) as exc:
        return CaseResult(name, modality, kind, 0.0, 0.0, status=FAILED, error=f"prediction: {exc}",
                          warnings=warnings)
    return CaseResult(name, modality, kind, dsc, nsd, labels, warnings=warnings)


def _evaluate_job(job: tuple[str, str, MetricsConfig]) -> CaseResult:
    return evaluate_case(job[0], job[1], job[2])


@dataclass
class FolderResult:
    """All cases of a reference folder, plus prediction files that match no reference."""

    cases: list[CaseResult]
    config: MetricsConfig
    unmatched: list[str] = field(default_factory=list)


def evaluate_folder(
    segs_dir: str | Path,
    gts_dir: str | Path,
    config: MetricsConfig = MetricsConfig(),
    workers: int = 1,
    progress: bool = True,
) -> FolderResult:
    """Score every reference ``.npz`` of ``gts_dir`` against the same name in ``segs_dir``."""
    segs_dir, gts_dir = Path(segs_dir), Path(gts_dir)
    if not gts_dir.is_dir():
        raise FileNotFoundError(f"reference folder {gts_dir} does not exist")
    if not segs_dir.is_dir():
        raise FileNotFoundError(f"prediction folder {segs_dir} does not exist")
    gts = list_cases(gts_dir)
    if not gts:
        raise FileNotFoundError(f"no .npz reference files in {gts_dir}")
    jobs = [(str(g), str(segs_dir / g.name), config) for g in gts]
    from tqdm import tqdm

    bar = dict(total=len(jobs), desc=f"metrics ({config.mode})", unit="case", disable=not progress)
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
            results = list(tqdm(pool.map(_evaluate_job, jobs), **bar))
    else:
        results = [_evaluate_job(j) for j in tqdm(jobs, **bar)]
    names = {g.name for g in gts}
    unmatched = sorted(p.name for p in list_cases(segs_dir) if p.name not in names)
    for r in results:
        if r.status != OK:
            log.error("%s: %s", r.case, r.error)
    if unmatched:
        log.warning("%d prediction file(s) match no reference: %s", len(unmatched), ", ".join(unmatched[:10]))
    return FolderResult(sorted(results, key=lambda r: r.case), config, unmatched)


# --------------------------------------------------------------------------- summaries

@dataclass
class GroupSummary:
    """Means over the cases of one modality (or all: ``Overall``)."""

    group: str
    n: int
    dsc: float
    nsd: float
    n_failed: int = 0
    n_nan: int = 0


OVERALL = "Overall"


def _r4(x: float) -> float:
    return x if math.isnan(x) else round(x, 4)


def summarize(cases: Iterable[CaseResult]) -> list[GroupSummary]:
    """Per-modality means and the overall mean, from the 4-decimal case values the CSV holds.

    Failed cases count (as 0); ``gt_error`` cases are left out; a NaN value is skipped in its
    own column (as a pandas mean does), and counted in ``n_nan``.
    """
    scored = [c for c in cases if c.status != GT_ERROR]
    groups: dict[str, list[CaseResult]] = {}
    for c in scored:
        groups.setdefault(c.modality, []).append(c)

    def one(name: str, items: list[CaseResult]) -> GroupSummary:
        return GroupSummary(
            name,
            len(items),
            _nanmean([_r4(c.dsc) for c in items]),
            _nanmean([_r4(c.nsd) for c in items]),
            sum(c.status == FAILED for c in items),
            sum(math.isnan(c.dsc) for c in items),
        )

    out = [one(m, groups[m]) for m in sorted(groups)]
    out.append(one(OVERALL, scored))
    return out


# --------------------------------------------------------------------------- files

def sibling(path: Path, suffix: str, ext: str) -> Path:
    """``metrics.csv`` -> ``metrics_labels.csv`` / ``metrics.md``."""
    return path.with_name(f"{path.stem}{suffix}{ext}")


def summary_rows(summary: list[GroupSummary]) -> list[list[object]]:
    return [[s.group, str(s.n), s.dsc, s.nsd, str(s.n_failed), str(s.n_nan)] for s in summary]


SUMMARY_HEADERS = ("modality", "cases", "DSC", "NSD", "failed", "NaN DSC")


def render_markdown(result: FolderResult, segs_dir: str | Path, gts_dir: str | Path) -> str:
    cfg = result.config
    summary = summarize(result.cases)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "# Segmentation metrics\n",
        f"- predictions: `{segs_dir}`\n- references: `{gts_dir}`\n- mode: **{cfg.mode}**, NSD tolerance {cfg.tolerance:g}\n"
        f"- computed: {when}\n",
        "\n## Means per modality\n\n",
        markdown_table(SUMMARY_HEADERS, summary_rows(summary)),
    ]
    bad = [c for c in result.cases if c.status != OK]
    if bad:
        parts += ["\n## Failures\n\n", markdown_table(("case", "status", "error"), [[c.case, c.status, c.error or ""] for c in bad],
                                                       align_right=[False, False, False])]
    if result.unmatched:
        parts.append("\n## Predictions without a reference\n\n" + "".join(f"- `{n}`\n" for n in result.unmatched))
    parts += [
        "\n## Cases\n\n",
        markdown_table(
            ("case", "modality", "kind", "labels", "DSC", "NSD", "status"),
            [[c.case, c.modality, c.kind, str(len(c.labels)), c.dsc, c.nsd, c.status] for c in result.cases],
            align_right=[False, False, False, True, True, True, False],
        ),
    ]
    return "".join(parts)


def output_paths(csv_path: str | Path) -> list[Path]:
    """The files ``lapsam eval metrics -o CSV`` writes: CSV, CSV's ``_labels.csv`` and ``.md`` siblings."""
    csv_path = Path(csv_path)
    return [csv_path, sibling(csv_path, "_labels", ".csv"), sibling(csv_path, "", ".md")]


def check_outputs(csv_path: str | Path) -> list[Path]:
    """Check before scoring that every output file can be written (:class:`~lapsam.errors.UsageError`,
    exit code 2, otherwise), so that no scoring is lost at the write."""
    paths = output_paths(csv_path)
    for p in paths:
        check_output_file(p)
    return paths


def write_outputs(result: FolderResult, csv_path: str | Path, segs_dir: str | Path, gts_dir: str | Path) -> list[Path]:
    """``metrics.csv`` (case,dsc,nsd, 4 decimals, as the organisers write it), ``metrics_labels.csv``
    (per label, with status and error) and ``metrics.md``.

    All three are written together (:func:`.tables.atomic_write_texts`): each is either the old
    file or complete. A write that fails raises :class:`~lapsam.errors.LapsamError` (one line).
    """
    csv_path = Path(csv_path)
    main = csv_text(("case", "dsc", "nsd"), [[c.case, csv_float(c.dsc), csv_float(c.nsd)] for c in result.cases])
    label_rows: list[list[object]] = []
    for c in result.cases:
        if c.labels:
            for lab in c.labels:
                label_rows.append([c.case, c.modality, c.kind, lab.label, csv_float(lab.dsc),
                                   csv_float(lab.nsd), c.status, ""])
        else:
            label_rows.append([c.case, c.modality, c.kind, "", csv_float(c.dsc), csv_float(c.nsd), c.status, c.error or ""])
    labels = csv_text(("case", "modality", "kind", "label", "dsc", "nsd", "status", "error"), label_rows)
    texts = [main, labels, render_markdown(result, segs_dir, gts_dir)]
    paths = output_paths(csv_path)
    try:
        return atomic_write_texts(dict(zip(paths, texts, strict=True)))
    except OSError as exc:
        raise LapsamError(f"cannot write {exc.filename or csv_path}: {exc.strerror or exc}") from None


def print_tables(result: FolderResult, max_cases: int = 100) -> str:
    """The terminal view: cases (when not too many), failures, means per modality."""
    out = []
    if len(result.cases) <= max_cases:
        out.append(text_table(("case", "modality", "DSC", "NSD", "status"),
                              [[c.case, c.modality, c.dsc, c.nsd, c.status] for c in result.cases]))
    bad = [c for c in result.cases if c.status != OK]
    if bad:
        out.append("failures:\n" + "".join(f"  {c.case}: {c.error}\n" for c in bad))
    if result.unmatched:
        out.append(f"{len(result.unmatched)} prediction file(s) without a reference: {', '.join(result.unmatched[:10])}\n")
    out.append(text_table(SUMMARY_HEADERS, summary_rows(summarize(result.cases))))
    return "\n".join(out)


@dataclass
class MetricsRow:
    """One row of a metrics CSV as read back (for reports)."""

    case: str
    dsc: float
    nsd: float
    status: str = OK
    error: str = ""

    @property
    def modality(self) -> str:
        return parse_modality(self.case)


def read_metrics_csv(path: str | Path) -> list[MetricsRow]:
    """Read ``metrics.csv`` (the organisers' format also works); status comes from ``*_labels.csv`` if present."""
    path = Path(path)
    rows = read_csv_rows(path)
    if rows and not {"case", "dsc", "nsd"} <= set(rows[0]):
        raise ValueError(f"{path}: expected columns case,dsc,nsd, got {list(rows[0])}")
    out = [MetricsRow(r["case"], parse_float(r["dsc"]), parse_float(r["nsd"])) for r in rows
           if r["case"] not in ("Mean", "")]
    labels_path = sibling(path, "_labels", ".csv")
    if labels_path.exists():
        status = {}
        for r in read_csv_rows(labels_path):
            if r.get("status", OK) != OK:
                status[r["case"]] = (r["status"], r.get("error", ""))
        for m in out:
            if m.case in status:
                m.status, m.error = status[m.case]
    return out
