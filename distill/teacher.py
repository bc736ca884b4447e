"""The SAM2 / SAM2.1 teacher: exactly the three tensors SAM2's mask decoder consumes.

``Teacher(name, checkpoint)`` builds any SAM2 config (``t``, ``s``, ``b+``, ``l``, the full
names in :data:`lapsam.distill.sam2_factory.SAM2_CONFIGS`, or ``medsam2`` = SAM2.1 Hiera-T
at 512) randomly initialised or from a local checkpoint (SAM2's ``{"model": sd}`` layout or
a bare state dict such as MedSAM2's). Its forward returns

* ``image_embed`` (N, 256, T/16, T/16): the top FPN level plus ``no_mem_embed`` (as
  ``SAM2ImagePredictor.set_image`` does);
* ``high_res_feats_0`` (N, 32, T/4, T/4) and ``high_res_feats_1`` (N, 64, T/8, T/8): FPN
  levels 0 and 1 after the mask decoder's ``conv_s0`` / ``conv_s1``.

Preprocessing is SAM2's own: stretch resize to the teacher's ``image_size`` (bilinear,
``align_corners=False``) and ImageNet mean/std, i.e. :func:`lapsam.preprocess.preprocess_image`
with ``Preprocessing(T, "stretch")``.

Grid matching: when the student's input size S differs from the teacher's T, each teacher map
is brought to the student's grid (S/16, S/4, S/8) with :func:`match_grid`: area averaging
(``F.interpolate(mode="area")``, the mean over each block of teacher cells) when the teacher
grid is finer, bilinear interpolation when it is coarser. The student is trained against
these matched maps (and the cache stores them), so a 512 student learns from a 1024 teacher
the block means of its features.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lapsam.manifest import Preprocessing

from .sam2_factory import build_sam2_model, resolve_sam2_name

log = logging.getLogger(__name__)

FEATURE_NAMES: tuple[str, ...] = ("image_embed", "high_res_feats_0", "high_res_feats_1")
FEATURE_CHANNELS: tuple[int, ...] = (256, 32, 64)
FEATURE_STRIDES: tuple[int, ...] = (16, 4, 8)


def feature_shapes(input_size: int) -> list[tuple[int, int, int]]:
    """(C, H, W) of the three decoder inputs for a square input of ``input_size``."""
    return [(c, input_size // s, input_size // s) for c, s in zip(FEATURE_CHANNELS, FEATURE_STRIDES, strict=False)]


def match_grid(feat: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a (N, C, h, w) map to (N, C, size, size): area mean when shrinking, bilinear when growing."""
    h, w = feat.shape[-2:]
    if (h, w) == (size, size):
        return feat
    if h >= size and w >= size:
        return F.interpolate(feat, size=(size, size), mode="area")
    return F.interpolate(feat, size=(size, size), mode="bilinear", align_corners=False)


class Teacher(nn.Module):
    """A frozen SAM2 image encoder returning the mask decoder's three inputs."""

    def __init__(self, name: str = "sam2.1_hiera_t", checkpoint: str | Path | None = None,
                 image_size: int | None = None):
        super().__init__()
        cfg_name, size = resolve_sam2_name(name, image_size)
        sam = build_sam2_model(cfg_name, checkpoint, size)
        self.name = cfg_name
        self.image_size = size
        self.image_encoder = sam.image_encoder
        self.conv_s0 = sam.sam_mask_decoder.conv_s0
        self.conv_s1 = sam.sam_mask_decoder.conv_s1
        self.no_mem_embed = sam.no_mem_embed
        self.directly_add_no_mem_embed = bool(sam.directly_add_no_mem_embed)
        self.num_feature_levels = int(sam.num_feature_levels)
        if not sam.use_high_res_features_in_sam or self.num_feature_levels != 3:
            raise ValueError(f"{cfg_name}: the teacher needs high-res features in the SAM decoder")
        del sam  # memory attention / memory encoder are not needed
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def preprocessing(self, resize: str = "stretch") -> Preprocessing:
        """SAM2's own preprocessing at the teacher's size (``resize`` may follow a longest-side student)."""
        return Preprocessing(input_size=self.image_size, resize=resize)

    def train(self, mode: bool = True) -> Teacher:  # always frozen, always eval
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, out_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, 3, T, T) normalised -> (image_embed, high_res_feats_0, high_res_feats_1).

        ``out_size``: the student's input size S; the maps are matched to its grid
        (S/16, S/4, S/8) with :func:`match_grid`.
        """
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            raise ValueError(f"teacher {self.name} expects {self.image_size}x{self.image_size} inputs, got {tuple(images.shape)}")
        out = self.image_encoder(images)
        fpn = out["backbone_fpn"][-self.num_feature_levels:]
        hr0 = self.conv_s0(fpn[0])
        hr1 = self.conv_s1(fpn[1])
        embed = fpn[2]
        if self.directly_add_no_mem_embed:
            embed = embed + self.no_mem_embed.reshape(1, -1, 1, 1)
        feats = (embed, hr0, hr1)
        if out_size is not None and out_size != self.image_size:
            feats = tuple(match_grid(f, out_size // s) for f, s in zip(feats, FEATURE_STRIDES, strict=False))  # type: ignore[assignment]
        return feats  # type: ignore[return-value]
