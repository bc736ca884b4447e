"""The torch-free predictor: a case in, ``segs`` out.

2D: one encoder call per image, all boxes decoded in chunks of ``decoder_batch``.

3D: each box starts on its middle slice (``box_mid_z`` when the case gives one, else
``(z_min + z_max) // 2``) with the given box, and goes slice by slice to ``z_max``
and down to ``z_min`` (inclusive). The prompt on each slice is, for 2024 boxes with
``prompt_3d="ellipsoid"`` (the default), the slice's cross-section of the ellipsoid inscribed in
the given box (:func:`lapsam.preprocess.ellipsoid_section`: the whole box on the middle slice, smaller towards
z_min and z_max), and a mask covering less than the manifest's ``min_mask_fill`` of that box is
replaced by its ``fill_shape``, as on 2D boxes; with ``"given"``, the given box on every slice;
with ``"propagate"`` (and always for 2025 box sweeps) the bounding box of the previous slice's
mask grown by ``margin_px``. Work is scheduled as two sweeps over
the slices so that every slice is encoded at most once per case:

1. ascending over every slice that has "upward" work (middle slice .. z_max of some box),
   the decoder batched over all boxes active on that slice;
2. descending over every slice that has "downward" work (z_min .. middle - 1 of some box),
   starting from the middle-slice masks found in sweep 1.

A slice encoded in sweep 1 that sweep 2 needs is kept in a bounded
:class:`~lapsam.runtime.cache.EmbeddingCache` (fp16) and dropped after its use in sweep 2;
only slices between the lowest and highest middle slice can be in both sweeps, so the
cache holds at most that many slices (for two opposite sweeps over the same slices no
order can hold fewer). If the byte limit is hit, a slice is encoded again rather than
memory growing; this is counted and logged.

When a box's mask vanishes on a slice, ``on_empty`` decides the next prompt:
``"box"`` (default) prompts the next slice with the given box's x/y extent again,
``"stop"`` ends that box's propagation in that direction. The default is ``"box"``
because the challenge's boxes are tight 3D boxes of the reference: in every real 3D case
shipped in demo/data the object is present on every slice of its z-range (see
runtime/README.md), so a vanished mask inside the range is a model miss, never the
object's end, and stopping would turn one missed slice into a lost half-object.

Overlaps: box i is label i+1. Where two masks claim a pixel, it goes to the mask with the
higher logit there (ties: the larger label), whatever order the sweeps paste in. With
``overlap="nested"`` (default) a box that lies wholly inside another box first takes the pixels
of its own mask from the outer box's mask (labels are disjoint, so an object boxed inside
another object's box is not part of it); a box that stands in for a weak mask never does.

Masks are computed on a window around a box (grown by ``window_pad_frac`` + ``window_pad_px``).
For 2024 cases (tight 3D boxes) that is the given box on every slice, and a vanished mask
falls back to the given box. For 2025 cases the given box is only the middle slice's
extent, so the window follows the propagated prompt of each slice, and a vanished mask
falls back to the last prompt of that sweep (``follow_prompt``).

2025 cases (:meth:`Predictor.predict_prompts`, prompts from
:mod:`lapsam.runtime.interactive`), the refinement rule:

1. the starting segmentation is ``prev_pred`` when given, else empty; every class with a
   box that it lacks entirely is segmented by the sweeps above (the box's z range, from
   ``z_mid``, ``follow_prompt``);
2. a click is *pending* when the starting segmentation contradicts it (a fg click outside
   its label, a bg click inside it); the clicks that ``prev_pred`` already satisfies cause no
   work. Each slice with a pending click of a class is re-segmented for that class with a
   box (the given box on ``z_mid``, else the bbox of the class's current mask on that slice,
   else of its masks on the two neighbour slices, each grown by ``margin_px``; no box at all
   when there is nothing: clicks only) and every click of that class on the slice as points.
   A fg click outside that box widens it to reach as far beyond the click as the click lies
   beyond the box (+ ``margin_px``): the organisers click the centre of the missed region;
3. the change then propagates slice by slice both ways: the next slice is re-segmented
   with the bbox of the new mask + ``margin_px`` (and that slice's own clicks); it stops
   on the first slice whose new mask has DSC >= ``settle_dsc`` with the mask it replaces
   (the change has died out; two empty masks count as equal), at the class's z range, or
   at the volume's end. When the new mask is empty the next prompt is the last one (a
   class with a box, ``on_empty="box"``) or nothing (clicks only: the object has ended, so
   the following slices lose the label until the old mask is empty too).

Slices no pending click reaches keep ``prev_pred`` exactly.

Crop (models exported with ``Preprocessing.crop_context`` > 0, such as the default model):
the boxes are grouped into crop windows by :func:`lapsam.preprocess.box_windows` (one window
around their union, or with ``crop_mode="box"`` one per small box and one shared window for
the large ones; :mod:`lapsam.runtime.crop`); each group is segmented as above on its window
(2024 boxes, and the sweeps of 2025 boxes) and pasted back, so small objects keep their
pixels. Each window is encoded once per slice it needs. Clicks refine on the whole slice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lapsam.case import FORMAT_2025, Case
from lapsam.errors import CaseError
from lapsam.manifest import ModelManifest, Preprocessing
from lapsam.preprocess import (
    Transform,
    ellipsoid_section,
    get_transform,
    preprocess_image,
    transform_boxes,
    transform_coords,
    upsample_logits,
)

from .cache import EmbeddingCache
from .cpus import available_cpus, blas_threads
from .crop import case_windows, crop_case, paste_labels, shift_boxes, volume_windows
from .engines import CallStats, CountingEngine, Engine, EngineOptions, Feats, load_engine
from .interactive import (
    ClassPrompt,
    drop_outside_clicks,
    grow_box,
    include_points,
    mask_bbox,
    mask_dsc,
    mask_to_logits,
    pending_clicks,
    prompts_from_case,
    write_label,
)

log = logging.getLogger(__name__)

ON_EMPTY = ("box", "stop")
PROMPT_3D = ("given", "ellipsoid", "propagate")
OVERLAP = ("nested", "logit")


@dataclass
class PredictorConfig:
    """Scheduling and post-processing knobs (the defaults are what ``lapsam predict`` uses)."""

    decoder_batch: int = 16  # boxes per decoder call (bounds decoder memory)
    # 2024 3D boxes: prompt every slice with its section of the box's inscribed ellipsoid
    # ("ellipsoid"), with the given box ("given"), or with the previous slice's
    # mask bbox grown by margin_px ("propagate"). 2025 sweeps always propagate (their box is the
    # middle slice's). "ellipsoid" measured best on the default model (models/default/README.md).
    prompt_3d: str = "ellipsoid"
    margin_px: int = 2  # propagated prompt = previous mask's bbox grown by this many pixels
    on_empty: str = "box"  # what to prompt when the previous slice's mask is empty: "box" | "stop"
    window_pad_frac: float = 0.1  # masks are computed on the box grown by this fraction of its size ...
    window_pad_px: int = 8  # ... plus this many pixels; outside that window a label stays empty
    cache_fp16: bool = True  # store cached slice embeddings as float16
    cache_limit_mb: float = 1024.0  # hard bound on the embedding cache
    blas_threads: int | None = 1  # numpy's BLAS threads (small products: 1 is fastest); None: leave as is
    # 2025 refinement: a click's change stops propagating on the first slice whose new mask has
    # at least this DSC with the mask it replaces.
    settle_dsc: float = 0.95
    # 2025 refinement: also give the decoder the slice's previous mask as mask_input (the model
    # is not trained with mask inputs, so this is off by default; see runtime/README.md).
    prev_mask_input: bool = False
    mask_input_logit: float = 10.0  # |logit| of that mask_input inside / outside the previous mask
    # 2024 cases, two masks on one pixel: "nested" (a box wholly inside another box wins its mask's
    # pixels from the outer one's; otherwise the higher logit) or "logit" (the higher logit only)
    overlap: str = "nested"

    def __post_init__(self) -> None:
        if self.prompt_3d not in PROMPT_3D:
            raise ValueError(f"prompt_3d must be one of {PROMPT_3D}, got {self.prompt_3d!r}")
        if self.overlap not in OVERLAP:
            raise ValueError(f"overlap must be one of {OVERLAP}, got {self.overlap!r}")
        if self.on_empty not in ON_EMPTY:
            raise ValueError(f"on_empty must be one of {ON_EMPTY}, got {self.on_empty!r}")
        if self.decoder_batch < 1:
            raise ValueError("decoder_batch must be >= 1")
        if not 0.0 <= self.settle_dsc <= 1.0:
            raise ValueError(f"settle_dsc must lie in [0, 1], got {self.settle_dsc}")


@dataclass
class CaseReport:
    """What happened on one case (logged; the benchmark and tests read it)."""

    name: str
    seconds: float = 0.0
    encoder_calls: int = 0
    decoder_calls: int = 0
    decoder_items: int = 0
    encoder_s: float = 0.0
    decoder_s: float = 0.0
    skipped_boxes: dict[int, str] = field(default_factory=dict)
    empty_fallbacks: int = 0  # 3D: prompts that fell back to the given box (on_empty="box")
    stopped: int = 0  # 3D: propagations ended by an empty mask (on_empty="stop")
    slices_needed: int = 0  # 3D: size of the union of the boxes' z-ranges (summed over crop windows)
    reencoded: int = 0  # 3D: slices encoded twice because the cache limit was hit
    cache_peak_slices: int = 0
    cache_peak_mb: float = 0.0
    # 2025 cases
    swept_classes: list[int] = field(default_factory=list)  # labels segmented from their box
    pending_clicks: int = 0  # clicks the starting segmentation contradicted
    refined_slices: int = 0  # (class, slice) pairs re-segmented because of clicks
    ignored_clicks: list[str] = field(default_factory=list)


def _window(box_xy: np.ndarray, h: int, w: int, frac: float, pad: int) -> tuple[slice, slice]:
    """Rows/cols of the box (x0, y0, x1, y1 inclusive) grown by ``frac`` of its size + ``pad`` px."""
    x0, y0, x1, y1 = (int(v) for v in box_xy)
    gx = int(round((x1 - x0 + 1) * frac)) + pad
    gy = int(round((y1 - y0 + 1) * frac)) + pad
    return slice(max(0, y0 - gy), min(h, y1 + gy + 1)), slice(max(0, x0 - gx), min(w, x1 + gx + 1))


def fill_shape(box_xy: np.ndarray, shape: str, rows: slice, cols: slice) -> np.ndarray:
    """The stand-in for a weak mask on the window ``rows`` x ``cols``: every pixel of the box
    ``(x0, y0, x1, y1)`` (inclusive pixel indices), or of the ellipse inscribed in it (``shape``
    "ellipse": centre at the box's centre, semi-axes half its width and height in pixels)."""
    x0, y0, x1, y1 = (float(v) for v in box_xy[:4])
    ys = np.arange(rows.start, rows.stop, dtype=np.float64)[:, None]
    xs = np.arange(cols.start, cols.stop, dtype=np.float64)[None, :]
    in_box = (ys >= y0) & (ys <= y1) & (xs >= x0) & (xs <= x1)
    if shape != "ellipse":  # "box" (Preprocessing checks the word)
        return in_box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    rx, ry = (x1 - x0 + 1) / 2, (y1 - y0 + 1) / 2
    return in_box & (((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1.0)


def nested_boxes(boxes: np.ndarray, valid: Sequence[int]) -> np.ndarray:
    """``out[a, b]``: label a's box (box a-1, inclusive 2D or 3D corners) lies wholly inside label
    b's box and is not the same box; labels 0..N, only ``valid`` boxes take part."""
    b = np.asarray(boxes, np.int64)
    n = b.shape[0]
    out = np.zeros((n + 1, n + 1), bool)
    if n == 0:
        return out
    k = b.shape[1] // 2
    lo, hi = b[:, :k], b[:, k:]
    inside = (lo[:, None] >= lo[None]).all(-1) & (hi[:, None] <= hi[None]).all(-1)
    same = (b[:, None] == b[None]).all(-1)
    ok = np.zeros(n, bool)
    ok[list(valid)] = True
    out[1:, 1:] = inside & ~same & ok[:, None] & ok[None]
    return out


class Predictor:
    """Runs an exported model on challenge cases; see the module docstring for the schedule."""

    def __init__(
        self,
        engine: Engine,
        preprocessing: Preprocessing,
        config: PredictorConfig | None = None,
        manifest: ModelManifest | None = None,
        threads: int | None = None,
    ):
        self.engine = CountingEngine(engine)
        self.threads = threads or available_cpus()
        self.pp = preprocessing
        self.config = config or PredictorConfig()
        self.manifest = manifest
        self.last_report: CaseReport | None = None
        self._zeros: dict[int, tuple[np.ndarray, ...]] = {}

    # ---- construction -----------------------------------------------------------------
    @classmethod
    def from_model_dir(
        cls,
        path: str | Path,
        backend: str = "openvino",
        threads: int | None = None,
        precision: str = "fp32",
        cache_dir: str | None = None,
        precision_hint: str | None = None,
        config: PredictorConfig | None = None,
        background: bool = False,
    ) -> Predictor:
        """Load (sha256-checked) and compile the model in ``path`` once; reuse for every case.

        ``background``: return once the compiles are started; the engine waits for them at its first
        call (:func:`~lapsam.runtime.engines.load_engine`)."""
        path = Path(path)
        manifest = ModelManifest.load(path)
        opts = EngineOptions(backend=backend, precision=precision, threads=threads, cache_dir=cache_dir,
                             precision_hint=precision_hint)
        n = threads or available_cpus()
        t = time.perf_counter()
        engine = load_engine(path, manifest, opts, n, background=background)
        log.info("%s %s (%s %s, %d threads) in %.2f s", "started loading" if background else "loaded", manifest.name,
                 opts.backend, precision, n, time.perf_counter() - t)
        return cls(engine, manifest.preprocessing, config, manifest, threads=n)

    @property
    def stats(self) -> CallStats:
        return self.engine.stats

    # ---- shared steps -----------------------------------------------------------------
    def _encode(self, img: np.ndarray) -> tuple[Feats, Transform]:
        x, tf = preprocess_image(img, self.pp)
        return self.engine.encode(x), tf

    def _prompt_zeros(self, b: int) -> tuple[np.ndarray, ...]:
        z = self._zeros.get(b)
        if z is None:
            low = self.pp.low_res_size
            z = (
                np.zeros((b, 0, 2), np.float32),
                np.zeros((b, 0), np.float32),
                np.zeros((b, 1, low, low), np.float32),
                np.zeros((b,), np.float32),
            )
            self._zeros[b] = z
        return z

    def _decode(self, feats: Feats, boxes_model: np.ndarray) -> np.ndarray:
        """Boxes (B, 4) in model-input pixels -> low-res logits (B, L, L), in chunks of decoder_batch."""
        out = []
        step = self.config.decoder_batch
        for s in range(0, boxes_model.shape[0], step):
            b = boxes_model[s : s + step]
            pc, pl, mi, hm = self._prompt_zeros(b.shape[0])
            masks, _ = self.engine.decode(feats, np.ascontiguousarray(b, np.float32), pc, pl, mi, hm)
            out.append(masks.reshape(b.shape[0], masks.shape[-2], masks.shape[-1]))
        return np.concatenate(out, axis=0) if out else np.zeros((0, 1, 1), np.float32)

    def _decode_one(self, feats: Feats, tf: Transform, box_xy: np.ndarray | None, pts_xy: np.ndarray,
                    pt_labels: np.ndarray, mask_logits: np.ndarray | None = None) -> np.ndarray:
        """One prompt in original pixels (box or None: clicks only; points (P, 2) xy) -> logits (L, L)."""
        low = self.pp.low_res_size
        box = np.full((1, 4), -1.0, np.float32) if box_xy is None else transform_boxes(box_xy[None], tf)
        pc = transform_coords(pts_xy, tf).reshape(1, -1, 2)
        pl = np.asarray(pt_labels, np.float32).reshape(1, -1)
        if mask_logits is None:
            mi = np.zeros((1, 1, low, low), np.float32)
            hm = np.zeros((1,), np.float32)
        else:
            mi = np.ascontiguousarray(mask_logits, np.float32).reshape(1, 1, low, low)
            hm = np.ones((1,), np.float32)
        masks, _ = self.engine.decode(feats, np.ascontiguousarray(box), np.ascontiguousarray(pc),
                                      np.ascontiguousarray(pl), mi, hm)
        return masks.reshape(masks.shape[-2], masks.shape[-1])

    def _paste(self, seg2d: np.ndarray, logits: np.ndarray, tf: Transform, box_xy: np.ndarray, label: int,
               fill_box: bool = False, score2d: np.ndarray | None = None,
               nest: np.ndarray | None = None, fill_xy: np.ndarray | None = None) -> tuple[int, int, int, int] | None:
        """Threshold one box's logits on its window, write ``label`` where it wins; return the mask bbox.

        ``fill_box`` (2D boxes, manifest ``min_mask_fill`` > 0): a mask covering less than that
        fraction of its box becomes the whole box (manifest ``fill_shape`` "ellipse": the ellipse
        inscribed in it; :func:`fill_shape`). Overlaps: with ``score2d`` (the logit of the
        label written at each pixel so far, -inf where none) a pixel goes to the mask with the
        higher logit (ties: the larger label), and ``score2d`` is updated; a box that replaced a
        weak mask scores ``mask_threshold`` minus a number that grows with its area (below every real mask;
        the smaller of two such boxes wins). Without ``score2d``, later boxes (larger labels) win.
        ``nest`` (with ``score2d``; :func:`nested_boxes`): ``nest[a, b]`` when label a's box lies
        inside label b's; where both masks are real (above the threshold), the inner one wins.
        """
        h, w = seg2d.shape
        rows, cols = _window(box_xy, h, w, self.config.window_pad_frac, self.config.window_pad_px)
        up = upsample_logits(logits[None], tf, rows, cols)[0]
        m = up > self.pp.mask_threshold
        if fill_box and self.pp.min_mask_fill > 0:
            ibox = np.array([int(round(float(v))) for v in (box_xy if fill_xy is None else fill_xy)[:4]])
            x0, y0 = max(ibox[0], cols.start), max(ibox[1], rows.start)
            x1, y1 = min(ibox[2], cols.stop - 1), min(ibox[3], rows.stop - 1)
            inside = m[y0 - rows.start: y1 - rows.start + 1, x0 - cols.start: x1 - cols.start + 1]
            if inside.size and inside.sum() < self.pp.min_mask_fill * inside.size:
                m = fill_shape(ibox, self.pp.fill_shape, rows, cols)
                # The box stands in for a weak mask. Its score lies below the threshold, so any
                # other mask's positive logit beats it, and falls with the box's area in pixels
                # (not the window's, which differs between crop windows), so of two such boxes the
                # smaller (e.g. one nested in the other) keeps its pixels.
                area = float(inside.size)
                up = np.where(m, np.float32(self.pp.mask_threshold - area / (area + 4096.0)), up)
        if not m.any():
            return None
        sub = seg2d[rows, cols]
        if score2d is None:
            sub[m & (sub < label)] = label  # later boxes (larger labels) win overlaps
        else:
            sc = score2d[rows, cols]
            mine = up.astype(sc.dtype)  # compared at the stored precision, so equal logits tie
            # ties (equal logits): the larger label, as without scores
            win = (mine > sc) | ((mine == sc) & (sub < label))
            if nest is not None and (nest[label].any() or nest[:, label].any()):  # most boxes nest in none
                thr = self.pp.mask_threshold
                real = (mine > thr) & (sc > thr)  # both real masks (not a weak mask's stand-in box)
                win = (win | (real & nest[label][sub])) & ~(real & nest[:, label][sub])  # inner box wins
            win &= m
            sub[win] = label
            sc[win] = mine[win]
        ys = np.flatnonzero(m.any(axis=1))
        xs = np.flatnonzero(m.any(axis=0))
        return (cols.start + int(xs[0]), rows.start + int(ys[0]), cols.start + int(xs[-1]), rows.start + int(ys[-1]))

    def _mask(self, logits: np.ndarray, tf: Transform, window_box: np.ndarray | None, h: int, w: int) -> np.ndarray:
        """Full-slice boolean mask of one prompt's logits, computed on the window of ``window_box`` (None: all)."""
        out = np.zeros((h, w), bool)
        if window_box is None:
            rows, cols = slice(0, h), slice(0, w)
        else:
            rows, cols = _window(window_box, h, w, self.config.window_pad_frac, self.config.window_pad_px)
        out[rows, cols] = upsample_logits(logits[None], tf, rows, cols)[0] > self.pp.mask_threshold
        return out

    def _grow(self, bbox: tuple[int, int, int, int], h: int, w: int) -> np.ndarray:
        return grow_box(bbox, self.config.margin_px, h, w)

    # ---- entry points -----------------------------------------------------------------
    def predict(self, case: Case) -> np.ndarray:
        """``segs`` for ``case`` (labels 0..N, ``case.segs_dtype``); details in ``self.last_report``.

        2024 cases use their boxes; 2025 cases (``case.format == "2025"``) their per-class box
        dicts, clicks and ``prev_pred`` (:meth:`predict_prompts`). numpy's BLAS threads are
        limited to ``config.blas_threads`` during the call only (scoped, restored after).
        """
        with blas_threads(self.config.blas_threads):
            return self._predict_case(case)

    def _predict_case(self, case: Case) -> np.ndarray:
        if case.format == FORMAT_2025 and case.is_3d:
            prev = case.prev_pred
            if prev is not None and prev.shape != case.spatial_shape:
                raise CaseError(case.path, f"prev_pred has shape {prev.shape}; expected {case.spatial_shape}")
            segs = self._predict_prompts(case.image, prompts_from_case(case), prev, case.name, case.segs_dtype)
            self.last_report.skipped_boxes = dict(case.box_errors)
            for i, msg in case.box_errors.items():
                log.warning("%s: box %d skipped: %s", case.name, i + 1, msg)
            return segs
        t = time.perf_counter()
        self.stats.reset()
        report = CaseReport(name=case.name, skipped_boxes=dict(case.box_errors))
        for i, msg in case.box_errors.items():
            log.warning("%s: box %d skipped: %s", case.name, i + 1, msg)
        if case.clicks is not None:
            log.warning("%s: clicks are only used on 3D cases", case.name)
        segs = case.empty_segs()
        if case.valid_box_indices:
            # Overlapping boxes: each pixel goes to the mask with the highest logit there (float16
            # logits of the label written so far), across crop windows too: a window works on
            # views of ``segs`` and ``scores``.
            scores = np.full(segs.shape, -np.inf, np.float16)
            nest = nested_boxes(case.boxes, case.valid_box_indices) if self.config.overlap == "nested" else None
            # a model trained with crop_context: each group of boxes on its own window
            for win, idx in case_windows(case, self.pp):
                sub = crop_case(case, win) if win is not None else case
                view = (slice(None),) * (segs.ndim - 2) + ((slice(win[0], win[1]), slice(win[2], win[3])) if win else ())
                if case.is_3d:
                    self._predict_3d(sub, segs[view], report, idx, scores[view], nest)
                else:
                    self._predict_2d(sub, segs[view], idx, scores[view], nest)
        self._finish(report, t)
        return segs

    def predict_prompts(
        self,
        volume: np.ndarray,
        prompts: Sequence[ClassPrompt],
        prev_pred: np.ndarray | None = None,
        name: str = "volume",
        dtype: np.dtype | None = None,
    ) -> np.ndarray:
        """Segment a (D, H, W) uint8 volume from per-class prompts (the 2025 rule, module docstring).

        ``prompts`` are :class:`~lapsam.runtime.interactive.ClassPrompt` (label, optional
        :class:`~lapsam.runtime.interactive.SliceBox`, fg/bg clicks as (z, y, x)); ``prev_pred``
        (D, H, W) labels is the starting segmentation. A 2D RGB image can be given as
        ``image[None]`` (1, H, W, 3) with clicks on z = 0. Returns labels 0..max(label). BLAS
        threads as in :meth:`predict`.
        """
        with blas_threads(self.config.blas_threads):
            return self._predict_prompts(volume, prompts, prev_pred, name, dtype)

    def _predict_prompts(self, volume: np.ndarray, prompts: Sequence[ClassPrompt], prev_pred: np.ndarray | None,
                         name: str, dtype: np.dtype | None) -> np.ndarray:
        t = time.perf_counter()
        self.stats.reset()
        report = CaseReport(name=name)
        vol = np.asarray(volume)
        if vol.ndim not in (3, 4) or vol.dtype != np.uint8:
            raise ValueError(f"volume must be uint8 (D, H, W) or (1, H, W, 3); got {vol.dtype} {vol.shape}")
        shape = vol.shape[:3]
        n = max((p.label for p in prompts), default=0)
        dt = np.dtype(dtype) if dtype is not None else (np.dtype(np.uint8) if n <= 255 else np.dtype(np.uint16))
        if prev_pred is not None:
            prev = np.asarray(prev_pred)
            if prev.shape != shape:
                raise ValueError(f"prev_pred has shape {prev.shape}; expected {shape}")
            segs = prev.astype(dt)
        else:
            segs = np.zeros(shape, dt)
        prompts = [ClassPrompt(p.label, p.box, list(p.fg), list(p.bg)) for p in prompts]  # the caller's stay as given
        report.ignored_clicks = drop_outside_clicks(prompts, shape)
        for msg in report.ignored_clicks:
            log.warning("%s: %s", name, msg)
        present = np.bincount(segs.ravel(), minlength=n + 1) > 0 if prev_pred is not None else None
        sweep = [p for p in prompts if p.box is not None and (present is None or not present[p.label])]
        if sweep:
            report.swept_classes = [p.label for p in sweep]
            boxes = np.array([[p.box.x_min, p.box.y_min, p.box.z_min, p.box.x_max, p.box.y_max, p.box.z_max]
                              for p in sweep], np.int64)
            mid = np.array([p.box.z_mid for p in sweep], np.int64)
            labels = [p.label for p in sweep]
            for win, idx in volume_windows(boxes, shape[1], shape[2], self.pp):
                if win is None:
                    self._sweep(vol, boxes[idx], mid[idx], [labels[j] for j in idx], segs, report, follow_prompt=True)
                    continue
                y0, y1, x0, x1 = win
                sub_segs = np.zeros((shape[0], y1 - y0, x1 - x0), dt)
                self._sweep(vol[:, y0:y1, x0:x1], shift_boxes(boxes[idx], win, True), mid[idx],
                            [labels[j] for j in idx], sub_segs, report, follow_prompt=True)
                paste_labels(segs, sub_segs, win)
        todo = [(p, pend) for p in prompts if (pend := pending_clicks(p, segs))]
        if todo:
            cache = EmbeddingCache(int(self.config.cache_limit_mb * 2**20), fp16=self.config.cache_fp16)
            for p, pend in todo:
                report.pending_clicks += len(pend)
                self._refine_class(vol, p, sorted({q[0] for q in pend}), segs, cache, report)
        self._finish(report, t)
        return segs

    def _finish(self, report: CaseReport, t: float) -> None:
        s = self.stats
        report.seconds = time.perf_counter() - t
        report.encoder_calls, report.decoder_calls, report.decoder_items = s.encoder_calls, s.decoder_calls, s.decoder_items
        report.encoder_s, report.decoder_s = s.encoder_s, s.decoder_s
        self.last_report = report

    # ---- 2D ---------------------------------------------------------------------------
    def _predict_2d(self, case: Case, segs: np.ndarray, idx: list[int], scores: np.ndarray | None = None,
                    nest: np.ndarray | None = None) -> None:
        feats, tf = self._encode(case.image)
        step = self.config.decoder_batch
        for s in range(0, len(idx), step):
            chunk = idx[s : s + step]
            logits = self._decode(feats, transform_boxes(case.boxes[chunk], tf))
            for j, i in enumerate(chunk):
                self._paste(segs, logits[j], tf, case.boxes[i], i + 1, fill_box=True, score2d=scores, nest=nest)

    # ---- 3D ---------------------------------------------------------------------------
    def mid_slices(self, case: Case) -> np.ndarray:
        b = case.boxes
        if case.box_mid_z is not None:
            return np.asarray(case.box_mid_z, np.int64)
        return (b[:, 2] + b[:, 5]) // 2

    def _predict_3d(self, case: Case, segs: np.ndarray, report: CaseReport, valid: list[int],
                    scores: np.ndarray | None = None, nest: np.ndarray | None = None) -> None:
        self._sweep(case.image, case.boxes[valid], self.mid_slices(case)[valid], [i + 1 for i in valid], segs, report,
                    follow_prompt=False, scores=scores, nest=nest)

    def _sweep(self, image: np.ndarray, boxes: np.ndarray, mid: np.ndarray, labels: list[int], segs: np.ndarray,
               report: CaseReport, follow_prompt: bool, scores: np.ndarray | None = None,
               nest: np.ndarray | None = None) -> None:
        """The two sweeps of the module docstring for boxes (N, 6) with start slices ``mid`` and ``labels``.

        ``follow_prompt``: the window and the vanished-mask fallback follow each slice's
        prompt (2025 boxes) instead of the given box (2024 tight 3D boxes). ``scores``: per-pixel
        logits of the labels written so far (see :meth:`_paste`); None: later labels win. ``nest``:
        see :meth:`_paste`.
        """
        cfg = self.config
        d, h, w = image.shape[:3]
        valid = list(range(boxes.shape[0]))
        z0, z1 = boxes[:, 2], boxes[:, 5]
        up_slices = sorted({z for b in valid for z in range(int(mid[b]), int(z1[b]) + 1)})
        down_slices = sorted({z for b in valid for z in range(int(z0[b]), int(mid[b]))}, reverse=True)
        down_set = set(down_slices)
        report.slices_needed += len(set(up_slices) | down_set)
        cache = EmbeddingCache(int(cfg.cache_limit_mb * 2**20), fp16=cfg.cache_fp16)
        tf = get_transform((h, w), self.pp)
        given = {b: boxes[b, [0, 1, 3, 4]].astype(np.float32) for b in valid}
        every_given = not follow_prompt and cfg.prompt_3d == "given"  # 2024 boxes: the given box on every slice
        shrink = not follow_prompt and cfg.prompt_3d == "ellipsoid"  # 2024 boxes: its ellipsoid section
        up_prev: dict[int, tuple[int, int, int, int] | None] = {}
        down_prev: dict[int, tuple[int, int, int, int] | None] = {}
        # the fallback prompt of a vanished mask: the given box, or (follow_prompt) the last prompt
        up_last = dict(given)
        down_last = dict(given)
        stopped_up: set[int] = set()
        stopped_down: set[int] = set()
        encoded: set[int] = set()

        def prompts_for(active: list[int], prev: dict, last: dict, stopped: set[int], start: dict[int, bool],
                        z: int) -> list[tuple[int, np.ndarray]]:
            out = []
            for b in active:
                if shrink:
                    out.append((b, ellipsoid_section(boxes[b], z)))
                    continue
                if start[b] or every_given:
                    out.append((b, given[b]))
                    continue
                bb = prev.get(b)
                if bb is not None:
                    out.append((b, self._grow(bb, h, w)))
                elif cfg.on_empty == "box":
                    report.empty_fallbacks += 1
                    out.append((b, last[b]))
                else:
                    report.stopped += 1
                    stopped.add(b)
            return out

        def run_slice(z: int, feats: Feats, todo: list[tuple[int, np.ndarray]], prev: dict, last: dict) -> None:
            if not todo:
                return
            logits = self._decode(feats, transform_boxes(np.stack([p for _, p in todo]), tf))
            for j, (b, prompt) in enumerate(todo):
                prev[b] = self._paste(segs[z], logits[j], tf, prompt if follow_prompt else given[b], labels[b],
                                      score2d=None if scores is None else scores[z], nest=nest,
                                      fill_box=shrink, fill_xy=prompt if shrink else None)
                if follow_prompt:
                    last[b] = prompt

        # sweep 1: ascending, middle slice .. z_max of every box
        for z in up_slices:
            active = [b for b in valid if mid[b] <= z <= z1[b] and b not in stopped_up]
            todo = prompts_for(active, up_prev, up_last, stopped_up, {b: z == mid[b] for b in active}, z)
            if not todo:
                continue
            feats, _ = self._encode(image[z])
            encoded.add(z)
            if z in down_set:
                cache.put(z, feats)
            run_slice(z, feats, todo, up_prev, up_last)
            for b, _ in todo:
                if z == mid[b]:
                    down_prev[b] = up_prev[b]  # the downward chain starts from the middle-slice mask

        # sweep 2: descending, middle - 1 .. z_min of every box
        for z in down_slices:
            active = [b for b in valid if z0[b] <= z < mid[b] and b not in stopped_down]
            todo = prompts_for(active, down_prev, down_last, stopped_down, {b: False for b in active}, z)
            if todo:
                feats = cache.get(z)
                if feats is None:
                    if z in encoded:
                        report.reencoded += 1
                    feats, _ = self._encode(image[z])
                run_slice(z, feats, todo, down_prev, down_last)
            cache.drop(z)

        report.cache_peak_slices = max(report.cache_peak_slices, cache.peak_slices)
        report.cache_peak_mb = max(report.cache_peak_mb, cache.peak_bytes / 2**20)
        if report.reencoded:
            log.warning("%s: embedding cache limit (%.0f MB) hit: %d slice(s) encoded twice", report.name,
                        cfg.cache_limit_mb, report.reencoded)

    # ---- 2025 clicks --------------------------------------------------------------------
    def _refine_class(self, vol: np.ndarray, p: ClassPrompt, seeds: list[int], segs: np.ndarray,
                      cache: EmbeddingCache, report: CaseReport) -> None:
        """Re-segment the slices ``seeds`` (slices with pending clicks) of class ``p`` and propagate."""
        cfg = self.config
        d, h, w = vol.shape[:3]
        tf = get_transform((h, w), self.pp)
        lab = p.label
        z_lo, z_hi = p.z_range(d)

        def feats_of(z: int) -> Feats:
            f = cache.get(z)
            if f is None:
                f, _ = self._encode(vol[z])
                cache.put(z, f)
            return f

        def segment(z: int, box: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
            """Run the decoder on slice z with ``box`` (None: clicks only) and the slice's clicks; write it."""
            pts, pls = p.clicks_on(z)
            old = segs[z] == lab
            box = include_points(box, p.fg_on(z), cfg.margin_px, h, w)
            if box is None and pts.shape[0] == 0:
                new = np.zeros((h, w), bool)  # nothing to prompt with: the label ends here
            elif box is None and not (pls > 0).any():
                new = np.zeros((h, w), bool)  # background clicks alone select nothing
            else:
                ml = None
                if cfg.prev_mask_input and old.any():
                    ml = mask_to_logits(old, tf, self.pp.low_res_size, cfg.mask_input_logit)
                logits = self._decode_one(feats_of(z), tf, box, pts, pls, ml)
                new = self._mask(logits, tf, box, h, w)
                report.refined_slices += 1
            write_label(segs[z], lab, new)
            return new, old, box

        for z in seeds:
            if not any(q[0] == z for q in pending_clicks(p, segs)):
                continue  # an earlier seed's propagation already satisfied this slice's clicks
            cur = segs[z] == lab
            if p.box is not None and z == p.box.z_mid:
                box = p.box.xyxy
            elif cur.any():
                box = self._grow(mask_bbox(cur), h, w)
            else:
                near = np.zeros((h, w), bool)
                for zn in (z - 1, z + 1):
                    if z_lo <= zn <= z_hi:
                        near |= segs[zn] == lab
                box = self._grow(mask_bbox(near), h, w) if near.any() else None
            new, _, seed_box = segment(z, box)
            for step in (1, -1):
                prev_mask, last_box = new, seed_box
                zz = z + step
                while z_lo <= zz <= z_hi:
                    bb = mask_bbox(prev_mask)
                    if bb is not None:
                        box = self._grow(bb, h, w)
                    elif p.box is not None and cfg.on_empty == "box":
                        report.empty_fallbacks += 1
                        box = last_box
                    else:
                        box = None
                    nm, old, used = segment(zz, box)
                    if used is not None:
                        last_box = used
                    if mask_dsc(nm, old) >= cfg.settle_dsc:
                        break
                    prev_mask = nm
                    zz += step
