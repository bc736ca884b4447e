"""How many CPUs this process may really use: affinity and cgroup (v1 or v2) CPU quota.

``os.cpu_count()`` reports the host's CPUs; inside a container limited with
``--cpus`` or a CPU quota, or pinned with ``--cpuset-cpus``, fewer are usable and
starting more threads than that makes inference slower, not faster.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _cgroup_paths(proc_cgroup: str) -> tuple[str | None, str | None]:
    """(v2 path, v1 cpu-controller path) of this process from /proc/self/cgroup text."""
    v2 = v1 = None
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            v2 = path
        elif "cpu" in controllers.split(","):
            v1 = path
    return v2, v1


def _ancestors(root: Path, rel: str | None) -> list[Path]:
    """``root/rel`` and each of its parents up to ``root`` (a quota anywhere above applies)."""
    out = [root]
    if rel and rel != "/":
        p = root
        for part in Path(rel.lstrip("/")).parts:
            p = p / part
            out.append(p)
    return out[::-1]


def cgroup_cpu_limit(root: str | Path = "/sys/fs/cgroup", proc_cgroup: str | None = None) -> float | None:
    """The CPU quota (in CPUs, possibly fractional) of this process's cgroup, or None if unlimited.

    cgroup v2: ``cpu.max`` holds ``"<quota> <period>"`` or ``"max <period>"``.
    cgroup v1: ``cpu/cpu.cfs_quota_us`` (-1 = unlimited) and ``cpu/cpu.cfs_period_us``.
    Inside a container the process's own cgroup is usually mounted at the root, so the
    root files are read as well as the path named in /proc/self/cgroup; the smallest
    quota found wins.
    """
    root = Path(root)
    if proc_cgroup is None:
        proc_cgroup = _read(Path("/proc/self/cgroup")) or ""
    v2, v1 = _cgroup_paths(proc_cgroup)
    limits: list[float] = []
    # v2 (unified hierarchy)
    for d in _ancestors(root, v2):
        text = _read(d / "cpu.max")
        if not text:
            continue
        fields = text.split()
        if len(fields) >= 1 and fields[0] != "max":
            try:
                quota = float(fields[0])
                period = float(fields[1]) if len(fields) > 1 else 100000.0
                if quota > 0 and period > 0:
                    limits.append(quota / period)
            except ValueError:
                pass
    # v1 (cpu controller, possibly mounted as cpu,cpuacct)
    for ctrl in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        base = root / ctrl
        if not base.is_dir():
            continue
        for d in _ancestors(base, v1):
            q, p = _read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")
            if q is None or p is None:
                continue
            try:
                quota, period = float(q), float(p)
            except ValueError:
                continue
            if quota > 0 and period > 0:
                limits.append(quota / period)
        break
    return min(limits) if limits else None


def affinity_cpus() -> int:
    """CPUs in this process's affinity mask (``os.sched_getaffinity``), else ``os.cpu_count()``."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def available_cpus(root: str | Path = "/sys/fs/cgroup", proc_cgroup: str | None = None) -> int:
    """CPUs this process can use: min(affinity, ceil(cgroup quota)), at least 1."""
    n = affinity_cpus()
    quota = cgroup_cpu_limit(root, proc_cgroup)
    if quota is not None:
        n = min(n, max(1, math.ceil(quota - 1e-9)))
    log.debug("available CPUs: %d (affinity %d, cgroup quota %s)", n, affinity_cpus(), quota)
    return max(1, n)


@contextmanager
def blas_threads(n: int | None = 1) -> Iterator[None]:
    """Inside the block, numpy's BLAS (OpenBLAS, MKL, BLIS) uses at most ``n`` threads; None: unchanged.

    The runtime's own numpy work (resizing slices, upsampling mask windows) is many small
    matrix products; a multi-threaded BLAS spends more on waking its threads than on the
    product, and on a busy or quota-limited CPU it fights the inference engine's threads
    (measured on the shared 2-core VM: 0.5 ms single-threaded against 47 ms with 2 threads).
    Uses ``threadpoolctl`` (portable, scoped: the previous limits are restored on exit).
    """
    if n is None:
        yield
        return
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=int(n), user_api="blas"):
        yield
