"""The official per-case timing protocol (CVPR24_time_eval.py, adapted from MICCAI FLARE), literally.

For each case, in case-name order:

1. the case file is copied ALONE into an empty ``inputs/`` folder;
2. ``docker container run -m 8G --name NAME --rm -v $PWD/inputs/:/workspace/inputs/
   -v $PWD/outputs/:/workspace/outputs/ IMAGE /bin/bash -c "sh predict.sh"`` runs through the
   docker CLI, and the wall-clock time around that command is the case's running time (so
   container start, Python start-up and model loading are paid on every case);
3. the case is removed from ``inputs/`` and ``outputs/<case name>`` is moved to the team's
   results folder; a missing or misnamed output is reported ("Wrong segmentation name").

``NAME_running_time.csv`` (``CaseName,RunningTime``) is written next to the results, as the
organisers do. Like their timer, ``outputs/`` is NOT emptied between cases (anything else a
container leaves there persists; ``clean_outputs=True`` empties it). Both folders are made
world-writable (the organisers ``chmod -R 777``) so that a non-root container user can write.

With a second image the two alternate case by case (A B A B ...), each in its own work folder,
so that drifts in machine load hit both alike; the table shows the per-case ratio B/A.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lapsam.case import list_cases
from lapsam.errors import LapsamError

from .tables import atomic_write_text, csv_text, markdown_table, text_table

log = logging.getLogger(__name__)

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


class DockerError(LapsamError):
    """The docker engine cannot be used, or an image cannot be found/loaded."""


def docker_cli() -> str:
    exe = shutil.which("docker")
    if exe is None:
        raise DockerError("the docker CLI is not installed (no 'docker' on PATH)")
    return exe


def docker_server_version(timeout: float = 20.0) -> str:
    """The engine's version; raises :class:`DockerError` with the reason when no engine answers."""
    exe = docker_cli()
    try:
        proc = subprocess.run([exe, "version", "--format", "{{.Server.Version}}"], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        raise DockerError(f"the docker engine did not answer within {timeout:g} s") from None
    if proc.returncode != 0 or not proc.stdout.strip():
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise DockerError("no docker engine answers: " + (msg[-1].rstrip(".") if msg else f"exit code {proc.returncode}"))
    return proc.stdout.strip()


def _docker(*args: str, timeout: float | None = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([docker_cli(), *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise DockerError(f"docker {' '.join(args[:2])} failed: {(proc.stderr or proc.stdout).strip()}")
    return proc


def container_name_for(ref: str) -> str:
    """Team name from an image reference: ``registry:5000/team:v1`` -> ``team``."""
    last = ref.rsplit("/", 1)[-1]
    base = last.split("@", 1)[0].split(":", 1)[0]
    name = re.sub(r"[^a-z0-9_.-]+", "_", base.lower()).strip("._-")
    return name or "lapsam_timing"


@dataclass(frozen=True)
class DockerImage:
    """An image ready to run: ``ref`` (tag or id) and ``name`` (container and CSV name)."""

    ref: str
    name: str
    source: str


def is_image_archive(spec: str) -> bool:
    return spec.lower().endswith(TAR_SUFFIXES) and Path(spec).is_file()


def resolve_image(spec: str) -> DockerImage:
    """A tag that the engine knows, or a ``.tar``/``.tar.gz`` saved image (``docker load``-ed first)."""
    if is_image_archive(spec):
        log.info("loading %s", spec)
        proc = _docker("load", "-i", str(spec), timeout=1800)
        out = proc.stdout + proc.stderr
        tags = re.findall(r"Loaded image: (\S+)", out)
        ids = re.findall(r"Loaded image ID: (\S+)", out)
        if tags:
            ref = tags[0]
            name = container_name_for(ref)
        elif ids:
            ref = ids[0]
            stem = Path(spec).name.split(".")[0]  # as the organisers: teamname = file name before the first dot
            name = container_name_for(stem)
        else:
            raise DockerError(f"docker load -i {spec} did not report a loaded image: {out.strip()[-300:]}")
        return DockerImage(ref, name, spec)
    if Path(spec).exists() and not Path(spec).is_dir() and ":" not in spec:
        raise DockerError(f"{spec} is a file but not a .tar/.tar.gz/.tgz image archive")
    proc = _docker("image", "inspect", "--format", "{{.Id}}", spec, check=False, timeout=60)
    if proc.returncode != 0:
        raise DockerError(f"image {spec!r} is not known to the docker engine (build it, or give a saved .tar.gz)")
    return DockerImage(spec, container_name_for(spec), spec)


@dataclass
class RunRecord:
    """One ``docker container run`` of one case."""

    case: str
    image: str
    seconds: float
    returncode: int | None
    output_ok: bool
    error: str | None = None


@dataclass
class ProtocolRunner:
    """Runs cases one by one for one image, in ``out_dir/work_NAME/{inputs,outputs}``."""

    image: DockerImage
    out_dir: Path
    memory: str = "8G"
    timeout: float | None = None
    clean_outputs: bool = False
    network: str | None = None  # None: no --network flag, as the official command
    records: list[RunRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir).resolve()
        self.work = self.out_dir / f"work_{self.image.name}"
        self.inputs = self.work / "inputs"
        self.outputs = self.work / "outputs"
        self.results = self.out_dir / self.image.name
        self.logs = self.out_dir / "logs"
        for d in (self.inputs, self.outputs, self.results, self.logs):
            d.mkdir(parents=True, exist_ok=True)
        for d in (self.work, self.inputs, self.outputs):
            os.chmod(d, 0o777)  # a non-root user inside the container must write outputs

    @property
    def csv_path(self) -> Path:
        return self.results / f"{self.image.name}_running_time.csv"

    def command(self) -> list[str]:
        net = ["--network", self.network] if self.network else []
        return [
            docker_cli(), "container", "run", "-m", self.memory, "--name", self.image.name, "--rm", *net,
            "-v", f"{self.inputs}/:/workspace/inputs/", "-v", f"{self.outputs}/:/workspace/outputs/",
            self.image.ref, "/bin/bash", "-c", "sh predict.sh",
        ]

    def check_name_free(self) -> None:
        proc = _docker("container", "inspect", self.image.name, check=False, timeout=60)
        if proc.returncode == 0:
            raise DockerError(f"a container named {self.image.name!r} already exists; remove it first "
                              f"(docker rm -f {self.image.name})")

    @staticmethod
    def _empty(folder: Path) -> None:
        for p in folder.iterdir():
            try:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
            except OSError as exc:
                log.warning("cannot remove %s: %s", p, exc)

    def run_case(self, case: Path) -> RunRecord:
        name = case.name
        self._empty(self.inputs)
        if self.clean_outputs:
            self._empty(self.outputs)
        stale = self.outputs / name
        if stale.exists():
            stale.unlink()
        dst = self.inputs / name
        shutil.copy(case, dst)
        os.chmod(dst, 0o644)
        log_path = self.logs / f"{self.image.name}__{case.stem}.log"
        cmd = self.command()
        log.info("%s: %s", name, " ".join(cmd))
        error = None
        rc: int | None
        with open(log_path, "wb") as logf:
            start = time.perf_counter()
            try:
                rc = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, timeout=self.timeout).returncode
            except subprocess.TimeoutExpired:
                rc = None
                error = f"timed out after {self.timeout:g} s"
            except KeyboardInterrupt:
                _docker("kill", self.image.name, check=False, timeout=60)  # do not leave it running
                raise
            seconds = time.perf_counter() - start
        if rc is None:
            _docker("kill", self.image.name, check=False, timeout=60)
        try:
            dst.unlink()
        except OSError:
            pass
        out = self.outputs / name
        ok = out.is_file()
        if ok:
            os.replace(out, self.results / name)
        else:
            found = sorted(p.name for p in self.outputs.iterdir())
            msg = f"no outputs/{name} (wrong segmentation name?); outputs holds {found[:5]}"
            error = f"{error}; {msg}" if error else msg
        if rc not in (0, None):
            tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] if log_path.exists() else []
            msg = f"container exit code {rc}" + (f": {tail[0][:200]}" if tail else "")
            error = f"{msg}; {error}" if error else msg
        rec = RunRecord(name, self.image.name, seconds, rc, ok, error)
        if error:
            log.error("%s / %s: %s", self.image.name, name, error)
        self.records.append(rec)
        return rec

    def write_csv(self) -> Path:
        """``NAME_running_time.csv`` with one row per case run (CaseName,RunningTime), like the organisers'."""
        return atomic_write_text(self.csv_path, csv_text(("CaseName", "RunningTime"),
                                                         [[r.case, repr(r.seconds)] for r in self.records]))

    def cleanup(self) -> None:
        try:
            shutil.rmtree(self.work)
        except OSError as exc:
            log.warning("could not remove %s (files written by the container's user?): %s", self.work, exc)


@dataclass
class TimingResult:
    runners: list[ProtocolRunner]
    cases: list[str]

    @property
    def failed(self) -> list[RunRecord]:
        return [r for run in self.runners for r in run.records if r.error]


def run_protocol(
    images: Sequence[str],
    cases_dir: str | Path,
    out_dir: str | Path,
    memory: str = "8G",
    timeout: float | None = None,
    clean_outputs: bool = False,
    keep_work: bool = False,
    progress: bool = True,
    network: str | None = None,
) -> TimingResult:
    """Time every case of ``cases_dir`` with one image, or two alternating (A B A B)."""
    if not 1 <= len(images) <= 2:
        raise ValueError("give one image, or two to compare")
    cases = list_cases(cases_dir)
    if not cases:
        raise FileNotFoundError(f"no .npz cases in {cases_dir}")
    docker_server_version()
    resolved = [resolve_image(s) for s in images]
    if len(resolved) == 2 and resolved[0].name == resolved[1].name:
        b = resolved[1]
        resolved[1] = DockerImage(b.ref, f"{b.name}_b", b.source)
    runners = [ProtocolRunner(img, Path(out_dir), memory, timeout, clean_outputs, network) for img in resolved]
    for r in runners:
        r.check_name_free()
    from tqdm import tqdm

    try:
        for case in tqdm(cases, desc="timing", unit="case", disable=not progress):
            for r in runners:  # A B A B ...
                rec = r.run_case(case)
                log.info("%s %s: %.2f s", r.image.name, case.name, rec.seconds)
    finally:
        for r in runners:
            if r.records:
                r.write_csv()
            if not keep_work:
                r.cleanup()
    return TimingResult(runners, [c.name for c in cases])


def _rows(result: TimingResult) -> tuple[list[str], list[list[object]]]:
    a = result.runners[0]
    b = result.runners[1] if len(result.runners) > 1 else None
    headers = ["case", f"{a.image.name} s"]
    if b is not None:
        headers += [f"{b.image.name} s", "B/A"]
    headers.append("status")
    by_a = {r.case: r for r in a.records}
    by_b = {r.case: r for r in b.records} if b else {}
    rows: list[list[object]] = []
    for name in result.cases:
        ra, rb = by_a.get(name), by_b.get(name)
        if ra is None:
            continue
        row: list[object] = [name, f"{ra.seconds:.2f}"]
        errs = [f"A: {ra.error}"] if ra.error else []
        if b is not None:
            row += [f"{rb.seconds:.2f}" if rb else "-",
                    f"{rb.seconds / ra.seconds:.2f}" if rb and ra.seconds > 0 else "-"]
            if rb and rb.error:
                errs.append(f"B: {rb.error}")
        row.append("ok" if not errs else "; ".join(errs))
        rows.append(row)
    ta = sum(r.seconds for r in a.records)
    total: list[object] = ["total", f"{ta:.2f}"]
    if b is not None:
        tb = sum(r.seconds for r in b.records)
        total += [f"{tb:.2f}", f"{tb / ta:.2f}" if ta > 0 else "-"]
    total.append(f"{len(result.failed)} failed run(s)")
    rows.append(total)
    return headers, rows


def timing_table(result: TimingResult) -> str:
    headers, rows = _rows(result)
    return text_table(headers, rows)


def write_timing_markdown(result: TimingResult, out_dir: str | Path) -> Path:
    headers, rows = _rows(result)
    imgs = "".join(f"- {'AB'[i]}: `{r.image.ref}` (from `{r.image.source}`), CSV `{r.csv_path}`\n"
                   for i, r in enumerate(result.runners))
    text = ("# Running time (official per-case protocol)\n\n" + imgs + f"- memory limit {result.runners[0].memory}\n\n"
            + markdown_table(headers, rows, align_right=[False] + [True] * (len(headers) - 2) + [False]))
    return atomic_write_text(Path(out_dir) / "timing.md", text)


def read_timing_csv(path: str | Path) -> dict[str, float]:
    """``CaseName,RunningTime`` -> {case: seconds}."""
    from .tables import read_csv_rows

    rows = read_csv_rows(path)
    if rows and not {"CaseName", "RunningTime"} <= set(rows[0]):
        raise ValueError(f"{path}: expected columns CaseName,RunningTime, got {list(rows[0])}")
    return {r["CaseName"]: float(r["RunningTime"]) for r in rows}


def timing_label(path: str | Path) -> str:
    """``team_running_time.csv`` -> ``team``."""
    stem = Path(path).stem
    return stem[: -len("_running_time")] if stem.endswith("_running_time") else stem
