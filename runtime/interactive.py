"""Per-class prompts of the 2025 interactive format, and the pure rules the predictor applies to them.

The public API (also for callers that build prompts themselves, e.g. a web app):

* :class:`SliceBox`: a 2D box drawn on one slice (``z_mid``) plus the class's z range;
* :class:`ClassPrompt`: one class (``label``), its optional :class:`SliceBox` and its
  foreground / background clicks as ``(z, y, x)`` voxel indices;
* :func:`prompts_from_case`: the prompts of a loaded 2025 :class:`~lapsam.case.Case`;
* ``Predictor.predict_prompts(volume, prompts, prev_pred)`` segments them
  (``lapsam.runtime.predictor``; the rule is written down there and in runtime/README.md).

Everything here is numpy only (the runtime never imports torch or scipy).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from lapsam.case import Case
from lapsam.preprocess import Transform, resize_2d

Point = tuple[int, int, int]  # (z, y, x) voxel indices, as the 2025 clicks


@dataclass(frozen=True)
class SliceBox:
    """A 2D box ``[x_min, y_min, x_max, y_max]`` (inclusive pixels) on slice ``z_mid``, and the z range.

    The 2025 format's box dict: ``z_min``/``z_max`` bound the class's extent; only the
    middle slice's x/y extent is given.
    """

    x_min: int
    y_min: int
    x_max: int
    y_max: int
    z_mid: int
    z_min: int
    z_max: int

    def __post_init__(self) -> None:
        if self.x_min > self.x_max or self.y_min > self.y_max or self.z_min > self.z_max:
            raise ValueError(f"inverted box {self}")
        if not self.z_min <= self.z_mid <= self.z_max:
            raise ValueError(f"z_mid {self.z_mid} outside the z range {self.z_min}..{self.z_max}")

    @property
    def xyxy(self) -> np.ndarray:
        return np.array([self.x_min, self.y_min, self.x_max, self.y_max], np.float32)

    @classmethod
    def from_dict(cls, d: dict[str, int]) -> SliceBox:
        """From a 2025 box dict (``z_mid`` defaults to the middle of the z range)."""
        z_mid = d.get("z_mid", (int(d["z_min"]) + int(d["z_max"])) // 2)
        return cls(int(d["z_mid_x_min"]), int(d["z_mid_y_min"]), int(d["z_mid_x_max"]), int(d["z_mid_y_max"]),
                   int(z_mid), int(d["z_min"]), int(d["z_max"]))


@dataclass
class ClassPrompt:
    """What the user gave for one class: label (1-based), an optional box, and clicks ``(z, y, x)``."""

    label: int
    box: SliceBox | None = None
    fg: list[Point] = field(default_factory=list)
    bg: list[Point] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.label < 1:
            raise ValueError(f"labels start at 1, got {self.label}")
        self.fg = [tuple(int(v) for v in p) for p in self.fg]  # type: ignore[misc]
        self.bg = [tuple(int(v) for v in p) for p in self.bg]  # type: ignore[misc]
        if any(len(p) != 3 for p in self.fg + self.bg):
            raise ValueError("clicks are (z, y, x) triples")

    @property
    def has_clicks(self) -> bool:
        return bool(self.fg or self.bg)

    def clicks_on(self, z: int) -> tuple[np.ndarray, np.ndarray]:
        """Clicks on slice ``z``: pixel centres ``(x + 0.5, y + 0.5)`` (P, 2) and labels (1 fg, 0 bg)."""
        pts = [(p[2] + 0.5, p[1] + 0.5, 1.0) for p in self.fg if p[0] == z]
        pts += [(p[2] + 0.5, p[1] + 0.5, 0.0) for p in self.bg if p[0] == z]
        if not pts:
            return np.zeros((0, 2), np.float32), np.zeros((0,), np.float32)
        a = np.asarray(pts, np.float32)
        return a[:, :2].copy(), a[:, 2].copy()

    def fg_on(self, z: int) -> list[tuple[int, int]]:
        """Foreground clicks on slice ``z`` as (x, y)."""
        return [(p[2], p[1]) for p in self.fg if p[0] == z]

    def z_range(self, depth: int) -> tuple[int, int]:
        """Slices this class may occupy: the box's z range widened to hold its fg clicks, else the volume."""
        if self.box is None:
            return 0, depth - 1
        lo = min([self.box.z_min] + [q[0] for q in self.fg])
        hi = max([self.box.z_max] + [q[0] for q in self.fg])
        return max(0, lo), min(depth - 1, hi)


