"""Teacher-feature cache: the teacher runs once per slice; later epochs read fp16 memory maps.

Layout of the cache folder: ``image_embed.npy``, ``high_res_feats_0.npy``,
``high_res_feats_1.npy`` (``numpy.lib.format.open_memmap``, float16, (N, C, h, w) on the
student's grid), ``filled.npy`` (uint8 (N,), 1 once row i is written) and ``meta.json`` (what
the rows depend on: teacher, sizes, the list of slices). A cache whose ``meta.json`` differs
is rebuilt. Under DDP every rank fills the rows ``i % world == rank``, then all read all.

Size per slice: 256 x (S/16)^2 + 32 x (S/4)^2 + 64 x (S/8)^2 = (1 + 2 + 1) x S^2 = 4 S^2 fp16 values,
i.e. 8 S^2 bytes: 512 KiB at 256, 2 MiB at 512, 8 MiB at 1024 (x 1000 slices: 0.5 GiB / 2 GiB / 8 GiB).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .teacher import FEATURE_NAMES, feature_shapes

log = logging.getLogger(__name__)


def fingerprint(items: Sequence[Any]) -> str:
    h = hashlib.sha256()
    for it in items:
        h.update(repr(it).encode())
    return h.hexdigest()[:16]


class FeatureCache:
    """Rows of the three teacher maps for N dataset items, in fp16 memory maps (or RAM when ``root`` is None)."""

    def __init__(self, root: str | Path | None, n: int, student_size: int, meta: dict[str, Any], create: bool = True):
        self.root = Path(root) if root is not None else None
        self.n = n
        self.shapes = feature_shapes(student_size)
        self.meta = {**meta, "n": n, "student_size": student_size, "shapes": self.shapes, "dtype": "float16"}
        self.maps: list[np.ndarray] = []
        self.filled: np.ndarray
        if self.root is None:
            self.maps = [np.zeros((n, *s), np.float16) for s in self.shapes]
            self.filled = np.zeros(n, np.uint8)
            return
        if create:
            self._create_or_open()
        else:
            self._open("r+")

    def _meta_path(self) -> Path:
        assert self.root is not None
        return self.root / "meta.json"

    def matches(self) -> bool:
        p = self._meta_path()
        if not p.is_file():
            return False
        try:
            old = json.loads(p.read_text())
        except json.JSONDecodeError:
            return False
        return old == json.loads(json.dumps(self.meta))

    def _create_or_open(self) -> None:
        assert self.root is not None
        if self.matches() and all((self.root / f"{n}.npy").is_file() for n in FEATURE_NAMES):
            self._open("r+")
            log.info("teacher cache %s: %d/%d rows present", self.root, int(self.filled.sum()), self.n)
            return
        self.root.mkdir(parents=True, exist_ok=True)
        self._meta_path().unlink(missing_ok=True)
        for name, shape in zip(FEATURE_NAMES, self.shapes, strict=False):
            np.lib.format.open_memmap(self.root / f"{name}.npy", mode="w+", dtype=np.float16, shape=(self.n, *shape)).flush()
        np.lib.format.open_memmap(self.root / "filled.npy", mode="w+", dtype=np.uint8, shape=(self.n,)).flush()
        self._meta_path().write_text(json.dumps(self.meta, indent=1))
        self._open("r+")
        log.info("teacher cache %s: created for %d slices (%.1f MiB)", self.root, self.n,
                 sum(m.nbytes for m in self.maps) / 2**20)

    def _open(self, mode: str) -> None:
        assert self.root is not None
        self.maps = [np.load(self.root / f"{n}.npy", mmap_mode=mode) for n in FEATURE_NAMES]  # type: ignore[call-overload]
        self.filled = np.load(self.root / "filled.npy", mmap_mode=mode)  # type: ignore[call-overload]

    def reopen(self) -> None:
        """See rows other processes wrote."""
        if self.root is not None:
            self._open("r+")

    @property
    def complete(self) -> bool:
        return bool(np.all(self.filled))

    def put(self, indices: Sequence[int], feats: Sequence[torch.Tensor]) -> None:
        idx = np.asarray(indices, np.int64)
        for m, f in zip(self.maps, feats, strict=False):
            m[idx] = f.detach().float().cpu().numpy().astype(np.float16)
        self.filled[idx] = 1

    def flush(self) -> None:
        for m in [*self.maps, self.filled]:
            if isinstance(m, np.memmap):
                m.flush()

    def get(self, indices: torch.Tensor | Sequence[int], device: torch.device | None = None) -> tuple[torch.Tensor, ...]:
        idx = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices, np.int64)
        if not np.all(self.filled[idx]):
            missing = idx[self.filled[idx] == 0][:5].tolist()
            raise RuntimeError(f"teacher cache rows {missing} are not filled")
        out = tuple(torch.from_numpy(np.ascontiguousarray(m[idx])).float() for m in self.maps)
        return tuple(o.to(device) for o in out) if device is not None else out

    def fill(self, teacher: torch.nn.Module, dataset: Any, out_size: int, device: torch.device, rank: int = 0,
             world: int = 1, batch_size: int = 8, show: bool = True) -> int:
        """Run the teacher on this rank's missing rows; returns how many rows it wrote."""
        from tqdm import tqdm

        todo = [i for i in range(rank, self.n, world) if not self.filled[i]]
        if not todo:
            return 0
        for s in tqdm(range(0, len(todo), batch_size), desc="teacher cache", unit="batch", disable=not show):
            chunk = todo[s: s + batch_size]
            x = torch.from_numpy(np.stack([dataset[i]["teacher_image"] for i in chunk])).to(device)
            with torch.no_grad():
                feats = teacher(x, out_size=out_size)
            self.put(chunk, feats)
        self.flush()
        return len(todo)
