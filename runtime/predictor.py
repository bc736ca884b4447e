"""The torch-free predictor: a case in, ``segs`` out.

2D: one encoder call per image, all boxes decoded in chunks of ``decoder_batch``.

3D: each box starts on its middle slice (``box_mid_z`` when the case gives one, else
``(z_min + z_max) // 2``) with the given box, and propagates slice by slice to ``z_max``
and down to ``z_min`` (inclusive); the prompt on each next slice is the bounding box of
the previous slice's mask grown by ``margin_px``. Work is scheduled as two sweeps over
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

Overlaps: box i is label i+1 and later boxes win (the largest label covering a pixel),
as the challenge specifies; this holds whatever order the sweeps paste in.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lapsam.case import Case
from lapsam.manifest import ModelManifest, Preprocessing
from lapsam.preprocess import Transform, get_transform, preprocess_image, transform_boxes, upsample_logits

from .cache import EmbeddingCache
from .cpus import available_cpus, limit_blas_threads
from .engines import CallStats, CountingEngine, Engine, EngineOptions, Feats, load_engine

log = logging.getLogger(__name__)

ON_EMPTY = ("box", "stop")


@dataclass
class PredictorConfig:
    """Scheduling and post-processing knobs (the defaults are what ``lapsam predict`` uses)."""

    decoder_batch: int = 16  # boxes per decoder call (bounds decoder memory)
    margin_px: int = 2  # propagated prompt = previous mask's bbox grown by this many pixels
    on_empty: str = "box"  # what to prompt when the previous slice's mask is empty: "box" | "stop"
    window_pad_frac: float = 0.1  # masks are computed on the box grown by this fraction of its size ...
    window_pad_px: int = 8  # ... plus this many pixels; outside that window a label stays empty
    cache_fp16: bool = True  # store cached slice embeddings as float16
    cache_limit_mb: float = 1024.0  # hard bound on the embedding cache
    blas_threads: int | None = 1  # numpy's BLAS threads (small products: 1 is fastest); None: leave as is

    def __post_init__(self) -> None:
        if self.on_empty not in ON_EMPTY:
            raise ValueError(f"on_empty must be one of {ON_EMPTY}, got {self.on_empty!r}")
        if self.decoder_batch < 1:
            raise ValueError("decoder_batch must be >= 1")


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
    slices_needed: int = 0  # 3D: size of the union of the boxes' z-ranges
    reencoded: int = 0  # 3D: slices encoded twice because the cache limit was hit
    cache_peak_slices: int = 0
    cache_peak_mb: float = 0.0


def _window(box_xy: np.ndarray, h: int, w: int, frac: float, pad: int) -> tuple[slice, slice]:
    """Rows/cols of the box (x0, y0, x1, y1 inclusive) grown by ``frac`` of its size + ``pad`` px."""
    x0, y0, x1, y1 = (int(v) for v in box_xy)
    gx = int(round((x1 - x0 + 1) * frac)) + pad
    gy = int(round((y1 - y0 + 1) * frac)) + pad
    return slice(max(0, y0 - gy), min(h, y1 + gy + 1)), slice(max(0, x0 - gx), min(w, x1 + gx + 1))


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
        if self.config.blas_threads is not None:
            limit_blas_threads(self.config.blas_threads)

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
    ) -> Predictor:
        """Load (sha256-checked) and compile the model in ``path`` once; reuse for every case."""
        path = Path(path)
        manifest = ModelManifest.load(path)
        opts = EngineOptions(backend=backend, precision=precision, threads=threads, cache_dir=cache_dir,
                             precision_hint=precision_hint)
        n = threads or available_cpus()
        t = time.perf_counter()
        engine = load_engine(path, manifest, opts, n)
        log.info("loaded %s (%s %s, %d threads) in %.2f s", manifest.name, opts.backend, precision, n,
                 time.perf_counter() - t)
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

    def _paste(self, seg2d: np.ndarray, logits: np.ndarray, tf: Transform, box_xy: np.ndarray, label: int) -> tuple[int, int, int, int] | None:
        """Threshold one box's logits on its window, write ``label`` where it wins; return the mask bbox."""
        h, w = seg2d.shape
        rows, cols = _window(box_xy, h, w, self.config.window_pad_frac, self.config.window_pad_px)
        m = upsample_logits(logits[None], tf, rows, cols)[0] > self.pp.mask_threshold
        if not m.any():
            return None
        sub = seg2d[rows, cols]
        sub[m & (sub < label)] = label  # later boxes (larger labels) win overlaps
        ys = np.flatnonzero(m.any(axis=1))
        xs = np.flatnonzero(m.any(axis=0))
        return (cols.start + int(xs[0]), rows.start + int(ys[0]), cols.start + int(xs[-1]), rows.start + int(ys[-1]))

    def _grow(self, bbox: tuple[int, int, int, int], h: int, w: int) -> np.ndarray:
        m = self.config.margin_px
        x0, y0, x1, y1 = bbox
        return np.array([max(0, x0 - m), max(0, y0 - m), min(w - 1, x1 + m), min(h - 1, y1 + m)], np.float32)

    # ---- entry point ------------------------------------------------------------------
    def predict(self, case: Case) -> np.ndarray:
        """``segs`` for ``case`` (labels 0..N, ``case.segs_dtype``); details in ``self.last_report``."""
        t = time.perf_counter()
        self.stats.reset()
        report = CaseReport(name=case.name, skipped_boxes=dict(case.box_errors))
        for i, msg in case.box_errors.items():
            log.warning("%s: box %d skipped: %s", case.name, i + 1, msg)
        if case.clicks is not None:
            log.warning("%s: clicks are not used by this predictor (boxes only)", case.name)
        segs = case.empty_segs()
        if case.valid_box_indices:
            if case.is_3d:
                self._predict_3d(case, segs, report)
            else:
                self._predict_2d(case, segs)
        s = self.stats
        report.seconds = time.perf_counter() - t
        report.encoder_calls, report.decoder_calls, report.decoder_items = s.encoder_calls, s.decoder_calls, s.decoder_items
        report.encoder_s, report.decoder_s = s.encoder_s, s.decoder_s
        self.last_report = report
        return segs

    # ---- 2D ---------------------------------------------------------------------------
    def _predict_2d(self, case: Case, segs: np.ndarray) -> None:
        feats, tf = self._encode(case.image)
        idx = case.valid_box_indices
        step = self.config.decoder_batch
        for s in range(0, len(idx), step):
            chunk = idx[s : s + step]
            logits = self._decode(feats, transform_boxes(case.boxes[chunk], tf))
            for j, i in enumerate(chunk):
                self._paste(segs, logits[j], tf, case.boxes[i], i + 1)

    # ---- 3D ---------------------------------------------------------------------------
    def mid_slices(self, case: Case) -> np.ndarray:
        b = case.boxes
        if case.box_mid_z is not None:
            return np.asarray(case.box_mid_z, np.int64)
        return (b[:, 2] + b[:, 5]) // 2

    def _predict_3d(self, case: Case, segs: np.ndarray, report: CaseReport) -> None:
        cfg = self.config
        d, h, w = case.image.shape
        boxes = case.boxes
        valid = case.valid_box_indices
        mid = self.mid_slices(case)
        z0, z1 = boxes[:, 2], boxes[:, 5]
        up_slices = sorted({z for b in valid for z in range(int(mid[b]), int(z1[b]) + 1)})
        down_slices = sorted({z for b in valid for z in range(int(z0[b]), int(mid[b]))}, reverse=True)
        down_set = set(down_slices)
        report.slices_needed = len(set(up_slices) | down_set)
        cache = EmbeddingCache(int(cfg.cache_limit_mb * 2**20), fp16=cfg.cache_fp16)
        tf = get_transform((h, w), self.pp)
        given = {b: boxes[b, [0, 1, 3, 4]] for b in valid}
        up_prev: dict[int, tuple[int, int, int, int] | None] = {}
        down_prev: dict[int, tuple[int, int, int, int] | None] = {}
        stopped_up: set[int] = set()
        stopped_down: set[int] = set()
        encoded: set[int] = set()

        def prompts_for(z: int, active: list[int], prev: dict, stopped: set[int], start: dict[int, bool]) -> list[tuple[int, np.ndarray]]:
            out = []
            for b in active:
                if start[b]:
                    out.append((b, given[b].astype(np.float32)))
                    continue
                bb = prev.get(b)
                if bb is not None:
                    out.append((b, self._grow(bb, h, w)))
                elif cfg.on_empty == "box":
                    report.empty_fallbacks += 1
                    out.append((b, given[b].astype(np.float32)))
                else:
                    report.stopped += 1
                    stopped.add(b)
            return out

        def run_slice(z: int, feats: Feats, todo: list[tuple[int, np.ndarray]], prev: dict) -> None:
            if not todo:
                return
            lab = [b for b, _ in todo]
            logits = self._decode(feats, transform_boxes(np.stack([p for _, p in todo]), tf))
            for j, b in enumerate(lab):
                prev[b] = self._paste(segs[z], logits[j], tf, given[b], b + 1)

        # sweep 1: ascending, middle slice .. z_max of every box
        for z in up_slices:
            active = [b for b in valid if mid[b] <= z <= z1[b] and b not in stopped_up]
            todo = prompts_for(z, active, up_prev, stopped_up, {b: z == mid[b] for b in active})
            if not todo:
                continue
            feats, _ = self._encode(case.image[z])
            encoded.add(z)
            if z in down_set:
                cache.put(z, feats)
            run_slice(z, feats, todo, up_prev)
            for b, _ in todo:
                if z == mid[b]:
                    down_prev[b] = up_prev[b]  # the downward chain starts from the middle-slice mask

        # sweep 2: descending, middle - 1 .. z_min of every box
        for z in down_slices:
            active = [b for b in valid if z0[b] <= z < mid[b] and b not in stopped_down]
            todo = prompts_for(z, active, down_prev, stopped_down, {b: False for b in active})
            if todo:
                feats = cache.get(z)
                if feats is None:
                    if z in encoded:
                        report.reencoded += 1
                    feats, _ = self._encode(case.image[z])
                run_slice(z, feats, todo, down_prev)
            cache.drop(z)

        report.cache_peak_slices = cache.peak_slices
        report.cache_peak_mb = cache.peak_bytes / 2**20
        if report.reencoded:
            log.warning("%s: embedding cache limit (%.0f MB) hit: %d slice(s) encoded twice", case.name,
                        cfg.cache_limit_mb, report.reencoded)

