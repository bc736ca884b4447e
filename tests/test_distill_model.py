"""Student shapes, the SAM2 decoder path, the teacher's outputs against SAM2's own predictor."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from lapsam.distill.modeling import (  # noqa: E402
    LapSam,
    LapSamConfig,
    StudentConfig,
    build_prompt_heads,
    build_student,
    param_count,
)
from lapsam.distill.teacher import Teacher, feature_shapes, match_grid  # noqa: E402

torch.set_num_threads(2)

# One backbone per family: RepViT, EfficientViT (MIT) B and L series.
FAMILIES = ("repvit_m0_9", "efficientvit_b0", "efficientvit_l1")


@pytest.fixture(scope="module")
def heads():
    return {s: build_prompt_heads(LapSamConfig(student=StudentConfig(input_size=s))) for s in (128, 256)}


@pytest.mark.parametrize("size", [128, 256])
@pytest.mark.parametrize("backbone", FAMILIES)
def test_student_shapes_and_box_decode(backbone: str, size: int, heads) -> None:
    torch.manual_seed(0)
    cfg = LapSamConfig(student=StudentConfig(backbone=backbone, input_size=size))
    enc = build_student(backbone, size).eval()
    pe, dec = heads[size]
    model = LapSam(cfg, enc, pe, dec).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        feats = model.encode(x)
        assert [tuple(f.shape[1:]) for f in feats] == feature_shapes(size)
        assert [tuple(f.shape[1:]) for f in feats] == [(256, size // 16, size // 16), (32, size // 4, size // 4),
                                                      (64, size // 8, size // 8)]
        boxes = torch.tensor([[10.0, 20.0, size * 0.6, size * 0.7], [0.0, 0.0, size - 1.0, size - 1.0]])
        masks, iou = model.decode(*feats, boxes=boxes)  # paired: image i with box i
        assert masks.shape == (2, 1, size // 4, size // 4) and iou.shape == (2, 1)
        one = tuple(f[:1] for f in feats)
        m2, _ = model.decode(*one, boxes=boxes, repeat_image=True)
        assert m2.shape == (2, 1, size // 4, size // 4)
        assert torch.isfinite(m2).all()
        # The box changes the answer (the prompt path is connected).
        assert not torch.allclose(m2[0], m2[1])
    assert param_count(enc) > param_count(enc.backbone) > 0


def test_gradient_reaches_every_trained_part(heads) -> None:
    torch.manual_seed(0)
    pe, dec = heads[256]
    model = LapSam(LapSamConfig(student=StudentConfig(input_size=256)), build_student("repvit_m0_9", 256), pe, dec)
    feats = model.encode(torch.randn(1, 3, 256, 256))
    masks, iou = model.decode(*feats, boxes=torch.tensor([[30.0, 40.0, 150.0, 160.0]]))
    (masks.mean() + iou.mean()).backward()
    for part in (model.image_encoder.backbone, model.image_encoder.neck, model.mask_decoder.transformer):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    assert model.prompt_encoder.point_embeddings[2].weight.grad.abs().sum() > 0  # the box corner embedding


def test_teacher_matches_sam2_predictor() -> None:
    """Teacher outputs == SAM2ImagePredictor's features (same weights, same image)."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    from lapsam.preprocess import preprocess_image

    torch.manual_seed(0)
    teacher = Teacher("t", image_size=256)
    # Rebuild the predictor around the very same modules.
    from lapsam.distill.sam2_factory import build_sam2_model

    sam = build_sam2_model("sam2.1_hiera_t", None, 256)
    sam.image_encoder = teacher.image_encoder
    sam.sam_mask_decoder.conv_s0 = teacher.conv_s0
    sam.sam_mask_decoder.conv_s1 = teacher.conv_s1
    sam.no_mem_embed = teacher.no_mem_embed
    pred = SAM2ImagePredictor(sam)
    pred._bb_feat_sizes = [(64, 64), (32, 32), (16, 16)]
    img = (np.random.default_rng(0).random((90, 130, 3)) * 255).astype(np.uint8)
    pred.set_image(img)
    x, _ = preprocess_image(img, teacher.preprocessing())
    feats = teacher(torch.from_numpy(x))
    ref = [pred._features["image_embed"], *pred._features["high_res_feats"]]
    assert [tuple(f.shape[1:]) for f in feats] == feature_shapes(256)
    for a, b in zip(feats, ref, strict=False):
        assert torch.allclose(a, b, atol=1e-4), float((a - b).abs().max())
    # shrinking (SAM2's Resize antialiases): 600 x 900 -> 256, like a large 2D image
    big = (np.random.default_rng(1).random((600, 900, 3)) * 255).astype(np.uint8)
    pred.set_image(big)
    xb, _ = preprocess_image(big, teacher.preprocessing())
    ref_b = [pred._features["image_embed"], *pred._features["high_res_feats"]]
    for a, b in zip(teacher(torch.from_numpy(xb)), ref_b, strict=True):
        assert torch.allclose(a, b, atol=1e-4), float((a - b).abs().max())
    # no_mem_embed is really added
    assert not torch.allclose(feats[0], teacher.image_encoder(torch.from_numpy(x))["backbone_fpn"][-1])
    # matched to a 128 student grid: area mean of 2x2 blocks
    small = teacher(torch.from_numpy(x), out_size=128)
    assert [tuple(f.shape[1:]) for f in small] == feature_shapes(128)
    assert torch.allclose(small[0][0, :, 0, 0], feats[0][0, :, :2, :2].mean(dim=(1, 2)), atol=1e-5)
    with pytest.raises(ValueError, match="expects 256x256"):
        teacher(torch.zeros(1, 3, 128, 128))


def test_match_grid_up_and_down() -> None:
    f = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert torch.equal(match_grid(f, 4), f)
    assert match_grid(f, 2)[0, 0].tolist() == [[2.5, 4.5], [10.5, 12.5]]
    assert match_grid(f, 8).shape == (1, 1, 8, 8)


def test_teacher_loads_sam2_and_medsam2_checkpoint_layouts(tmp_path) -> None:
    """SAM2 ships {"model": sd}; MedSAM2-style files are a bare state dict. Both give the same teacher."""
    from lapsam.distill.sam2_factory import build_sam2_model

    torch.manual_seed(1)
    sd = build_sam2_model("sam2.1_hiera_t", None, 256).state_dict()
    torch.save({"model": sd}, tmp_path / "sam2.pt")
    torch.save(sd, tmp_path / "medsam2.pt")
    x = torch.randn(1, 3, 256, 256)
    a = Teacher("t", tmp_path / "sam2.pt", image_size=256)(x)
    b = Teacher("medsam2", tmp_path / "medsam2.pt", image_size=256)(x)
    c = Teacher("t", None, image_size=256)(x)  # random: differs
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert not torch.allclose(a[0], c[0])
    assert Teacher("medsam2").image_size == 512
