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
    assert "--no-index" in text and not any(re.search(r"(?<!/)\btorch\b", ln) for ln in lines)
    predict = (repo_root / "submission" / "predict.sh").read_text()
    assert "predict -i /workspace/inputs -o /workspace/outputs" in predict
    # the final image: one flattened root file system (FROM scratch), no installer, the build's
    # hash marker, the engine predict.sh runs
    froms = [ln for ln in lines if ln.startswith("FROM ")]
    assert froms[-1] == "FROM scratch" and "COPY --from=rootfs / /" in lines
    final = lines[lines.index("FROM scratch"):]
    assert not any(re.search(r"\bpip\b", ln) for ln in final)
    assert any("LAPSAM_VERIFIED_MARKER=/opt/lapsam/verified.json" in ln for ln in final)
    assert any("lapsam.submission.warmup" in ln and "--marker" in ln for ln in final)
    assert '--backend "${LAPSAM_BACKEND:-openvino}"' in predict


def test_prepare_context_layout_and_lapsam_wheel_without_extras(tmp_path: Path, repo_root: Path) -> None:
    """The context holds what the Dockerfile copies; the lapsam wheel requires no training package."""
    spec = WheelhouseSpec(pinned_runtime_requirements())
    cache = tmp_path / "cache"
    fake = cache / "wheelhouse" / spec.key()  # a prepared wheelhouse: no download in this test
    fake.mkdir(parents=True)
    (fake / "numpy-0-py3-none-any.whl").write_bytes(b"x")
    (fake / "requirements.txt").write_text("\n".join(spec.requirements) + "\n")
    (fake / ".complete").write_text("ok\n")
    model = _fake_model(tmp_path / "model")
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


# ---- requirements follow the model's backend ---------------------------------------------------
def test_image_requirements_follow_the_shipped_backends() -> None:
    from lapsam.submission.context import (
        SubmissionError,
        image_requirements,
        predict_backend,
        requirement_name,
    )

    reqs = ["numpy==2.4.6", "onnxruntime==1.32.0", "openvino==2026.4.1", "threadpoolctl==3.8.0", "tqdm==4.70.1"]
    names = lambda rs: [requirement_name(r) for r in rs]  # noqa: E731
    assert names(image_requirements({"openvino"}, reqs)) == ["numpy", "openvino", "threadpoolctl", "tqdm"]
    assert names(image_requirements({"onnx"}, reqs)) == ["numpy", "onnxruntime", "threadpoolctl", "tqdm"]
    assert image_requirements({"onnx", "openvino"}, reqs) == reqs
    assert requirement_name("OpenVINO>=2024; python_version>'3.9'") == "openvino"
    for bad in (set(), {"tensorrt"}):
        with pytest.raises(SubmissionError, match="backend"):
            image_requirements(bad, reqs)
    assert predict_backend({"openvino", "onnx"}) == "openvino" and predict_backend({"onnx"}) == "onnxruntime"


@pytest.mark.parametrize("only, expect", [(None, {"onnxruntime", "openvino"}), ("openvino", {"openvino"}),
                                          ("onnx", {"onnxruntime"})])
def test_context_requirements_follow_only_backend(tmp_path: Path, repo_root: Path, only, expect) -> None:
    """--only-backend openvino (or an OpenVINO-only model) gives an image without onnxruntime."""
    spec = WheelhouseSpec(pinned_runtime_requirements())
    cache = tmp_path / "cache"
    fake = cache / "wheelhouse" / spec.key()
    fake.mkdir(parents=True)
    (fake / "requirements.txt").write_text("\n".join(spec.requirements) + "\n")
    (fake / ".complete").write_text("ok\n")
    model = _fake_model(tmp_path / "model")
    ctx = prepare_context(model, tmp_path / "ctx", repo=repo_root, spec=spec, cache_dir=cache,
                          backends=(only,) if only else None)
    got = {r.split("==")[0] for r in (ctx / "wheelhouse" / "deps" / "requirements.txt").read_text().split()}
    assert got == {"numpy", "threadpoolctl", "tqdm"} | expect


