"""Shared fixtures (the real cases in demo/data, a small exported model) and the CI guard.

CI guard: under ``CI=true`` a skip that drops a group of tests because the environment lacks
something CI must have is turned into a failure: a missing package (``pytest.importorskip``:
the torch/export group, the app group, ...) or ``LAPSAM_SKIP_DOCKER=1`` (the docker group).
Outside CI those groups are skipped as before, so a laptop without Docker or torch can run
the rest. Other skips (a test that does not apply on this OS, ...) stay skips everywhere.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "demo" / "data"

#: Skip reasons that CI must not accept: a module that could not be imported, Docker switched off.
CI_FORBIDDEN_SKIPS = (re.compile(r"could not import '([^']+)'"), re.compile(r"LAPSAM_SKIP_DOCKER"))


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _skip_reason(report) -> str:  # type: ignore[no-untyped-def]
    lr = report.longrepr
    if isinstance(lr, tuple) and len(lr) == 3:
        return str(lr[2])
    return str(lr)


def _fail_forbidden_skip(report) -> None:  # type: ignore[no-untyped-def]
    if not report.skipped or not in_ci() or hasattr(report, "wasxfail"):
        return
    reason = _skip_reason(report)
    if any(p.search(reason) for p in CI_FORBIDDEN_SKIPS):
        report.outcome = "failed"
        report.longrepr = f"CI=true: this group must run here, but it was skipped ({reason})"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):  # type: ignore[no-untyped-def]
    """Module-level skips (``importorskip`` at the top of a test file) drop a whole file."""
    outcome = yield
    _fail_forbidden_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):  # type: ignore[no-untyped-def]
    """Skips inside tests and fixtures (``small_checkpoint`` needs torch, docker fixtures)."""
    outcome = yield
    _fail_forbidden_skip(outcome.get_result())


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def imgs_dir() -> Path:
    return DATA / "imgs"


@pytest.fixture(scope="session")
def gts_dir() -> Path:
    return DATA / "gts"


@pytest.fixture(scope="session")
def extra_dir() -> Path:
    return DATA / "extra"


@pytest.fixture
def case_copy(tmp_path: Path, imgs_dir: Path):
    """Copy named shared cases into a fresh input folder: ``case_copy("2DBox_CT_amos_0004_75", ...)``."""

    def _copy(*names: str) -> Path:
        d = tmp_path / "inputs"
        d.mkdir(exist_ok=True)
        for n in names:
            shutil.copy(imgs_dir / f"{n}.npz", d / f"{n}.npz")
        return d

    return _copy


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory) -> Path:
    """A randomly initialised LapSam (repvit_m0_9 at 256) saved as a lapsam checkpoint."""
    torch = pytest.importorskip("torch")
    from lapsam.distill.modeling import LapSamConfig, StudentConfig, build_lapsam, save_checkpoint

    torch.manual_seed(0)
    model = build_lapsam(LapSamConfig(student=StudentConfig(backbone="repvit_m0_9", input_size=256)))
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "small.pt", model.eval())


@pytest.fixture(scope="session")
def small_model_dir(small_checkpoint: Path, tmp_path_factory) -> Path:
    """``small_checkpoint`` exported to ONNX + OpenVINO fp32 with a manifest (built once per session)."""
    from lapsam.export.exporter import export_model

    out = tmp_path_factory.mktemp("models") / "small"
    export_model(small_checkpoint, out, backends=("onnx", "openvino"), precisions=("fp32",))
    return out
