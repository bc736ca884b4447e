"""A bounded store of slice embeddings, shared by all boxes of a 3D case.

The 3D scheduler (:mod:`lapsam.runtime.predictor`) knows in advance which slices will be
needed again, and asks the cache to keep only those; it drops each slice after its last
use. The byte limit is a hard bound: a slice that does not fit is not kept (it will be
encoded again when needed, and the miss is counted), so memory never grows past it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from .engines import Feats

log = logging.getLogger(__name__)


@dataclass
class EmbeddingCache:
    limit_bytes: int
    fp16: bool = True
    _store: dict[int, Feats] = field(default_factory=dict)
    nbytes: int = 0
    peak_bytes: int = 0
    peak_slices: int = 0
    rejected: int = 0

    def put(self, key: int, feats: Feats) -> bool:
        """Keep ``feats`` for ``key`` if it fits; returns whether it was kept."""
        if key in self._store:
            return True
        dtype = np.float16 if self.fp16 else np.float32
        size = sum(int(f.size) * np.dtype(dtype).itemsize for f in feats)
        if self.nbytes + size > self.limit_bytes:
            self.rejected += 1
            return False
        self._store[key] = tuple(np.asarray(f, dtype=dtype).copy() for f in feats)  # type: ignore[assignment]
        self.nbytes += size
        self.peak_bytes = max(self.peak_bytes, self.nbytes)
        self.peak_slices = max(self.peak_slices, len(self._store))
        return True

    def get(self, key: int) -> Feats | None:
        f = self._store.get(key)
        if f is None:
            return None
        return tuple(np.asarray(a, dtype=np.float32) for a in f)  # type: ignore[return-value]

    def drop(self, key: int) -> None:
        f = self._store.pop(key, None)
        if f is not None:
            self.nbytes -= sum(int(a.nbytes) for a in f)

    def __contains__(self, key: int) -> bool:
        return key in self._store

    def __len__(self) -> int:
        return len(self._store)
