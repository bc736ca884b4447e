"""The core CLI (`lapsam --help`, `lapsam data inspect`), one-line errors on stderr, and the torch-free import path."""

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


def _lapsam(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lapsam.cli", *args], cwd=cwd, capture_output=True, text=True,
                          encoding="utf-8", errors="replace", timeout=300)


def test_data_and_distill_errors_are_one_stderr_line(tmp_path: Path) -> None:
    """`lapsam data` / `lapsam distill` report a command that cannot start as every command does:
    one `error: MESSAGE` line on stderr (nothing on stdout), exit 2."""
    empty, missing = tmp_path / "empty", tmp_path / "missing"
    empty.mkdir()
    cases = [
        (["data", "inspect", str(empty)], "no .npz cases"),
        (["data", "inspect", str(missing)], "does not exist"),
        (["data", "to2025", str(missing), str(tmp_path / "o")], "does not exist"),
        (["data", "to2025", str(empty), str(tmp_path / "o"), "--box-shift", "-1"], "--box-shift"),
        (["distill", "prepare", str(missing), str(missing), str(tmp_path / "o")], "does not exist"),
        (["distill", "plot", str(empty)], "train_log.csv"),
        (["distill", "split"], "--out DIR is required"),
    ]
    for argv, what in cases:
        r = _lapsam(*argv, cwd=tmp_path)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2, (argv, r.stdout, r.stderr)
        assert r.stdout == "", (argv, r.stdout)
        assert len(lines) == 1 and lines[0].startswith("error: ") and what in lines[0], (argv, r.stderr)
    assert not (tmp_path / "o").exists()


def test_core_and_runtime_do_not_import_torch() -> None:
    code = (
        "import sys, lapsam, lapsam.case, lapsam.writers, lapsam.manifest, lapsam.preprocess, lapsam.cli, lapsam.runtime\n"
        "import lapsam.runtime.predictor, lapsam.runtime.run, lapsam.runtime.engines\n"
        "parts = sorted(m for m in sys.modules if m.startswith(('lapsam.distill', 'lapsam.export')))\n"
        "from lapsam.cli import build_parser; build_parser()\n"
        "heavy = sorted(m for m in ('torch', 'timm', 'sam2', 'torchvision', 'onnx') if m in sys.modules)\n"
        "print(','.join(parts + heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"torch-free path imported: {out}"


def test_pyproject_lists_every_package() -> None:
    """A non-editable wheel holds only the packages pyproject names: every folder of a part with an
    ``__init__.py`` (e.g. ``distill/modeling``) must be listed."""
    import tomllib

    repo = Path(__file__).resolve().parents[1]
    tool = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(tool["packages"])
    for name, folder in tool["package-dir"].items():
        for init in (repo / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(repo / folder)
            pkg = ".".join((name, *rel.parts))
            assert pkg in listed, f"{pkg} ({init.parent}) missing from [tool.setuptools] packages"


def test_console_script_help() -> None:
    exe = Path(sys.executable).with_name("lapsam")
    res = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "data" in res.stdout


def test_each_command_imports_only_its_part() -> None:
    """`lapsam CMD` registers only the module that adds CMD (a faster start): the table in
    lapsam.cli must match what each module registers, and `lapsam predict` must not import the
    other parts, tqdm or the engines before it runs."""
    import argparse
    import importlib

    from lapsam import cli

    for mod_name, commands in cli._PART_CLIS.items():
        parser = argparse.ArgumentParser()
        sub = parser.add_subparsers()
        importlib.import_module(mod_name).register(sub)
        assert tuple(sub.choices) == commands, mod_name
    assert cli.part_modules("predict") == ["lapsam.runtime.cli"]
    assert cli.part_modules("bench") == cli.part_modules(None) == list(cli._PART_CLIS)
    assert cli.command_of(["-v", "predict", "-i", "x"]) == "predict"
    code = (
        "import sys; from lapsam import cli; p = cli.build_parser('predict'); "
        "p.parse_args(['predict', '-i', 'a', '-o', 'b']); "
        "bad = sorted(m for m in sys.modules if m.startswith(('lapsam.distill', 'lapsam.export', 'lapsam.eval', "
        "'lapsam.submission', 'lapsam.runtime.app', 'lapsam.data_cli', 'tqdm', 'openvino', 'onnxruntime', "
        "'numpy'))); print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", out
