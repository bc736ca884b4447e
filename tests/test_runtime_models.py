"""The runtime on a real exported model (the small 256-input student): both backends, CLI,
sha256 check, OpenVINO cache, torch-free imports."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from lapsam.runtime import Predictor

from lapsam.case import load_case
from lapsam.errors import ModelIntegrityError

HEAVY = ("torch", "timm", "sam2")
CASE_2D = "2DBox_CT_amos_0004_75"
CASE_3D = "3DBox_MR_Breast1"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("LAPSAM_MODEL_DIR", None)
    env.pop("LAPSAM_OV_CACHE_DIR", None)
    return env


def test_runtime_import_is_torch_free():
    code = (
        "import sys, lapsam.runtime, lapsam.runtime.cli, lapsam.runtime.engines, lapsam.cli; "
        "lapsam.cli.build_parser(); "
        f"bad = [m for m in sys.modules if m.split('.')[0] in {HEAVY!r}]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_predict_cli_torch_free_bad_case_and_exit_code(small_model_dir: Path, case_copy, tmp_path: Path):
    inp = case_copy(CASE_2D, CASE_3D)
    (inp / "2DBox_US_broken.npz").write_bytes(b"PK\x03\x04 truncated")
    out = tmp_path / "out"
    code = (
        "import sys; from lapsam.cli import main; "
        f"rc = main(['predict', '-i', {str(inp)!r}, '-o', {str(out)!r}, '--model', {str(small_model_dir)!r}, "
        "'--backend', 'openvino', '--threads', '1', '--no-progress']); "
        f"bad = [m for m in sys.modules if m.split('.')[0] in {HEAVY!r}]; "
        "print('HEAVY', bad); sys.exit(rc)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=300)
    text = r.stdout + r.stderr
    assert r.returncode == 1, text  # one case failed
    assert "HEAVY []" in r.stdout, text
    assert "3 case(s): 2 ok, 1 failed" in r.stdout, text
    assert "2DBox_US_broken.npz" in text
    assert sorted(p.name for p in out.iterdir()) == [f"{CASE_2D}.npz", f"{CASE_3D}.npz"]
    for name in (CASE_2D, CASE_3D):
        case = load_case(inp / f"{name}.npz")
        with np.load(out / f"{name}.npz") as z:
            assert list(z.keys()) == ["segs"]
            segs = z["segs"]
        assert segs.shape == case.spatial_shape and segs.dtype == np.uint8
        assert segs.max() <= case.num_boxes


def test_predict_cli_all_ok_exit_zero(small_model_dir: Path, case_copy, tmp_path: Path):
    inp = case_copy(CASE_2D)
    r = subprocess.run(
        [sys.executable, "-m", "lapsam.cli", "predict", "-i", str(inp), "-o", str(tmp_path / "o"),
         "--model", str(small_model_dir), "--backend", "onnxruntime", "--threads", "1"],
        capture_output=True, text=True, env=_env(), timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "o" / f"{CASE_2D}.npz").is_file()


def test_no_model_gives_clear_error(tmp_path: Path, case_copy, monkeypatch):
    from lapsam.runtime import cli as rcli

    from lapsam.cli import main

    monkeypatch.delenv("LAPSAM_MODEL_DIR", raising=False)
    if (Path(rcli.__file__).resolve().parents[1] / "models" / "default" / "manifest.json").is_file():
        pytest.skip("a bundled default model exists")
    rc = main(["predict", "-i", str(case_copy(CASE_2D)), "-o", str(tmp_path / "o")])
    assert rc == 1 and not (tmp_path / "o").exists()


def test_backends_agree_and_3d_counts(small_model_dir: Path, imgs_dir: Path):
    ov = Predictor.from_model_dir(small_model_dir, backend="openvino", threads=1)
    ort = Predictor.from_model_dir(small_model_dir, backend="onnxruntime", threads=1)
    for name in (CASE_2D, CASE_3D):
        case = load_case(imgs_dir / f"{name}.npz")
        a, b = ov.predict(case), ort.predict(case)
        assert a.shape == case.spatial_shape
        assert np.mean(a == b) > 0.995
        if case.is_3d:
            r = ov.last_report
            zs = set()
            for bx in case.boxes:
                zs |= set(range(bx[2], bx[5] + 1))
            assert r.encoder_calls == len(zs) == r.slices_needed
            assert r.decoder_items == sum(int(bx[5] - bx[2] + 1) for bx in case.boxes)


def test_matches_torch_reference_on_2d(small_model_dir: Path, small_checkpoint: Path, imgs_dir: Path):
    """segs from the exported model == the torch model's logits upsampled and thresholded (inside the windows)."""
    torch = pytest.importorskip("torch")
    from lapsam.distill.model import load_lapsam

    from lapsam.preprocess import postprocess_masks, preprocess_image, transform_boxes

    case = load_case(imgs_dir / f"{CASE_2D}.npz")
    pred = Predictor.from_model_dir(small_model_dir, backend="onnxruntime", threads=1)
    segs = pred.predict(case)
    model = load_lapsam(small_checkpoint).eval()
    x, tf = preprocess_image(case.image, pred.pp)
    with torch.no_grad():
        feats = model.encode(torch.from_numpy(x))
        logits, _ = model.decode(*feats, boxes=torch.from_numpy(transform_boxes(case.boxes, tf)), repeat_image=True)
    masks = postprocess_masks(logits[:, 0].numpy(), tf)
    # the runtime computes each box's mask on a window around the box: do the same here
    from lapsam.runtime.predictor import _window

    h, w = case.spatial_shape
    ref = np.zeros(case.spatial_shape, np.uint8)
    inside = np.zeros(case.spatial_shape, bool)
    for i, (m, bx) in enumerate(zip(masks, case.boxes, strict=False)):
        r, c = _window(bx, h, w, pred.config.window_pad_frac, pred.config.window_pad_px)
        win = np.zeros_like(m)
        win[r, c] = m[r, c]
        ref[win] = i + 1
        inside[r, c] = True
    assert ref.any()
    assert np.mean(segs[inside] == ref[inside]) > 0.995
    assert not segs[~inside].any()


def test_sha256_mismatch_refuses_to_load(small_model_dir: Path, tmp_path: Path):
    bad = tmp_path / "model"
    shutil.copytree(small_model_dir, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    entry = next(f for f in manifest["files"] if f["role"] == "decoder" and f["backend"] == "onnx")
    p = bad / entry["path"]
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match="sha256"):
        Predictor.from_model_dir(bad, backend="onnxruntime", threads=1)
    Predictor.from_model_dir(bad, backend="openvino", threads=1)  # other files are intact


def test_openvino_cache_dir_written_and_corrupt_cache_falls_back(small_model_dir: Path, tmp_path: Path, imgs_dir: Path):
    cache = tmp_path / "ovcache"
    case = load_case(imgs_dir / f"{CASE_2D}.npz")
    ref = Predictor.from_model_dir(small_model_dir, backend="openvino", threads=1, cache_dir=str(cache)).predict(case)
    blobs = list(cache.glob("*.blob"))
    assert blobs, list(cache.iterdir())
    for b in blobs:
        b.write_bytes(b"garbage" * 10)
    again = Predictor.from_model_dir(small_model_dir, backend="openvino", threads=1, cache_dir=str(cache)).predict(case)
    np.testing.assert_array_equal(ref, again)
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")  # a cache path that cannot be a folder: compile without the cache
    third = Predictor.from_model_dir(small_model_dir, backend="openvino", threads=1, cache_dir=str(not_a_dir)).predict(case)
    np.testing.assert_array_equal(ref, third)