# ---- the verified marker: hashes checked at build time ----------------------------------------
def _hashed_model(root: Path) -> Path:
    """A model folder whose manifest holds the files' real sha256."""
    from lapsam.manifest import ModelFile, ModelManifest, Preprocessing, sha256_file

    (root / "openvino").mkdir(parents=True)
    files = []
    for role in ("encoder", "decoder"):
        rels = [f"openvino/{role}_fp32.xml", f"openvino/{role}_fp32.bin"]
        for rel in rels:
            (root / rel).write_bytes(f"{rel} contents".encode())
        files.append(ModelFile(role, "openvino", "fp32", rels[0], {r: sha256_file(root / r) for r in rels}))
    ModelManifest(name="hashed", preprocessing=Preprocessing(input_size=256), files=files).save(root)
    return root


def test_verified_marker_skips_hashing_only_while_nothing_changed(tmp_path: Path, monkeypatch) -> None:
    import json
    import os

    from lapsam.runtime import engines
    from lapsam.runtime.verified import MARKER_ENV, verified_at_build, write_marker

    from lapsam.errors import ModelIntegrityError
    from lapsam.manifest import ModelManifest

    model = _hashed_model(tmp_path / "model")
    marker = tmp_path / "verified.json"
    rec = write_marker(model, marker)
    assert set(rec["files"]) == {"openvino/encoder_fp32.xml", "openvino/encoder_fp32.bin",
                                 "openvino/decoder_fp32.xml", "openvino/decoder_fp32.bin"}
    enc = ModelManifest.load(model).find("encoder", "openvino")
    hashed: list[str] = []
    real_verify = engines.verify_file
    monkeypatch.setattr(engines, "verify_file", lambda d, e: (hashed.append(e.role), real_verify(d, e)))

    # outside the image (no $LAPSAM_VERIFIED_MARKER) every start hashes
    monkeypatch.delenv(MARKER_ENV, raising=False)
    engines.check_files(model, enc)
    assert hashed == ["encoder"]
    # in the image: skipped while the marker matches
    monkeypatch.setenv(MARKER_ENV, str(marker))
    engines.check_files(model, enc)
    assert hashed == ["encoder"]
    assert verified_at_build(model, enc)

    bin_ = model / "openvino" / "encoder_fp32.bin"
    st = bin_.stat()
    os.utime(bin_, ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10**9))  # touched: hash again
    assert not verified_at_build(model, enc)
    os.utime(bin_, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert verified_at_build(model, enc)
    bin_.write_bytes(b"replaced, other size")  # changed: hashed, and refused
    with pytest.raises(ModelIntegrityError):
        engines.check_files(model, enc)
    assert hashed == ["encoder", "encoder"]

    # another model folder, another manifest, a damaged marker: never trusted
    write_marker(_hashed_model(tmp_path / "other"), marker)
    assert not verified_at_build(model, enc)
    model2 = _hashed_model(tmp_path / "m2")
    write_marker(model2, marker)
    enc2 = ModelManifest.load(model2).find("encoder", "openvino")
    assert verified_at_build(model2, enc2)
    m = json.loads((model2 / "manifest.json").read_text())
    m["notes"] = ["edited"]
    (model2 / "manifest.json").write_text(json.dumps(m))
    assert not verified_at_build(model2, enc2)
    marker.write_text("{not json")
    assert not verified_at_build(model2, enc2)
    assert not verified_at_build(model2, enc2, marker=tmp_path / "missing.json")


def test_write_marker_refuses_a_file_that_does_not_match(tmp_path: Path) -> None:
    from lapsam.runtime.verified import write_marker

    from lapsam.errors import ModelIntegrityError

    model = _hashed_model(tmp_path / "model")
    (model / "openvino" / "decoder_fp32.bin").write_bytes(b"corrupt")
    with pytest.raises(ModelIntegrityError):
        write_marker(model, tmp_path / "verified.json")
    assert not (tmp_path / "verified.json").exists()


def test_predict_timings_and_marker_with_the_default_model(tmp_path: Path, repo_root: Path, imgs_dir: Path,
                                                           monkeypatch, capsys) -> None:
    """`lapsam predict --timings` prints each phase and one timings-json line; with the build's
    marker the hash check is skipped, without it the files are hashed."""
    from lapsam.runtime.verified import MARKER_ENV, write_marker

    from lapsam import timings
    from lapsam.cli import main

    model = repo_root / "models" / "default"
    inp = tmp_path / "in"
    inp.mkdir()
    shutil.copy(imgs_dir / f"{CASE_2D}.npz", inp)
    marker = tmp_path / "verified.json"
    write_marker(model, marker)
    monkeypatch.delenv("LAPSAM_OV_CACHE_DIR", raising=False)
    monkeypatch.delenv(timings.ENV, raising=False)
    seen = {}
    for label, env in (("marker", str(marker)), ("no marker", None)):
        if env:
            monkeypatch.setenv(MARKER_ENV, env)
        else:
            monkeypatch.delenv(MARKER_ENV, raising=False)
        timings.reset()
        monkeypatch.setattr(timings, "_forced", False)
        assert main(["predict", "-i", str(inp), "-o", str(tmp_path / label), "--model", str(model),
                     "--no-progress", "--timings"]) == 0
        err = capsys.readouterr().err
        rep = timings.parse(err)
        assert rep is not None, err
        names = [p[0] for p in rep["phases"]]
        seen[label] = names
        for want in ("imports: runtime (numpy, lapsam.runtime)", "model load: import openvino",
                     "model load: encoder compile (compiled)", "case: read", "case: encoder", "case: decoder",
                     "case: write"):
            assert want in names, (want, names)
        assert all(e >= s for _, s, e in rep["phases"]) and rep["t_end"] >= rep["t_import"]
        assert "timing: case: encoder" in err
        # the two compiles ran at once in worker threads: marked concurrent; the main thread's waits
        beside = {names[i] for i in rep["concurrent"]}
        assert beside == {"model load: encoder compile (compiled)", "model load: decoder compile (compiled)",
                          "model load (encoder + decoder compiles, concurrent)"}, (beside, names)
        assert "waiting for model load: encoder" in names and "waiting for model load: decoder" in names
        assert (tmp_path / label / f"{CASE_2D}.npz").is_file()
    assert "model load: encoder hash check skipped (verified at build)" in seen["marker"]
    assert "model load: encoder hash check (sha256)" in seen["no marker"]
    timings.reset()


# ---- OpenVINO cache modes chosen by the warm-up ------------------------------------------------
def _timings_err(cached: dict[str, bool]) -> str:
    import json

    phases = [[f"model load: {role} compile ({'from cache' if ok else 'compiled'})", 1.0, 2.0]
              for role, ok in cached.items()]
    return "2 case(s)\ntimings-json: " + json.dumps({"t_exec": None, "t_import": 0.0, "t_end": 3.0, "phases": phases})


def test_warmup_keeps_weightless_blobs_only_where_they_load(tmp_path: Path) -> None:
    import json

    from lapsam.runtime.engines import OV_CACHE_MODES_FILE, ov_cache_mode
    from lapsam.submission.warmup import choose_cache_modes, loaded_from_cache

    assert loaded_from_cache(_timings_err({"encoder": True, "decoder": False})) == {"encoder": True, "decoder": False}
    calls: list[str | None] = []

    def run(mode):  # the default model: its decoder does not load back from a weight-less blob
        calls.append(mode)
        if mode == "OPTIMIZE_SIZE":
            return _timings_err({"encoder": len(calls) > 1, "decoder": False})
        return _timings_err({"encoder": True, "decoder": len(calls) > 3})

    cached = choose_cache_modes(run, tmp_path)
    assert calls == ["OPTIMIZE_SIZE", "OPTIMIZE_SIZE", None, None]
    assert cached == {"encoder": True, "decoder": True}
    modes = json.loads((tmp_path / OV_CACHE_MODES_FILE).read_text())
    assert modes == {"decoder": "OPTIMIZE_SPEED", "encoder": "OPTIMIZE_SIZE"}
    # the runtime reads the file; an explicit mode ($LAPSAM_OV_CACHE_MODE) wins; a bad file is ignored
    assert ov_cache_mode("encoder", str(tmp_path)) == "OPTIMIZE_SIZE"
    assert ov_cache_mode("decoder", str(tmp_path)) == "OPTIMIZE_SPEED"
    assert ov_cache_mode("encoder", str(tmp_path), "OPTIMIZE_SPEED") == "OPTIMIZE_SPEED"
    (tmp_path / OV_CACHE_MODES_FILE).write_text("garbage")
    assert ov_cache_mode("encoder", str(tmp_path)) is None
    assert ov_cache_mode("encoder", str(tmp_path / "none")) is None

    calls.clear()
    cached = choose_cache_modes(lambda mode: (calls.append(mode), _timings_err(
        {"encoder": len(calls) > 1, "decoder": len(calls) > 1}))[1], tmp_path)
    assert calls == ["OPTIMIZE_SIZE", "OPTIMIZE_SIZE"] and all(cached.values())


# ---- lapsam bench submission: the breakdown -----------------------------------------------------
T0 = 1000.0


def _bench_runs(phases: list, concurrent: list[int] | None = None):  # type: ignore[no-untyped-def]
    """A baseline run (0.30 s) and a case run (0.80 s) from T0 whose log holds ``phases``."""
    import json

    from lapsam.submission.verify import RunResult

    rep: dict = {"t_exec": T0 + 0.21, "t_import": T0 + 0.25, "t_end": T0 + 0.60, "phases": phases}
    if concurrent is not None:
        rep["concurrent"] = concurrent
    base = RunResult(exit_code=0, wall_s=0.30, t_create=T0, started_at=T0 + 0.15, finished_at=T0 + 0.17,
                     t_removed=T0 + 0.30)
    case = RunResult(exit_code=0, wall_s=0.80, t_create=T0, started_at=T0 + 0.20, finished_at=T0 + 0.65,
                     t_removed=T0 + 0.80, log_tail="noise\ntimings-json: " + json.dumps(rep))
    return base, case


def test_bench_breakdown_adds_up_and_reports_the_ratio() -> None:
    from lapsam.submission.bench import Series, Variant, baseline_rows, case_rows, format_report
    from lapsam.submission.verify import RunResult, docker_time

    assert docker_time("2026-11-27T14:45:12.5Z") == pytest.approx(docker_time("2026-11-27T14:45:12Z") + 0.5)
    assert docker_time("2026-11-27T14:45:12.123456789Z") % 1 == pytest.approx(0.123456789, abs=1e-6)
    assert docker_time("0001-01-01T00:00:00Z") is None and docker_time(None) is None
    t0 = T0
    base, case = _bench_runs([
        ["cli: imports, parser, arguments", t0 + 0.25, t0 + 0.27],
        ["imports: runtime (numpy, lapsam.runtime)", t0 + 0.27, t0 + 0.35],
        ["model load: encoder compile (from cache)", t0 + 0.36, t0 + 0.40],
        ["model load: decoder compile (from cache)", t0 + 0.40, t0 + 0.45],
        ["model load (all)", t0 + 0.355, t0 + 0.46],
        ["case: read", t0 + 0.46, t0 + 0.47],
        ["case: encoder", t0 + 0.47, t0 + 0.52],
        ["case: write", t0 + 0.55, t0 + 0.56]])
    assert [round(v, 3) for _, v in baseline_rows(base)] == [0.17, 0.13]
    rows = case_rows(case)
    names = [n for n, _ in rows]
    assert names[:3] == ["docker: create + start", "shell: bash -c, sh predict.sh",
                         "python start: interpreter, site, lapsam"]
    assert names[-2:] == ["python exit + container stop", "docker: wait returns + remove"]
    assert dict(rows)["model load: rest"] == pytest.approx(0.105 - 0.09)
    assert sum(v for _, v in rows) == pytest.approx(case.wall_s)
    lines = format_report(Variant("A", "img", {}), "2DBox_US_0001.npz", Series([baseline_rows(base)], [0.30]),
                          Series([rows], [0.80]))
    assert lines[-1].strip().startswith("ratio case total / docker run true: 2.67")
    assert any("model load: encoder compile (from cache)" in ln for ln in lines)
    floor = Series([], [0.45, 0.40, 0.50])  # the floor runs: median 0.45 s = 1.5x the 0.30 s baseline
    with_floor = format_report(Variant("A", "img", {}), "2DBox_US_0001.npz", Series([baseline_rows(base)], [0.30]),
                               Series([rows], [0.80]), floor=floor)
    assert with_floor[-1] == lines[-1] and len(with_floor) == len(lines) + 2
    assert with_floor[-3].split()[-3:] == ["0.450", "0.400", "3"]
    assert with_floor[-2].strip() == ("floor / docker run true: 1.50; the case above the floor: 0.350 s "
                                      "(model load, the case, lapsam's imports)")
    with pytest.raises(Exception, match="timings-json"):
        case_rows(RunResult(exit_code=0, wall_s=1.0, t_create=t0, started_at=t0, finished_at=t0, t_removed=t0))


def test_bench_breakdown_leaves_concurrent_phases_out_of_the_sum() -> None:
    """Phases recorded in worker threads (the compiles, opened at once) overlap the main thread's:
    they are printed apart, under the total, and the steps still add up to the run's time."""
    from lapsam.submission.bench import (
        Series,
        Variant,
        baseline_rows,
        case_rows,
        concurrent_rows,
        format_report,
    )

    ms = (  # name, start, end: ms after T0; the 5th, 7th and 8th ran in worker threads
        ("imports: runtime (numpy, lapsam.runtime)", 250, 330), ("model load: import openvino", 340, 360),
        ("model load (all)", 340, 370), ("case: read", 370, 380),
        ("model load: encoder compile (from cache)", 365, 450), ("waiting for model load: encoder", 385, 450),
        ("model load: decoder compile (from cache)", 366, 480),
        ("model load (encoder + decoder compiles, concurrent)", 364, 480),
        ("waiting for model load: decoder", 470, 480), ("case: encoder", 450, 470), ("case: decoder", 480, 500),
        ("case: write", 500, 510))
    phases = [[name, T0 + a / 1000, T0 + b / 1000] for name, a, b in ms]
    base, case = _bench_runs(phases, concurrent=[4, 6, 7])
    rows, beside = case_rows(case), concurrent_rows(case)
    assert sum(v for _, v in rows) == pytest.approx(case.wall_s)
    assert dict(rows)["model load: rest"] == pytest.approx(0.01)  # the compiles are not inside the aggregate
    assert dict(rows)["waiting for model load: encoder"] == pytest.approx(0.065)
    assert [n for n, _ in beside] == ["model load (encoder + decoder compiles, concurrent)",
                                      "model load: encoder compile (from cache)",
                                      "model load: decoder compile (from cache)"]
    assert not {n for n, _ in beside} & {n for n, _ in rows}
    lines = format_report(Variant("A", "img", {}), "2DBox_US_0001.npz", Series([baseline_rows(base)], [0.30]),
                          Series([rows], [0.80]), Series([beside], []))
    i = next(i for i, ln in enumerate(lines) if ln.strip().startswith("case total"))
    assert lines[i + 1].strip().startswith("in worker threads, beside the steps above")
    assert "model load: decoder compile (from cache)" in lines[i + 4] and "%" not in lines[i + 4]
    assert lines[-1].strip().startswith("ratio case total / docker run true: 2.67")
    _, old = _bench_runs(phases[:4])  # a report without the key (an older image): every phase is a step
    assert concurrent_rows(old) == [] and len(case_rows(old)) > 4


def test_timings_off_by_default_and_round_trip(monkeypatch, capsys) -> None:
    from lapsam import timings

    monkeypatch.delenv(timings.ENV, raising=False)
    monkeypatch.setattr(timings, "_forced", False)
    timings.reset()
    with timings.phase("x"):
        pass
    timings.emit()
    assert timings.phases() == [] and capsys.readouterr().err == ""
    monkeypatch.setenv(timings.ENV, "1")
    monkeypatch.setenv(timings.EXEC_ENV, str(timings.T_IMPORT - 0.05))
    with timings.phase("x"):
        pass
    timings.record_seconds("y", 0.25)
    timings.record("z", 1.0, 2.0, concurrent=True)
    timings.emit()
    err = capsys.readouterr().err
    rep = timings.parse(err)
    assert [p[0] for p in rep["phases"]] == ["x", "y", "z"] and rep["t_exec"] == pytest.approx(timings.T_IMPORT - 0.05)
    assert rep["concurrent"] == [2] and timings.concurrent_indices(rep) == {2}
    assert "timing: y" in err and "(concurrent)" not in next(ln for ln in err.splitlines() if "timing: y" in ln)
    assert next(ln for ln in err.splitlines() if "timing: z" in ln).endswith("(concurrent)")
    assert "timing: python start (interpreter, site, lapsam)" in err and "timing: y" in err
    timings.reset()
