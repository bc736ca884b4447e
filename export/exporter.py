"""``export_model``: a LapSam checkpoint -> ``models/NAME/`` (ONNX, OpenVINO IR, manifest.json).

Files written (paths relative to the model folder, names fixed):

* ``encoder.onnx``, ``decoder.onnx``: fp32, one file each, weights inline;
* ``openvino/encoder_fp32.xml`` (+ ``.bin``), ``openvino/decoder_fp32.xml``, and with fp16 in
  ``precisions`` ``openvino/encoder_fp16.xml``, ``openvino/decoder_fp16.xml`` (FP16 weights);
* with ``int8=True``: ``encoder_int8.onnx`` (QDQ) and/or ``openvino/encoder_int8.xml``
  (NNCF post-training quantisation on slices of real cases); the decoder stays fp32;
* ``manifest.json`` (:class:`lapsam.manifest.ModelManifest`) listing every file with its sha256;
* ``export_info.json``: where the checkpoint came from (its path and sha256) and the options
  used; ``lapsam export check`` reads it to find the PyTorch model. It is not part of the
  manifest and not covered by the determinism guarantee (it records an absolute path).

Everything is built in a hidden sibling folder first and moved in at the end, so a failed
export leaves the previous contents of ``out_dir`` untouched.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
import shutil
import tempfile
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from lapsam.errors import LapsamError
from lapsam.manifest import (
    DECODER_INPUTS,
    DECODER_OUTPUTS,
    ENCODER_INPUT,
    ENCODER_OUTPUTS,
    MANIFEST_NAME,
    ModelFile,
    ModelManifest,
    Preprocessing,
    sha256_file,
)

log = logging.getLogger(__name__)

EXPORT_INFO_NAME = "export_info.json"
SUPPORTED_BACKENDS = ("onnx", "openvino")
SUPPORTED_PRECISIONS = ("fp32", "fp16")
VERSION_PACKAGES = ("lapsam", "torch", "timm", "sam2", "onnx", "onnxslim", "onnxruntime", "openvino", "nncf", "numpy")

# Relative file names (kept predictable: runtime and submission refer to them).
ENCODER_ONNX = "encoder.onnx"
DECODER_ONNX = "decoder.onnx"
ENCODER_INT8_ONNX = "encoder_int8.onnx"


def openvino_xml(role: str, precision: str) -> str:
    return f"openvino/{role}_{precision}.xml"


class ExportError(LapsamError):
    """The export could not be done (bad options, unusable output folder, failed conversion)."""


def package_versions() -> dict[str, str]:
    out = {}
    for name in VERSION_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def tensor_shapes(input_size: int) -> dict[str, dict[str, list[Any]]]:
    """Role -> tensor name -> shape (``"B"``: number of boxes, ``"P"``: number of points)."""
    s = input_size
    e = s // 16
    low = 4 * e
    feats = {
        "image_embed": [1, 256, e, e],
        "high_res_feats_0": [1, 32, 4 * e, 4 * e],
        "high_res_feats_1": [1, 64, 2 * e, 2 * e],
    }
    return {
        "encoder": {ENCODER_INPUT: [1, 3, s, s], **feats},
        "decoder": {
            **feats,
            "boxes": ["B", 4],
            "point_coords": ["B", "P", 2],
            "point_labels": ["B", "P"],
            "mask_input": ["B", 1, low, low],
            "has_mask_input": ["B"],
            "masks": ["B", 1, low, low],
            "iou_predictions": ["B", 1],
        },
    }


DECODER_DYNAMIC_AXES: dict[str, dict[int, str]] = {
    "boxes": {0: "B"},
    "point_coords": {0: "B", 1: "P"},
    "point_labels": {0: "B", 1: "P"},
    "mask_input": {0: "B"},
    "has_mask_input": {0: "B"},
    "masks": {0: "B"},
    "iou_predictions": {0: "B"},
}


def _model_file(root: Path, role: str, backend: str, precision: str, rel: str) -> ModelFile:
    files = [rel]
    if rel.endswith(".xml"):
        files.append(rel[: -len(".xml")] + ".bin")
    return ModelFile(role=role, backend=backend, precision=precision, path=rel,
                     files={f: sha256_file(root / f) for f in files})


def export_encoder_files(
    encoder,
    input_size: int,
    root: Path,
    *,
    backends: Sequence[str] = SUPPORTED_BACKENDS,
    precisions: Sequence[str] = ("fp32",),
    int8: bool = False,
    calib_images: list | None = None,
    simplify: bool = True,
) -> tuple[list[ModelFile], list[str]]:
    """Export an encoder module (image -> 3 maps) to every requested variant under ``root``.

    Returns the manifest entries and notes. Also used for the SAM2 teacher in ``lapsam bench export``.
    """
    import torch

    from .onnx_io import simplify_onnx, torch_to_onnx

    notes: list[str] = []
    x = torch.zeros(1, 3, input_size, input_size)
    proto = torch_to_onnx(encoder, (x,), [ENCODER_INPUT], list(ENCODER_OUTPUTS))
    if simplify:
        proto, rep = simplify_onnx(proto, ENCODER_ONNX)
        notes.append(rep.note())
    entries = _write_graph(proto, root, "encoder", ENCODER_ONNX, backends, precisions)
    if int8:
        from .quantize import quantize_onnx, quantize_openvino

        if not calib_images:
            raise ExportError("int8 needs calibration images (calib_cases)")
        if "onnx" in backends:
            quantize_onnx(root / ENCODER_ONNX, root / ENCODER_INT8_ONNX, calib_images)
            entries.append(_model_file(root, "encoder", "onnx", "int8", ENCODER_INT8_ONNX))
        if "openvino" in backends:
            rel = openvino_xml("encoder", "int8")
            quantize_openvino(root / ENCODER_ONNX, root / rel, calib_images)
            entries.append(_model_file(root, "encoder", "openvino", "int8", rel))
        notes.append(
            f"int8 encoder: NNCF post-training quantisation (nncf {package_versions().get('nncf', '?')}), "
            f"{len(calib_images)} calibration slices of real cases; the decoder stays fp32"
        )
    if "onnx" not in backends:
        (root / ENCODER_ONNX).unlink()
    return entries, notes


def export_decoder_files(
    decoder, input_size: int, root: Path, *, backends: Sequence[str], precisions: Sequence[str], simplify: bool
) -> tuple[list[ModelFile], list[str]]:
    """Export a :class:`~lapsam.export.graphs.DecoderGraph` to ONNX and OpenVINO IR."""
    from .graphs import example_decoder_inputs
    from .onnx_io import simplify_onnx, torch_to_onnx

    notes: list[str] = []
    args = example_decoder_inputs(input_size)
    proto = torch_to_onnx(decoder, args, list(DECODER_INPUTS), list(DECODER_OUTPUTS), DECODER_DYNAMIC_AXES)
    if simplify:
        # Compare on real-looking prompts (B=3 boxes, P=2 points), not random box coordinates.
        feeds = {n: t.numpy() for n, t in zip(DECODER_INPUTS, example_decoder_inputs(input_size, 3, 2), strict=True)}
        proto, rep = simplify_onnx(proto, DECODER_ONNX, feeds=feeds)
        notes.append(rep.note())
    entries = _write_graph(proto, root, "decoder", DECODER_ONNX, backends, precisions)
    if "onnx" not in backends:
        (root / DECODER_ONNX).unlink()
    return entries, notes


def _write_graph(
    proto, root: Path, role: str, onnx_name: str, backends: Sequence[str], precisions: Sequence[str]
) -> list[ModelFile]:
    """Save ``proto`` as ``onnx_name`` and convert it to OpenVINO IR per precision; return the manifest entries.

    The ONNX file is always written (OpenVINO and INT8 are made from it); the caller removes it
    when the onnx backend was not asked for.
    """
    from .onnx_io import onnx_to_openvino, save_onnx

    save_onnx(proto, root / onnx_name)
    entries: list[ModelFile] = []
    if "onnx" in backends:
        entries.append(_model_file(root, role, "onnx", "fp32", onnx_name))
    if "openvino" in backends:
        for p in precisions:
            rel = openvino_xml(role, p)
            onnx_to_openvino(root / onnx_name, root / rel, fp16=(p == "fp16"))
            entries.append(_model_file(root, role, "openvino", p, rel))
    return entries


def _check_options(backends: Sequence[str], precisions: Sequence[str]) -> None:
    bad_b = [b for b in backends if b not in SUPPORTED_BACKENDS]
    bad_p = [p for p in precisions if p not in SUPPORTED_PRECISIONS]
    if bad_b or not backends:
        raise ExportError(f"backends must be a non-empty subset of {SUPPORTED_BACKENDS}, got {list(backends)}")
    if bad_p or not precisions:
        raise ExportError(f"precisions must be a non-empty subset of {SUPPORTED_PRECISIONS} "
                          f"(int8 is the separate int8 option), got {list(precisions)}")


def _install(tmp: Path, out_dir: Path, manifest: ModelManifest) -> None:
    """Move the finished export from ``tmp`` into ``out_dir``; manifest.json goes last.

    Files of a previous export listed in its manifest are removed first; other files in
    ``out_dir`` (e.g. a checkpoint kept there) are left alone.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    old_manifest = out_dir / MANIFEST_NAME
    if old_manifest.is_file():
        try:
            old = ModelManifest.load(out_dir)
            for f in old.files:
                for rel in f.files:
                    (out_dir / rel).unlink(missing_ok=True)
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("%s: previous manifest unreadable (%s); overwriting files by name", old_manifest, exc)
        old_manifest.unlink()
    produced = sorted(p for p in tmp.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
    for src in produced:
        dst = out_dir / src.relative_to(tmp)
        dst.parent.mkdir(parents=True, exist_ok=True)
        src.replace(dst)
    (tmp / MANIFEST_NAME).replace(out_dir / MANIFEST_NAME)


def export_model(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    backends: Sequence[str] = ("onnx", "openvino"),
    precisions: Sequence[str] = ("fp32",),
    int8: bool = False,
    calib_cases: str | Path | None = None,
    simplify: bool = True,
    name: str | None = None,
    calib_max_images: int = 32,
    min_mask_fill: float | None = None,
    fill_shape: str | None = None,
) -> ModelManifest:
    """Export a LapSam checkpoint to ``out_dir`` and return the manifest written there.

    ``precisions`` selects the OpenVINO IR weight precisions (fp32, fp16); ONNX files are
    always fp32. ``int8`` adds a quantised encoder per backend, calibrated on slices of the
    cases in ``calib_cases`` (required then).
    """
    import torch
    from lapsam.distill.modeling import load_lapsam

    from .graphs import DecoderGraph, EncoderGraph

    checkpoint = Path(checkpoint)
    out_dir = Path(out_dir)
    backends = tuple(dict.fromkeys(backends))
    precisions = tuple(dict.fromkeys(precisions))
    _check_options(backends, precisions)
    if int8 and calib_cases is None:
        raise ExportError("--int8 needs --calib-cases DIR (slices of real cases calibrate the quantiser)")
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir} exists and is not a folder")
    if not checkpoint.is_file():
        raise ExportError(f"checkpoint {checkpoint} does not exist")
    try:
        model = load_lapsam(checkpoint)
    except (pickle.UnpicklingError, EOFError):
        raise ExportError(f"{checkpoint}: not a lapsam checkpoint (torch.load with weights_only failed)") from None
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise ExportError(f"{checkpoint}: cannot load as a lapsam checkpoint: {first}") from None
    cfg = model.config
    pp: Preprocessing = model.preprocessing
    if min_mask_fill is not None:  # a post-processing rule of this export (Preprocessing.min_mask_fill)
        pp = dataclasses.replace(pp, min_mask_fill=float(min_mask_fill))
    if fill_shape is not None:  # ... and what replaces a weak mask (Preprocessing.fill_shape, checked there)
        pp = dataclasses.replace(pp, fill_shape=fill_shape)
    s = pp.input_size
    name = name or out_dir.name
    ckpt_sha = sha256_file(checkpoint)

    calib_images = None
    if int8:
        from .slices import calibration_images

        calib_images = calibration_images(Path(calib_cases), pp, max_images=calib_max_images)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        torch.manual_seed(0)
        log.info("exporting %s (%s @ %d) to %s", checkpoint, cfg.student.backbone, s, out_dir)
        enc_entries, enc_notes = export_encoder_files(
            EncoderGraph(model), s, tmp, backends=backends, precisions=precisions, int8=int8,
            calib_images=calib_images, simplify=simplify,
        )
        dec_entries, dec_notes = export_decoder_files(
            DecoderGraph(model), s, tmp, backends=backends, precisions=precisions, simplify=simplify
        )
        notes = [
            "exported with torch.onnx.export(dynamo=False), opset 17; the prompt encoder is inside decoder.onnx",
            "point_labels and has_mask_input are float32; boxes become corner points labelled 2/3 before the clicks",
            "masks are the single-mask output with SAM2's dynamic multimask-via-stability fallback, as LapSam.decode",
            "ONNX files are fp32 only; fp16 means OpenVINO IR with FP16-compressed weights (computed in f32 or bf16)",
            f"source checkpoint sha256 {ckpt_sha}",
            "deterministic: the same checkpoint and options give byte-identical files and manifest",
            *enc_notes,
            *dec_notes,
        ]
        manifest = ModelManifest(
            name=name,
            preprocessing=pp,
            files=enc_entries + dec_entries,
            backbone=cfg.student.backbone,
            teacher=cfg.teacher,
            tensors=tensor_shapes(s),
            versions=package_versions(),
            notes=notes,
        )
        manifest.save(tmp)
        info = {
            "checkpoint": str(checkpoint.resolve()),
            "checkpoint_sha256": ckpt_sha,
            "backends": list(backends),
            "precisions": list(precisions),
            "int8": bool(int8),
            "calib_cases": None if calib_cases is None else str(Path(calib_cases).resolve()),
            "simplify": bool(simplify),
        }
        (tmp / EXPORT_INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
        _install(tmp, out_dir, manifest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote %s (%d files)", out_dir / MANIFEST_NAME, len(manifest.files))
    return manifest
