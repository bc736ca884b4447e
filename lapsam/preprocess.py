"""Numpy pre- and post-processing, exactly as the manifest's :class:`Preprocessing` records it.

Used by the runtime (no torch) and by distill's data pipeline, so training and inference
see identical inputs. Resizing is a pair of interpolation matrices that reproduce
PyTorch's ``F.interpolate(mode="bilinear", align_corners=False, antialias=False)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .manifest import Preprocessing


@lru_cache(maxsize=128)
def _taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices i0, i1 and weight w1 of each output sample (half-pixel centres, edge clamped).

    PyTorch's bilinear ``align_corners=False``: src = (dst + 0.5) * in/out - 0.5, clamped at 0;
    out = (1 - w1) * x[i0] + w1 * x[i1].
    """
    scale = in_size / out_size
    src = np.maximum((np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = src - i0
    for a in (i0, i1, w1):
        a.flags.writeable = False
    return i0, i1, w1


@lru_cache(maxsize=64)
def resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) float32 matrix M so that ``M @ x`` resizes x along axis 0 (two taps per row)."""
    i0, i1, w1 = _taps(in_size, out_size)
    m = np.zeros((out_size, in_size), dtype=np.float64)
    rows = np.arange(out_size)
    np.add.at(m, (rows, i0), 1.0 - w1)
    np.add.at(m, (rows, i1), w1)
    m = m.astype(np.float32)
    m.flags.writeable = False
    return m


def _resize_axis(x: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    """Two-tap bilinear resize of one axis: O(output size), whatever the scale factor."""
    i0, i1, w1 = _taps(x.shape[axis], out_size)
    shape = [1] * x.ndim
    shape[axis] = out_size
    w = w1.astype(np.float32).reshape(shape)
    a = np.take(x, i0, axis=axis)
    b = np.take(x, i1, axis=axis)
    # a + w * (b - a), computed in place on the gathered copies
    np.subtract(b, a, out=b)
    np.multiply(b, w, out=b)
    np.add(a, b, out=a)
    return a


def resize_2d(x: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of the first two axes of ``x`` (H, W[, C]) to ``out_hw``, float32.

    Equal to ``F.interpolate(mode="bilinear", align_corners=False, antialias=False)`` up to
    float rounding. The axis that shrinks most is resized first, so the intermediate is small.
    """
    oh, ow = int(out_hw[0]), int(out_hw[1])
    x = np.asarray(x)
    if x.dtype != np.float32:
        x = x.astype(np.float32)
    h, w = x.shape[:2]
    if (oh / h) <= (ow / w):
        return _resize_axis(_resize_axis(x, oh, 0), ow, 1)
    return _resize_axis(_resize_axis(x, ow, 1), oh, 0)


@dataclass(frozen=True)
class Transform:
    """Geometry of one image's preprocessing: original size and resized (unpadded) size."""

    orig_h: int
    orig_w: int
    new_h: int
    new_w: int
    input_size: int

    @property
    def scale_xy(self) -> tuple[float, float]:
        return self.new_w / self.orig_w, self.new_h / self.orig_h


def get_transform(orig_hw: tuple[int, int], pp: Preprocessing) -> Transform:
    h, w = int(orig_hw[0]), int(orig_hw[1])
    s = pp.input_size
    if pp.resize == "stretch":
        return Transform(h, w, s, s, s)
    scale = s / max(h, w)
    return Transform(h, w, max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5)), s)


def preprocess_image(img: np.ndarray, pp: Preprocessing) -> tuple[np.ndarray, Transform]:
    """uint8 (H, W) or (H, W, 3) -> encoder input (1, 3, S, S) float32 and its :class:`Transform`.

    A grey (H, W) slice (3D cases) is resized once and normalised per channel, which gives
    the same values as replicating it to RGB first.
    """
    tf = get_transform(img.shape[:2], pp)
    r = resize_2d(img, (tf.new_h, tf.new_w))
    out = np.zeros((1, 3, pp.input_size, pp.input_size), np.float32)
    for c in range(3):
        src = r if img.ndim == 2 else r[:, :, c]
        dst = out[0, c, : tf.new_h, : tf.new_w]
        np.subtract(src, np.float32(pp.pixel_mean[c]), out=dst)
        dst /= np.float32(pp.pixel_std[c])
    return out, tf


def transform_coords(xy: np.ndarray, tf: Transform) -> np.ndarray:
    """Pixel coordinates (..., 2) in the original image -> model-input pixels (float32)."""
    sx, sy = tf.scale_xy
    out = np.asarray(xy, np.float32).copy()
    out[..., 0] *= sx
    out[..., 1] *= sy
    return out


def transform_boxes(boxes_xyxy: np.ndarray, tf: Transform) -> np.ndarray:
    """Boxes (B, 4) xyxy in original pixels -> model-input pixels (float32)."""
    b = np.asarray(boxes_xyxy, np.float32).reshape(-1, 2, 2)
    return transform_coords(b, tf).reshape(-1, 4)


@lru_cache(maxsize=32)
def _mask_matrices(low: int, tf: Transform) -> tuple[np.ndarray, np.ndarray]:
    """Matrices taking (L, L) low-res logits to the original (H, W) grid.

    Low-res logits cover the padded S x S input; they are upsampled to S, the valid
    (new_h, new_w) region is cropped, and that is resized to the original size. All three
    steps are linear, so they compose into one (H, L) and one (W, L) matrix.
    """
    s = tf.input_size
    up = resize_matrix(low, s)
    mh = resize_matrix(tf.new_h, tf.orig_h) @ up[: tf.new_h]
    mw = resize_matrix(tf.new_w, tf.orig_w) @ up[: tf.new_w]
    mh.flags.writeable = False
    mw.flags.writeable = False
    return mh, mw


def upsample_logits(
    logits: np.ndarray, tf: Transform, rows: slice | None = None, cols: slice | None = None
) -> np.ndarray:
    """Low-res logits (B, L, L) -> logits on the original grid (B, H, W) float32.

    ``rows``/``cols`` restrict the output to a window of the original image (a box's mask
    never needs the whole image). The interpolation matrices are banded, so only the
    low-res rows/columns that the window depends on are multiplied.
    """
    low = logits.shape[-1]
    mh, mw = _mask_matrices(low, tf)
    if rows is not None:
        mh = mh[rows]
    if cols is not None:
        mw = mw[cols]
    x = np.asarray(logits, np.float32).reshape(-1, low, low)
    if mh.shape[0] == 0 or mw.shape[0] == 0:
        return np.zeros((x.shape[0], mh.shape[0], mw.shape[0]), np.float32)
    r0, r1 = _band(mh)
    c0, c1 = _band(mw)
    a = np.ascontiguousarray(mh[:, r0:r1])
    b = np.ascontiguousarray(mw[:, c0:c1].T)
    return np.matmul(np.matmul(a, x[:, r0:r1, c0:c1]), b)


def _band(m: np.ndarray) -> tuple[int, int]:
    """First and one-past-last column of ``m`` with a non-zero weight."""
    nz = np.flatnonzero(m.any(axis=0))
    return int(nz[0]), int(nz[-1]) + 1


def postprocess_masks(logits: np.ndarray, tf: Transform, threshold: float = 0.0) -> np.ndarray:
    """Low-res logits (B, L, L) -> boolean masks (B, H, W) on the original grid."""
    return upsample_logits(logits, tf) > threshold
