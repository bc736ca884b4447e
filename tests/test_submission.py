"""Submission helpers that need no Docker engine: output checks, build context, CLI wiring."""

from __future__ import annotations

import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from lapsam.submission.cli import default_tar_name
from lapsam.submission.context import (
    RUNTIME_PACKAGES,
    WheelhouseSpec,
    pinned_runtime_requirements,
    prepare_context,
)
from lapsam.submission.verify import check_output
from lapsam.submission.warmup import write_synthetic_cases

from lapsam.case import load_case
from lapsam.cli import build_parser

CASE_2D = "2DBox_CT_amos_0004_75"


def _write(path: Path, **arrays: np.ndarray) -> Path:
    np.savez_compressed(path, **arrays)
    return path


@pytest.fixture
def case_2d(imgs_dir: Path) -> tuple[Path, tuple[int, ...], int]:
    p = imgs_dir / f"{CASE_2D}.npz"
    c = load_case(p)
    return p, c.spatial_shape, c.num_boxes


def test_check_output_accepts_a_correct_output(tmp_path: Path, case_2d) -> None:
    p, shape, n = case_2d
    segs = np.zeros(shape, np.uint8)
    segs[:5, :5] = n
    out = _write(tmp_path / p.name, segs=segs)
    assert check_output(p, out) == ([], True)


@pytest.mark.parametrize(
    "make, expect",
    [
        (lambda shape, n: {"segs": np.zeros((shape[0] + 1, *shape[1:]), np.uint8)}, "shape"),
        (lambda shape, n: {"segs": np.zeros(shape, np.int64)}, "dtype"),
        (lambda shape, n: {"segs": np.full(shape, n + 1, np.uint8)}, "outside 0.."),
        (lambda shape, n: {"mask": np.zeros(shape, np.uint8)}, "no key 'segs'"),
        (lambda shape, n: {"segs": np.zeros(shape, np.uint8), "extra": np.zeros(1)}, "extra keys"),
    ],
)
def test_check_output_flags_each_kind_of_wrong_output(tmp_path: Path, case_2d, make, expect: str) -> None:
    p, shape, n = case_2d
    out = _write(tmp_path / p.name, **make(shape, n))
    problems, valid = check_output(p, out)
    assert valid
    assert any(expect in msg for msg in problems), problems


def test_check_output_missing_and_corrupt(tmp_path: Path, case_2d) -> None:
    p, _, _ = case_2d
    assert check_output(p, tmp_path / p.name) == (["no output file"], True)
    (tmp_path / p.name).write_bytes(b"not a zip")
    problems, valid = check_output(p, tmp_path / p.name)
    assert valid and problems and problems[0].startswith("output unreadable")
    corrupt = tmp_path / "in" / "2DBox_CT_bad.npz"
    corrupt.parent.mkdir()
    corrupt.write_bytes(p.read_bytes()[:2000])
    problems, valid = check_output(corrupt, tmp_path / "nothing.npz")
    assert not valid and problems[0].startswith("input is invalid")


def test_warmup_cases_are_valid_challenge_cases(tmp_path: Path) -> None:
    paths = write_synthetic_cases(tmp_path)
    cases = [load_case(p) for p in paths]
    assert [c.is_3d for c in cases] == [False, True]
    assert all(c.num_boxes == 2 and not c.box_errors for c in cases)


def test_requirements_are_pinned_runtime_packages_only() -> None:
    reqs = pinned_runtime_requirements()
    assert [r.split("==")[0] for r in reqs] == list(RUNTIME_PACKAGES)
    assert all("==" in r for r in reqs)
    assert not any(r.startswith(("torch", "timm", "sam2")) for r in reqs)
    a, b = WheelhouseSpec(reqs), WheelhouseSpec(reqs[:-1])
    assert a.key() == WheelhouseSpec(list(reversed(reqs))).key() != b.key()


def test_default_tar_name() -> None:
    assert default_tar_name("team:latest") == Path("team.tar.gz")
    assert default_tar_name("registry.local:5000/me/team:v1") == Path("team.tar.gz")


def test_cli_verify_needs_an_image(capsys) -> None:
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["submission", "verify", "--cases", "x"])
    args = parser.parse_args(["submission", "verify", "--tar", "t.tar.gz", "--cases", "x"])
    assert args.tar == Path("t.tar.gz") and args.tag is None


