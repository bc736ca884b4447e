"""lapsam.export: ONNX/OpenVINO export of a small random student, manifest, parity check, integrity."""

from __future__ import annotations

import dataclasses

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")

from lapsam.errors import ModelIntegrityError  # noqa: E402
from lapsam.manifest import (  # noqa: E402
    DECODER_INPUTS,
    DECODER_OUTPUTS,
    ENCODER_INPUT,
    ENCODER_OUTPUTS,
    ModelManifest,
    sha256_file,
    verify_file,
)

CASE_2D = "2DBox_CT_amos_0004_75"
CASE_3D = "3DBox_CT_TotalSegSmall"


@pytest.fixture(autouse=True, scope="module")
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def model(small_checkpoint: Path):
    from lapsam.distill.modeling import load_lapsam

    return load_lapsam(small_checkpoint)


def _all_files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# ---- manifest --------------------------------------------------------------------------------


def test_manifest_schema(small_model_dir: Path, model) -> None:
    raw = json.loads((small_model_dir / "manifest.json").read_text())
    m = ModelManifest.from_dict(raw)
    assert json.loads(json.dumps(m.to_dict())) == raw  # round trip: nothing outside the schema
    assert m.preprocessing == model.preprocessing
    assert m.backbone == "repvit_m0_9" and m.teacher == model.config.teacher
    s = m.preprocessing.input_size
    e, low = s // 16, s // 4
    assert m.tensors["encoder"][ENCODER_INPUT] == [1, 3, s, s]
    assert m.tensors["encoder"]["image_embed"] == [1, 256, e, e]
    assert set(m.tensors["encoder"]) == {ENCODER_INPUT, *ENCODER_OUTPUTS}
    assert set(m.tensors["decoder"]) == {*DECODER_INPUTS, *DECODER_OUTPUTS}
    assert m.tensors["decoder"]["masks"] == ["B", 1, low, low]
    assert m.tensors["decoder"]["point_coords"] == ["B", "P", 2]
    paths = {(f.role, f.backend, f.precision): f.path for f in m.files}
    assert paths == {
        ("encoder", "onnx", "fp32"): "encoder.onnx",
        ("decoder", "onnx", "fp32"): "decoder.onnx",
        ("encoder", "openvino", "fp32"): "openvino/encoder_fp32.xml",
        ("decoder", "openvino", "fp32"): "openvino/decoder_fp32.xml",
    }
    for f in m.files:
        assert f.path in f.files
        if f.backend == "openvino":
            assert set(f.files) == {f.path, f.path[:-4] + ".bin"}
        for rel, digest in f.files.items():
            assert not Path(rel).is_absolute()
            assert sha256_file(small_model_dir / rel) == digest
        verify_file(small_model_dir, f)
    assert {"torch", "onnx", "onnxruntime", "openvino"} <= set(m.versions)
    assert any("onnxslim" in n for n in m.notes)
    assert sorted(m.variants()) == [("onnx", "fp32"), ("openvino", "fp32")]


def test_graph_tensor_names(small_model_dir: Path) -> None:
    import onnx
    import openvino as ov

    for name, inputs, outputs in (("encoder", [ENCODER_INPUT], ENCODER_OUTPUTS), ("decoder", DECODER_INPUTS, DECODER_OUTPUTS)):
        g = onnx.load(str(small_model_dir / f"{name}.onnx"), load_external_data=False).graph
        assert [i.name for i in g.input] == list(inputs)
        assert [o.name for o in g.output] == list(outputs)
        assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in g.initializer)  # weights inline
        c = ov.Core().read_model(str(small_model_dir / f"openvino/{name}_fp32.xml"))
        assert [i.get_any_name() for i in c.inputs] == list(inputs)
        assert [o.get_any_name() for o in c.outputs] == list(outputs)


