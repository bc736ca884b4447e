"""Writing results: ``segs`` npz files written atomically; output paths checked before any work."""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import numpy as np

from .case import segs_dtype
from .errors import UsageError

log = logging.getLogger(__name__)

# atomic_write's temporary file for NAME is ".NAME.<mkstemp's random part>.tmp" beside it.
_TEMP_SUFFIX = ".tmp"


def _temp_prefix(name: str) -> str:
    return f".{name}."


def stale_temp_files(folder: str | Path, names: Iterable[str]) -> list[Path]:
    """Temporary files that :func:`atomic_write` left in ``folder`` for the files ``names``.

    They remain only when a process was killed while writing (SIGKILL, power loss): any other
    interruption removes them.
    """
    folder = Path(folder)
    wanted = set(names)
    if not wanted or not folder.is_dir():
        return []
    pattern = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]+" + re.escape(_TEMP_SUFFIX) + "$")
    out = []
    for p in folder.iterdir():
        m = pattern.match(p.name)
        if m and m.group("name") in wanted and p.is_file():
            out.append(p)
    return sorted(out)


def remove_stale_temp_files(folder: str | Path, names: Iterable[str]) -> list[Path]:
    """Remove :func:`stale_temp_files` (logged); returns what was removed."""
    removed = []
    for p in stale_temp_files(folder, names):
        try:
            p.unlink()
        except FileNotFoundError:
            continue
        removed.append(p)
    if removed:
        log.info("%s: removed %d temporary file(s) left by an interrupted run", folder, len(removed))
    return removed


def check_output_dir(path: str | Path) -> Path:
    """Make sure ``path`` is a folder this process can write into (created if absent).

    Meant to run before any long work, so that results are never computed only to be lost at
    the write. Raises :class:`UsageError` (one line, exit code 2) otherwise.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"output folder {path} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"output folder {path} cannot be created: {exc.strerror or exc}") from None
    # A real write: os.access() is wrong for root, ACLs, read-only mounts and full quotas.
    try:
        fd, probe = tempfile.mkstemp(prefix=".lapsam-write-check.", suffix=_TEMP_SUFFIX, dir=path)
    except OSError as exc:
        raise UsageError(f"output folder {path} is not writable: {exc.strerror or exc}") from None
    os.close(fd)
    os.unlink(probe)
    return path


def check_output_file(path: str | Path) -> Path:
    """Make sure the file ``path`` can be written (its folder is checked with :func:`check_output_dir`)."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"output file {path} is a folder")
    if path.exists() and not path.is_file():
        raise UsageError(f"output file {path} is not a regular file")
    check_output_dir(path.parent)
    return path


@contextmanager
def atomic_write(path: str | Path, mode: str = "wb", **open_kwargs) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success flush, fsync and rename it to ``path``.

    ``path`` is therefore either absent, the old file, or complete: never half-written,
    whatever interrupts the ``with`` block (the temporary file is removed then).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path.name), suffix=_TEMP_SUFFIX, dir=path.parent)
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
