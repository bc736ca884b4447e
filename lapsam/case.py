"""One typed ``Case`` for the CVPR 2024 (box) and CVPR 2025 (interactive 3D) npz formats.

Conventions (those of the organisers' npz files):

* 3D ``image`` is uint8 (D, H, W); ``boxes`` are int64 (N, 6)
  ``[x_min, y_min, z_min, x_max, y_max, z_max]``, inclusive.
* 2D ``image`` is uint8 (H, W, 3); ``boxes`` are int64 (N, 4) ``[x_min, y_min, x_max, y_max]``.
* ``spacing`` is kept as stored (SimpleITK order x, y, z); ``spacing_zyx`` gives it in
  array order.
* 2025 cases keep the per-class box dicts (``box_dicts``, possibly absent), ``clicks``,
  ``clicks_order`` and ``prev_pred``; ``boxes`` is derived from the dicts (mid-slice x/y
  extent, z range) and ``box_mid_z`` records the slice the box was drawn on.

Validation (documented behaviour, each tested):

* missing ``imgs``, or ``boxes`` in a 2024 case -> :class:`CaseError`;
* wrong ndim/shape, empty arrays -> :class:`CaseError`;
* non-uint8 images: integer or float images whose values already lie in 0..255 are cast;
  otherwise they are rescaled linearly from their min..max to 0..255 (a warning says so);
  NaN/inf, bool or complex images -> :class:`CaseError`;
* an inverted box (min > max on any axis), a box value beyond int64 (e.g. a float 1e30), a
  2025 box-dict or click value that is not an integer or beyond int64 -> :class:`CaseError`
  naming the field (``boxes[0]['z_max']``);
* a 2025 ``z_mid`` outside its box's ``z_min..z_max`` is clipped into it, with a warning;
* a 2025 ``prev_pred`` with labels outside ``0..number of classes`` -> :class:`CaseError`;
* a box partly outside the image is clipped, with a warning;
* a box wholly outside the image is recorded in ``box_errors`` (that label stays empty);
* zero boxes is valid: the output is an all-zero ``segs``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CaseError, UsageError
from .modality import parse_modality, split_name
from .safe_npz import load_npz

log = logging.getLogger(__name__)

FORMAT_2024 = "2024"
FORMAT_2025 = "2025"
_BOX_DICT_KEYS = ("z_min", "z_max", "z_mid", "z_mid_x_min", "z_mid_y_min", "z_mid_x_max", "z_mid_y_max")
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _as_int(v: Any, field_name: str, path: Path | None) -> int:
    """One integer field of a 2025 object key; any bad value is a :class:`CaseError` naming the field."""
    try:
        out = int(v)
    except (TypeError, ValueError, OverflowError):
        raise CaseError(path, f"{field_name} is not an integer: {v!r}") from None
    if not _INT64_MIN <= out <= _INT64_MAX:
        raise CaseError(path, f"{field_name} = {out} is out of range (beyond int64)")
    return out


@dataclass
class Case:
    """A challenge case held in memory, validated."""

    name: str
    image: np.ndarray
    boxes: np.ndarray
    is_3d: bool
    modality: str
    spacing: tuple[float, float, float] | None = None
    format: str = FORMAT_2024
    path: Path | None = None
    box_mid_z: np.ndarray | None = None
    box_dicts: list[dict[str, int]] | None = None
    clicks: list[dict[str, list[list[int]]]] | None = None
    clicks_order: list[Any] | None = None
    prev_pred: np.ndarray | None = None
    box_errors: dict[int, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """Shape of ``segs``: (D, H, W) for 3D, (H, W) for 2D."""
        return tuple(self.image.shape if self.is_3d else self.image.shape[:2])

    @property
    def num_boxes(self) -> int:
        return int(self.boxes.shape[0])

    @property
    def num_objects(self) -> int:
        """Number of labels the output may hold (boxes, or click classes without boxes)."""
        n = self.num_boxes
        if self.clicks is not None:
            n = max(n, len(self.clicks))
        return n

    @property
    def valid_box_indices(self) -> list[int]:
        return [i for i in range(self.num_boxes) if i not in self.box_errors]

    @property
    def spacing_zyx(self) -> tuple[float, float, float] | None:
        """Spacing in the array's axis order (the stored order is x, y, z)."""
        if self.spacing is None:
            return None
        x, y, z = self.spacing
        return (z, y, x)

    @property
    def segs_dtype(self) -> np.dtype:
        return segs_dtype(self.num_objects)

    def empty_segs(self) -> np.ndarray:
        return np.zeros(self.spatial_shape, dtype=self.segs_dtype)

    def summary(self) -> dict[str, Any]:
        """Plain facts about the case, as ``lapsam data inspect`` prints them."""
        return {
            "name": self.name,
            "format": self.format,
            "kind": "3D" if self.is_3d else "2D",
            "modality": self.modality,
            "shape": list(self.image.shape),
            "dtype": str(self.image.dtype),
            "spacing": None if self.spacing is None else [round(float(s), 6) for s in self.spacing],
            "boxes": self.num_boxes,
            "clicks": None if self.clicks is None else len(self.clicks),
            "prev_pred": self.prev_pred is not None,
            "box_errors": dict(self.box_errors),
            "warnings": list(self.warnings),
        }


