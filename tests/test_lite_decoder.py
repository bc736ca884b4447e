"""The lite mask decoder (``model.decoder: lite``): image-side work once per image, shared by its prompts.

References are independent of the batching under test: each prompt decoded on its own, and the
image repeated once per prompt (training's paired layout). The exported graphs (the engines
that ship) are compared with PyTorch.
"""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from decoder_export import check_exported_decoder, export_small, random_prompts  # noqa: E402
from lapsam.distill.modeling import LapSamConfig, StudentConfig, build_lapsam  # noqa: E402
from lapsam.distill.modeling.lite_decoder import LiteMaskDecoder  # noqa: E402

S = 64


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_lapsam(LapSamConfig(student=StudentConfig(backbone="efficientvit_b0", input_size=S), box_prior=4.0,
                                  decoder="lite")).eval()
    # random weights of the trained-from-zero kind: make the no-mask bias and tokens non-trivial
    with torch.no_grad():
        m.mask_decoder.no_mask_embed.normal_()
    return m


def _prompts(b: int, p: int, seed: int = 0):
    return random_prompts(b, p, S, seed)


def test_builds_lite_and_rejects_unknown() -> None:
    m = build_lapsam(LapSamConfig(student=StudentConfig(backbone="efficientvit_b0", input_size=S), decoder="lite"))
    assert isinstance(m.mask_decoder, LiteMaskDecoder)
    with pytest.raises(ValueError, match="unknown decoder"):
        build_lapsam(LapSamConfig(student=StudentConfig(backbone="efficientvit_b0", input_size=S), decoder="tiny"))
    # the config round-trips through the checkpoint dict
    cfg = LapSamConfig(decoder="lite")
    assert LapSamConfig.from_dict(cfg.to_dict()).decoder == "lite"
    assert LapSamConfig.from_dict({}).decoder == "sam2"


@pytest.mark.parametrize("p", [0, 2])
def test_batched_prompts_equal_one_prompt_at_a_time_and_the_paired_layout(model, p: int) -> None:
    image = torch.randn(1, 3, S, S, generator=torch.Generator().manual_seed(1))
    boxes, coords, labels = _prompts(6, p)
    with torch.no_grad():
        feats = model.encode(image)
        got, iou = model.decode(*feats, boxes=boxes, point_coords=coords if p else None,
                                point_labels=labels if p else None, repeat_image=True)
        assert got.shape == (6, 1, S // 4, S // 4) and iou.shape == (6, 1)
        for i in range(6):
            one, one_iou = model.decode(*feats, boxes=boxes[i:i + 1], point_coords=coords[i:i + 1] if p else None,
                                        point_labels=labels[i:i + 1] if p else None, repeat_image=True)
            torch.testing.assert_close(got[i:i + 1], one, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(iou[i:i + 1], one_iou, atol=1e-5, rtol=1e-5)
        paired, _ = model.decode(*[f.expand(6, -1, -1, -1) for f in feats], boxes=boxes,
                                 point_coords=coords if p else None, point_labels=labels if p else None)
        torch.testing.assert_close(got, paired, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[0], got[1])  # each row answers its own prompt


def test_image_side_runs_once_per_image_whatever_the_number_of_prompts(model) -> None:
    calls: list[int] = []
    h = model.mask_decoder.up1.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    try:
        with torch.no_grad():
            feats = model.encode(torch.randn(1, 3, S, S))
            model.decode(*feats, boxes=_prompts(9, 0)[0], repeat_image=True)
    finally:
        h.remove()
    assert calls == [1]


def test_gradient_reaches_every_decoder_parameter() -> None:
    torch.manual_seed(0)
    m = build_lapsam(LapSamConfig(student=StudentConfig(backbone="efficientvit_b0", input_size=S), box_prior=4.0,
                                  decoder="lite"))
    boxes, coords, labels = _prompts(2, 1)
    low, iou = m(torch.randn(2, 3, S, S), boxes=boxes, point_coords=coords, point_labels=labels)
    (low.square().mean() + iou.square().mean()).backward()
    missing = [n for n, p in m.mask_decoder.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    assert m.prompt_encoder.point_embeddings[2].weight.grad.abs().sum() > 0  # the box corner embedding


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory) -> Path:
    return export_small(model, tmp_path_factory.mktemp("lite"), "lite")


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_exported_lite_decoder_matches_pytorch(model, exported: Path, backend: str) -> None:
    check_exported_decoder(model, exported, backend, _prompts, S, [(1, 0), (7, 0), (7, 3)], dense_prompt=False)