def test_dockerfile_contract(repo_root: Path) -> None:
    text = (repo_root / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert "ARG BASE_IMAGE=python:3.11-slim" in lines
    assert lines[-3:] == ["WORKDIR /workspace", "USER lapsam", 'CMD ["/bin/bash", "-c", "sh predict.sh"]']
    assert "--no-index" in text and not any(re.search(r"\btorch\b", ln) for ln in lines)
    predict = (repo_root / "submission" / "predict.sh").read_text()
    assert "predict -i /workspace/inputs -o /workspace/outputs" in predict


def test_prepare_context_layout_and_lapsam_wheel_without_extras(tmp_path: Path, repo_root: Path) -> None:
    """The context holds what the Dockerfile copies; the lapsam wheel requires no training package."""
    spec = WheelhouseSpec(pinned_runtime_requirements())
    cache = tmp_path / "cache"
    fake = cache / "wheelhouse" / spec.key()  # a prepared wheelhouse: no download in this test
    fake.mkdir(parents=True)
    (fake / "numpy-0-py3-none-any.whl").write_bytes(b"x")
    (fake / "requirements.txt").write_text("\n".join(spec.requirements) + "\n")
    (fake / ".complete").write_text("ok\n")
    model = tmp_path / "model"
    model.mkdir()
    (model / "manifest.json").write_text("{}")
    ctx = prepare_context(model, tmp_path / "ctx", repo=repo_root, spec=spec, cache_dir=cache)
    assert (ctx / "Dockerfile").read_text() == (repo_root / "Dockerfile").read_text()
    assert sorted(p.name for p in (ctx / "wheelhouse" / "deps").iterdir()) == [
        "numpy-0-py3-none-any.whl", "requirements.txt"]
    assert (ctx / "model" / "manifest.json").is_file() and (ctx / "predict.sh").is_file()
    (wheel,) = (ctx / "wheelhouse" / "lapsam").glob("lapsam-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        requires = [ln for ln in zf.read(meta).decode().splitlines() if ln.startswith("Requires-Dist:")]
        names = zf.namelist()
    unconditional = sorted(ln.split()[1].split(">")[0].split("=")[0] for ln in requires if "extra ==" not in ln)
    assert unconditional == sorted(RUNTIME_PACKAGES)
    assert "lapsam/submission/predict.sh" in names and "lapsam/runtime/cli.py" in names
    shutil.rmtree(ctx)


def test_prepare_context_refuses_a_folder_without_manifest(tmp_path: Path, repo_root: Path) -> None:
    from lapsam.submission.context import SubmissionError

    with pytest.raises(SubmissionError, match="manifest.json"):
        prepare_context(tmp_path, tmp_path / "ctx", repo=repo_root)


def _fake_model(root: Path) -> Path:
    from lapsam.manifest import ModelFile, ModelManifest, Preprocessing

    files = []
    for role in ("encoder", "decoder"):
        (root / "openvino").mkdir(parents=True, exist_ok=True)
        (root / f"{role}.onnx").write_bytes(b"onnx")
        (root / "openvino" / f"{role}_fp32.xml").write_bytes(b"xml")
        (root / "openvino" / f"{role}_fp32.bin").write_bytes(b"bin")
        files += [
            ModelFile(role, "onnx", "fp32", f"{role}.onnx", {f"{role}.onnx": "0" * 64}),
            ModelFile(role, "openvino", "fp32", f"openvino/{role}_fp32.xml",
                      {f"openvino/{role}_fp32.xml": "0" * 64, f"openvino/{role}_fp32.bin": "0" * 64}),
        ]
    (root / "export_info.json").write_text("{}")
    ModelManifest(name="fake", preprocessing=Preprocessing(input_size=256), files=files).save(root)
    return root


def test_copy_model_keeps_one_backend(tmp_path: Path) -> None:
    from lapsam.submission.context import SubmissionError, copy_model

    from lapsam.manifest import ModelManifest

    src = _fake_model(tmp_path / "src")
    dst = copy_model(src, tmp_path / "dst", ("openvino",))
    got = sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*") if p.is_file())
    assert got == ["export_info.json", "manifest.json", "openvino/decoder_fp32.bin", "openvino/decoder_fp32.xml",
                   "openvino/encoder_fp32.bin", "openvino/encoder_fp32.xml"]
    m = ModelManifest.load(dst)
    assert {f.backend for f in m.files} == {"openvino"} and len(m.files) == 2
    full = copy_model(src, tmp_path / "all")
    assert (full / "encoder.onnx").is_file() and len(ModelManifest.load(full).files) == 4
    with pytest.raises(SubmissionError, match="unknown backend"):
        copy_model(src, tmp_path / "x", ("tensorrt",))
