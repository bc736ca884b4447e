"""Inference engines over the exported encoder/decoder graphs (ONNX Runtime or OpenVINO).

An engine has two calls, following the graph contract in :mod:`lapsam.manifest`:

* ``encode(image)``: (1, 3, S, S) float32 -> ``(image_embed, high_res_feats_0, high_res_feats_1)``;
* ``decode(feats, boxes, point_coords, point_labels, mask_input, has_mask_input)``
  -> ``(masks (B, 1, L, L) logits, iou_predictions (B, 1))``.

Both backends are imported lazily (inside the loaders), never torch. Every file is
checked against its sha256 in the manifest before it is loaded, and each model is
loaded/compiled once per process (the engine object is reused for every case).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from lapsam.errors import LapsamError
from lapsam.manifest import (
    DECODER_INPUTS,
    DECODER_OUTPUTS,
    ENCODER_INPUT,
    ENCODER_OUTPUTS,
    ModelFile,
    ModelManifest,
    verify_file,
)

log = logging.getLogger(__name__)

Feats = tuple[np.ndarray, np.ndarray, np.ndarray]
BACKEND_ALIASES = {"onnxruntime": "onnx", "ort": "onnx", "onnx": "onnx", "openvino": "openvino", "ov": "openvino"}
PRECISION_HINTS = ("f32", "bf16")
OV_CACHE_ENV = "LAPSAM_OV_CACHE_DIR"


class Engine(Protocol):
    """What the predictor needs from a backend (also implemented by test fakes)."""

    def encode(self, image: np.ndarray) -> Feats: ...

    def decode(
        self,
        feats: Feats,
        boxes: np.ndarray,
        point_coords: np.ndarray,
        point_labels: np.ndarray,
        mask_input: np.ndarray,
        has_mask_input: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass
class EngineOptions:
    """How to load a model: backend, precision, threads and OpenVINO settings."""

    backend: str = "openvino"
    precision: str = "fp32"
    threads: int | None = None
    cache_dir: str | None = None  # OpenVINO CACHE_DIR; default: env LAPSAM_OV_CACHE_DIR
    precision_hint: str | None = None  # OpenVINO INFERENCE_PRECISION_HINT: f32 | bf16 (None: plugin default)
    verify: bool = True

    def __post_init__(self) -> None:
        if self.backend not in BACKEND_ALIASES:
            raise ValueError(f"unknown backend {self.backend!r}; use openvino or onnxruntime")
        self.backend = BACKEND_ALIASES[self.backend]
        if self.precision_hint is not None and self.precision_hint not in PRECISION_HINTS:
            raise ValueError(f"precision hint must be one of {PRECISION_HINTS}, got {self.precision_hint!r}")


@dataclass
class CallStats:
    """Counts and seconds spent in engine calls (for logs and the benchmark)."""

    encoder_calls: int = 0
    decoder_calls: int = 0
    decoder_items: int = 0
    encoder_s: float = 0.0
    decoder_s: float = 0.0

    def reset(self) -> None:
        self.encoder_calls = self.decoder_calls = self.decoder_items = 0
        self.encoder_s = self.decoder_s = 0.0

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


@dataclass
class CountingEngine:
    """Wraps an engine and counts/timings its calls."""

    inner: Engine
    stats: CallStats = field(default_factory=CallStats)

    def encode(self, image: np.ndarray) -> Feats:
        t = time.perf_counter()
        out = self.inner.encode(image)
        self.stats.encoder_s += time.perf_counter() - t
        self.stats.encoder_calls += 1
        return out

    def decode(self, feats, boxes, point_coords, point_labels, mask_input, has_mask_input):  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        out = self.inner.decode(feats, boxes, point_coords, point_labels, mask_input, has_mask_input)
        self.stats.decoder_s += time.perf_counter() - t
        self.stats.decoder_calls += 1
        self.stats.decoder_items += int(boxes.shape[0])
        return out


def _np_dtype_from_ort(t: str) -> np.dtype:
    table = {
        "tensor(float)": np.float32,
        "tensor(float16)": np.float16,
        "tensor(double)": np.float64,
        "tensor(int64)": np.int64,
        "tensor(int32)": np.int32,
        "tensor(bool)": np.bool_,
        "tensor(uint8)": np.uint8,
    }
    return np.dtype(table.get(t, np.float32))


class OnnxRuntimeEngine:
    """ONNX Runtime sessions (one per graph), created once."""

    def __init__(self, encoder_path: Path, decoder_path: Path, threads: int):
        import onnxruntime as ort

        def session(path: Path) -> ort.InferenceSession:
            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
            so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])

        self.enc = session(encoder_path)
        self.dec = session(decoder_path)
        self.enc_input = self.enc.get_inputs()[0].name
        self.enc_dtype = _np_dtype_from_ort(self.enc.get_inputs()[0].type)
        self.dec_dtypes = {i.name: _np_dtype_from_ort(i.type) for i in self.dec.get_inputs()}
        missing = set(DECODER_INPUTS) - set(self.dec_dtypes)
        if missing:
            raise LapsamError(f"{decoder_path.name}: decoder lacks inputs {sorted(missing)}")

    def encode(self, image: np.ndarray) -> Feats:
        out = self.enc.run(list(ENCODER_OUTPUTS), {self.enc_input: image.astype(self.enc_dtype, copy=False)})
        return tuple(np.asarray(o, np.float32) for o in out)  # type: ignore[return-value]

    def decode(self, feats, boxes, point_coords, point_labels, mask_input, has_mask_input):  # type: ignore[no-untyped-def]
        values = dict(zip(DECODER_INPUTS, (*feats, boxes, point_coords, point_labels, mask_input, has_mask_input), strict=False))
        feed = {k: np.ascontiguousarray(v, dtype=self.dec_dtypes[k]) for k, v in values.items()}
        masks, iou = self.dec.run(list(DECODER_OUTPUTS), feed)
        return np.asarray(masks, np.float32), np.asarray(iou, np.float32)


class OpenVinoEngine:
    """OpenVINO compiled models (LATENCY hint), compiled once; optional compiled-model cache."""

    def __init__(
        self,
        encoder_path: Path,
        decoder_path: Path,
        threads: int,
        cache_dir: str | None = None,
        precision_hint: str | None = None,
    ):
        import openvino as ov

        self.core = ov.Core()
        config: dict[str, object] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": int(threads)}
        if precision_hint:
            config["INFERENCE_PRECISION_HINT"] = precision_hint
        self.config = config
        self.cache_dir = cache_dir
        self.enc = self._compile(encoder_path)
        self.dec = self._compile(decoder_path)
        self.enc_req = self.enc.create_infer_request()
        self.dec_req = self.dec.create_infer_request()
        self.enc_input = self.enc.inputs[0].get_any_name()
        self.enc_dtype = np.dtype(self.enc.inputs[0].get_element_type().to_dtype())
        self.dec_dtypes = {}
        for port in self.dec.inputs:
            for name in port.get_names():
                self.dec_dtypes[name] = np.dtype(port.get_element_type().to_dtype())
        missing = set(DECODER_INPUTS) - set(self.dec_dtypes)
        if missing:
            raise LapsamError(f"{decoder_path.name}: decoder lacks inputs {sorted(missing)}")

    def _compile(self, path: Path):  # type: ignore[no-untyped-def]
        """Compile with CACHE_DIR if one is set; a cache that cannot be used falls back to a plain compile."""
        if self.cache_dir:
            try:
                os.makedirs(self.cache_dir, exist_ok=True)
                self.core.set_property({"CACHE_DIR": str(self.cache_dir)})
                return self.core.compile_model(str(path), "CPU", self.config)
            except Exception as exc:  # noqa: BLE001 - any cache problem must not stop inference
                log.warning("OpenVINO cache %s unusable (%s); compiling without it", self.cache_dir, exc)
                try:
                    self.core.set_property({"CACHE_DIR": ""})
                except Exception:  # noqa: BLE001
                    self.core = __import__("openvino").Core()
        return self.core.compile_model(self.core.read_model(str(path)), "CPU", self.config)

    def encode(self, image: np.ndarray) -> Feats:
        self.enc_req.infer({self.enc_input: np.ascontiguousarray(image, dtype=self.enc_dtype)}, share_inputs=True)
        # copies: the request's output buffers are reused by the next call
        return tuple(np.array(self.enc_req.get_tensor(n).data, np.float32) for n in ENCODER_OUTPUTS)  # type: ignore[return-value]

    def decode(self, feats, boxes, point_coords, point_labels, mask_input, has_mask_input):  # type: ignore[no-untyped-def]
        values = dict(zip(DECODER_INPUTS, (*feats, boxes, point_coords, point_labels, mask_input, has_mask_input), strict=False))
        feed = {k: np.ascontiguousarray(v, dtype=self.dec_dtypes[k]) for k, v in values.items()}
        self.dec_req.infer(feed, share_inputs=True)
        return tuple(np.array(self.dec_req.get_tensor(n).data, np.float32) for n in DECODER_OUTPUTS)  # type: ignore[return-value]


def _model_path(model_dir: Path, entry: ModelFile) -> Path:
    return model_dir / entry.path


def select_files(manifest: ModelManifest, backend: str, precision: str) -> tuple[ModelFile, ModelFile]:
    """Encoder and decoder entries for a backend/precision (the decoder falls back to fp32)."""
    try:
        enc = manifest.find("encoder", backend, precision)
    except KeyError as exc:
        raise LapsamError(f"model '{manifest.name}': {exc.args[0]}") from None
    try:
        dec = manifest.find("decoder", backend, precision)
    except KeyError:
        try:
            dec = manifest.find("decoder", backend, "fp32")
        except KeyError as exc:
            raise LapsamError(f"model '{manifest.name}': {exc.args[0]}") from None
    return enc, dec


def load_engine(model_dir: str | Path, manifest: ModelManifest, opts: EngineOptions, threads: int) -> Engine:
    """Verify the selected files' sha256, then create the backend engine."""
    model_dir = Path(model_dir)
    enc, dec = select_files(manifest, opts.backend, opts.precision)
    if opts.verify:
        for entry in (enc, dec):
            verify_file(model_dir, entry)
    if opts.backend == "onnx":
        return OnnxRuntimeEngine(_model_path(model_dir, enc), _model_path(model_dir, dec), threads)
    cache_dir = opts.cache_dir or os.environ.get(OV_CACHE_ENV) or None
    return OpenVinoEngine(_model_path(model_dir, enc), _model_path(model_dir, dec), threads, cache_dir, opts.precision_hint)


__all__ = [
    "ENCODER_INPUT",
    "CallStats",
    "CountingEngine",
    "Engine",
    "EngineOptions",
    "Feats",
    "OnnxRuntimeEngine",
    "OpenVinoEngine",
    "load_engine",
    "select_files",
]
