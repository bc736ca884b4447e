"""INT8 encoders by NNCF post-training quantisation, calibrated on slices of real cases.

Both backends start from the fp32 ``encoder.onnx``:

* ONNX: NNCF's ONNX backend inserts QuantizeLinear/DequantizeLinear pairs (static QDQ,
  per-channel weights) -> ``encoder_int8.onnx`` for ONNX Runtime;
* OpenVINO: the ONNX file is converted to an OpenVINO model, quantised with NNCF's OpenVINO
  backend (FakeQuantize) and saved as ``openvino/encoder_int8.xml``.

Calibration images come from :func:`lapsam.export.slices.calibration_images` (real case
slices preprocessed exactly as at run time). The decoder is not quantised: it is small, and
its attention over the embedding is the sensitive part of mask quality.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np

from lapsam.manifest import ENCODER_INPUT

log = logging.getLogger(__name__)


def _nncf_quiet():
    import nncf

    try:
        nncf.set_log_level(logging.ERROR)
    except AttributeError:  # older nncf
        pass
    return nncf


def quantize_onnx(fp32_path: Path, out_path: Path, images: list[np.ndarray]) -> None:
    import onnx

    nncf = _nncf_quiet()
    model = onnx.load(str(fp32_path))
    dataset = nncf.Dataset(images, lambda x: {ENCODER_INPUT: x})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = nncf.quantize(model, dataset, subset_size=len(images), preset=nncf.QuantizationPreset.MIXED)
    q.producer_name = "lapsam.export"
    q.producer_version = ""
    onnx.save_model(q, str(out_path), save_as_external_data=False)
    log.info("wrote %s (%d calibration slices)", out_path, len(images))


def quantize_openvino(fp32_onnx_path: Path, xml_path: Path, images: list[np.ndarray]) -> None:
    import openvino as ov

    from .onnx_io import _stable_names, save_openvino

    nncf = _nncf_quiet()
    model = ov.convert_model(str(fp32_onnx_path))
    _stable_names(model)  # NNCF derives its node names from these: make them process-independent
    dataset = nncf.Dataset(images)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = nncf.quantize(model, dataset, subset_size=len(images), preset=nncf.QuantizationPreset.MIXED)
    save_openvino(q, xml_path, fp16=False)
    log.info("wrote %s (%d calibration slices)", xml_path, len(images))
