"""Backend and precision names shared by every command (a light module: no numpy, no engines).

* backends: ``openvino`` and ``onnxruntime`` (``onnx``, the manifest's word for ONNX files, is
  accepted as an alias but not advertised);
* file precision (``--precision``): which exported files run, ``fp32`` / ``fp16`` / ``int8``;
* OpenVINO execution precision (``--ov-precision``): ``f32`` / ``bf16``, OpenVINO's
  ``INFERENCE_PRECISION_HINT``, independent of the files' precision.
"""

from __future__ import annotations

import argparse

#: Backend names used by every command and API.
BACKENDS: tuple[str, ...] = ("openvino", "onnxruntime")
#: Other accepted spellings: ``onnx`` is how the manifest names ONNX files.
BACKEND_ALIASES: dict[str, str] = {"onnx": "onnxruntime"}
_FILE_BACKEND = {"openvino": "openvino", "onnxruntime": "onnx"}
#: OpenVINO's execution precision (``INFERENCE_PRECISION_HINT``); not the precision of the files.
OV_PRECISIONS: tuple[str, ...] = ("f32", "bf16")
BACKEND_METAVAR = "{" + ",".join(BACKENDS) + "}"


def backend_name(name: str) -> str:
    """``openvino`` or ``onnxruntime`` for a backend name or alias; ValueError otherwise."""
    b = BACKEND_ALIASES.get(name, name)
    if b not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; use openvino or onnxruntime")
    return b


def file_backend(name: str) -> str:
    """The manifest's backend word (``openvino`` / ``onnx``) for a backend name or alias."""
    return _FILE_BACKEND[backend_name(name)]


def backend_arg(text: str) -> str:
    """argparse ``type=`` for a backend: its canonical name (aliases work, help shows only BACKENDS)."""
    try:
        return backend_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive_int(text: str) -> int:
    """argparse ``type=`` for a count that must be >= 1."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n