# ---- decoder prompts -------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_decoder_batches_and_points(small_model_dir: Path, model, backend: str) -> None:
    """The runtime's engines (the code that ships) on every prompt kind, against PyTorch."""
    from lapsam.runtime.engines import EngineOptions, load_engine

    m = ModelManifest.load(small_model_dir)
    s = m.preprocessing.input_size
    low = m.preprocessing.low_res_size
    engine = load_engine(small_model_dir, m, EngineOptions(backend=backend, precision_hint="f32"), threads=2)
    rng = np.random.default_rng(1)
    image = rng.standard_normal((1, 3, s, s)).astype(np.float32)
    feats = engine.encode(image)
    with torch.no_grad():
        tfeats = model.encode(torch.from_numpy(image))
    for f, t in zip(feats, tfeats, strict=True):
        np.testing.assert_allclose(f, t.numpy(), atol=1e-4)
    for b, p, with_mask in [(1, 0, False), (7, 0, False), (1, 1, False), (7, 1, True), (1, 5, True), (7, 5, False)]:
        xy0 = rng.uniform(0, s / 2, (b, 2))
        boxes = np.concatenate([xy0, xy0 + rng.uniform(8, s / 2, (b, 2))], 1).astype(np.float32)
        coords = rng.uniform(0, s, (b, p, 2)).astype(np.float32)
        labels = rng.integers(0, 2, (b, p)).astype(np.float32)
        mask_in = (rng.standard_normal((b, 1, low, low)) * 4).astype(np.float32)
        has = np.full((b,), 1.0 if with_mask else 0.0, np.float32)
        masks, iou = engine.decode(feats, boxes, coords, labels, mask_in, has)
        assert masks.shape == (b, 1, low, low)
        assert iou.shape == (b, 1)
        with torch.no_grad():
            ref_m, ref_iou = model.decode(
                *tfeats, boxes=torch.from_numpy(boxes),
                point_coords=torch.from_numpy(coords) if p else None,
                point_labels=torch.from_numpy(labels) if p else None,
                mask_input=torch.from_numpy(mask_in) if with_mask else None, repeat_image=True,
            )
        np.testing.assert_allclose(masks, ref_m.numpy(), atol=2e-3, err_msg=f"B={b} P={p} mask={with_mask}")
        np.testing.assert_allclose(iou, ref_iou.numpy(), atol=2e-3)
        # Boxes are not interchangeable: each row answers its own prompt.
        if b == 7:
            assert not np.allclose(masks[0], masks[1])


# ---- integrity -------------------------------------------------------------------------------


@pytest.mark.parametrize("rel", ["decoder.onnx", "openvino/encoder_fp32.bin"])
def test_corrupted_file_detected(small_model_dir: Path, tmp_path: Path, rel: str) -> None:
    from lapsam.runtime.engines import open_graph

    d = tmp_path / "model"
    shutil.copytree(small_model_dir, d)
    m = ModelManifest.load(d)
    entry = next(f for f in m.files if rel in f.files)
    verify_file(d, entry)
    data = bytearray((d / rel).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (d / rel).write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match="sha256"):
        verify_file(d, entry)
    with pytest.raises(ModelIntegrityError):
        open_graph(d, entry)
    (d / rel).unlink()
    with pytest.raises(ModelIntegrityError, match="missing"):
        verify_file(d, entry)


# ---- determinism -----------------------------------------------------------------------------


def test_export_is_deterministic(small_checkpoint: Path, small_model_dir: Path, tmp_path: Path) -> None:
    from lapsam.export.exporter import export_model

    out = tmp_path / small_model_dir.name  # same name: the manifest records it
    m = export_model(small_checkpoint, out, backends=("onnx", "openvino"), precisions=("fp32",))
    a, b = _all_files(small_model_dir), _all_files(out)
    assert set(a) == set(b)
    for rel in a:
        assert a[rel] == b[rel], f"{rel} differs between two exports of the same checkpoint"
    assert m == ModelManifest.load(small_model_dir)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no partial folder left


# ---- export check ----------------------------------------------------------------------------


def test_export_check_two_cases(small_model_dir: Path, case_copy, tmp_path: Path, capsys) -> None:
    from lapsam.export.check import run_check

    from lapsam.cli import main

    cases = case_copy(CASE_2D, CASE_3D)
    results = run_check(small_model_dir, cases, threads=2, max_slices=2, bf16=False)
    names = [r.name for r in results]
    assert names == ["onnxruntime/fp32", "openvino/fp32"]
    for r in results:
        assert r.error is None
        assert set(r.dsc) == {CASE_2D, CASE_3D}
        assert r.bar == 0.999 and r.passed, r
        assert r.dsc_min >= 0.999
        assert 0 < r.embed_max < 1e-3 and 0 < r.logits_max < 1e-3
        assert r.embed_mean <= r.embed_max and r.logits_mean <= r.logits_max
    js = tmp_path / "check.json"
    rc = main(["export", "check", str(small_model_dir), "--cases", str(cases), "--max-slices", "1",
               "--no-bf16", "--json", str(js)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "onnxruntime/fp32" in out and "openvino/fp32" in out and "DSC min" in out
    assert [r["passed"] for r in json.loads(js.read_text())] == [True, True]


def test_export_check_fails_on_wrong_model(small_model_dir: Path, case_copy, tmp_path: Path) -> None:
    """An encoder with altered weights (and a consistent manifest) must fail the fp32 bar."""
    import onnx
    from onnx import numpy_helper

    from lapsam.cli import main

    d = tmp_path / "model"
    shutil.copytree(small_model_dir, d)
    proto = onnx.load(str(d / "encoder.onnx"))
    # Perturb the largest weight tensor by 20%: a different model, same graph.
    init = max(proto.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.2, init.name))
    onnx.save_model(proto, str(d / "encoder.onnx"))
    m = ModelManifest.load(d)
    m.find("encoder", "onnx").files = {"encoder.onnx": sha256_file(d / "encoder.onnx")}
    m.save(d)
    js = tmp_path / "check.json"
    rc = main(["export", "check", str(d), "--cases", str(case_copy(CASE_2D)), "--no-bf16", "--json", str(js)])
    assert rc == 1
    res = {r["name"]: r for r in json.loads(js.read_text())}
    assert res["onnxruntime/fp32"]["passed"] is False and res["onnxruntime/fp32"]["dsc_min"] < 0.999
    assert res["openvino/fp32"]["passed"] is True


def test_check_refuses_other_checkpoint(small_model_dir: Path, tmp_path: Path, case_copy) -> None:
    from lapsam.export.check import run_check
    from lapsam.export.exporter import ExportError

    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"not the checkpoint")
    with pytest.raises(ExportError, match="sha256"):
        run_check(small_model_dir, case_copy(CASE_2D), checkpoint=bogus)


