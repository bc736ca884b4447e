"""Per-phase timings of one ``lapsam`` process, from the interpreter's start to the end of ``main``.

Off by default (a few ``time.time()`` calls, nothing printed). ``LAPSAM_TIMINGS=1`` in the
environment or ``lapsam predict --timings`` turns them on: the command then prints to stderr
one line per phase and one machine-readable line::

    timing: model load: encoder compile (from cache)    0.183 s  (concurrent)
    timings-json: {"t_exec": ..., "t_import": ..., "t_end": ..., "phases": [[name, start, end], ...],
                   "concurrent": [index, ...]}

All stamps are epoch seconds (``time.time()``), so a host that knows when it started a
container (``lapsam bench submission``) can place them on its own clock. ``t_exec`` is when
the shell exec'd Python (``LAPSAM_T_EXEC``, set by ``predict.sh`` when timings are on),
``t_import`` when this module was first imported (``lapsam.cli`` imports it first: the
interpreter and ``site`` are done by then), ``t_end`` when the report was printed.

Phases follow each other on the main thread (``... (all)`` aggregates apart), except those
recorded with ``concurrent=True``: they ran in worker threads beside the others (the encoder and
decoder opened at once, :mod:`lapsam.runtime.engines`), and ``concurrent`` lists their indices in
``phases``, so that a breakdown that adds phases up leaves them out (``lapsam bench submission``).

Light module: standard library only, imported before anything else by ``lapsam.cli``.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

ENV = "LAPSAM_TIMINGS"
EXEC_ENV = "LAPSAM_T_EXEC"
JSON_PREFIX = "timings-json: "

T_IMPORT = time.time()
_phases: list[tuple[str, float, float, bool]] = []  # name, start, end, concurrent
_forced = False


def enabled() -> bool:
    return _forced or os.environ.get(ENV, "").strip() not in ("", "0")


def enable() -> None:
    """Turn timings on for this process (``--timings``)."""
    global _forced
    _forced = True


def reset() -> None:
    """Forget the recorded phases (tests, or a second run in one process)."""
    _phases.clear()


def record(name: str, start: float, end: float, concurrent: bool = False) -> None:
    """Record a phase from epoch ``start`` to ``end`` (when timings are on); ``concurrent``: it ran
    in a worker thread, overlapping the main thread's phases. Safe to call from any thread."""
    if enabled():
        _phases.append((name, start, end, concurrent))


def record_seconds(name: str, seconds: float, end: float | None = None) -> None:
    """Record a phase known only by its length (e.g. the engine's own counters), ending at ``end``."""
    if enabled():
        end = time.time() if end is None else end
        _phases.append((name, end - seconds, end, False))


@contextmanager
def phase(name: str) -> Iterator[None]:
    """``with phase("read case"): ...`` records that block (also when it raises)."""
    if not enabled():
        yield
        return
    t = time.time()
    try:
        yield
    finally:
        _phases.append((name, t, time.time(), False))


def phases() -> list[tuple[str, float, float]]:
    return [(n, s, e) for n, s, e, _ in _phases]


def exec_time() -> float | None:
    try:
        return float(os.environ[EXEC_ENV])
    except (KeyError, ValueError):
        return None


def report(t_end: float | None = None) -> dict[str, object]:
    """The stamps as a dict (what ``timings-json:`` prints)."""
    return {
        "t_exec": exec_time(),
        "t_import": T_IMPORT,
        "t_end": time.time() if t_end is None else t_end,
        "phases": [[n, s, e] for n, s, e, _ in _phases],
        "concurrent": [i for i, p in enumerate(_phases) if p[3]],
    }


def concurrent_indices(rep: dict[str, object]) -> set[int]:
    """Indices in ``rep["phases"]`` of the phases that ran beside the main thread's (none in older reports)."""
    return {int(i) for i in rep.get("concurrent") or []}  # type: ignore[attr-defined]


def lines(rep: dict[str, object]) -> list[str]:
    """One human-readable line per phase, the interpreter start first."""
    out = []
    t_exec = rep.get("t_exec")
    if isinstance(t_exec, float):
        out.append(f"timing: {'python start (interpreter, site, lapsam)':48s} {rep['t_import'] - t_exec:7.3f} s")  # type: ignore[operator]
    beside = concurrent_indices(rep)
    for i, (name, s, e) in enumerate(rep["phases"]):  # type: ignore[arg-type]
        out.append(f"timing: {name:48s} {e - s:7.3f} s" + ("  (concurrent)" if i in beside else ""))
    out.append(f"timing: {'total since ' + ('exec' if isinstance(t_exec, float) else 'lapsam import'):48s} "
               f"{rep['t_end'] - (t_exec if isinstance(t_exec, float) else rep['t_import']):7.3f} s")  # type: ignore[operator]
    return out


def emit(stream: TextIO | None = None) -> None:
    """Print the phases and the JSON line to stderr (when timings are on)."""
    if not enabled():
        return
    import json

    rep = report()
    stream = stream or sys.stderr
    stream.write("\n".join([*lines(rep), JSON_PREFIX + json.dumps(rep)]) + "\n")
    stream.flush()


def parse(text: str) -> dict[str, object] | None:
    """The last ``timings-json:`` record in a log, or None."""
    import json

    found = None
    for line in text.splitlines():
        i = line.find(JSON_PREFIX)
        if i >= 0:
            try:
                found = json.loads(line[i + len(JSON_PREFIX):])
            except ValueError:
                continue
    return found
