"""The shipped default model (models/default): its manifest holds, it is the default everywhere, it segments."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "default"


def test_manifest_hashes_hold_and_size_limit():
    manifest = json.loads((MODEL / "manifest.json").read_text())
    files = manifest["files"]
    assert files, "the manifest lists no files"
    total = 0
    for f in files:
        for rel, sha in f["files"].items():
            data = (MODEL / rel).read_bytes()
            total += len(data)
            assert hashlib.sha256(data).hexdigest() == sha, rel
    assert {(f["role"], f["backend"], f["precision"]) for f in files} >= {("encoder", "openvino", "fp32"),
                                                                            ("decoder", "openvino", "fp32")}
    on_disk = sum(p.stat().st_size for p in MODEL.rglob("*") if p.is_file())
    assert on_disk <= 50 * 1024 * 1024, f"models/default is {on_disk / 2**20:.1f} MB"
    assert (MODEL / "README.md").is_file() and (MODEL / "training_curve.png").is_file()


def test_predict_without_model_uses_the_default_and_segments(tmp_path):
    """`lapsam predict -i DIR -o OUT` with no --model: real masks inside the given boxes."""
    inp = tmp_path / "in"
    inp.mkdir()
    name = "2DBox_CT_amos_0004_75.npz"
    (inp / name).write_bytes((REPO / "demo" / "data" / "imgs" / name).read_bytes())
    env = {k: v for k, v in __import__("os").environ.items() if k != "LAPSAM_MODEL_DIR"}
    r = subprocess.run([sys.executable, "-m", "lapsam.cli", "predict", "-i", str(inp), "-o", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    segs = np.load(tmp_path / "out" / name)["segs"]
    case = np.load(inp / name)
    gts = np.load(REPO / "demo" / "data" / "gts" / name)["gts"]
    assert segs.shape == gts.shape
    for i, (x0, y0, x1, y1) in enumerate(case["boxes"]):
        m = segs == i + 1
        assert m.any(), f"box {i + 1} got no mask"
        ys, xs = np.nonzero(m)
        # the mask stays near its box (the runtime's window), and overlaps the reference object
        assert xs.min() >= x0 - 16 and xs.max() <= x1 + 16 and ys.min() >= y0 - 16 and ys.max() <= y1 + 16
        g = gts == i + 1
        assert 2 * (m & g).sum() / (m.sum() + g.sum()) > 0.3


def test_predict_honours_backend(tmp_path):
    """--backend reaches the engine: the default model ships OpenVINO files only, so onnxruntime is refused."""
    from lapsam.cli import main

    inp = tmp_path / "in"
    inp.mkdir()
    name = "2DBox_CT_amos_0004_75.npz"
    (inp / name).write_bytes((REPO / "demo" / "data" / "imgs" / name).read_bytes())
    manifest = json.loads((MODEL / "manifest.json").read_text())
    assert {f["backend"] for f in manifest["files"]} == {"openvino"}
    rc = main(["predict", "-i", str(inp), "-o", str(tmp_path / "ort"), "--model", str(MODEL),
               "--backend", "onnxruntime", "--no-progress"])
    assert rc != 0 and not (tmp_path / "ort" / name).exists()
    rc = main(["predict", "-i", str(inp), "-o", str(tmp_path / "ov"), "--model", str(MODEL),
               "--backend", "openvino", "--no-progress"])
    assert rc == 0 and (tmp_path / "ov" / name).is_file()
