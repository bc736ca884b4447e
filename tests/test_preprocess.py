"""lapsam.preprocess against PyTorch / torchvision / SAM2 themselves (the references are never lapsam code).

* ``resize_2d`` == torchvision ``resize(antialias=True)`` == ``F.interpolate(antialias=True)``
  (what SAM2's ``Resize`` does), shrinking and enlarging, odd shapes, mixed directions,
  uint8 and float input, and the 3024x4032 -> 512 shrink of the challenge's dermoscopy case
  (on a 378x504 image with the same ratios);
* ``preprocess_image`` == SAM2's own ``SAM2Transforms`` (``stretch``), and == a torch
  resize + normalise + zero-pad of the unpadded size MedSAM's ``ResizeLongestSide`` gives
  (``longest_side``);
* ``upsample_logits`` == ``F.interpolate`` (bilinear, no antialias) to S, crop of the
  padding, ``F.interpolate`` to the original size; windows equal the whole-image result;
* ``transform_boxes`` == SAM2's ``transform_boxes`` (stretch) and MedSAM's box scaling.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")
import torch.nn.functional as F  # noqa: E402
import torchvision.transforms.functional as TF  # noqa: E402
from torchvision.transforms import InterpolationMode  # noqa: E402

from lapsam.manifest import Preprocessing  # noqa: E402
from lapsam.preprocess import (  # noqa: E402
    get_transform,
    postprocess_masks,
    preprocess_image,
    resize_2d,
    transform_boxes,
    upsample_logits,
)

torch.set_num_threads(1)

# (in H, W) -> (out H, W): shrink, enlarge, mixed, odd and prime sizes, 1-pixel edges,
# non-integer and large factors, identity.
RESIZE_CASES = [
    ((378, 504), (64, 64)),  # 3024x4032 -> 512x512 (stretch) scaled by 1/8: factors 5.9 and 7.9
    ((378, 504), (48, 64)),  # ... and its longest-side layout (3024x4032 -> 384x512)
    ((90, 130), (256, 256)),  # enlarge (what the old teacher-parity test covered)
    ((37, 53), (16, 100)),  # one axis shrinks, the other enlarges
    ((500, 7), (33, 3)),
    ((101, 103), (97, 89)),  # slight shrink, primes
    ((64, 64), (64, 64)),  # identity
    ((3, 5), (11, 2)),
    ((1, 9), (4, 3)),  # a 1-pixel axis
    ((255, 255), (256, 256)),  # slight enlarge
    ((1000, 60), (7, 60)),  # a factor above 100 on one axis
]


def _tv_resize(x_hwc: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """torchvision's tensor resize as SAM2 uses it (float tensor, bilinear, antialias=True)."""
    t = torch.from_numpy(np.ascontiguousarray(x_hwc)).permute(2, 0, 1).to(torch.float64)
    y = TF.resize(t, list(out_hw), interpolation=InterpolationMode.BILINEAR, antialias=True)
    return y.permute(1, 2, 0).numpy()


def _interp(x: np.ndarray, out_hw: tuple[int, int], antialias: bool) -> np.ndarray:
    """F.interpolate(bilinear, align_corners=False) over the last two axes, in float64."""
    t = torch.from_numpy(np.asarray(x, np.float64))
    lead = t.shape[:-2]
    y = F.interpolate(t.reshape(1, -1, *t.shape[-2:]), size=tuple(out_hw), mode="bilinear",
                      align_corners=False, antialias=antialias)
    return y.reshape(*lead, *out_hw).numpy()


@pytest.mark.parametrize(("in_hw", "out_hw"), RESIZE_CASES)
def test_resize_2d_matches_torchvision_antialiased(in_hw, out_hw) -> None:
    rng = np.random.default_rng(sum(in_hw) + sum(out_hw))
    img = rng.integers(0, 256, (*in_hw, 3), dtype=np.uint8)
    ours = resize_2d(img, out_hw)
    assert ours.shape == (*out_hw, 3) and ours.dtype == np.float32
    ref = _tv_resize(img.astype(np.float64), out_hw)
    # float32 arithmetic on 0..255 values: equal to float rounding
    np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-3)
    # the same through F.interpolate(antialias=True), one grey channel (H, W)
    grey = rng.standard_normal(in_hw).astype(np.float32) * 50
    np.testing.assert_allclose(resize_2d(grey, out_hw), _interp(grey, out_hw, antialias=True), rtol=0, atol=1e-3)


