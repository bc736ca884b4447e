"""lapsam.eval.timing: the official per-case docker protocol, run against tiny images built offline.

The images are made without any registry: a rootfs tarball holding the host's /bin/bash,
/bin/sh, cp and their shared libraries (found with ldd) is ``docker import``-ed.
"""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import subprocess
import tarfile
import uuid
from pathlib import Path

import numpy as np
import pytest
from lapsam.eval.timing import (
    DockerError,
    container_name_for,
    docker_server_version,
    read_timing_csv,
    run_protocol,
    timing_label,
)

from lapsam.cli import main

# ---------------------------------------------------------------------------- no engine needed


def test_container_name_for():
    assert container_name_for("team:latest") == "team"
    assert container_name_for("localhost:5000/Org/My Team:v1") == "my_team"
    assert container_name_for("sha256:abc") == "sha256"
    assert timing_label("out/team_running_time.csv") == "team"


def test_official_command_is_literal(tmp_path, monkeypatch):
    import lapsam.eval.timing as timing

    monkeypatch.setattr(timing, "docker_cli", lambda: "docker")
    r = timing.ProtocolRunner(timing.DockerImage("team:latest", "team", "team.tar.gz"), tmp_path)
    assert r.command() == [
        "docker", "container", "run", "-m", "8G", "--name", "team", "--rm",
        "-v", f"{tmp_path.resolve()}/work_team/inputs/:/workspace/inputs/",
        "-v", f"{tmp_path.resolve()}/work_team/outputs/:/workspace/outputs/",
        "team:latest", "/bin/bash", "-c", "sh predict.sh",
    ]
    assert (r.outputs.stat().st_mode & 0o777) == 0o777 and (r.inputs.stat().st_mode & 0o777) == 0o777
    r.network = "none"  # optional, off by default
    assert r.command()[8:10] == ["--network", "none"]


def test_read_timing_csv(tmp_path):
    p = tmp_path / "t_running_time.csv"
    p.write_text("CaseName,RunningTime\na.npz,1.5\nb.npz,2.25\n")
    assert read_timing_csv(p) == {"a.npz": 1.5, "b.npz": 2.25}
    p.write_text("case,time\na.npz,1\n")
    with pytest.raises(ValueError):
        read_timing_csv(p)


# ---------------------------------------------------------------------------- docker

PREDICT_GOOD = 'for f in /workspace/inputs/*.npz; do cp /workspace/fixed.npz "/workspace/outputs/${f##*/}"; done\n'
PREDICT_WRONG_NAME = "cp /workspace/fixed.npz /workspace/outputs/wrong_name.npz\n"


@pytest.fixture(scope="module")
def docker_engine() -> str:
    try:
        return docker_server_version()
    except DockerError as exc:
        if os.environ.get("LAPSAM_SKIP_DOCKER") == "1":
            pytest.skip(f"LAPSAM_SKIP_DOCKER=1 and {exc}")
        pytest.fail(f"{exc}. The timing tests need a running Docker engine (start dockerd), "
                    "or set LAPSAM_SKIP_DOCKER=1 to skip them.", pytrace=False)


def _shared_libs(binary: str) -> list[str]:
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    libs = []
    for line in out.splitlines():
        m = re.search(r"(/\S+)", line.split("=>")[-1])
        if m:
            libs.append(m.group(1))
    return libs


def _add_file(tar: tarfile.TarFile, arcname: str, data: bytes, mode: int) -> None:
    info = tarfile.TarInfo(arcname.lstrip("/"))
    info.size, info.mode = len(data), mode
    tar.addfile(info, io.BytesIO(data))


def _rootfs(predict_sh: str, fixed_npz: bytes) -> bytes:
    """A tiny rootfs: bash, sh, cp and their libraries, /workspace/predict.sh, /workspace/fixed.npz."""
    files: dict[str, str] = {}
    for name in ("bash", "sh", "cp"):
        exe = shutil.which(name, path="/bin:/usr/bin")
        assert exe, f"host has no {name}"
        files[f"/bin/{name}"] = exe
        for lib in _shared_libs(os.path.realpath(exe)):
            files[lib] = lib
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        dirs = {"/workspace", "/tmp"} | {str(Path(p).parent) for p in files}
        for d in sorted(dirs):
            parts = Path(d).parts[1:]
            for i in range(1, len(parts) + 1):
                sub = "/".join(parts[:i])
                if sub not in tar.getnames():
                    info = tarfile.TarInfo(sub)
                    info.type, info.mode = tarfile.DIRTYPE, 0o1777 if sub == "tmp" else 0o755
                    tar.addfile(info)
        for arc, src in files.items():
            _add_file(tar, arc, Path(os.path.realpath(src)).read_bytes(), 0o755)
        _add_file(tar, "/workspace/predict.sh", predict_sh.encode(), 0o644)
        _add_file(tar, "/workspace/fixed.npz", fixed_npz, 0o644)
    return buf.getvalue()


