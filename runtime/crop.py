"""The crop of :class:`~lapsam.manifest.Preprocessing` ``crop_context``: segment windows, paste them back.

A model trained with ``crop_context`` > 0 sees, at inference, the image (every slice of a 3D
case) cropped to the windows of :func:`lapsam.preprocess.box_windows`, computed from the
boxes' x/y extent (over all slices for 3D), the rule training used:

* ``crop_mode="union"``: one window around the union of the boxes, ``crop_context`` times the
  union's longer side and at least ``input_size`` pixels, so small objects in large images
  keep their pixels while cases whose boxes cover the image are unchanged;
* ``crop_mode="box"`` (the default model): a window per box, ``crop_context`` times the box's
  longer side and at least ``crop_min_px`` pixels, so a small object is enlarged to the input
  size (a 12-pixel nucleus fills a fifth of the input instead of 3 of 256 pixels). Boxes whose
  window would cover at least ``crop_shared_frac`` of the image share one union window.

Each window is encoded once per slice of its boxes' z-ranges (a slice is encoded once per
window that needs it).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lapsam.case import FORMAT_2024, Case
from lapsam.manifest import Preprocessing
from lapsam.preprocess import Window, box_windows


def case_windows(case: Case, pp: Preprocessing) -> list[tuple[Window | None, list[int]]]:
    """``[(window or None for the whole image, valid box indexes), ...]`` of a 2024-format case.

    One group with every valid box and no window when the model does not crop (or the case is
    not in the 2024 format, or has no valid box).
    """
    idx = case.valid_box_indices
    if pp.crop_context <= 0 or case.format != FORMAT_2024 or not idx:
        return [(None, list(idx))]
    b = np.asarray(case.boxes[idx], np.int64)
    xy = b[:, [0, 1, 3, 4]] if case.is_3d else b[:, :4]
    h, w = case.spatial_shape[-2:]
    return [(win, [idx[j] for j in group]) for win, group in box_windows(xy, h, w, pp)]


def volume_windows(boxes: np.ndarray, h: int, w: int, pp: Preprocessing) -> list[tuple[Window | None, list[int]]]:
    """:func:`case_windows` for (N, 6) 3D boxes ``[x0, y0, z0, x1, y1, z1]`` of an (D, h, w) volume."""
    b = np.asarray(boxes, np.int64).reshape(-1, 6)
    if pp.crop_context <= 0 or not len(b):
        return [(None, list(range(len(b))))]
    return box_windows(b[:, [0, 1, 3, 4]], h, w, pp)


def shift_boxes(boxes: np.ndarray, win: Window, is_3d: bool) -> np.ndarray:
    """Boxes in the coordinates of ``win`` (x by -x0, y by -y0)."""
    y0, _, x0, _ = win
    out = np.array(boxes, np.int64, copy=True)
    if out.size:
        xcols, ycols = ((0, 3), (1, 4)) if is_3d else ((0, 2), (1, 3))
        out[:, list(xcols)] -= x0
        out[:, list(ycols)] -= y0
    return out


def crop_case(case: Case, win: Window) -> Case:
    """The same case restricted to ``win``: image cropped, boxes shifted (x by -x0, y by -y0)."""
    y0, y1, x0, x1 = win
    boxes = shift_boxes(case.boxes, win, case.is_3d)
    image = case.image[:, y0:y1, x0:x1] if case.is_3d else case.image[y0:y1, x0:x1]
    return dataclasses.replace(case, image=np.ascontiguousarray(image), boxes=boxes)


def paste_labels(segs: np.ndarray, sub_segs: np.ndarray, win: Window | None) -> None:
    """Write the labelled pixels of a window's ``sub_segs`` into ``segs`` (2D or 3D), in place.

    Where windows overlap, the larger label wins (box i is label i+1; later boxes win, as in
    the uncropped rule).
    """
    if win is None:
        region = segs
    else:
        y0, y1, x0, x1 = win
        region = segs[..., y0:y1, x0:x1]
    np.maximum(region, sub_segs.astype(segs.dtype, copy=False), out=region)
