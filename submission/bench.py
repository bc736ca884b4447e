"""``lapsam bench submission``: where the time of one case goes in the organisers' protocol.

Each round runs, in fresh containers with the protocol's options (``-m 8G``, ``--network none``,
``inputs/`` and ``outputs/`` mounted, ``--rm``):

1. the baseline: the image with the command ``true`` (``docker run ... IMAGE true``);
2. each case: the official ``/bin/bash -c "sh predict.sh"`` with ``LAPSAM_TIMINGS=1``, so that
   ``lapsam predict`` prints the time of each of its phases from inside the container
   (:mod:`lapsam.timings`); its output is checked like ``submission verify`` does.

The steps outside Python come from docker's own timestamps (the container's ``StartedAt`` and
``FinishedAt``) and this machine's clock around the SDK calls (the same clock when the engine
is local): create + start, the shell (``bash -c``, ``sh predict.sh``), Python's start, every
phase ``lapsam predict`` records, Python's exit, wait + removal. All runs of one invocation
alternate (baseline, case, baseline, case ...), so the ratio of the case's total to the
baseline is measured in one run on one machine; medians over the rounds are printed.

3. the floor (unless ``--no-floor``): the same container running only ``python -c "import numpy,
   ENGINE"`` (the engine predict.sh uses): the start-up that any Python runtime with that engine
   pays before it opens a model, printed with its own ratio to the baseline.

The steps add up to the case's total. Phases that ran in worker threads beside them (the encoder
and decoder compiles, opened at once: ``concurrent`` in the timings record) are printed apart,
under the total, and are not part of the sum; the main thread's share of the load is its own
steps (the imports, the hash checks, ``waiting for model load: ROLE``).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lapsam import timings

from .context import SubmissionError

#: The issue's target: a small 2D case within this many times ``docker run IMAGE true``.
TARGET_RATIO = 2.0
AGGREGATE_SUFFIX = " (all)"
#: The floor's command: the image's Python importing numpy and the engine predict.sh uses.
FLOOR_COMMAND = ["python", "-c", "import importlib, os, numpy; "
                 "importlib.import_module(os.environ.get('LAPSAM_BACKEND') or 'openvino')"]


@dataclass(frozen=True)
class Variant:
    label: str
    tag: str
    env: dict[str, str]


def default_case(folder: Path) -> Path:
    """A 256x256 2D case with one box (the challenge's small US case), resampled from demo/data."""
    import numpy as np
    from lapsam.runtime.bench import REPO, CaseSpec, build_case

    data = REPO / "demo" / "data"
    if not (data / "imgs").is_dir():
        raise SubmissionError(f"no demo cases in {data}: pass --cases FILE.npz")
    spec = CaseSpec("2DBox_US_0001", (256, 256), 1, "2DBox_CT_amos_0004_75")
    path = folder / f"{spec.name}.npz"
    np.savez_compressed(path, **build_case(spec, data / "imgs", data / "gts"))
    return path


def baseline_rows(r: Any) -> list[tuple[str, float]]:
    """``docker run ... true`` in two steps (docker's ``FinishedAt``; its ``StartedAt`` is set after
    a process as short as ``true`` may have ended); the total is ``r.wall_s``."""
    if r.finished_at is None:
        return []
    return [
        ("docker: create, start, `true` runs and exits", r.finished_at - r.t_create),
        ("docker: wait returns + remove", r.t_removed - r.finished_at),
    ]


def case_rows(r: Any) -> list[tuple[str, float]]:
    """The steps of one case run, from ``docker run`` to the written file and the removed container.

    Rows are consecutive (they add up to the run's wall time, up to rounding), except the
    ``... (all)`` aggregates of lapsam's phases, which are split into their phases and a
    ``...: rest`` row for the time between them. Concurrent phases are left out
    (:func:`concurrent_rows`).
    """
    rep = timings.parse(r.log_tail)
    if rep is None:
        raise SubmissionError("the container printed no timings-json line (an image older than "
                              "LAPSAM_TIMINGS? rebuild it)")
    if r.started_at is None or r.finished_at is None:
        raise SubmissionError("docker reported no start / finish time for the container")
    t_import, t_end = float(rep["t_import"]), float(rep["t_end"])  # type: ignore[arg-type]
    t_exec = rep.get("t_exec")
    beside = timings.concurrent_indices(rep)
    phases = [(str(n), float(s), float(e)) for i, (n, s, e) in enumerate(rep["phases"])  # type: ignore[arg-type]
              if i not in beside]
    rows: list[tuple[str, float]] = [("docker: create + start", r.started_at - r.t_create)]
    if isinstance(t_exec, float):
        rows += [("shell: bash -c, sh predict.sh", t_exec - r.started_at),
                 ("python start: interpreter, site, lapsam", t_import - t_exec)]
    else:
        rows.append(("shell + python start", t_import - r.started_at))
    leaves = [p for p in phases if not p[0].endswith(AGGREGATE_SUFFIX)]
    aggregates = [p for p in phases if p[0].endswith(AGGREGATE_SUFFIX)]
    covered = 0.0
    for name, s, e in sorted(leaves, key=lambda p: p[1]):
        rows.append((name, e - s))
        covered += e - s
    for name, s, e in aggregates:
        inside = sum(le - ls for _, ls, le in leaves if ls >= s - 1e-6 and le <= e + 1e-6)
        rows.append((f"{name.removesuffix(AGGREGATE_SUFFIX)}: rest", max(0.0, (e - s) - inside)))
        covered += max(0.0, (e - s) - inside)
    rows.append(("lapsam: rest (logging, summary, between phases)", max(0.0, (t_end - t_import) - covered)))
    rows += [("python exit + container stop", r.finished_at - t_end),
             ("docker: wait returns + remove", r.t_removed - r.finished_at)]
    return rows


def concurrent_rows(r: Any) -> list[tuple[str, float]]:
    """The phases of one case run that ran in worker threads beside :func:`case_rows`' steps (the
    encoder and decoder compiles, and their span), in the order they started; not part of the total."""
    rep = timings.parse(r.log_tail) or {}
    beside = timings.concurrent_indices(rep)
    phases = [(str(n), float(s), float(e)) for i, (n, s, e) in enumerate(rep.get("phases") or [])  # type: ignore[arg-type]
              if i in beside]
    return [(n, e - s) for n, s, e in sorted(phases, key=lambda p: (p[1], -p[2]))]


@dataclass
class Series:
    """Rows of several runs of one kind; medians by row name, in first-seen order."""

    runs: list[list[tuple[str, float]]]
    walls: list[float]

    def table(self) -> list[tuple[str, float, float, int]]:
        order: list[str] = []
        values: dict[str, list[float]] = {}
        for rows in self.runs:
            for name, v in rows:
                if name not in values:
                    order.append(name)
                values.setdefault(name, []).append(v)
        return [(n, statistics.median(values[n]), min(values[n]), len(values[n])) for n in order]

    @property
    def median_wall(self) -> float:
        return statistics.median(self.walls)


def format_report(variant: Variant, case_name: str, base: Series, case: Series,
                  beside: Series | None = None, floor: Series | None = None) -> list[str]:
    """The table of one image and case; ``beside``: the rows of :func:`concurrent_rows`, printed
    under the total (they overlap the steps, so they have no share of it); ``floor``: the runs of
    :data:`FLOOR_COMMAND`, printed with their ratio to the baseline."""
    rows_b, rows_c = base.table(), case.table()
    rows_x = beside.table() if beside is not None else []
    w = max([40] + [len(n) + 2 for n, *_ in rows_b + rows_c + rows_x])
    out = [f"{variant.label}: {case_name}", f"  {'step':{w}s} {'median s':>9s} {'min s':>8s} {'share':>6s}  runs"]
    bt = base.median_wall
    out.append(f"  {'docker run ... true (baseline, total)':{w}s} {bt:9.3f} {min(base.walls):8.3f} {'':6s}  "
               f"{len(base.walls)}")
    for name, med, lo, n in rows_b:
        out.append(f"  {'  ' + name:{w}s} {med:9.3f} {lo:8.3f} {'':6s}  {n}")
    total = case.median_wall
    out.append("  case: docker run ... sh predict.sh, step by step")
    for name, med, lo, n in rows_c:
        out.append(f"  {'  ' + name:{w}s} {med:9.3f} {lo:8.3f} {100 * med / total:5.1f}%  {n}")
    out.append(f"  {'case total (docker run to removal)':{w}s} {total:9.3f} {min(case.walls):8.3f} {100.0:5.1f}%  "
               f"{len(case.walls)}")
    if rows_x:
        out.append("  in worker threads, beside the steps above (not part of the total):")
        for name, med, lo, n in rows_x:
            out.append(f"  {'  ' + name:{w}s} {med:9.3f} {lo:8.3f} {'':6s}  {n}")
    ratio = total / bt if bt > 0 else float("inf")
    if floor is not None and floor.walls:
        fl = floor.median_wall
        label = "floor: docker run ... python -c 'import numpy, ENGINE'"
        out.append(f"  {label:{w}s} {fl:9.3f} {min(floor.walls):8.3f} {'':6s}  {len(floor.walls)}")
        out.append(f"  floor / docker run true: {fl / bt if bt > 0 else float('inf'):.2f}; the case above the floor: "
                   f"{total - fl:.3f} s (model load, the case, lapsam's imports)")
    verdict = "within" if ratio <= TARGET_RATIO else "above"
    out.append(f"  ratio case total / docker run true: {ratio:.2f} (medians; target <= {TARGET_RATIO:.1f}: {verdict})")
    return out


def _parse_env(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SubmissionError(f"--vs-env {item!r}: expected KEY=VALUE")
        env[key] = value
    return env


def run_bench(args: argparse.Namespace, emit=print) -> int:  # type: ignore[no-untyped-def]
    """The benchmark; ``emit`` prints a line. Returns the exit code."""
    from .image import docker_client, human_size, image_size
    from .verify import official_command_line, time_case_run, time_empty_run

    client = docker_client()
    variants = [Variant("A", args.tag, {})]
    if args.vs_tag or args.vs_env:
        variants.append(Variant("B", args.vs_tag or args.tag, _parse_env(args.vs_env or [])))
    with tempfile.TemporaryDirectory(prefix="lapsam-bench-submission-") as tmp:
        cases = [Path(c) for c in args.cases] or [default_case(Path(tmp))]
        for c in cases:
            if not c.is_file():
                raise SubmissionError(f"{c}: no such case file")
        info = client.version()
        for v in variants:
            emit(f"{v.label}: image {v.tag}, {human_size(image_size(v.tag, client))} uncompressed"
                 + (f", env {v.env}" if v.env else ""))
        emit(f"docker {info.get('Version', '?')}; each run a fresh container, as the organisers run it:\n"
             f"  {official_command_line('IMAGE')}  (+ -e LAPSAM_TIMINGS=1)\n"
             f"  baseline: the same options, command `true`")
        emit(f"{args.repeats} round(s), each: baseline, {'floor, ' if args.floor else ''}then each case, "
             "for each image (alternating)")
        base: dict[str, Series] = {v.label: Series([], []) for v in variants}
        runs: dict[tuple[str, str], Series] = {(v.label, c.name): Series([], []) for v in variants for c in cases}
        beside: dict[tuple[str, str], Series] = {k: Series([], []) for k in runs}
        floors: dict[str, Series] = {v.label: Series([], []) for v in variants}
        for rnd in range(1, args.repeats + 1):
            for v in variants:
                b = time_empty_run(v.tag, client, v.env or None, command=["true"])
                if b.exit_code != 0:
                    emit(f"error: `true` failed in {v.tag}: exit {b.exit_code}\n{b.log_tail}")
                    return 1
                base[v.label].runs.append(baseline_rows(b))
                base[v.label].walls.append(b.wall_s)
                parts = [f"true {b.wall_s:.3f} s"]
                if args.floor:
                    f = time_empty_run(v.tag, client, v.env or None, command=FLOOR_COMMAND)
                    if f.exit_code != 0:
                        emit(f"error: the floor command failed in {v.tag}: exit {f.exit_code}\n{f.log_tail}")
                        return 1
                    floors[v.label].walls.append(f.wall_s)
                    parts.append(f"floor {f.wall_s:.3f} s")
                for c in cases:
                    r, problems = time_case_run(v.tag, c, client, {**v.env, timings.ENV: "1"}, log_lines=400,
                                                check=True)
                    if r.exit_code != 0 or problems:
                        emit(f"error: {v.tag} on {c.name}: exit {r.exit_code}; {'; '.join(problems)}\n{r.log_tail}")
                        return 1
                    runs[(v.label, c.name)].runs.append(case_rows(r))
                    runs[(v.label, c.name)].walls.append(r.wall_s)
                    beside[(v.label, c.name)].runs.append(concurrent_rows(r))
                    parts.append(f"{c.name} {r.wall_s:.3f} s")
                emit(f"  round {rnd} {v.label}: " + " | ".join(parts))
        for v in variants:
            for c in cases:
                for line in format_report(v, c.name, base[v.label], runs[(v.label, c.name)],
                                          beside[(v.label, c.name)], floors[v.label]):
                    emit(line)
    return 0
