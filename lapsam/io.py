"""Writing results: ``segs`` npz files written atomically."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import numpy as np

from .case import segs_dtype


@contextmanager
def atomic_write(path: str | Path, mode: str = "wb", **open_kwargs) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success flush, fsync and rename it to ``path``.

    ``path`` is therefore either absent, the old file, or complete: never half-written,
    whatever interrupts the ``with`` block (the temporary file is removed then).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **open_kwargs) as fp:
            yield fp
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


def atomic_savez(path: str | Path, compressed: bool = True, **arrays: np.ndarray) -> Path:
    """Write an npz atomically (see :func:`atomic_write`)."""
    with atomic_write(path) as fp:
        (np.savez_compressed if compressed else np.savez)(fp, **arrays)
    return Path(path)


def write_segs(
    path: str | Path, segs: np.ndarray, num_objects: int | None = None, compressed: bool = True
) -> Path:
    """Write ``segs`` (labels 0..N) atomically, uint8 for N <= 255 boxes else uint16."""
    n = int(segs.max(initial=0)) if num_objects is None else num_objects
    dtype = segs_dtype(n)
    if segs.size and int(segs.max()) > np.iinfo(dtype).max:
        raise ValueError(f"label {int(segs.max())} does not fit {dtype}")
    return atomic_savez(path, compressed=compressed, segs=np.ascontiguousarray(segs, dtype=dtype))
