"""The core CLI (`lapsam --help`, `lapsam data inspect`) and the torch-free import path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from lapsam.cli import main

PARTS = ("data", "distill", "export", "predict", "submission", "eval", "bench")


def test_help_lists_parts(capsys) -> None:
    try:
        main(["--help"])
    except SystemExit as exc:
        assert exc.code == 0
    out = capsys.readouterr().out
    for part in PARTS:
        assert f"    {part} " in out, f"'{part}' missing from lapsam --help"


def test_inspect_shared_cases(imgs_dir: Path, capsys) -> None:
    assert main(["data", "inspect", str(imgs_dir)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "10 case(s), 10 ok, 0 with errors"
    line = next(x for x in out if x.startswith("3DBox_CT_TotalSegSmall:"))
    assert "3D CT" in line and "shape=(30, 101, 122)" in line and "boxes=8" in line and "spacing=3x3x3" in line


def test_inspect_json(imgs_dir: Path, capsys) -> None:
    assert main(["data", "inspect", "--json", str(imgs_dir / "2DBox_CT_s0114_111.npz")]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["kind"] == "2D" and rec["boxes"] == 15 and rec["shape"] == [181, 258, 3]


def test_inspect_bad_inputs_one_line_each(tmp_path: Path, imgs_dir: Path, capsys) -> None:
    (tmp_path / "2DBox_US_notzip.npz").write_text("nope")
    np.savez(tmp_path / "2DBox_US_nobox.npz", imgs=np.zeros((8, 8, 3), np.uint8))
    np.savez(tmp_path / "2DBox_US_inverted.npz", imgs=np.zeros((8, 8, 3), np.uint8), boxes=np.array([[5, 1, 2, 3]]))
    np.savez(tmp_path / "3DBox_CT_2d.npz", imgs=np.zeros((8, 8), np.uint8), boxes=np.zeros((1, 6), int))
    np.savez(tmp_path / "2DBox_US_outside.npz", imgs=np.zeros((8, 8, 3), np.uint8), boxes=np.array([[1, 1, 3, 3], [20, 20, 30, 30]]))
    data = (imgs_dir / "2DBox_CT_amos_0004_75.npz").read_bytes()
    (tmp_path / "2DBox_CT_trunc.npz").write_bytes(data[:1000])
    assert main(["data", "inspect", str(tmp_path)]) == 1
    lines = capsys.readouterr().out.splitlines()
    by_name = {ln.split(":")[0]: ln for ln in lines[:-1]}
    assert len(by_name) == 6
    for n in ("2DBox_US_notzip.npz", "2DBox_US_nobox.npz", "2DBox_US_inverted.npz", "3DBox_CT_2d.npz", "2DBox_CT_trunc.npz"):
        assert "ERROR" in by_name[n], by_name[n]
    assert "box error" in by_name["2DBox_US_outside"]  # the case itself loads; one box is reported
    assert lines[-1] == "6 case(s), 1 ok, 5 with errors"


def test_inspect_empty_folder(tmp_path: Path, capsys) -> None:
    assert main(["data", "inspect", str(tmp_path)]) == 2
    assert "no .npz files" in capsys.readouterr().out


def test_core_and_runtime_do_not_import_torch() -> None:
    code = (
        "import sys, lapsam, lapsam.case, lapsam.io, lapsam.manifest, lapsam.preprocess, lapsam.cli, lapsam.runtime\n"
        "from lapsam.cli import build_parser; build_parser()\n"
        "heavy = sorted(m for m in ('torch', 'timm', 'sam2', 'torchvision', 'onnx') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"torch-free path imported: {out}"


def test_console_script_help() -> None:
    exe = Path(sys.executable).with_name("lapsam")
    res = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "data" in res.stdout
