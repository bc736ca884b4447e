"""The runtime predictor behind the page: cached slice embeddings, progress, cancel.

:class:`Segmenter` runs :class:`lapsam.runtime.Predictor` (the code ``lapsam predict`` runs)
over a :class:`CachingEngine`: the encoder output of every slice is kept, keyed by a digest
of the encoder input, so a second box on a slice only runs the decoder, and a 3D propagation
reuses the slices the user already prompted (and the reverse). The cache is bounded in
bytes (least recently used slices leave first) and stores float32, so a cached decode gives
exactly what a fresh ``lapsam predict`` gives.

A long job (3D propagation) reports each encoder call to a progress callback and can be
cancelled: the next engine call raises :class:`Cancelled`.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lapsam.case import Case
from lapsam.errors import LapsamError
from lapsam.manifest import ModelManifest, Preprocessing
from lapsam.preprocess import preprocess_image

from ..cpus import available_cpus
from ..engines import Engine, EngineOptions, Feats, load_engine, read_manifest
from ..interactive import ClassPrompt
from ..predictor import Predictor, PredictorConfig

Progress = Callable[[int, int], None]  # (slices encoded so far, slices expected; 0 when unknown)


class Cancelled(LapsamError):
    """The user stopped the job."""


class CachingEngine:
    """An :class:`~lapsam.runtime.engines.Engine` that keeps encoder outputs (LRU, byte-bounded).

    Not thread-safe: the session runs one engine call at a time.
    """

    def __init__(self, inner: Engine, limit_bytes: int):
        self.inner = inner
        self.limit_bytes = int(limit_bytes)
        self._store: OrderedDict[bytes, Feats] = OrderedDict()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self.cancel = threading.Event()
        self.on_encode: Callable[[], None] | None = None

    @staticmethod
    def key(image: np.ndarray) -> bytes:
        return hashlib.blake2b(np.ascontiguousarray(image, np.float32).data, digest_size=16).digest()

    def __contains__(self, image: np.ndarray) -> bool:
        return self.key(image) in self._store

    def __len__(self) -> int:
        return len(self._store)

    def encode(self, image: np.ndarray) -> Feats:
        if self.cancel.is_set():
            raise Cancelled("stopped")
        k = self.key(image)
        feats = self._store.get(k)
        if feats is not None:
            self._store.move_to_end(k)
            self.hits += 1
        else:
            feats = tuple(np.asarray(f, np.float32) for f in self.inner.encode(image))  # type: ignore[assignment]
            self.misses += 1
            size = sum(int(f.nbytes) for f in feats)
            while self._store and self.nbytes + size > self.limit_bytes:
                _, old = self._store.popitem(last=False)
                self.nbytes -= sum(int(f.nbytes) for f in old)
            if size <= self.limit_bytes:
                self._store[k] = feats
                self.nbytes += size
        if self.on_encode is not None:
            self.on_encode()
        return feats

    def decode(self, feats, boxes, point_coords, point_labels, mask_input, has_mask_input):  # type: ignore[no-untyped-def]
        if self.cancel.is_set():
            raise Cancelled("stopped")
        return self.inner.decode(feats, boxes, point_coords, point_labels, mask_input, has_mask_input)

    def clear(self) -> None:
        self._store.clear()
        self.nbytes = 0


@dataclass
class SegmenterConfig:
    """The app's runtime settings (the predictor's defaults otherwise)."""

    cache_mb: float = 1024.0  # slice embeddings kept (float32; 4 MiB per slice at 512 input)
    margin_px: int = 2
    decoder_batch: int = 16
    prompt_3d: str = "ellipsoid"  # PredictorConfig.prompt_3d


class Segmenter:
    """Boxes on one slice and 3D propagation, with the runtime's :class:`Predictor`."""

    def __init__(self, engine: Engine, preprocessing: Preprocessing, manifest: ModelManifest | None = None,
                 threads: int | None = None, config: SegmenterConfig | None = None):
        self.config = config or SegmenterConfig()
        self.pp = preprocessing
        self.manifest = manifest
        self.engine = CachingEngine(engine, int(self.config.cache_mb * 2**20))
        self.threads = threads or available_cpus()
        self.predictors = {
            on_empty: Predictor(
                self.engine, preprocessing,
                PredictorConfig(on_empty=on_empty, margin_px=self.config.margin_px,
                                decoder_batch=self.config.decoder_batch, prompt_3d=self.config.prompt_3d),
                manifest, threads=self.threads,
            )
            for on_empty in ("box", "stop")
        }

    @classmethod
    def from_model_dir(cls, path: str | Path, backend: str = "openvino", threads: int | None = None,
                       precision: str = "fp32", cache_dir: str | None = None, precision_hint: str | None = None,
                       config: SegmenterConfig | None = None) -> Segmenter:
        """Load (sha256-checked) and compile the model once, as ``Predictor.from_model_dir`` does."""
        path = Path(path)
        manifest = read_manifest(path)  # a folder that is not a model: one-line UsageError
        opts = EngineOptions(backend=backend, precision=precision, threads=threads, cache_dir=cache_dir,
                             precision_hint=precision_hint)
        n = threads or available_cpus()
        return cls(load_engine(path, manifest, opts, n), manifest.preprocessing, manifest, n, config)

    @property
    def model_name(self) -> str:
        return self.manifest.name if self.manifest is not None else "model"

    def crops(self, image: np.ndarray) -> bool:
        """Whether the model encodes a window around each box's region instead of the whole slice.

        Models exported with ``crop_context`` > 0 (the default model) see, for a box, a crop around
        it (``lapsam.runtime.crop``): each new region is encoded; only the same window is reused.
        """
        if self.pp.crop_context <= 0:
            return False
        return self.pp.crop_mode == "box" or max(image.shape[:2]) > self.pp.input_size

    def encode_slice(self, image: np.ndarray) -> bool:
        """Encode one uint8 slice (H, W) / (H, W, 3) into the cache; False when cached or when the model crops."""
        if self.crops(image):
            return False
        x, _ = preprocess_image(image, self.pp)
        if x in self.engine:
            return False
        self.engine.encode(x)
        return True

    def is_cached(self, image: np.ndarray) -> bool:
        x, _ = preprocess_image(image, self.pp)
        return x in self.engine

    def segment_slice(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """Labels 1..N (H, W) for boxes (N, 4) ``[x0, y0, x1, y1]`` on a uint8 slice or 2D image.

        Exactly ``lapsam predict`` on a 2D case holding ``image`` and ``boxes``.
        """
        b = np.asarray(boxes, np.int64).reshape(-1, 4)
        case = Case(name="2DBox_app", image=image, boxes=b, is_3d=False, modality="")
        return self.predictors["box"].predict(case)

    @contextmanager
    def _progress(self, total: int, progress: Progress | None) -> Iterator[None]:
        """Report every encoder call (cached ones too) to ``progress`` while the block runs."""
        done = 0

        def tick() -> None:
            nonlocal done
            done += 1
            if progress is not None:
                progress(min(done, total) if total else done, total)

        self.engine.on_encode = tick
        try:
            yield
        finally:
            self.engine.on_encode = None

    def propagate(self, volume: np.ndarray, boxes: np.ndarray, mid_z: np.ndarray, on_empty: str = "box",
                  progress: Progress | None = None) -> np.ndarray:
        """Labels 1..N (D, H, W) for 3D boxes (N, 6) ``[x0, y0, z0, x1, y1, z1]`` started on slices ``mid_z``.

        Exactly ``lapsam predict`` on a 2024-format 3D case with these boxes (and ``box_mid_z``).
        ``progress(done, total)`` is called after each slice's encoding (total: slices in the union
        of the z ranges); :meth:`cancel` stops it with :class:`Cancelled`.
        """
        b = np.asarray(boxes, np.int64).reshape(-1, 6)
        mid = np.asarray(mid_z, np.int64).reshape(-1)
        total = len({z for row in b for z in range(int(row[2]), int(row[5]) + 1)})
        case = Case(name="3DBox_app", image=volume, boxes=b, is_3d=True, modality="", box_mid_z=mid)
        with self._progress(total, progress):
            return self.predictors[on_empty].predict(case)

    def predict_case(self, case: Case, progress: Progress | None = None) -> np.ndarray:
        """``lapsam predict`` on a loaded case (2025 cases: box dicts, clicks, ``prev_pred``)."""
        with self._progress(0, progress):
            return self.predictors["box"].predict(case)

    def segment_prompts(self, volume: np.ndarray, prompts: Sequence[ClassPrompt], prev_pred: np.ndarray,
                        on_empty: str = "box", total: int = 0, progress: Progress | None = None) -> np.ndarray:
        """The runtime's 2025 rule (``Predictor.predict_prompts``) on ``volume`` (D, H, W) / (1, H, W, 3).

        A class absent from ``prev_pred`` is swept from its box's slice through its z range (the window
        follows each slice's prompt); then its clicks that the result contradicts re-segment their
        slices and the change propagates until it settles. Labels of other classes are kept.
        """
        with self._progress(total, progress):
            return self.predictors[on_empty].predict_prompts(volume, prompts, prev_pred, name="app",
                                                            dtype=prev_pred.dtype)

    def cancel(self) -> None:
        self.engine.cancel.set()

    def reset_cancel(self) -> None:
        self.engine.cancel.clear()


def timed(fn: Callable[[], np.ndarray]) -> tuple[np.ndarray, float]:
    t = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - t) * 1000.0