def test_resize_2d_uint8_equals_torchvision_uint8_path_after_rounding() -> None:
    """torchvision resizes uint8 tensors with its own integer kernel; rounding ours must agree (within 1)."""
    rng = np.random.default_rng(7)
    for in_hw, out_hw in RESIZE_CASES[:5]:
        img = rng.integers(0, 256, (*in_hw, 3), dtype=np.uint8)
        t = torch.from_numpy(img).permute(2, 0, 1)
        ref = TF.resize(t, list(out_hw), interpolation=InterpolationMode.BILINEAR, antialias=True)
        ref = ref.permute(1, 2, 0).numpy().astype(np.int32)
        ours = np.clip(np.rint(resize_2d(img, out_hw)), 0, 255).astype(np.int32)
        assert np.abs(ours - ref).max() <= 1
        assert np.mean(ours == ref) > 0.99


def test_resize_2d_shrink_is_antialiased_not_two_tap() -> None:
    """Pixel-wide stripes shrunk 256 -> 37 come out nearly flat grey; a two-tap resize aliases them."""
    img = np.zeros((256, 256), np.float32)
    img[:, ::2] = 255.0
    out = resize_2d(img, (37, 37))[:, 1:-1]  # the edge columns see a cut filter
    assert np.abs(out - 127.5).max() < 3
    aliased = _interp(img, (37, 37), antialias=False)[:, 1:-1]
    assert np.abs(aliased - 127.5).max() > 100  # what the non-antialiased rule gives


def test_resize_2d_float_input_and_extra_channels() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((45, 70, 5)).astype(np.float32)
    ours = resize_2d(x, (20, 90))
    np.testing.assert_allclose(ours, _tv_resize(x.astype(np.float64), (20, 90)), rtol=0, atol=1e-4)
    x64 = x.astype(np.float64)
    assert resize_2d(x64, (20, 90)).dtype == np.float32


# ---- the encoder input ------------------------------------------------------------------------
@pytest.mark.parametrize("hw", [(378, 504), (90, 130), (300, 41)])
def test_preprocess_image_stretch_equals_sam2_transforms(hw) -> None:
    from sam2.utils.transforms import SAM2Transforms

    size = 64 if hw[0] > 200 else 256
    img = np.random.default_rng(hw[0]).integers(0, 256, (*hw, 3), dtype=np.uint8)
    ours, tf = preprocess_image(img, Preprocessing(input_size=size, resize="stretch"))
    ref = SAM2Transforms(resolution=size, mask_threshold=0.0)(img)[None].numpy()
    assert ours.shape == ref.shape == (1, 3, size, size)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)
    assert (tf.new_h, tf.new_w) == (size, size)


def _medsam_shape(h: int, w: int, s: int) -> tuple[int, int]:
    """segment_anything's ResizeLongestSide.get_preprocess_shape (MedSAM / LiteMedSAM)."""
    scale = s * 1.0 / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


