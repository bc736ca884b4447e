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
# 15 small objects on 181 x 258 (enlarged to the input) and 125 nuclei on 512 x 512 (shrunk)
MANY_BOX_CASES = ("2DBox_CT_s0114_111", "2DBox_Microscope_Nuclei")


def _box_window(box, h: int, w: int, frac: float, pad: int) -> tuple[slice, slice]:
    """The runtime's documented mask window: the box grown by ``frac`` of its size plus ``pad`` pixels."""
    x0, y0, x1, y1 = (int(v) for v in box)
    gx, gy = int(round((x1 - x0 + 1) * frac)) + pad, int(round((y1 - y0 + 1) * frac)) + pad
    return slice(max(0, y0 - gy), min(h, y1 + gy + 1)), slice(max(0, x0 - gx), min(w, x1 + gx + 1))


def _assert_same_labels(a: np.ndarray, b: np.ndarray, n: int, what: str, min_dice: float = 0.99) -> None:
    """Per label (a small object missing in one of them must fail): same presence, Dice >= min_dice."""
    for label in range(1, n + 1):
        ma, mb = a == label, b == label
        assert ma.any() == mb.any(), f"{what}: label {label} present in only one ({ma.sum()} vs {mb.sum()} px)"
        if ma.any():
            dice = 2 * np.logical_and(ma, mb).sum() / (ma.sum() + mb.sum())
            assert dice >= min_dice, f"{what}: label {label} Dice {dice:.4f} ({ma.sum()} vs {mb.sum()} px)"
    assert not ((a > n) | (b > n)).any()


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("LAPSAM_MODEL_DIR", None)
    env.pop("LAPSAM_OV_CACHE_DIR", None)
    return env


