"""Numpy pre- and post-processing, exactly as the manifest's :class:`Preprocessing` records it.

Used by the runtime (no torch) and by distill's data pipeline, so training and inference
see identical inputs. Images are resized like SAM2's torchvision ``Resize`` (bilinear,
antialiased: :func:`resize_2d`); low-res mask logits are enlarged like SAM2's post-processing,
``F.interpolate(mode="bilinear", align_corners=False)`` without antialiasing
(:func:`resize_matrix`, :func:`upsample_logits`).
"""

from __future__ import annotations

import math
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


@lru_cache(maxsize=128)
def _aa_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and weights, each (out_size, K), of torchvision's antialiased bilinear resize.

    The rule of ATen's ``_upsample_bilinear2d_aa`` (PIL's resampling): a triangle filter whose
    support grows with the shrink factor (``scale = in/out`` when > 1, else 1), centred at
    ``(i + 0.5) * scale``, weights normalised to sum 1 over the window that lies inside the
    image. When enlarging it is the ordinary half-pixel bilinear interpolation.
    """
    scale = in_size / out_size
    support = scale if scale >= 1.0 else 1.0
    inv = 1.0 / scale if scale >= 1.0 else 1.0
    centre = scale * (np.arange(out_size, dtype=np.float64) + 0.5)
    # C++ casts truncate toward zero; both bounds are then clamped to the image.
    lo = np.maximum(np.trunc(centre - support + 0.5).astype(np.int64), 0)
    hi = np.minimum(np.trunc(centre + support + 0.5).astype(np.int64), in_size)
    k = max(1, int((hi - lo).max()))
    j = lo[:, None] + np.arange(k)[None, :]
    w = np.clip(1.0 - np.abs((j - centre[:, None] + 0.5) * inv), 0.0, None)
    w[j >= hi[:, None]] = 0.0
    w /= w.sum(axis=1, keepdims=True)
    idx = np.minimum(j, in_size - 1)
    w = w.astype(np.float32)
    for a in (idx, w):
        a.flags.writeable = False
    return idx, w


def _resize_axis(x: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    """Antialiased bilinear resize of one axis: K gathers of the output size (K = taps per sample)."""
    idx, w = _aa_taps(x.shape[axis], out_size)
    shape = [1] * x.ndim
    shape[axis] = out_size
    out = np.take(x, idx[:, 0], axis=axis)
    out *= w[:, 0].reshape(shape)
    for t in range(1, idx.shape[1]):
        col = w[:, t]
        if not col.any():
            continue
        g = np.take(x, idx[:, t], axis=axis)
        g *= col.reshape(shape)
        out += g
    return out


def resize_2d(x: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Antialiased bilinear resize of the first two axes of ``x`` (H, W[, C]) to ``out_hw``, float32.

    Equal to torchvision's ``Resize`` on a tensor (``antialias=True``, what SAM2's transforms
    use), i.e. ``F.interpolate(mode="bilinear", align_corners=False, antialias=True)``, up to
    float rounding, when shrinking and when enlarging. The axis that shrinks most is resized
    first, so the intermediate is small.
    """
    oh, ow = int(out_hw[0]), int(out_hw[1])
    x = np.asarray(x)
    if x.dtype != np.float32:
        x = x.astype(np.float32)
    h, w = x.shape[:2]
    if (oh / h) <= (ow / w):
        return _resize_axis(_resize_axis(x, oh, 0), ow, 1)
    return _resize_axis(_resize_axis(x, ow, 1), oh, 0)


