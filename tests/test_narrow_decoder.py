"""SAM2's mask decoder at a narrower width (``model.decoder_dim`` < 256: ``NarrowMaskDecoder``).

References are independent of the batching under test: each prompt decoded on its own and the
paired layout of training (the image repeated once per prompt); the exported graphs (the engines
that ship) are compared with PyTorch, with and without a dense mask prompt.
"""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from decoder_export import check_exported_decoder, export_small, random_prompts  # noqa: E402
from lapsam.distill.modeling import LapSamConfig, NarrowMaskDecoder, StudentConfig, build_lapsam  # noqa: E402

S = 64


def _config(**kw) -> LapSamConfig:  # type: ignore[no-untyped-def]
    return LapSamConfig(student=StudentConfig(backbone="efficientvit_b0", input_size=S), box_prior=4.0, **kw)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_lapsam(_config(decoder_dim=64)).eval()


def _prompts(b: int, p: int, seed: int = 0):
    return random_prompts(b, p, S, seed)


def _params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_builds_narrow_only_where_it_can() -> None:
    wide, narrow = build_lapsam(_config()), build_lapsam(_config(decoder_dim=128))
    assert not isinstance(wide.mask_decoder, NarrowMaskDecoder)
    assert isinstance(narrow.mask_decoder, NarrowMaskDecoder) and narrow.mask_decoder.decoder.transformer_dim == 128
    assert narrow.prompt_encoder.embed_dim == 128
    # about a quarter of SAM2's decoder at 256 (4.2M parameters)
    assert _params(narrow.mask_decoder) < 0.3 * _params(wide.mask_decoder)
    with pytest.raises(ValueError, match="sam2 decoder"):
        build_lapsam(_config(decoder="lite", decoder_dim=128))
    with pytest.raises(ValueError, match="teacher's decoder weights"):
        build_lapsam(_config(decoder_dim=128, teacher_checkpoint="sam2.pt"))
    with pytest.raises(ValueError, match="multiple of 8"):
        build_lapsam(_config(decoder_dim=100))
    # the config round-trips through the checkpoint dict; old checkpoints read as 256
    assert LapSamConfig.from_dict(_config(decoder_dim=128).to_dict()).decoder_dim == 128
    assert LapSamConfig.from_dict({}).decoder_dim == 256


@pytest.mark.parametrize("p", [0, 2])
def test_batched_prompts_equal_one_prompt_at_a_time_and_the_paired_layout(model, p: int) -> None:
    image = torch.randn(1, 3, S, S, generator=torch.Generator().manual_seed(1))
    boxes, coords, labels = _prompts(5, p)
    pts = {"point_coords": coords, "point_labels": labels} if p else {}
    with torch.no_grad():
        feats = model.encode(image)
        got, iou = model.decode(*feats, boxes=boxes, repeat_image=True, **pts)
        assert got.shape == (5, 1, S // 4, S // 4) and iou.shape == (5, 1)
        for i in range(5):
            one, one_iou = model.decode(*feats, boxes=boxes[i:i + 1], repeat_image=True,
                                        **{k: v[i:i + 1] for k, v in pts.items()})
            torch.testing.assert_close(got[i:i + 1], one, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(iou[i:i + 1], one_iou, atol=1e-5, rtol=1e-5)
        paired, _ = model.decode(*[f.expand(5, -1, -1, -1) for f in feats], boxes=boxes, **pts)
        torch.testing.assert_close(got, paired, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[0], got[1])  # each row answers its own prompt


def test_gradient_reaches_the_projections_and_the_decoder() -> None:
    torch.manual_seed(0)
    m = build_lapsam(_config(decoder_dim=64))
    m.train()
    boxes, coords, labels = _prompts(2, 1)
    low, iou = m(torch.randn(2, 3, S, S), boxes=boxes, point_coords=coords, point_labels=labels)
    (low.square().mean() + iou.square().mean()).backward()
    for mod in (m.mask_decoder.proj, m.mask_decoder.proj_s0, m.mask_decoder.proj_s1,
                m.mask_decoder.decoder.transformer, m.mask_decoder.decoder.output_upscaling):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mod.parameters()), mod


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory) -> Path:
    return export_small(model, tmp_path_factory.mktemp("narrow"), "narrow")


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_exported_narrow_decoder_matches_pytorch(model, exported: Path, backend: str) -> None:
    check_exported_decoder(model, exported, backend, _prompts, S, [(1, 0), (2, 0), (6, 0), (6, 3)], dense_prompt=True)
