"""The prompt side of ``LapSam``: SAM2's prompt encoder and mask decoder, and the learned box prior."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..sam2_factory import build_sam2_model, resolve_sam2_name
from .lite_decoder import LiteMaskDecoder
from .student import EMBED_DIM

if TYPE_CHECKING:
    from .lapsam import LapSamConfig


class BoxPrior(nn.Module):
    """Adds ``s * (+1 inside the box, -1 outside)`` to low-res logits, with a learned scale ``s``.

    The box is read from the SAM2-style point prompt: the first two points, when labelled 2
    and 3, are its corners in model-input pixels (inclusive pixel indices, so the box covers
    ``[x0, x1 + 1) x [y0, y1 + 1)``). A low-res cell is inside when its centre is. Prompts
    whose first label is not 2 (clicks only) get no prior. Written with comparisons and
    arithmetic only, so the same code exports to ONNX (see ``lapsam.export.graphs``).
    """

    def __init__(self, init_scale: float, input_size: int):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(init_scale)))
        self.input_size = int(input_size)

    def forward(self, low_res: torch.Tensor, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        lh, lw = low_res.shape[-2:]
        step_y, step_x = self.input_size / lh, self.input_size / lw
        cy = (torch.arange(lh, dtype=torch.float32, device=low_res.device) + 0.5) * step_y
        cx = (torch.arange(lw, dtype=torch.float32, device=low_res.device) + 0.5) * step_x
        c = coords[:, :2].to(torch.float32)
        x0, y0 = c[:, 0, 0].reshape(-1, 1, 1), c[:, 0, 1].reshape(-1, 1, 1)
        x1, y1 = c[:, 1, 0].reshape(-1, 1, 1) + 1.0, c[:, 1, 1].reshape(-1, 1, 1) + 1.0
        inside_y = ((cy.reshape(1, -1, 1) >= y0) & (cy.reshape(1, -1, 1) < y1)).to(torch.float32)
        inside_x = ((cx.reshape(1, 1, -1) >= x0) & (cx.reshape(1, 1, -1) < x1)).to(torch.float32)
        sign = 2.0 * inside_y * inside_x - 1.0  # (B, lh, lw)
        active = (labels[:, 0] == 2).to(torch.float32).reshape(-1, 1, 1)
        return low_res + (self.scale * active * sign).unsqueeze(1).to(low_res.dtype)


def concat_prompts(
    boxes: torch.Tensor | None, point_coords: torch.Tensor | None, point_labels: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes become two points labelled 2 and 3 placed before the clicks (SAM2's convention)."""
    parts_c, parts_l = [], []
    if boxes is not None:
        b = boxes.reshape(-1, 2, 2).to(torch.float32)
        parts_c.append(b)
        parts_l.append(torch.tensor([2, 3], dtype=torch.int32, device=b.device).expand(b.shape[0], 2))
    if point_coords is not None:
        if point_labels is None:
            raise ValueError("point_coords needs point_labels")
        parts_c.append(point_coords.to(torch.float32))
        parts_l.append(point_labels.to(torch.int32))
    if not parts_c:
        raise ValueError("a prompt needs a box or points")
    return torch.cat(parts_c, dim=1), torch.cat(parts_l, dim=1)


def build_prompt_heads(config: LapSamConfig) -> tuple[nn.Module, nn.Module]:
    """SAM2's prompt encoder (resized to the student's grid) and the mask decoder.

    ``config.decoder == "sam2"``: SAM2's mask decoder from the teacher config (with the teacher's
    weights when it has a checkpoint); ``"lite"``: a :class:`LiteMaskDecoder` (random weights).
    """
    from sam2.modeling.sam.prompt_encoder import PromptEncoder

    teacher_cfg, teacher_size = resolve_sam2_name(config.teacher)
    sam = build_sam2_model(teacher_cfg, config.teacher_checkpoint, teacher_size)
    s = config.student.input_size
    pe = PromptEncoder(
        embed_dim=EMBED_DIM,
        image_embedding_size=(s // 16, s // 16),
        input_image_size=(s, s),
        mask_in_chans=16,
    )
    # Same parameter shapes whatever the grid: the teacher's weights carry over.
    pe.load_state_dict(sam.sam_prompt_encoder.state_dict())
    if config.decoder == "lite":
        return pe, LiteMaskDecoder(dim=EMBED_DIM)
    if config.decoder != "sam2":
        raise ValueError(f"unknown decoder {config.decoder!r} (sam2 or lite)")
    decoder = copy.deepcopy(sam.sam_mask_decoder)
    # The student outputs already-projected high-res features: conv_s0/conv_s1 are unused.
    decoder.conv_s0 = nn.Identity()
    decoder.conv_s1 = nn.Identity()
    return pe, decoder