# ---- int8 ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_int8_openvino_encoder(small_checkpoint: Path, case_copy, tmp_path: Path) -> None:
    from lapsam.export.check import run_check
    from lapsam.export.exporter import export_model

    cases = case_copy(CASE_2D, CASE_3D)
    out = tmp_path / "q"
    m = export_model(small_checkpoint, out, backends=("openvino",), int8=True, calib_cases=cases,
                     calib_max_images=3)
    q = m.find("encoder", "openvino", "int8")
    assert q.path == "openvino/encoder_int8.xml"
    verify_file(out, q)
    assert ("openvino", "int8") in m.variants()
    assert any("int8" in n and "3 calibration slices" in n for n in m.notes)
    assert (out / "openvino/encoder_int8.bin").stat().st_size < 0.5 * (out / "openvino/encoder_fp32.bin").stat().st_size
    results = {r.name: r for r in run_check(out, cases, max_slices=1, bf16=False)}
    assert results["openvino/int8"].bar is None  # reported, not a bar
    assert results["openvino/int8"].embed_max > results["openvino/fp32"].embed_max
    assert results["openvino/int8"].dsc_min > 0.9


# ---- options, errors, CLI --------------------------------------------------------------------


def test_export_errors_leave_output_untouched(small_checkpoint: Path, tmp_path: Path, monkeypatch) -> None:
    from lapsam.export import exporter
    from lapsam.export.exporter import ExportError, export_model

    with pytest.raises(ExportError, match="calib"):
        export_model(small_checkpoint, tmp_path / "a", int8=True)
    with pytest.raises(ExportError, match="does not exist"):
        export_model(tmp_path / "missing.pt", tmp_path / "a")
    with pytest.raises(ExportError, match="precisions"):
        export_model(small_checkpoint, tmp_path / "a", precisions=("int4",))
    bad = tmp_path / "bad.pt"
    torch.save({"format": "something else"}, bad)
    with pytest.raises(ExportError, match="lapsam checkpoint"):
        export_model(bad, tmp_path / "a")

    out = tmp_path / "keep"
    out.mkdir()
    (out / "note.txt").write_text("mine")

    def boom(*a, **k):
        raise RuntimeError("conversion failed")

    monkeypatch.setattr(exporter, "export_decoder_files", boom)
    with pytest.raises(RuntimeError):
        export_model(small_checkpoint, out, backends=("onnx",), simplify=False)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert [p.name for p in out.iterdir()] == ["note.txt"]


def test_cli_parses_both_forms(tmp_path: Path, capsys) -> None:
    from lapsam.export import cli

    from lapsam.cli import build_parser, expand_argv

    p = build_parser()

    def parse(*argv: str):
        return p.parse_args(expand_argv(argv))

    a = parse("export", "ckpt.pt", "--out", "models/x", "--precision", "fp32", "fp16", "--no-simplify")
    assert a.func is cli._cmd_export
    assert a.checkpoint == Path("ckpt.pt") and a.out == Path("models/x")
    assert a.precision == ["fp32", "fp16"] and a.simplify is False and a.int8 is False
    assert a.backend == ["openvino", "onnxruntime"]
    a = parse("-v", "export", "model", "check", "--out", "m", "--backend", "onnx")  # a checkpoint named "check"
    assert a.func is cli._cmd_export and a.checkpoint == Path("check") and a.backend == ["onnxruntime"]
    a = parse("export", "check", "models/x", "--cases", "c")
    assert a.func is cli._cmd_check and a.model_dir == Path("models/x") and a.cases == Path("c")
    a = parse("export", "random", "--out", "r", "--input-size", "256")
    assert a.func is cli._cmd_random and a.input_size == 256 and a.backbone == "repvit_m0_9"
    with pytest.raises(SystemExit):
        parse("export", "ckpt.pt")  # --out is required
    with pytest.raises(SystemExit):
        parse("export", "ckpt.pt", "--out", "m", "--backend", "tensorrt")
    a = parse("bench", "export", "--no-teacher")
    assert a.func is cli._cmd_bench and a.teacher_enabled is False
    with pytest.raises(SystemExit):
        parse("export", "--help")
    help_text = capsys.readouterr().out
    assert "{model,check,random}" in help_text and "lapsam export CHECKPOINT" in help_text
    with pytest.raises(SystemExit):
        parse("export", "model", "--help")
    assert "{openvino,onnxruntime}" in capsys.readouterr().out  # the alias "onnx" is not advertised