def prompts_from_case(case: Case) -> list[ClassPrompt]:
    """One :class:`ClassPrompt` per class of a 2025 case (class i -> label i + 1).

    Classes are the longer of the box list and the click list; a box the case marked invalid
    (``case.box_errors``: wholly outside the image) is dropped, its clicks kept.
    """
    n = case.num_objects
    out = []
    for i in range(n):
        box = None
        if case.box_dicts is not None and i < len(case.box_dicts) and i not in case.box_errors:
            b = case.boxes[i]  # clipped to the image by the case loader
            z_mid = int(case.box_mid_z[i]) if case.box_mid_z is not None else int((b[2] + b[5]) // 2)
            box = SliceBox(int(b[0]), int(b[1]), int(b[3]), int(b[4]), z_mid, int(b[2]), int(b[5]))
        fg: list[Point] = []
        bg: list[Point] = []
        if case.clicks is not None and i < len(case.clicks):
            fg = [tuple(p) for p in case.clicks[i].get("fg", [])]  # type: ignore[misc]
            bg = [tuple(p) for p in case.clicks[i].get("bg", [])]  # type: ignore[misc]
        out.append(ClassPrompt(i + 1, box, fg, bg))
    return out


def drop_outside_clicks(prompts: Sequence[ClassPrompt], shape: tuple[int, int, int]) -> list[str]:
    """Remove clicks outside the volume (in place); one message per removed click."""
    msgs = []
    for p in prompts:
        for kind in ("fg", "bg"):
            pts = getattr(p, kind)
            keep = [q for q in pts if all(0 <= v < s for v, s in zip(q, shape, strict=True))]
            for q in pts:
                if q not in keep:
                    msgs.append(f"class {p.label}: {kind} click {list(q)} lies outside the volume {list(shape)}; ignored")
            setattr(p, kind, keep)
    return msgs


def pending_clicks(prompt: ClassPrompt, segs: np.ndarray) -> list[Point]:
    """Clicks that ``segs`` contradicts: fg where the label is absent, bg where it is present."""
    lab = prompt.label
    out = [p for p in prompt.fg if segs[p] != lab]
    out += [p for p in prompt.bg if segs[p] == lab]
    return out


def mask_bbox(m: np.ndarray) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) inclusive of a 2D boolean mask, None when empty."""
    rows = np.flatnonzero(m.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(m.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])


def grow_box(box: Sequence[float], margin: int, h: int, w: int) -> np.ndarray:
    x0, y0, x1, y1 = box
    return np.array([max(0, x0 - margin), max(0, y0 - margin), min(w - 1, x1 + margin), min(h - 1, y1 + margin)],
                    np.float32)


def include_points(box: np.ndarray | None, pts_xy: Sequence[tuple[int, int]], margin: int, h: int, w: int
                   ) -> np.ndarray | None:
    """``box`` widened for foreground clicks ``pts_xy`` (x, y); no box stays no box (clicks only).

    A click inside the box changes nothing. A click outside it moves that side out to as far
    beyond the click as the click lies beyond the side, plus ``margin``: a correction click sits
    at the centre of the missed region (the organisers place it at the maximum of the error's
    distance transform), so the region reaches about that far on the other side of it.
    """
    if box is None:
        return None
    x0, y0, x1, y1 = (float(v) for v in box)
    for x, y in pts_xy:
        if x < x0:
            x0 = min(x0, 2 * x - x0 - margin)
        elif x > x1:
            x1 = max(x1, 2 * x - x1 + margin)
        if y < y0:
            y0 = min(y0, 2 * y - y0 - margin)
        elif y > y1:
            y1 = max(y1, 2 * y - y1 + margin)
    return np.array([max(0.0, x0), max(0.0, y0), min(w - 1.0, x1), min(h - 1.0, y1)], np.float32)


def mask_dsc(a: np.ndarray, b: np.ndarray) -> float:
    """DSC of two boolean masks; 1.0 when both are empty (nothing changed)."""
    sa, sb = int(a.sum()), int(b.sum())
    if sa + sb == 0:
        return 1.0
    return 2.0 * int(np.logical_and(a, b).sum()) / (sa + sb)


def mask_to_logits(mask: np.ndarray, tf: Transform, low: int, logit: float) -> np.ndarray:
    """A binary (H, W) mask -> (L, L) low-res logits (+logit inside, -logit outside) for ``mask_input``.

    The mask goes through the image's own geometry (resize to the unpadded input size, zero
    padding to S x S), then down to L x L; 0.5 maps to logit 0.
    """
    s = tf.input_size
    m = np.zeros((s, s), np.float32)
    m[: tf.new_h, : tf.new_w] = resize_2d(mask.astype(np.float32), (tf.new_h, tf.new_w))
    lo = resize_2d(m, (low, low))
    return ((lo - 0.5) * (2.0 * logit)).astype(np.float32)


def write_label(seg2d: np.ndarray, label: int, m: np.ndarray) -> None:
    """Replace ``label`` on one slice by mask ``m``: old pixels of the label not in ``m`` become 0;
    ``m`` takes pixels of smaller labels and leaves larger labels alone (later classes win)."""
    seg2d[(seg2d == label) & ~m] = 0
    seg2d[m & (seg2d < label)] = label