@pytest.mark.parametrize("hw", [(378, 504), (504, 378), (90, 130), (300, 41), (64, 64), (3, 200)])
def test_preprocess_image_longest_side_equals_torch(hw) -> None:
    s = 128
    pp = Preprocessing(input_size=s, resize="longest_side")
    img = np.random.default_rng(hw[1]).integers(0, 256, (*hw, 3), dtype=np.uint8)
    ours, tf = preprocess_image(img, pp)
    nh, nw = _medsam_shape(*hw, s)
    assert (tf.new_h, tf.new_w, tf.orig_h, tf.orig_w) == (nh, nw, *hw)
    t = torch.from_numpy(img).permute(2, 0, 1).to(torch.float64)[None]
    r = F.interpolate(t, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(pp.pixel_mean, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(pp.pixel_std, dtype=torch.float64).view(1, 3, 1, 1)
    ref = F.pad((r - mean) / std, (0, s - nw, 0, s - nh)).numpy()
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)
    assert not ours[..., nh:, :].any() and not ours[..., :, nw:].any()  # the padding is exactly 0


def test_preprocess_grey_slice_equals_rgb_replicated() -> None:
    pp = Preprocessing(input_size=64, resize="longest_side")
    grey = np.random.default_rng(1).integers(0, 256, (50, 90), dtype=np.uint8)
    a, _ = preprocess_image(grey, pp)
    b, _ = preprocess_image(np.repeat(grey[:, :, None], 3, axis=2), pp)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


# ---- the masks --------------------------------------------------------------------------------
def _torch_postprocess(low: np.ndarray, s: int, new_hw: tuple[int, int], orig_hw: tuple[int, int]) -> np.ndarray:
    """Low-res logits -> S x S, crop the unpadded (new_h, new_w) part, -> original size (no antialias)."""
    up = _interp(low, (s, s), antialias=False)[..., : new_hw[0], : new_hw[1]]
    return _interp(up, orig_hw, antialias=False)


@pytest.mark.parametrize("resize", ["stretch", "longest_side"])
@pytest.mark.parametrize("orig_hw", [(378, 504), (504, 378), (90, 130), (1000, 37), (64, 64), (33, 250)])
def test_upsample_logits_matches_torch_interpolate_with_padding_crop(resize: str, orig_hw) -> None:
    s = 128
    pp = Preprocessing(input_size=s, resize=resize)
    tf = get_transform(orig_hw, pp)
    low_size = pp.low_res_size
    rng = np.random.default_rng(orig_hw[0] * 7 + orig_hw[1])
    logits = (rng.standard_normal((3, low_size, low_size)) * 5).astype(np.float32)
    ours = upsample_logits(logits, tf)
    ref = _torch_postprocess(logits, s, (tf.new_h, tf.new_w), orig_hw)
    assert ours.shape == ref.shape == (3, *orig_hw)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(postprocess_masks(logits, tf), ours > pp.mask_threshold)
    # a window of the image: the same values as the whole image, cut
    h, w = orig_hw
    rows, cols = slice(h // 5, h // 5 + max(1, h // 3)), slice(w // 7, w - w // 9)
    np.testing.assert_allclose(upsample_logits(logits, tf, rows, cols), ref[:, rows, cols], rtol=0, atol=1e-4)
    assert upsample_logits(logits, tf, slice(3, 3), cols).shape == (3, 0, len(range(w)[cols]))


def test_longest_side_padding_does_not_leak_into_masks() -> None:
    """Logits that are positive only over the padding must give an empty mask after the crop."""
    s = 128
    pp = Preprocessing(input_size=s, resize="longest_side")
    tf = get_transform((40, 120), pp)  # unpadded 43 x 128: rows 43.. are padding
    low = np.full((1, pp.low_res_size, pp.low_res_size), -20.0, np.float32)
    low[0, 16:, :] = 20.0  # low-res rows 16.. lie at input rows >= 64: all padding
    assert not postprocess_masks(low, tf).any()


# ---- prompts ----------------------------------------------------------------------------------
@pytest.mark.parametrize("orig_hw", [(378, 504), (90, 130), (512, 512)])
def test_transform_boxes_stretch_equals_sam2(orig_hw) -> None:
    from sam2.utils.transforms import SAM2Transforms

    s = 256
    boxes = np.array([[0, 0, orig_hw[1] - 1, orig_hw[0] - 1], [10, 20, 30, 45], [5.5, 7.25, 6.5, 8.0]], np.float32)
    ours = transform_boxes(boxes, get_transform(orig_hw, Preprocessing(input_size=s, resize="stretch")))
    ref = SAM2Transforms(resolution=s, mask_threshold=0.0).transform_boxes(
        torch.from_numpy(boxes), normalize=True, orig_hw=orig_hw).reshape(-1, 4).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("orig_hw", [(378, 504), (130, 90), (3, 200)])
def test_transform_boxes_longest_side_equals_medsam_scaling(orig_hw) -> None:
    s = 256
    h, w = orig_hw
    nh, nw = _medsam_shape(h, w, s)
    boxes = np.array([[0, 0, w - 1, h - 1], [1, 2, 2, 2]], np.int64)
    ours = transform_boxes(boxes, get_transform(orig_hw, Preprocessing(input_size=s, resize="longest_side")))
    ref = boxes.astype(np.float64) * np.array([nw / w, nh / h, nw / w, nh / h])  # ResizeLongestSide.apply_boxes
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-4)
    assert ours.dtype == np.float32 and ours.shape == (2, 4)