def test_slices_and_calibration(case_copy, caplog) -> None:
    from lapsam.export.slices import calibration_images, case_slices

    from lapsam.case import load_case
    from lapsam.manifest import Preprocessing

    d = case_copy(CASE_2D, CASE_3D)
    (d / "0_broken.npz").write_bytes(b"not an npz")
    pp = Preprocessing(input_size=128)
    case = load_case(d / f"{CASE_3D}.npz")
    sl = case_slices(case, pp, max_slices=2)
    assert 1 <= len(sl) <= 2
    for s in sl:
        assert s.image.shape == (1, 3, 128, 128) and s.image.dtype == np.float32
        active = [b for b in case.boxes if b[2] <= s.z <= b[5]]
        assert s.boxes.shape == (len(active), 4)
        assert np.all(s.boxes >= 0) and np.all(s.boxes <= 128)
    imgs = calibration_images(d, pp, max_images=4)
    assert len(imgs) == 4  # the broken case is skipped, the others still used
    again = calibration_images(d, pp, max_images=4)
    assert all(np.array_equal(a, b) for a, b in zip(imgs, again, strict=True))
    assert "0_broken" in caplog.text


def test_min_mask_fill_flag_reaches_the_manifest(small_checkpoint: Path, small_model_dir: Path, tmp_path: Path,
                                                 capsys, case_copy) -> None:
    """`lapsam export --min-mask-fill F --fill-shape S` records F and S in the manifest's preprocessing
    (defaults 0, off, and box)."""
    from lapsam.cli import build_parser, expand_argv
    from lapsam.export.exporter import export_model

    p = build_parser()
    assert p.parse_args(expand_argv(["export", "c.pt", "--out", "m", "--min-mask-fill", "0.5"])).min_mask_fill == 0.5
    assert p.parse_args(expand_argv(["export", "c.pt", "--out", "m"])).min_mask_fill is None
    for bad in ("1.5", "-0.1", "half"):
        with pytest.raises(SystemExit):
            p.parse_args(expand_argv(["export", "c.pt", "--out", "m", "--min-mask-fill", bad]))
    assert "expected a number in [0, 1]" in capsys.readouterr().err
    assert p.parse_args(expand_argv(["export", "c.pt", "--out", "m", "--fill-shape", "ellipse"])).fill_shape == "ellipse"
    assert p.parse_args(expand_argv(["export", "c.pt", "--out", "m"])).fill_shape is None
    with pytest.raises(SystemExit):
        p.parse_args(expand_argv(["export", "c.pt", "--out", "m", "--fill-shape", "circle"]))
    assert ModelManifest.load(small_model_dir).preprocessing.min_mask_fill == 0.0
    assert ModelManifest.load(small_model_dir).preprocessing.fill_shape == "box"
    out = tmp_path / "filled"
    export_model(small_checkpoint, out, backends=("onnx",), simplify=False, min_mask_fill=0.5, fill_shape="ellipse")
    assert json.loads((out / "manifest.json").read_text())["preprocessing"]["min_mask_fill"] == 0.5
    assert json.loads((out / "manifest.json").read_text())["preprocessing"]["fill_shape"] == "ellipse"
    assert ModelManifest.load(out).preprocessing.min_mask_fill == 0.5
    assert ModelManifest.load(out).preprocessing.fill_shape == "ellipse"
    # `export check` against the checkpoint: min_mask_fill is the export's rule, not the checkpoint's
    from lapsam.export.check import run_check
    from lapsam.export.exporter import ExportError

    res = run_check(out, case_copy(CASE_2D), checkpoint=small_checkpoint, threads=2, max_slices=1, bf16=False)
    assert [r.name for r in res] == ["onnxruntime/fp32"] and res[0].passed
    m = ModelManifest.load(out)  # any other preprocessing difference still refuses the checkpoint
    m.preprocessing = dataclasses.replace(m.preprocessing, mask_threshold=1.0)
    m.save(out)
    with pytest.raises(ExportError, match="differs from the manifest"):
        run_check(out, case_copy(CASE_2D), checkpoint=small_checkpoint, threads=2, max_slices=1, bf16=False)
