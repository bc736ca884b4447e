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


@lru_cache(maxsize=64)
def resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) float32 matrix M so that ``M @ x`` resizes x along axis 0.

    Half-pixel centres, edge clamped: PyTorch's bilinear ``align_corners=False``.
    """
    scale = in_size / out_size
    src = (np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5
    src = np.maximum(src, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = src - i0
    w0 = 1.0 - w1
    m = np.zeros((out_size, in_size), dtype=np.float64)
    rows = np.arange(out_size)
    np.add.at(m, (rows, i0), w0)
    np.add.at(m, (rows, i1), w1)
    m.flags.writeable = False
    return m.astype(np.float32)


def resize_2d(x: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of the first two axes of ``x`` (H, W[, C]) to ``out_hw``, float32."""
    h, w = x.shape[:2]
    oh, ow = out_hw
    x = x.astype(np.float32, copy=False)
    mh = resize_matrix(h, oh)
    mw = resize_matrix(w, ow)
    if x.ndim == 2:
        return mh @ x @ mw.T
    # (H, W, C): rows then columns
    t = np.tensordot(mh, x, axes=(1, 0))  # (oh, W, C)
    return np.einsum("ow,hwc->hoc", mw, t, optimize=True).astype(np.float32, copy=False)


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


def to_rgb(img: np.ndarray) -> np.ndarray:
    """(H, W) grey or (H, W, 3) -> (H, W, 3)."""
    if img.ndim == 2:
        return np.repeat(img[:, :, None], 3, axis=2)
    return img


def preprocess_image(img: np.ndarray, pp: Preprocessing) -> tuple[np.ndarray, Transform]:
    """uint8 (H, W) or (H, W, 3) -> encoder input (1, 3, S, S) float32 and its :class:`Transform`."""
    tf = get_transform(img.shape[:2], pp)
    mean = np.asarray(pp.pixel_mean, np.float32)
    std = np.asarray(pp.pixel_std, np.float32)
    if img.ndim == 2:
        # Grey slice: resize once, then broadcast to three channels.
        r = resize_2d(img, (tf.new_h, tf.new_w))[:, :, None]
    else:
        r = resize_2d(img, (tf.new_h, tf.new_w))
    out = np.zeros((1, 3, pp.input_size, pp.input_size), np.float32)
    chw = (np.broadcast_to(r, (tf.new_h, tf.new_w, 3)) - mean) / std
    out[0, :, : tf.new_h, : tf.new_w] = chw.transpose(2, 0, 1)
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

    ``rows``/``cols`` restrict the output to a window of the original image (for speed:
    a box's mask never needs the whole image).
    """
    low = logits.shape[-1]
    mh, mw = _mask_matrices(low, tf)
    if rows is not None:
        mh = mh[rows]
    if cols is not None:
        mw = mw[cols]
    x = np.asarray(logits, np.float32).reshape(-1, low, low)
    return np.matmul(np.matmul(mh, x), mw.T)


def postprocess_masks(logits: np.ndarray, tf: Transform, threshold: float = 0.0) -> np.ndarray:
    """Low-res logits (B, L, L) -> boolean masks (B, H, W) on the original grid."""
    return upsample_logits(logits, tf) > threshold