def _import_image(tag: str, predict_sh: str, user: str | None) -> None:
    seg = io.BytesIO()
    np.savez_compressed(seg, segs=np.zeros((4, 4), np.uint8))
    changes = ["--change", "WORKDIR /workspace"] + (["--change", f"USER {user}"] if user else [])
    subprocess.run(["docker", "import", *changes, "-", tag], input=_rootfs(predict_sh, seg.getvalue()),
                   capture_output=True, check=True, timeout=120)


@pytest.fixture(scope="module")
def trivial_images(docker_engine, tmp_path_factory):
    """(good tag, bad image archive): the good image runs as a non-root user (uid 1000)."""
    tag = uuid.uuid4().hex[:8]
    good, bad = f"lapsam-eval-good-{tag}:latest", f"lapsam-eval-bad-{tag}:latest"
    _import_image(good, PREDICT_GOOD, user="1000:1000")
    _import_image(bad, PREDICT_WRONG_NAME, user=None)
    archive = tmp_path_factory.mktemp("img") / f"lapsam-eval-bad-{tag}.tar.gz"
    saved = subprocess.run(["docker", "save", bad], capture_output=True, check=True, timeout=120).stdout
    import gzip

    archive.write_bytes(gzip.compress(saved, compresslevel=1))
    subprocess.run(["docker", "rmi", "-f", bad], capture_output=True, timeout=120)
    yield good, archive, bad
    subprocess.run(["docker", "rmi", "-f", good, bad], capture_output=True, timeout=120)


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fp:
        return list(csv.DictReader(fp))


@pytest.mark.docker
def test_protocol_one_image_one_row_per_case(trivial_images, case_copy, tmp_path):
    good, _, _ = trivial_images
    cases = case_copy("2DBox_CT_amos_0004_75", "3DBox_MR_Breast1", "2DBox_CT_s0114_111")
    out = tmp_path / "timing"
    # --network none: the test images need no network, and a host whose docker bridge is broken still runs them
    result = run_protocol([good], cases, out, keep_work=True, progress=False, network="none")
    runner = result.runners[0]
    name = container_name_for(good)
    assert runner.csv_path == out / name / f"{name}_running_time.csv"
    rows = _csv_rows(runner.csv_path)
    assert [r["CaseName"] for r in rows] == sorted(p.name for p in cases.iterdir())
    assert all(float(r["RunningTime"]) > 0 for r in rows)
    assert not result.failed
    # the outputs were written by uid 1000 into the world-writable outputs folder, then collected
    for r in rows:
        assert "segs" in np.load(out / name / r["CaseName"]).files
    assert (runner.outputs.stat().st_mode & 0o777) == 0o777
    assert list(runner.inputs.iterdir()) == []  # the case is removed after its run


@pytest.mark.docker
def test_protocol_compare_alternates_and_reports_wrong_names(trivial_images, case_copy, tmp_path, capsys):
    good, archive, bad = trivial_images
    cases = case_copy("2DBox_CT_amos_0004_75", "3DBox_MR_Breast1")
    out = tmp_path / "cmp"
    rc = main(["eval", "timing", "--image", good, "--compare", str(archive), "--cases", str(cases), "-o", str(out),
               "--network", "none"])
    assert rc == 1  # image B never writes the right name
    printed = capsys.readouterr().out
    assert "B/A" in printed and "wrong segmentation name" in printed
    a, b = container_name_for(good), container_name_for(bad)
    rows_a = _csv_rows(out / a / f"{a}_running_time.csv")
    rows_b = _csv_rows(out / b / f"{b}_running_time.csv")
    assert len(rows_a) == len(rows_b) == 2  # one row per case, failures included
    assert (out / a / "3DBox_MR_Breast1.npz").exists() and not (out / b / "3DBox_MR_Breast1.npz").exists()
    # A B A B: the container logs were written in that order
    logs = sorted((out / "logs").iterdir(), key=lambda p: p.stat().st_mtime_ns)
    assert [p.name.split("__")[0] for p in logs] == [a, b, a, b]
    md = (out / "timing.md").read_text()
    assert "B/A" in md and md.count("wrong segmentation name") == 2
    assert not (out / f"work_{a}").exists()  # work folders removed


@pytest.mark.docker
def test_unknown_image_is_a_clear_error(docker_engine, case_copy, tmp_path):
    cases = case_copy("2DBox_CT_amos_0004_75")
    with pytest.raises(DockerError, match="not known"):
        run_protocol([f"lapsam-no-such-image-{uuid.uuid4().hex[:6]}:latest"], cases, tmp_path / "o", progress=False)
