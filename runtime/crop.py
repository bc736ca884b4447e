"""The crop of :class:`~lapsam.manifest.Preprocessing` ``crop_context``: segment a window, paste it back.

A model trained with ``crop_context`` > 0 sees, at inference, the image (every slice of a 3D
case) cropped to :func:`lapsam.preprocess.crop_window` around the union of the case's valid
boxes (their x/y extent over all slices): a square ``crop_context`` times the union's longer
side, at least ``input_size`` pixels. Small objects in large images then keep their pixels
(a 30-pixel lesion in a 512x512 CT slice is encoded at full resolution instead of half),
while cases whose boxes cover the image are unchanged. The window is computed once per case,
so each slice is still encoded once.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lapsam.case import FORMAT_2024, Case
from lapsam.manifest import Preprocessing
from lapsam.preprocess import crop_window

Window = tuple[int, int, int, int]  # y0, y1, x0, x1 (end exclusive)


def case_window(case: Case, pp: Preprocessing) -> Window | None:
    """The crop window of a 2024-format case, or None when it is the whole image (or crop is off)."""
    idx = case.valid_box_indices
    if pp.crop_context <= 0 or case.format != FORMAT_2024 or not idx:
        return None
    b = np.asarray(case.boxes[idx], np.int64)
    if case.is_3d:
        union = np.array([b[:, 0].min(), b[:, 1].min(), b[:, 3].max(), b[:, 4].max()])
        h, w = case.image.shape[1:3]
    else:
        union = np.array([b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()])
        h, w = case.image.shape[:2]
    win = crop_window(union, h, w, pp.input_size, pp.crop_context)
    return None if win == (0, h, 0, w) else win


def crop_case(case: Case, win: Window) -> Case:
    """The same case restricted to ``win``: image cropped, boxes shifted (x by -x0, y by -y0)."""
    y0, y1, x0, x1 = win
    boxes = np.array(case.boxes, np.int64, copy=True)
    if boxes.size:
        xcols, ycols = ((0, 3), (1, 4)) if case.is_3d else ((0, 2), (1, 3))
        boxes[:, list(xcols)] -= x0
        boxes[:, list(ycols)] -= y0
    image = case.image[:, y0:y1, x0:x1] if case.is_3d else case.image[y0:y1, x0:x1]
    return dataclasses.replace(case, image=np.ascontiguousarray(image), boxes=boxes)


def paste(case: Case, sub_segs: np.ndarray, win: Window) -> np.ndarray:
    """``segs`` of the whole case from the cropped case's ``segs`` (zero outside the window)."""
    y0, y1, x0, x1 = win
    segs = case.empty_segs()
    if case.is_3d:
        segs[:, y0:y1, x0:x1] = sub_segs
    else:
        segs[y0:y1, x0:x1] = sub_segs
    return segs
