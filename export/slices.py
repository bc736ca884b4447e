"""Slices of real cases with their box prompts, preprocessed for the model.

Used by ``lapsam export check`` (the same prompts go to PyTorch and every exported variant)
and by INT8 calibration. Selection is deterministic: for a 3D case, the middle slice of each
box (``box_mid_z`` when the case records it), de-duplicated, sorted, and thinned evenly to at
most ``max_slices`` (calibration instead spreads slices evenly over the boxes' z-range); a 2D
case is one slice. Every box active on a slice is prompted on it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lapsam.case import Case, list_cases, load_case
from lapsam.errors import CaseError
from lapsam.manifest import Preprocessing
from lapsam.preprocess import Transform, preprocess_image, transform_boxes

log = logging.getLogger(__name__)


@dataclass
class PromptedSlice:
    """One 2D image ready for the encoder, with its boxes in model-input pixels."""

    case: str
    z: int | None  # slice index of a 3D case, None for 2D
    image: np.ndarray  # (1, 3, S, S) float32
    boxes: np.ndarray  # (B, 4) float32, model-input pixels; B may be 0
    transform: Transform

    @property
    def label(self) -> str:
        return self.case if self.z is None else f"{self.case}[z={self.z}]"


def _mid_slices(case: Case, max_slices: int) -> list[int]:
    idx = case.valid_box_indices
    if case.box_mid_z is not None:
        zs = [int(case.box_mid_z[i]) for i in idx]
    else:
        zs = [int((case.boxes[i, 2] + case.boxes[i, 5]) // 2) for i in idx]
    zs = sorted(set(zs))
    if len(zs) > max_slices:
        pick = np.linspace(0, len(zs) - 1, max_slices).round().astype(int)
        zs = [zs[i] for i in sorted(set(pick.tolist()))]
    return zs


def _spread_slices(case: Case, n: int) -> list[int]:
    """``n`` slices evenly spread over the z-range the boxes cover (for calibration)."""
    idx = case.valid_box_indices
    if not idx:
        return []
    z0 = int(min(case.boxes[i, 2] for i in idx))
    z1 = int(max(case.boxes[i, 5] for i in idx))
    return sorted(set(np.linspace(z0, z1, n + 2)[1:-1].round().astype(int).tolist()))


def case_slices(case: Case, pp: Preprocessing, max_slices: int = 3, max_boxes: int = 64,
                spread: bool = False) -> list[PromptedSlice]:
    """The prompted slices of one loaded case (see module docstring).

    ``spread=True`` takes slices evenly over the boxes' z-range instead of the box centres.
    """
    out: list[PromptedSlice] = []
    valid = case.valid_box_indices
    if case.is_3d:
        zs = _spread_slices(case, max_slices) if spread else _mid_slices(case, max_slices)
        for z in zs:
            active = [i for i in valid if case.boxes[i, 2] <= z <= case.boxes[i, 5]][:max_boxes]
            img, tf = preprocess_image(case.image[z], pp)
            b2d = case.boxes[active][:, [0, 1, 3, 4]] if active else np.zeros((0, 4))
            out.append(PromptedSlice(case.name, z, img, transform_boxes(b2d, tf).reshape(-1, 4), tf))
    else:
        active = valid[:max_boxes]
        img, tf = preprocess_image(case.image, pp)
        b2d = case.boxes[active] if active else np.zeros((0, 4))
        out.append(PromptedSlice(case.name, None, img, transform_boxes(b2d, tf).reshape(-1, 4), tf))
    return out


def iter_case_slices(
    cases: Path | list[Path], pp: Preprocessing, max_slices: int = 3, max_boxes: int = 64, spread: bool = False
) -> Iterator[tuple[Path, list[PromptedSlice] | CaseError]]:
    """(case path, its slices) for each case of a folder (or list); a bad case yields its error."""
    paths = list_cases(cases) if isinstance(cases, (str, Path)) else list(cases)
    for p in paths:
        try:
            case = load_case(p)
        except CaseError as exc:
            yield p, exc
            continue
        yield p, case_slices(case, pp, max_slices, max_boxes, spread)


def calibration_images(cases: Path | list[Path], pp: Preprocessing, max_images: int = 32,
                       slices_per_case: int = 4) -> list[np.ndarray]:
    """Encoder inputs (1, 3, S, S) from slices of real cases, for INT8 calibration.

    Cases are visited in name order, taking up to ``slices_per_case`` slices spread evenly over
    the z-range of each 3D case's boxes (2D: the image), until ``max_images`` are collected.
    Bad cases are skipped with a warning.
    """
    images: list[np.ndarray] = []
    for _path, sl in iter_case_slices(cases, pp, max_slices=slices_per_case, spread=True):
        if isinstance(sl, CaseError):
            log.warning("calibration: skipping %s", sl)
            continue
        for s in sl:
            images.append(s.image)
            if len(images) >= max_images:
                return images
    if not images:
        raise CaseError(None, f"no calibration images could be read from {cases}")
    return images
