"""Run the image as the challenge does and check what it writes.

The official timer copies ONE case into ``inputs/`` and runs, in a fresh container::

    docker container run -m 8G --name team --rm -v $PWD/inputs/:/workspace/inputs/ \\
        -v $PWD/outputs/:/workspace/outputs/ team:latest /bin/bash -c "sh predict.sh"

timing the wall clock around it. :func:`run_case` does the same through the Docker SDK (plus
``--network none``: a submission must not need the network) and :func:`verify_cases` checks
each output: same file name, key ``segs``, the input's spatial shape, the dtype for its
number of boxes, labels within 0..N, nothing half-written. A case whose input is corrupt
must fail cleanly: the container exits, no output (or temporary file) is left for it, and
the other cases are unaffected (each runs in its own container anyway).

The image runs as a non-root user, so the ``outputs`` folder given to it must be writable by
that user: this module makes its per-case folders world-writable.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lapsam.case import list_cases, load_case, segs_dtype
from lapsam.errors import CaseError
from lapsam.safe_npz import load_npz

from .context import SubmissionError
from .image import docker_client, image_exists

log = logging.getLogger(__name__)

OFFICIAL_COMMAND = ["/bin/bash", "-c", "sh predict.sh"]
MEM_LIMIT = "8g"


@dataclass
class RunResult:
    """One container run: exit status, wall time (create .. remove), the log's last lines.

    ``wall_s`` leaves out this module's own inspection calls (reading the state and the log
    between the end of the container and its removal), so it is what ``docker run --rm`` costs.
    The epochs (``time.time()`` on this machine; docker's own for ``started_at`` / ``finished_at``:
    the same clock when the engine is local) place each step: create at ``t_create``, the
    container's process from ``started_at`` to ``finished_at``, removal done at ``t_removed``.
    """

    exit_code: int | None
    wall_s: float
    oom_killed: bool = False
    timed_out: bool = False
    log_tail: str = ""
    t_create: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    t_removed: float | None = None


def docker_time(text: str | None) -> float | None:
    """Epoch seconds of a docker timestamp (``2026-11-27T14:45:12.123456789Z``); None if unset or odd."""
    import calendar
    import re

    m = re.fullmatch(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d+))?Z", (text or "").strip())
    if not m or m.group(1) == "0001":
        return None
    whole = calendar.timegm(tuple(int(g) for g in m.groups()[:6]) + (0, 0, 0))  # type: ignore[arg-type]
    frac = m.group(7) or "0"
    return whole + int(frac) / 10 ** len(frac)


@dataclass
class CaseResult:
    name: str
    ok: bool
    wall_s: float
    exit_code: int | None
    problems: list[str] = field(default_factory=list)
    input_valid: bool = True
    clean: bool = True  # nothing half-written, no stray files, container ended by itself
    log_tail: str = ""

    @property
    def status(self) -> str:
        if self.ok:
            return "PASS"
        return "FAIL (clean)" if self.clean else "FAIL"


def official_command_line(tag: str) -> str:
    """The command line the organisers run (for reports)."""
    return (
        f"docker container run -m 8G --name team --rm --network none -v $PWD/inputs/:/workspace/inputs/ "
        f"-v $PWD/outputs/:/workspace/outputs/ {tag} /bin/bash -c \"sh predict.sh\""
    )


def run_case(
    tag: str,
    inputs: Path,
    outputs: Path,
    client: Any = None,
    timeout_s: float = 900.0,
    environment: dict[str, str] | None = None,
    name: str | None = None,
    mem_limit: str = MEM_LIMIT,
    command: list[str] | None = None,
    log_lines: int = 25,
) -> RunResult:
    """One fresh container with the official options (``command``: instead of the official
    ``sh predict.sh``); wall time from create to removal."""
    import docker.errors

    client = client or docker_client()
    name = name or f"lapsam-verify-{time.time_ns()}"
    t_create = time.time()
    t0 = time.perf_counter()
    container = client.containers.create(
        tag,
        command=command or OFFICIAL_COMMAND,
        name=name,
        mem_limit=mem_limit,
        network_mode="none",
        volumes={
            str(Path(inputs).resolve()): {"bind": "/workspace/inputs/", "mode": "rw"},
            str(Path(outputs).resolve()): {"bind": "/workspace/outputs/", "mode": "rw"},
        },
        environment=environment,
    )
    timed_out = False
    try:
        container.start()
        try:
            status = container.wait(timeout=timeout_s)
            exit_code: int | None = int(status.get("StatusCode", -1))
        except Exception:  # noqa: BLE001 - requests' timeout types vary by version
            timed_out = True
            exit_code = None
            container.kill()
            container.wait(timeout=60)
        ran = time.perf_counter() - t0
        container.reload()
        state = container.attrs.get("State", {})
        oom = bool(state.get("OOMKilled", False))
        logs = container.logs(tail=log_lines).decode("utf-8", "replace")
    finally:
        t_rm = time.perf_counter()
        try:
            container.remove(force=True)
        except docker.errors.APIError as exc:  # pragma: no cover - removal races
            log.warning("could not remove container %s: %s", name, exc)
        removed = time.perf_counter()
    wall = ran + (removed - t_rm)
    return RunResult(exit_code=exit_code, wall_s=wall, oom_killed=oom, timed_out=timed_out, log_tail=logs,
                     t_create=t_create, started_at=docker_time(state.get("StartedAt")),
                     finished_at=docker_time(state.get("FinishedAt")), t_removed=t_create + wall)


def check_output(case_path: Path, out_path: Path) -> tuple[list[str], bool]:
    """Problems with one output (empty list: correct) and whether the input itself was valid."""
    try:
        case = load_case(case_path)
    except CaseError as exc:
        problems = [f"input is invalid ({exc.problem})"]
        if out_path.exists():
            problems.append("an output was written for an invalid input")
        return problems, False
    if not out_path.is_file():
        return ["no output file"], True
    try:
        arrays = load_npz(out_path)
    except CaseError as exc:
        return [f"output unreadable ({exc.problem})"], True
    problems: list[str] = []
    if "segs" not in arrays:
        return [f"output has no key 'segs' (keys: {sorted(arrays)})"], True
    extra = sorted(set(arrays) - {"segs"})
    if extra:
        problems.append(f"output has extra keys {extra}")
    segs = arrays["segs"]
    if tuple(segs.shape) != tuple(case.spatial_shape):
        problems.append(f"segs shape {tuple(segs.shape)} != input spatial shape {tuple(case.spatial_shape)}")
    want = segs_dtype(case.num_objects)
    if segs.dtype != want:
        problems.append(f"segs dtype {segs.dtype} != {want} for {case.num_objects} objects")
    if segs.size and np.issubdtype(segs.dtype, np.number):
        lo, hi = int(segs.min()), int(segs.max())
        if lo < 0 or hi > case.num_objects:
            problems.append(f"labels {lo}..{hi} outside 0..{case.num_objects}")
    return problems, True


def _prepare_folders(root: Path, case_path: Path | None) -> tuple[Path, Path]:
    inputs, outputs = root / "inputs", root / "outputs"
    inputs.mkdir(parents=True)
    outputs.mkdir(parents=True)
    if case_path is not None:
        shutil.copy(case_path, inputs / case_path.name)
        (inputs / case_path.name).chmod(0o644)
    inputs.chmod(0o755)
    outputs.chmod(0o777)  # the container's user is not root
    return inputs, outputs


def verify_case(case_path: Path, tag: str, client: Any = None, timeout_s: float = 900.0,
                workdir: Path | None = None) -> CaseResult:
    """Copy one case into a fresh inputs/ folder, run the official command, check the output."""
    client = client or docker_client()
    case_path = Path(case_path)
    with tempfile.TemporaryDirectory(prefix="lapsam-verify-", dir=workdir) as tmp:
        inputs, outputs = _prepare_folders(Path(tmp), case_path)
        run = run_case(tag, inputs, outputs, client=client, timeout_s=timeout_s)
        out_path = outputs / case_path.name
        problems, valid = check_output(case_path, out_path)
        stray = sorted(p.name for p in outputs.iterdir() if p.name != case_path.name)
        clean = not stray and not run.timed_out and not run.oom_killed
        if stray:
            problems.append(f"stray or half-written files in outputs: {stray}")
        if run.timed_out:
            problems.append(f"timed out after {timeout_s:.0f} s")
        if run.oom_killed:
            problems.append("killed: out of memory (-m 8G)")
        if run.exit_code not in (0, None) and valid:
            problems.append(f"container exited with code {run.exit_code}")
        if not valid and out_path.exists():
            clean = False
    return CaseResult(
        name=case_path.name, ok=not problems, wall_s=run.wall_s, exit_code=run.exit_code,
        problems=problems, input_valid=valid, clean=clean, log_tail=run.log_tail,
    )


def verify_cases(
    cases: Path,
    tag: str,
    client: Any = None,
    timeout_s: float = 900.0,
    on_result: Callable[[CaseResult], None] | None = None,
) -> list[CaseResult]:
    """Verify each ``.npz`` of ``cases`` (a folder or one file) in its own fresh container."""
    client = client or docker_client()
    try:
        files = list_cases(cases)
    except FileNotFoundError as exc:
        raise SubmissionError(str(exc)) from exc
    if not files:
        raise SubmissionError(f"{cases}: no .npz cases")
    if not image_exists(client, tag):
        raise SubmissionError(f"no image {tag}; build it (lapsam submission build) or pass --tar FILE")
    results = []
    for f in files:
        r = verify_case(f, tag, client=client, timeout_s=timeout_s)
        results.append(r)
        if on_result:
            on_result(r)
    return results


def time_empty_run(tag: str, client: Any = None, environment: dict[str, str] | None = None,
                   timeout_s: float = 300.0, command: list[str] | None = None) -> RunResult:
    """A container given an empty inputs folder: the pure start-up cost of the official protocol
    (``command=["true"]``: of ``docker run ... IMAGE true`` with the same options)."""
    client = client or docker_client()
    with tempfile.TemporaryDirectory(prefix="lapsam-empty-") as tmp:
        inputs, outputs = _prepare_folders(Path(tmp), None)
        return run_case(tag, inputs, outputs, client=client, timeout_s=timeout_s, environment=environment,
                        command=command)


def time_case_run(tag: str, case_path: Path, client: Any = None, environment: dict[str, str] | None = None,
                  timeout_s: float = 900.0, log_lines: int = 25, check: bool = False) -> tuple[RunResult, list[str]]:
    """One case in a fresh container, for benchmarks: the run, and the output's problems when
    ``check`` (:func:`check_output`; else an empty list)."""
    client = client or docker_client()
    case_path = Path(case_path)
    with tempfile.TemporaryDirectory(prefix="lapsam-bench-") as tmp:
        inputs, outputs = _prepare_folders(Path(tmp), case_path)
        run = run_case(tag, inputs, outputs, client=client, timeout_s=timeout_s, environment=environment,
                       log_lines=log_lines)
        problems = check_output(case_path, outputs / case_path.name)[0] if check else []
        return run, problems