def segs_dtype(num_objects: int) -> np.dtype:
    """uint8 up to 255 objects, uint16 above (labels must not overflow)."""
    if num_objects > 65535:
        raise ValueError(f"{num_objects} objects do not fit in uint16 labels")
    return np.dtype(np.uint8) if num_objects <= 255 else np.dtype(np.uint16)


def _to_uint8(img: np.ndarray, path: Path | None, warnings: list[str]) -> np.ndarray:
    if img.dtype == np.uint8:
        return img
    if img.dtype == bool or np.iscomplexobj(img) or img.dtype.kind not in "iuf":
        raise CaseError(path, f"imgs has unsupported dtype {img.dtype} (expected uint8)")
    if img.dtype.kind == "f" and not np.isfinite(img).all():
        raise CaseError(path, "imgs contains NaN or infinite values")
    lo, hi = float(img.min()), float(img.max())
    integral = img.dtype.kind in "iu" or bool(np.all(np.floor(img) == img))
    if lo >= 0 and hi <= 255 and integral:
        warnings.append(f"imgs dtype {img.dtype} cast to uint8 (values already in 0..255)")
        return img.astype(np.uint8)
    warnings.append(f"imgs dtype {img.dtype} with range [{lo:g}, {hi:g}] rescaled linearly to uint8 0..255")
    if hi == lo:
        return np.zeros(img.shape, np.uint8)
    scaled = (img.astype(np.float64) - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _as_box_array(raw: np.ndarray, ncols: int, path: Path | None) -> np.ndarray:
    arr = np.asarray(raw)
    if arr.size == 0:
        return np.zeros((0, ncols), np.int64)
    if arr.dtype.kind not in "iuf" or arr.dtype == bool:
        raise CaseError(path, f"boxes has dtype {arr.dtype}; expected integers")
    if arr.ndim == 1 and arr.shape[0] == ncols:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != ncols:
        raise CaseError(path, f"boxes has shape {tuple(arr.shape)}; expected (N, {ncols})")
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise CaseError(path, "boxes contains NaN or infinite values")
        arr = np.rint(arr)
        big = np.abs(arr) >= 2.0**63
        if big.any():
            raise CaseError(path, f"boxes value {float(arr[big][0]):g} is out of range (beyond int64)")
    elif arr.dtype.kind == "u" and arr.size and int(arr.max()) > _INT64_MAX:
        raise CaseError(path, f"boxes value {int(arr.max())} is out of range (beyond int64)")
    return arr.astype(np.int64)


def _check_boxes(
    boxes: np.ndarray, extent: tuple[int, ...], path: Path | None, warnings: list[str]
) -> tuple[np.ndarray, dict[int, str]]:
    """Validate boxes against the image extent (per axis, in box-column order).

    ``extent`` gives the size of each axis in the box's column order: (W, H) for 2D,
    (W, H, D) for 3D. Returns clipped boxes and per-box errors for boxes wholly outside.
    """
    ndim = len(extent)
    names = "xyz"[:ndim]
    lo, hi = boxes[:, :ndim], boxes[:, ndim:]
    bad = np.nonzero((lo > hi).any(axis=1))[0]
    if bad.size:
        i = int(bad[0])
        axis = names[int(np.argmax(lo[i] > hi[i]))]
        raise CaseError(
            path,
            f"box {i + 1} is inverted ({axis}_min > {axis}_max): {boxes[i].tolist()}"
            + (f" (and {bad.size - 1} more)" if bad.size > 1 else ""),
        )
    size = np.asarray(extent, np.int64)
    outside = ((hi < 0) | (lo > size - 1)).any(axis=1)
    errors = {
        int(i): f"box {int(i) + 1} {boxes[i].tolist()} lies wholly outside the image (extent {list(extent)})"
        for i in np.nonzero(outside)[0]
    }
    clipped = boxes.copy()
    clipped[:, :ndim] = np.clip(lo, 0, size - 1)
    clipped[:, ndim:] = np.clip(hi, 0, size - 1)
    partly = np.nonzero(((clipped != boxes).any(axis=1)) & ~outside)[0]
    if partly.size:
        warnings.append(
            f"{partly.size} box(es) partly outside the image were clipped: "
            + ", ".join(str(int(i) + 1) for i in partly[:10])
            + (" ..." if partly.size > 10 else "")
        )
    return clipped, errors


def _plain(v: Any) -> Any:
    """numpy scalars/arrays inside 2025 object keys -> Python values."""
    if isinstance(v, np.ndarray):
        return [_plain(x) for x in v.tolist()] if v.dtype == object else v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, dict):
        return {_plain(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _object_list(raw: np.ndarray) -> list[Any]:
    val = raw.item() if raw.ndim == 0 else list(raw.tolist())
    val = _plain(val)
    return val if isinstance(val, list) else [val]


def _parse_box_dicts(raw: np.ndarray, path: Path | None) -> list[dict[str, int]]:
    dicts = _object_list(raw)
    out = []
    for i, d in enumerate(dicts):
        if not isinstance(d, dict):
            raise CaseError(path, f"boxes[{i}] is {type(d).__name__}; the 2025 format needs a dict per class")
        missing = [k for k in _BOX_DICT_KEYS if k not in d and k != "z_mid"]
        if missing:
            raise CaseError(path, f"boxes[{i}] lacks keys {missing}")
        entry = {k: _as_int(d[k], f"boxes[{i}]['{k}']", path) for k in _BOX_DICT_KEYS if k in d}
        entry.setdefault("z_mid", (entry["z_min"] + entry["z_max"]) // 2)
        out.append(entry)
    return out


def _parse_clicks(raw: np.ndarray, path: Path | None) -> list[dict[str, list[list[int]]]]:
    clicks = _object_list(raw)
    out = []
    for i, c in enumerate(clicks):
        if not isinstance(c, dict):
            raise CaseError(path, f"clicks[{i}] is {type(c).__name__}; expected a dict with 'fg'/'bg'")
        entry: dict[str, list[list[int]]] = {}
        for kind in ("fg", "bg"):
            pts = c.get(kind, []) or []
            try:
                entry[kind] = [[_as_int(p, f"clicks[{i}]['{kind}']", path) for p in pt] for pt in pts]
            except TypeError:
                raise CaseError(path, f"clicks[{i}]['{kind}'] is not a list of [z, y, x] points") from None
            if any(len(pt) != 3 for pt in entry[kind]):
                raise CaseError(path, f"clicks[{i}]['{kind}'] has points that are not [z, y, x]")
        out.append(entry)
    return out


def case_from_arrays(
    name: str, arrays: dict[str, np.ndarray], path: Path | None = None
) -> Case:
    """Validate the arrays of one npz and build a :class:`Case`."""
    stem = name[:-4] if name.endswith(".npz") else name
    warnings: list[str] = []
    if "imgs" not in arrays:
        raise CaseError(path, f"missing key 'imgs' (keys present: {sorted(arrays)})")
    img = np.asarray(arrays["imgs"])
    if img.dtype == object:
        raise CaseError(path, "imgs is an object array; expected a numeric array")
    tag, _ = split_name(stem)
    is_2025 = any(k in arrays for k in ("clicks", "clicks_order", "prev_pred")) or (
        "boxes" in arrays and np.asarray(arrays["boxes"]).dtype == object
    )
    if tag is None:
        is_3d = img.ndim == 3 and not (img.shape[-1] == 3 and "boxes" in arrays and np.asarray(arrays["boxes"]).ndim == 2 and np.asarray(arrays["boxes"]).shape[-1] == 4)
        warnings.append(f"name has no 2DBox_/3DBox_ prefix; treated as {'3D' if is_3d else '2D'}")
    else:
        is_3d = tag == "3D"
    if is_2025 and not is_3d:
        raise CaseError(path, "2025-format keys (clicks/prev_pred/box dicts) are only defined for 3D cases")
    if is_3d:
        if img.ndim != 3:
            raise CaseError(path, f"3D imgs has shape {tuple(img.shape)}; expected (D, H, W)")
    elif img.ndim != 3 or img.shape[2] != 3:
        raise CaseError(path, f"2D imgs has shape {tuple(img.shape)}; expected (H, W, 3)")
    if img.size == 0:
        raise CaseError(path, f"imgs is empty, shape {tuple(img.shape)}")
    img = _to_uint8(img, path, warnings)

    spacing = None
    if "spacing" in arrays:
        sp = np.asarray(arrays["spacing"], dtype=np.float64).ravel() if np.asarray(arrays["spacing"]).dtype.kind in "iuf" else None
        if sp is None or sp.shape != (3,) or not np.all(np.isfinite(sp)) or np.any(sp <= 0):
            raise CaseError(path, f"spacing must be 3 positive numbers, got {arrays['spacing']!r}")
        spacing = (float(sp[0]), float(sp[1]), float(sp[2]))
    elif is_3d:
        warnings.append("no spacing stored; metrics will assume (1, 1, 1)")

    box_dicts = clicks = clicks_order = prev_pred = box_mid_z = None
    fmt = FORMAT_2025 if is_2025 else FORMAT_2024
    if is_2025:
        if "boxes" in arrays:
            box_dicts = _parse_box_dicts(np.asarray(arrays["boxes"]), path)
            raw = np.array(
                [[d["z_mid_x_min"], d["z_mid_y_min"], d["z_min"], d["z_mid_x_max"], d["z_mid_y_max"], d["z_max"]] for d in box_dicts],
                dtype=np.int64,
            ).reshape(-1, 6)
            box_mid_z = np.array([d["z_mid"] for d in box_dicts], dtype=np.int64)
        else:
            raw = np.zeros((0, 6), np.int64)
        if "clicks" in arrays:
            clicks = _parse_clicks(np.asarray(arrays["clicks"]), path)
        if "clicks_order" in arrays:
            clicks_order = _object_list(np.asarray(arrays["clicks_order"]))
        if "prev_pred" in arrays:
            prev_pred = np.asarray(arrays["prev_pred"])
            if prev_pred.shape != img.shape:
                raise CaseError(path, f"prev_pred has shape {prev_pred.shape}; expected {img.shape}")
            if prev_pred.dtype.kind not in "iub":
                raise CaseError(path, f"prev_pred has dtype {prev_pred.dtype}; expected integer labels")
        if box_dicts is None and clicks is None:
            raise CaseError(path, "2025-format case has neither boxes nor clicks")
        if prev_pred is not None and prev_pred.size:
            n_obj = max(raw.shape[0], len(clicks) if clicks is not None else 0)
            lo, hi = int(prev_pred.min()), int(prev_pred.max())
            if lo < 0 or hi > n_obj:
                raise CaseError(path, f"prev_pred has labels {lo}..{hi}; expected 0..{n_obj} (one per class)")
    else:
        if "boxes" not in arrays:
            raise CaseError(path, f"missing key 'boxes' (keys present: {sorted(arrays)})")
        raw = _as_box_array(np.asarray(arrays["boxes"]), 6 if is_3d else 4, path)

    if is_3d:
        d, h, w = img.shape
        extent: tuple[int, ...] = (w, h, d)
    else:
        h, w = img.shape[:2]
        extent = (w, h)
    if box_mid_z is not None:
        outside = np.nonzero((box_mid_z < raw[:, 2]) | (box_mid_z > raw[:, 5]))[0]
        if outside.size:
            warnings.append(
                "z_mid outside its box's z_min..z_max, clipped into it: "
                + ", ".join(f"box {int(i) + 1} z_mid {int(box_mid_z[i])} not in {int(raw[i, 2])}..{int(raw[i, 5])}"
                            for i in outside[:5])
                + (" ..." if outside.size > 5 else "")
            )
    boxes, box_errors = _check_boxes(raw, extent, path, warnings)
    if box_mid_z is not None:
        box_mid_z = np.clip(box_mid_z, boxes[:, 2], boxes[:, 5])
    return Case(
        name=stem,
        image=img,
        boxes=boxes,
        is_3d=is_3d,
        modality=parse_modality(stem),
        spacing=spacing,
        format=fmt,
        path=path,
        box_mid_z=box_mid_z,
        box_dicts=box_dicts,
        clicks=clicks,
        clicks_order=clicks_order,
        prev_pred=prev_pred,
        box_errors=box_errors,
        warnings=warnings,
    )


def load_case(path: str | Path) -> Case:
    """Load and validate one case file. Raises :class:`CaseError` naming the file."""
    path = Path(path)
    arrays = load_npz(path)
    case = case_from_arrays(path.name, arrays, path)
    for w in case.warnings:
        log.warning("%s: %s", path.name, w)
    for msg in case.box_errors.values():
        log.error("%s: %s", path.name, msg)
    return case


def list_cases(path: str | Path) -> list[Path]:
    """The ``.npz`` files of a folder (sorted), or ``[path]`` for a file."""
    path = Path(path)
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix == ".npz" and p.is_file() and not p.name.startswith("."))
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    return [path]


def require_cases(path: str | Path, what: str = "") -> list[Path]:
    """:func:`list_cases` for a command's input, checked before any work: a path that does not exist
    or a folder without ``.npz`` files is a :class:`~lapsam.errors.UsageError` (exit 2), its message
    prefixed with ``what`` (e.g. ``"input"``) when given."""
    prefix = f"{what}: " if what else ""
    try:
        files = list_cases(path)
    except FileNotFoundError as exc:
        raise UsageError(f"{prefix}{exc}") from None
    if not files:
        raise UsageError(f"{prefix}{path}: no .npz cases")
    return files
