"""The CVPR 2025 interactive format: writing cases, and building them from 2024-format 3D cases.

A 2025 case (the organisers' interactive 3D format) is a 3D ``.npz`` with ``imgs`` (D, H, W) uint8, ``spacing``
and, per class, a box dict ``{z_min, z_max, z_mid, z_mid_x_min, z_mid_y_min, z_mid_x_max,
z_mid_y_max}`` (a 2D box on slice ``z_mid`` and the class's z range) in ``boxes``; the
evaluator later adds ``clicks`` (per class ``{'fg': [[z, y, x], ...], 'bg': [...]}``),
``clicks_order`` (per class ``['fg', 'bg', ...]``) and ``prev_pred``. Those keys are Python
objects that numpy pickles; they are written here with numpy and must be read back only with
:func:`lapsam.safe_npz.load_npz` (``lapsam.case.load_case`` does).

Box dicts are made as the organisers' ``get_boxes.py`` makes them: ``z_min``/``z_max`` are the
class's z extent, ``z_mid`` is the z of the median voxel (in C order), the 2D box is the class's
extent on that slice, each side moved out by ``shift * size / 256`` pixels (clipped to the
image) with one ``shift`` drawn from ``0..max_shift`` per class (``max_shift`` 5 as theirs; 0
gives tight boxes).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .case import case_from_arrays, list_cases
from .errors import CaseError
from .safe_npz import load_npz
from .writers import atomic_savez

log = logging.getLogger(__name__)


def read_reference(case_path: Path, arrays: dict[str, np.ndarray], gts_dir: Path | None) -> np.ndarray:
    """The reference labels of a case: ``gts_dir/<name>`` (key ``gts``), else the case's own ``gts`` key.

    A missing file or key, a non-integer dtype or negative labels is a :class:`CaseError`.
    """
    if gts_dir is not None:
        ref_path = gts_dir / case_path.name
        if not ref_path.is_file():
            raise CaseError(case_path, f"no reference {ref_path}")
        ref_arrays = load_npz(ref_path)
        if "gts" not in ref_arrays:
            raise CaseError(ref_path, f"no 'gts' key (keys present: {sorted(ref_arrays)})")
        gts = np.asarray(ref_arrays["gts"])
    elif "gts" in arrays:
        gts = np.asarray(arrays["gts"])
    else:
        raise CaseError(case_path, "no reference: the case has no 'gts' key; pass --gts DIR")
    if gts.dtype.kind not in "biu" or (gts.dtype.kind == "i" and gts.size and int(gts.min()) < 0):
        raise CaseError(case_path, f"reference 'gts' has dtype {gts.dtype} or negative labels; expected labels >= 0")
    return gts

BOX_KEYS: tuple[str, ...] = ("z_min", "z_max", "z_mid", "z_mid_x_min", "z_mid_y_min", "z_mid_x_max", "z_mid_y_max")


def object_array(items: Sequence[Any]) -> np.ndarray:
    """A 1-D object array holding ``items`` as they are (dicts, lists), as ``np.savez`` pickles them."""
    arr = np.empty(len(items), dtype=object)
    for i, v in enumerate(items):
        arr[i] = v
    return arr


def box_dict_from_mask(mask: np.ndarray, max_shift: int = 0, rng: np.random.Generator | None = None) -> dict[str, int]:
    """The 2025 box dict of one class's (D, H, W) mask (see the module docstring)."""
    m = np.asarray(mask, bool)
    if m.ndim != 3 or not m.any():
        raise ValueError("need a non-empty 3D mask")
    per_slice = m.sum(axis=(1, 2))
    zs = np.flatnonzero(per_slice)
    # z of the median voxel in C order: the first slice whose cumulative count passes n // 2
    z_mid = int(np.searchsorted(np.cumsum(per_slice), per_slice.sum() // 2, side="right"))
    ys, xs = np.nonzero(m[z_mid])
    _, h, w = m.shape
    shift = int(rng.integers(0, max_shift + 1)) if (max_shift > 0 and rng is not None) else 0
    sx, sy = int(shift * w / 256), int(shift * h / 256)
    return {
        "z_min": int(zs[0]),
        "z_max": int(zs[-1]),
        "z_mid": z_mid,
        "z_mid_x_min": max(0, int(xs.min()) - sx),
        "z_mid_y_min": max(0, int(ys.min()) - sy),
        "z_mid_x_max": min(w - 1, int(xs.max()) + sx),
        "z_mid_y_max": min(h - 1, int(ys.max()) + sy),
    }


def write_case_2025(
    path: str | Path,
    imgs: np.ndarray,
    spacing: Sequence[float] | np.ndarray | None,
    boxes: Sequence[dict[str, int]] | None = None,
    clicks: Sequence[dict[str, list[list[int]]]] | None = None,
    clicks_order: Sequence[Sequence[str]] | None = None,
    prev_pred: np.ndarray | None = None,
    compressed: bool = True,
) -> Path:
    """Write one 2025-format case atomically (keys left out when ``None``; boxes may be absent)."""
    arrays: dict[str, np.ndarray] = {"imgs": np.asarray(imgs)}
    if spacing is not None:
        arrays["spacing"] = np.asarray(spacing, np.float64)
    if boxes is not None:
        arrays["boxes"] = object_array([{k: int(d[k]) for k in BOX_KEYS if k in d} for d in boxes])
    if clicks is not None:
        arrays["clicks"] = object_array([{"fg": [[int(v) for v in p] for p in c.get("fg", [])],
                                          "bg": [[int(v) for v in p] for p in c.get("bg", [])]} for c in clicks])
    if clicks_order is not None:
        arrays["clicks_order"] = object_array([[str(k) for k in o] for o in clicks_order])
    if prev_pred is not None:
        arrays["prev_pred"] = np.asarray(prev_pred)
    return atomic_savez(path, compressed=compressed, **arrays)


def relabel_consecutive(gts: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Labels present in ``gts`` (sorted) mapped to 1..K; returns the new map and the old labels."""
    g = np.asarray(gts)
    labels = [int(v) for v in np.unique(g) if v != 0]
    if labels == list(range(1, len(labels) + 1)):
        return g, labels
    lut = np.zeros(int(g.max()) + 1, np.int64)
    lut[labels] = np.arange(1, len(labels) + 1)
    out = lut[g]
    return out.astype(np.uint8 if len(labels) <= 255 else np.uint16), labels


def to_2025_arrays(
    imgs: np.ndarray, gts: np.ndarray, max_shift: int = 5, rng: np.random.Generator | None = None
) -> tuple[list[dict[str, int]], np.ndarray, list[str]]:
    """Box dicts (class k = label k + 1 of the returned reference) and the relabelled reference."""
    if gts.shape != imgs.shape:
        raise ValueError(f"reference shape {gts.shape} differs from the image's {imgs.shape}")
    notes: list[str] = []
    ref, old = relabel_consecutive(gts)
    if old != list(range(1, len(old) + 1)):
        notes.append(f"labels {old[:10]}{' ...' if len(old) > 10 else ''} renumbered 1..{len(old)}")
    if not old:
        raise ValueError("the reference has no labels (all 0)")
    boxes = [box_dict_from_mask(ref == k, max_shift, rng) for k in range(1, len(old) + 1)]
    return boxes, ref, notes


@dataclass
class ConvertSummary:
    written: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)


def convert_to_2025(
    inputs: str | Path,
    out_dir: str | Path,
    gts_dir: str | Path | None = None,
    max_shift: int = 5,
    seed: int = 2025,
    progress: bool = True,
) -> ConvertSummary:
    """Build 2025-format cases from 2024-format 3D cases.

    ``inputs`` is a case file or a folder of them; each case's reference is ``gts_dir/<name>.npz``
    (key ``gts``) or, without ``gts_dir``, the case's own ``gts`` key. Writes
    ``out_dir/imgs/<name>.npz`` (``imgs``, ``spacing``, ``boxes`` dicts) and ``out_dir/gts/<name>.npz``
    (``gts`` relabelled 1..K in box order, ``spacing``). 2D cases are skipped; a case that fails
    is reported and writes nothing; the others complete.
    """
    from tqdm import tqdm

    files = list_cases(inputs)
    out = Path(out_dir)
    summary = ConvertSummary()
    rng = np.random.default_rng(seed)
    for f in tqdm(files, desc="to 2025", unit="case", disable=not progress or len(files) < 2):
        try:
            arrays = load_npz(f)
            case = case_from_arrays(f.name, arrays, f)
            if not case.is_3d:
                summary.skipped[f.name] = "2D case (the 2025 format is 3D only)"
                continue
            gts = read_reference(f, arrays, Path(gts_dir) if gts_dir is not None else None)
            try:
                boxes, ref, notes = to_2025_arrays(case.image, gts, max_shift, rng)
            except ValueError as exc:
                raise CaseError(f, str(exc)) from None
            spacing = case.spacing if case.spacing is not None else (1.0, 1.0, 1.0)
            for n in notes:
                log.warning("%s: %s", f.name, n)
            img_path = write_case_2025(out / "imgs" / f"{case.name}.npz", case.image, spacing, boxes)
            try:
                atomic_savez(out / "gts" / f"{case.name}.npz", gts=ref, spacing=np.asarray(spacing, np.float64))
            except BaseException:
                img_path.unlink(missing_ok=True)  # never an input without its reference
                raise
            summary.written.append(f.name)
        except CaseError as exc:
            summary.failed[f.name] = exc.problem
            log.error("%s", exc)
    return summary
