"""Shared by the decoder tests: export a small LapSam and compare its graphs with PyTorch."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch


def random_prompts(b: int, p: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """B boxes (at least 8 px, in the upper-left half of a ``size`` image) and P random clicks each."""
    g = torch.Generator().manual_seed(seed)
    xy0 = torch.rand(b, 2, generator=g) * size / 2
    boxes = torch.cat([xy0, xy0 + 8 + torch.rand(b, 2, generator=g) * size / 3], 1)
    coords = torch.rand(b, p, 2, generator=g) * size
    labels = torch.randint(0, 2, (b, p), generator=g).to(torch.int32)
    return boxes, coords, labels


def export_small(model: torch.nn.Module, tmp: Path, name: str) -> Path:
    """``model`` saved as a checkpoint and exported to ONNX + OpenVINO IR under ``tmp``; the model folder."""
    from lapsam.distill.modeling.checkpoint import save_checkpoint
    from lapsam.export.exporter import export_model

    export_model(save_checkpoint(tmp / f"{name}.pt", model), tmp / "model", backends=("onnx", "openvino"))
    return tmp / "model"


def check_exported_decoder(model: torch.nn.Module, out: Path, backend: str, prompts: Callable, size: int,
                           shapes: list[tuple[int, int]], dense_prompt: bool) -> None:
    """The exported decoder on ``backend`` (through the runtime's engine) equals ``model.decode`` for
    each (boxes B, clicks P) in ``shapes``; with a mask prompt too where ``dense_prompt``, else a mask
    prompt must change nothing."""
    from lapsam.runtime.engines import EngineOptions, load_engine

    from lapsam.manifest import ModelManifest

    m = ModelManifest.load(out)
    low = m.preprocessing.low_res_size
    engine = load_engine(out, m, EngineOptions(backend=backend, precision_hint="f32"), threads=1)
    rng = np.random.default_rng(2)
    image = rng.standard_normal((1, 3, size, size)).astype(np.float32)
    feats = engine.encode(image)
    with torch.no_grad():
        tfeats = model.encode(torch.from_numpy(image))
    for b, p in shapes:
        boxes, coords, labels = (t.numpy().astype(np.float32) for t in prompts(b, p, seed=b + p))
        mask_in = (rng.standard_normal((b, 1, low, low)) * 4).astype(np.float32)
        got = {}
        for has in (0.0, 1.0):
            masks, iou = engine.decode(feats, boxes, coords, labels, mask_in, np.full((b,), has, np.float32))
            got[has] = masks
            if has and not dense_prompt:
                continue
            with torch.no_grad():
                ref, ref_iou = model.decode(*tfeats, boxes=torch.from_numpy(boxes),
                                            point_coords=torch.from_numpy(coords) if p else None,
                                            point_labels=torch.from_numpy(labels).to(torch.int32) if p else None,
                                            mask_input=torch.from_numpy(mask_in) if has else None,
                                            repeat_image=True)
            np.testing.assert_allclose(masks, ref.numpy(), atol=2e-3, err_msg=f"B={b} P={p} mask={has}")
            np.testing.assert_allclose(iou, ref_iou.numpy(), atol=2e-3)
        if not dense_prompt:  # this decoder takes no dense prompt: a mask input changes nothing
            np.testing.assert_allclose(got[1.0], got[0.0], atol=1e-6)
