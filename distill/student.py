"""Students: a timm backbone (``pretrained=False``, optional local weights) + a light neck.

The classes live in :mod:`lapsam.distill.model` (the shared contract); this module re-exports
them and adds parameter counts. A student outputs SAM2's three decoder inputs at a
configurable input size S (a multiple of 32: 256, 512, 1024): ``image_embed`` (N, 256, S/16,
S/16), ``high_res_feats_0`` (N, 32, S/4, S/4), ``high_res_feats_1`` (N, 64, S/8, S/8).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .model import SUPPORTED_BACKBONES, StudentConfig, StudentEncoder

__all__ = ["SUPPORTED_BACKBONES", "StudentConfig", "StudentEncoder", "build_student", "param_count", "student_table"]


def param_count(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def build_student(backbone: str = "repvit_m0_9", input_size: int = 512, **kw: Any) -> StudentEncoder:
    return StudentEncoder(StudentConfig(backbone=backbone, input_size=input_size, **kw))


def student_table(input_size: int = 512, names: tuple[str, ...] | list[str] | None = None) -> list[dict[str, Any]]:
    """Parameters of each student encoder and of the whole LapSam (with SAM2's prompt encoder + decoder)."""
    from .model import LapSamConfig, build_prompt_heads

    pe, dec = build_prompt_heads(LapSamConfig(student=StudentConfig(input_size=input_size)))
    heads = param_count(pe) + param_count(dec)
    rows = []
    for name in names or SUPPORTED_BACKBONES:
        enc = build_student(name, input_size)
        n = param_count(enc)
        rows.append({"name": name, "encoder_params": n, "backbone_params": param_count(enc.backbone),
                     "total_params": n + heads})
    return rows