def crop_window(union_xyxy: np.ndarray | None, h: int, w: int, input_size: int,
                context: float) -> tuple[int, int, int, int]:
    """The crop ``(y0, y1, x0, x1)`` (end exclusive) that :class:`Preprocessing`'s ``crop_context`` asks for.

    ``union_xyxy``: inclusive ``[x0, y0, x1, y1]`` of everything to segment (the union of the
    boxes), or None for the whole image. The window is a square of side
    ``max(context * longer side of the union, input_size)`` centred on the union, clipped to
    the image size and shifted to lie inside the image. ``context`` <= 0: the whole image.
    """
    if context <= 0 or union_xyxy is None:
        return 0, h, 0, w
    x0, y0, x1, y1 = (float(v) for v in union_xyxy)
    side = max(context * max(x1 - x0 + 1, y1 - y0 + 1), float(input_size))
    sw, sh = min(w, int(math.ceil(side))), min(h, int(math.ceil(side)))
    cx, cy = (x0 + x1 + 1) / 2, (y0 + y1 + 1) / 2
    cx0 = int(min(max(round(cx - sw / 2), 0), w - sw))
    cy0 = int(min(max(round(cy - sh / 2), 0), h - sh))
    return cy0, cy0 + sh, cx0, cx0 + sw


Window = tuple[int, int, int, int]  # y0, y1, x0, x1 (end exclusive)


def box_windows(boxes_xyxy: np.ndarray, h: int, w: int, pp: Preprocessing) -> list[tuple[Window | None, list[int]]]:
    """Which boxes are segmented in which crop window: ``[(window or None, box indexes), ...]``.

    ``boxes_xyxy`` (N, 4): inclusive ``[x0, y0, x1, y1]`` (for 3D boxes their x/y extent).
    ``crop_context`` <= 0: one group, the whole image (None). ``crop_mode`` ``"union"``: one
    group, :func:`crop_window` around the union of all boxes. ``"box"``: each box's own window,
    ``crop_context`` times its longer side and at least ``crop_min_px`` pixels (so small objects
    are enlarged to the input size); boxes whose own window would cover at least
    ``crop_shared_frac`` of the image go into one shared group with the union rule instead
    (listed first), and boxes with identical windows share one. A window that is the whole
    image is None. The same rule serves training (distill) and the runtime.
    """
    boxes = np.asarray(boxes_xyxy, np.float64).reshape(-1, 4)
    n = boxes.shape[0]
    if n == 0:
        return []

    def union_group(idx: list[int]) -> tuple[Window | None, list[int]]:
        b = boxes[idx]
        union = np.array([b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()])
        win = crop_window(union, h, w, pp.input_size, pp.crop_context)
        return (None if win == (0, h, 0, w) else win), idx

    if pp.crop_context <= 0:
        return [(None, list(range(n)))]
    if pp.crop_mode == "union":
        return [union_group(list(range(n)))]
    shared: list[int] = []
    own: dict[Window, list[int]] = {}
    for i in range(n):
        win = crop_window(boxes[i], h, w, pp.crop_min_px, pp.crop_context)
        if (win[1] - win[0]) * (win[3] - win[2]) >= pp.crop_shared_frac * h * w:
            shared.append(i)
        else:
            own.setdefault(win, []).append(i)
    groups: list[tuple[Window | None, list[int]]] = [union_group(shared)] if shared else []
    groups.extend(own.items())
    return groups


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


def ellipsoid_section(box3d: np.ndarray, z: int) -> np.ndarray:
    """The 2D box (x0, y0, x1, y1) of slice ``z``'s cross-section of the ellipsoid inscribed in the 3D box
    ``(x0, y0, z0, x1, y1, z1)`` (inclusive indices; z semi-axis half the slice count): the box's
    x/y extent scaled about its centre by sqrt(1 - t^2), t the slice's distance from the z-centre
    in semi-axes (the middle slice keeps the whole box, the end slices get a smaller one)."""
    x0, y0, z0, x1, y1, z1 = (float(v) for v in box3d[:6])
    t = (z - (z0 + z1) / 2) / ((z1 - z0 + 1) / 2)
    s = float(np.sqrt(max(0.0, 1.0 - t * t)))
    cx, cy, hx, hy = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    return np.array([cx - s * hx, cy - s * hy, cx + s * hx, cy + s * hy], np.float32)