def test_runtime_import_is_torch_free():
    code = (
        "import sys, lapsam.runtime, lapsam.runtime.cli, lapsam.runtime.engines, lapsam.runtime.bench, lapsam.cli; "
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
        assert segs.any()
        # every label stays inside its own box's window (2D) or z-range (3D)
        for i, bx in enumerate(case.boxes):
            m = segs == i + 1
            if case.is_3d:
                zs = np.flatnonzero(m.any(axis=(1, 2)))
                assert zs.size == 0 or (bx[2] <= zs.min() and zs.max() <= bx[5]), (name, i, zs)
            else:
                r, c = _box_window(bx, *case.spatial_shape, 0.1, 8)
                assert m.sum() == m[r, c].sum(), (name, i)


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

    # the default model's place ($LAPSAM_MODEL_DIR) holds no model: a clear error before any work
    empty = tmp_path / "no-model"
    empty.mkdir()
    monkeypatch.setenv("LAPSAM_MODEL_DIR", str(empty))
    assert rcli.default_model_dir() == empty
    rc = main(["predict", "-i", str(case_copy(CASE_2D)), "-o", str(tmp_path / "o")])
    assert rc == 2 and not (tmp_path / "o").exists()


def test_openvino_runs_f32_unless_bf16_is_asked_for(small_model_dir: Path):
    """OpenVINO's own default is bf16 on CPUs with AVX512-BF16/AMX; lapsam asks for f32 unless told."""
    from lapsam.runtime.engines import OvGraph

    xml = sorted(small_model_dir.rglob("*.xml"))
    assert xml
    for p in xml:
        assert OvGraph(p, 1).compiled.get_property("INFERENCE_PRECISION_HINT").to_dtype() == np.float32
    import openvino as ov

    if "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):  # asked for, it is used
        hint = OvGraph(xml[0], 1, "bf16").compiled.get_property("INFERENCE_PRECISION_HINT")
        assert hint.get_type_name() == "bf16"


def _layer_types(graph) -> list[str]:  # type: ignore[no-untyped-def]
    return [op.get_rt_info()["layerType"].astype(str) for op in graph.compiled.get_runtime_model().get_ops()]


def test_openvino_snippets_off_by_default_same_outputs(small_model_dir: Path, monkeypatch: pytest.MonkeyPatch):
    """Snippets (the CPU plugin's JIT-fused subgraphs) are off unless $LAPSAM_OV_SNIPPETS=ENABLE: the
    executed graph has no 'Subgraph' node then, and both modes give the same encoder outputs."""
    from lapsam.runtime.engines import OvGraph

    from lapsam.errors import UsageError

    enc = next(p for p in small_model_dir.rglob("*.xml") if "encoder" in p.name)
    monkeypatch.delenv("LAPSAM_OV_SNIPPETS", raising=False)
    off = OvGraph(enc, 1)
    assert off.snippets_mode == "DISABLE" and "Subgraph" not in _layer_types(off)
    monkeypatch.setenv("LAPSAM_OV_SNIPPETS", "enable")
    on = OvGraph(enc, 1)
    assert on.snippets_mode == "ENABLE" and "Subgraph" in _layer_types(on)  # the plugin's default fuses
    x = {"image": np.random.default_rng(0).standard_normal(tuple(off.compiled.inputs[0].shape), np.float32)}
    for a, b in zip(off.run(x), on.run(x), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    monkeypatch.setenv("LAPSAM_OV_SNIPPETS", "sometimes")
    with pytest.raises(UsageError, match="LAPSAM_OV_SNIPPETS"):
        OvGraph(enc, 1)


def test_backends_agree_and_3d_counts(small_model_dir: Path, imgs_dir: Path):
    ov = Predictor.from_model_dir(small_model_dir, backend="openvino", threads=1)
    ort = Predictor.from_model_dir(small_model_dir, backend="onnxruntime", threads=1)
    for name in (CASE_2D, CASE_3D, MANY_BOX_CASES[0]):
        case = load_case(imgs_dir / f"{name}.npz")
        a, b = ov.predict(case), ort.predict(case)
        assert a.shape == case.spatial_shape
        _assert_same_labels(a, b, case.num_boxes, name)
        if case.is_3d:
            r = ov.last_report
            zs = set()
            for bx in case.boxes:
                zs |= set(range(bx[2], bx[5] + 1))
            assert r.encoder_calls == len(zs) == r.slices_needed
            assert r.decoder_items == sum(int(bx[5] - bx[2] + 1) for bx in case.boxes)


def _torch_reference(model, case, pp, frac: float, pad: int) -> np.ndarray:
    """segs of a 2D case computed with torch alone: SAM2's antialiased resize, normalise, pad, box
    scaling, F.interpolate of the logits (to S, crop, to the original size), the documented window,
    overlaps to the higher logit. No lapsam pre/post-processing code."""
    import torch
    import torch.nn.functional as F

    h, w = case.spatial_shape
    s = pp.input_size
    if pp.resize == "stretch":
        nh, nw = s, s
    else:
        scale = s / max(h, w)
        nh, nw = int(h * scale + 0.5), int(w * scale + 0.5)
    img = torch.from_numpy(case.image).permute(2, 0, 1)[None].double()
    x = F.interpolate(img, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    x = (x - torch.tensor(pp.pixel_mean).view(1, 3, 1, 1)) / torch.tensor(pp.pixel_std).view(1, 3, 1, 1)
    x = F.pad(x, (0, s - nw, 0, s - nh)).float()
    boxes = torch.from_numpy(case.boxes.astype(np.float64) * np.array([nw / w, nh / h, nw / w, nh / h])).float()
    with torch.no_grad():
        feats = model.encode(x)
        logits, _ = model.decode(*feats, boxes=boxes, repeat_image=True)
        up = F.interpolate(logits, size=(s, s), mode="bilinear", align_corners=False)[..., :nh, :nw]
        up = F.interpolate(up, size=(h, w), mode="bilinear", align_corners=False)[:, 0].numpy()
    # overlaps: the pixel goes to the box with the highest logit there (ties: the later box)
    ref = np.zeros((h, w), np.int64)
    best = np.full((h, w), -np.inf)
    for i, (m, lg, bx) in enumerate(zip(up > pp.mask_threshold, up, case.boxes, strict=True)):
        r, c = _box_window(bx, h, w, frac, pad)
        take = np.zeros((h, w), bool)
        take[r, c] = m[r, c]
        take &= lg >= best
        ref[take] = i + 1
        best[take] = lg[take]
    return ref


@pytest.mark.parametrize("name", MANY_BOX_CASES)
def test_matches_torch_reference_on_2d(small_model_dir: Path, small_checkpoint: Path, imgs_dir: Path, name: str):
    """segs from the exported model == an independent torch pipeline on the PyTorch model, label by label."""
    pytest.importorskip("torch")
    from lapsam.distill.modeling import load_lapsam

    case = load_case(imgs_dir / f"{name}.npz")
    pred = Predictor.from_model_dir(small_model_dir, backend="onnxruntime", threads=1)
    segs = pred.predict(case)
    ref = _torch_reference(load_lapsam(small_checkpoint).eval(), case, pred.pp, pred.config.window_pad_frac,
                           pred.config.window_pad_px)
    present = sum(1 for i in range(case.num_boxes) if (ref == i + 1).any())
    assert present >= case.num_boxes // 2  # the comparison is not between two empty images
    # measured: Dice 1.0 for every label; a two-tap (non-antialiased) resize gives 0.984 on a nucleus
    _assert_same_labels(segs, ref, case.num_boxes, name, min_dice=0.995)


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


# ---- model load: encoder and decoder opened at once ------------------------------------------
def _no_load_worker_left() -> bool:
    import threading

    for t in threading.enumerate():
        if t.name.startswith("lapsam-model-load"):
            t.join(timeout=60)
    return not any(t.name.startswith("lapsam-model-load") for t in threading.enumerate())


@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
def test_concurrent_load_gives_the_serial_load_outputs(small_model_dir: Path, imgs_dir: Path, backend: str):
    """Both graphs opened at once (waited for at load, or at first use) run exactly as when opened
    one after the other; no loader thread is left."""
    from lapsam.runtime.engines import EngineOptions, load_engine, read_manifest

    m = read_manifest(small_model_dir)
    case = load_case(imgs_dir / f"{CASE_2D}.npz")
    s = m.preprocessing.input_size
    x = np.random.default_rng(0).standard_normal((1, 3, s, s)).astype(np.float32)
    boxes = np.array([[s * 0.2, s * 0.3, s * 0.6, s * 0.7]], np.float32)
    prompt = (boxes, np.zeros((1, 0, 2), np.float32), np.zeros((1, 0), np.float32),
              np.zeros((1, 1, s // 4, s // 4), np.float32), np.zeros(1, np.float32))
    out = {}
    for label, concurrent, background in (("serial", False, False), ("concurrent", True, False),
                                          ("background", True, True)):
        engine = load_engine(small_model_dir, m, EngineOptions(backend=backend, threads=1, concurrent_load=concurrent),
                             background=background)
        feats = engine.encode(x)
        out[label] = (*feats, *engine.decode(feats, *prompt),
                      Predictor(engine, m.preprocessing, manifest=m, threads=1).predict(case))
    for label in ("concurrent", "background"):
        for a, b in zip(out[label], out["serial"], strict=True):
            np.testing.assert_array_equal(a, b, err_msg=label)
    assert _no_load_worker_left()


@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
def test_graph_the_backend_cannot_open_is_one_line_error(small_model_dir: Path, tmp_path: Path, imgs_dir: Path,
                                                         backend: str, caplog, monkeypatch):
    """A decoder file that passes its sha256 check but that the backend cannot read: the same one-line
    ModelLoadError naming the file, whether the graphs open one after the other, at once, or in the
    background (then at the first decoder call); `lapsam predict` stops there, exit 1, nothing written."""
    import logging

    from lapsam.runtime.engines import EngineOptions, ModelLoadError, load_engine, read_manifest

    from lapsam.cli import main
    from lapsam.manifest import sha256_file

    bad = tmp_path / "model"
    shutil.copytree(small_model_dir, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    fb = "onnx" if backend == "onnxruntime" else "openvino"
    entry = next(f for f in manifest["files"] if f["role"] == "decoder" and f["backend"] == fb)
    p = bad / entry["path"]
    p.write_bytes(b"<net><layers>broken" if fb == "openvino" else b"not an onnx model")
    entry["files"][entry["path"]] = sha256_file(p)  # the hash check passes: the backend must refuse it
    (bad / "manifest.json").write_text(json.dumps(manifest))
    m = read_manifest(bad)
    case = load_case(imgs_dir / f"{CASE_2D}.npz")
    errors = {}
    for label, concurrent, background in (("serial", False, False), ("concurrent", True, False),
                                          ("background", True, True)):
        with pytest.raises(ModelLoadError) as err:
            engine = load_engine(bad, m, EngineOptions(backend=backend, threads=1, concurrent_load=concurrent),
                                 background=background)
            assert background, "only a background load returns before the decoder is open"
            Predictor(engine, m.preprocessing, manifest=m, threads=1).predict(case)
        errors[label] = str(err.value)
    assert len(set(errors.values())) == 1, errors
    msg = errors["serial"]
    assert msg.startswith(f"{p}: ") and "\n" not in msg, msg
    assert _no_load_worker_left()

    monkeypatch.delenv("LAPSAM_OV_CACHE_DIR", raising=False)
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    shutil.copy(imgs_dir / f"{CASE_2D}.npz", inp)
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        rc = main(["predict", "-i", str(inp), "-o", str(out), "--model", str(bad), "--backend", backend,
                   "--threads", "1", "--no-progress"])
    assert rc == 1
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [msg]
    assert not list(out.glob("*.npz"))
    assert _no_load_worker_left()
