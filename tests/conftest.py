"""Shared fixtures: the real cases in demo/data and a small exported model."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "demo" / "data"


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
    from lapsam.distill.model import LapSamConfig, StudentConfig, build_lapsam, save_checkpoint

    torch.manual_seed(0)
    model = build_lapsam(LapSamConfig(student=StudentConfig(backbone="repvit_m0_9", input_size=256)))
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "small.pt", model.eval())


@pytest.fixture(scope="session")
def small_model_dir(small_checkpoint: Path, tmp_path_factory) -> Path:
    """``small_checkpoint`` exported to ONNX + OpenVINO fp32 with a manifest (built once per session)."""
    from lapsam.export.api import export_model

    out = tmp_path_factory.mktemp("models") / "small"
    export_model(small_checkpoint, out, backends=("onnx", "openvino"), precisions=("fp32",))
    return out
