"""The student image encoder: a timm backbone (``pretrained=False``, optional local weights) + a light neck.

A student outputs exactly what SAM2's mask decoder consumes (see ``lapsam.manifest``) at a
configurable input size S (a multiple of 32: 256, 512, 1024): ``image_embed`` (N, 256, S/16,
S/16), ``high_res_feats_0`` (N, 32, S/4, S/4) and ``high_res_feats_1`` (N, 64, S/8, S/8).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..sam2_factory import load_state_dict

log = logging.getLogger(__name__)

SUPPORTED_BACKBONES: tuple[str, ...] = (
    "repvit_m0_9", "repvit_m1_0", "repvit_m1_1", "repvit_m1_5", "repvit_m2_3",
    "efficientvit_b0", "efficientvit_b1", "efficientvit_b2", "efficientvit_b3",
    "efficientvit_l1", "efficientvit_l2", "efficientvit_l3",
)
EMBED_DIM = 256
HIGH_RES_DIMS = (32, 64)


@dataclass
class StudentConfig:
    backbone: str = "repvit_m0_9"
    input_size: int = 512
    resize: str = "stretch"
    neck_channels: int = EMBED_DIM
    backbone_weights: str | None = None  # local timm checkpoint; never downloaded


class ConvNormAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 1, act: bool = True):
        super().__init__(
            nn.Conv2d(cin, cout, k, padding=k // 2, bias=False),
            nn.BatchNorm2d(cout),
            nn.GELU() if act else nn.Identity(),
        )


class StudentNeck(nn.Module):
    """Light top-down FPN: strides 4/8/16/32 -> SAM2's three decoder inputs."""

    def __init__(self, in_channels: list[int], dim: int = EMBED_DIM):
        super().__init__()
        c4, c8, c16, c32 = in_channels
        self.lat16 = ConvNormAct(c16, dim)
        self.lat32 = ConvNormAct(c32, dim)
        self.fuse16 = nn.Sequential(ConvNormAct(dim, dim, 3), nn.Conv2d(dim, EMBED_DIM, 1))
        self.lat8 = ConvNormAct(c8, HIGH_RES_DIMS[1])
        self.top8 = nn.Conv2d(dim, HIGH_RES_DIMS[1], 1)
        self.out8 = nn.Sequential(ConvNormAct(HIGH_RES_DIMS[1], HIGH_RES_DIMS[1], 3), nn.Conv2d(HIGH_RES_DIMS[1], HIGH_RES_DIMS[1], 1))
        self.lat4 = ConvNormAct(c4, HIGH_RES_DIMS[0])
        self.top4 = nn.Conv2d(HIGH_RES_DIMS[1], HIGH_RES_DIMS[0], 1)
        self.out4 = nn.Sequential(ConvNormAct(HIGH_RES_DIMS[0], HIGH_RES_DIMS[0], 3), nn.Conv2d(HIGH_RES_DIMS[0], HIGH_RES_DIMS[0], 1))

    def forward(self, feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        f4, f8, f16, f32 = feats
        p16 = self.lat16(f16) + F.interpolate(self.lat32(f32), size=f16.shape[-2:], mode="nearest")
        image_embed = self.fuse16(p16)
        p8 = self.lat8(f8) + F.interpolate(self.top8(p16), size=f8.shape[-2:], mode="nearest")
        hr1 = self.out8(p8)
        p4 = self.lat4(f4) + F.interpolate(self.top4(p8), size=f4.shape[-2:], mode="nearest")
        hr0 = self.out4(p4)
        return image_embed, hr0, hr1


class StudentEncoder(nn.Module):
    """timm backbone (``features_only``, strides 4..32) + :class:`StudentNeck`."""

    def __init__(self, cfg: StudentConfig):
        super().__init__()
        import timm

        if cfg.backbone not in SUPPORTED_BACKBONES:
            raise ValueError(f"unsupported backbone {cfg.backbone!r}; choose from {SUPPORTED_BACKBONES}")
        if cfg.input_size % 32:
            raise ValueError(f"student input_size must be a multiple of 32, got {cfg.input_size}")
        self.backbone = timm.create_model(cfg.backbone, pretrained=False, features_only=True, out_indices=(0, 1, 2, 3))
        if cfg.backbone_weights:
            sd = load_state_dict(cfg.backbone_weights)
            missing, unexpected = self.backbone.load_state_dict(sd, strict=False)
            log.info("backbone weights %s: %d missing, %d unexpected keys", cfg.backbone_weights, len(missing), len(unexpected))
            if len(missing) == len(self.backbone.state_dict()):
                raise ValueError(f"{cfg.backbone_weights}: no key matches backbone {cfg.backbone}")
        reductions = self.backbone.feature_info.reduction()
        if list(reductions) != [4, 8, 16, 32]:
            raise ValueError(f"{cfg.backbone}: feature strides {reductions}, need [4, 8, 16, 32]")
        self.neck = StudentNeck(self.backbone.feature_info.channels(), cfg.neck_channels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, 3, S, S) normalised -> (image_embed, high_res_feats_0, high_res_feats_1)."""
        return self.neck(self.backbone(x))


def build_student(backbone: str = "repvit_m0_9", input_size: int = 512, **kw: Any) -> StudentEncoder:
    return StudentEncoder(StudentConfig(backbone=backbone, input_size=input_size, **kw))


def param_count(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``module`` (only those with ``requires_grad`` if ``trainable_only``)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
