"""Per-phase timings of one ``lapsam`` process, from the interpreter's start to the end of ``main``.

Off by default (a few ``time.time()`` calls, nothing printed). ``LAPSAM_TIMINGS=1`` in the
environment or ``lapsam predict --timings`` turns them on: the command then prints to stderr
one line per phase and one machine-readable line::

    timing: model load: compile encoder                 0.183 s
    timings-json: {"t_exec": ..., "t_import": ..., "t_end": ..., "phases": [[name, start, end], ...]}

All stamps are epoch seconds (``time.time()``), so a host that knows when it started a
container (``lapsam bench submission``) can place them on its own clock. ``t_exec`` is when
the shell exec'd Python (``LAPSAM_T_EXEC``, set by ``predict.sh`` when timings are on),
``t_import`` when this module was first imported (``lapsam.cli`` imports it first: the
interpreter and ``site`` are done by then), ``t_end`` when the report was printed.

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
_phases: list[tuple[str, float, float]] = []
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


def record(name: str, start: float, end: float) -> None:
    """Record a phase from epoch ``start`` to ``end`` (when timings are on)."""
    if enabled():
        _phases.append((name, start, end))


def record_seconds(name: str, seconds: float, end: float | None = None) -> None:
    """Record a phase known only by its length (e.g. the engine's own counters), ending at ``end``."""
    if enabled():
        end = time.time() if end is None else end
        _phases.append((name, end - seconds, end))


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
        _phases.append((name, t, time.time()))


def phases() -> list[tuple[str, float, float]]:
    return list(_phases)


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
        "phases": [[n, s, e] for n, s, e in _phases],
    }


def lines(rep: dict[str, object]) -> list[str]:
    """One human-readable line per phase, the interpreter start first."""
    out = []
    t_exec = rep.get("t_exec")
    if isinstance(t_exec, float):
        out.append(f"timing: {'python start (interpreter, site, lapsam)':48s} {rep['t_import'] - t_exec:7.3f} s")  # type: ignore[operator]
    for name, s, e in rep["phases"]:  # type: ignore[attr-defined]
        out.append(f"timing: {name:48s} {e - s:7.3f} s")
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
