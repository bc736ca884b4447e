"""Writing results: ``segs`` npz files written atomically."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from .case import segs_dtype


def atomic_savez(path: str | Path, compressed: bool = True, **arrays: np.ndarray) -> Path:
    """Write an npz so that ``path`` is either absent or complete: never half-written.

    The data go to a temporary file in the same folder, are flushed to disk, then renamed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fp:
            (np.savez_compressed if compressed else np.savez)(fp, **arrays)
            fp.flush()
            os.fsync(fp.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def write_segs(
    path: str | Path, segs: np.ndarray, num_objects: int | None = None, compressed: bool = True
) -> Path:
    """Write ``segs`` (labels 0..N) atomically, uint8 for N <= 255 boxes else uint16."""
    n = int(segs.max(initial=0)) if num_objects is None else num_objects
    dtype = segs_dtype(n)
    if segs.size and int(segs.max()) > np.iinfo(dtype).max:
        raise ValueError(f"label {int(segs.max())} does not fit {dtype}")
    return atomic_savez(path, compressed=compressed, segs=np.ascontiguousarray(segs, dtype=dtype))
