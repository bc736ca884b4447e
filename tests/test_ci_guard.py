"""The CI guard of tests/conftest.py: under CI=true a skipped torch/docker group fails the run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

SAMPLE = '''
import pytest

def test_needs_a_missing_package():
    pytest.importorskip("lapsam_no_such_package_for_the_guard")

def test_docker_switched_off():
    pytest.skip("LAPSAM_SKIP_DOCKER=1")

def test_other_skip():
    pytest.skip("not on this OS")

def test_passes():
    assert True
'''

MODULE_LEVEL = '''
import pytest

torch = pytest.importorskip("lapsam_no_such_torch_for_the_guard")

def test_never_collected():
    assert False
'''


def _run(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess:
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    (tmp_path / "test_module_level.py").write_text(MODULE_LEVEL)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider",
                           "--continue-on-collection-errors", "--rootdir",
                           str(tmp_path), str(tmp_path)], capture_output=True, text=True, env=env, timeout=120,
                          cwd=tmp_path)


def test_outside_ci_groups_are_skipped(tmp_path: Path) -> None:
    r = _run(tmp_path, None)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 passed, 4 skipped" in r.stdout, r.stdout


def test_in_ci_skipped_groups_fail(tmp_path: Path) -> None:
    r = _run(tmp_path, "true")
    out = r.stdout
    assert r.returncode == 1, out + r.stderr
    assert "FAILED test_sample.py::test_needs_a_missing_package" in out
    assert "FAILED test_sample.py::test_docker_switched_off" in out
    assert "ERROR test_module_level.py" in out  # the whole file, not silently dropped
    assert "SKIPPED" in out and "not on this OS" in out  # other skips stay skips
    assert "1 passed" in out
