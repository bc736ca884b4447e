"""The prompt side of ``LapSam``: SAM2's prompt encoder and mask decoder, and the learned box prior."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..sam2_factory import build_sam2_model, resolve_sam2_name
from .lite_decoder import LiteMaskDecoder
from .student import EMBED_DIM, HIGH_RES_DIMS

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


class NarrowMaskDecoder(nn.Module):
    """SAM2's mask decoder at a narrower width ``dim`` (< the encoder's 256 channels).

    The same architecture as the teacher's (``MaskDecoder`` + ``TwoWayTransformer``: depth 2, 8
    heads, MLP 8 x ``dim``, IoU and object-score heads), built from SAM2's own classes with random
    weights, behind three 1x1 projections of the encoder's outputs: the image embedding 256 ->
    ``dim``, the high-res features 32 -> ``dim``/8 and 64 -> ``dim``/4 (SAM2's ``conv_s0`` /
    ``conv_s1`` places). At 128, the per-prompt transformer and upscaling take about a quarter of
    the multiply-adds of SAM2's at 256; the projections run once per image. Called like SAM2's decoder.
    """

    def __init__(self, dim: int, in_dim: int = EMBED_DIM, high_res_dims: tuple[int, int] = HIGH_RES_DIMS):
        super().__init__()
        from sam2.modeling.sam.mask_decoder import MaskDecoder
        from sam2.modeling.sam.transformer import TwoWayTransformer

        if dim % 8 or dim <= 0:
            raise ValueError(f"decoder_dim must be a positive multiple of 8, got {dim}")
        self.proj = nn.Conv2d(in_dim, dim, 1)
        self.proj_s0 = nn.Conv2d(high_res_dims[0], dim // 8, 1)
        self.proj_s1 = nn.Conv2d(high_res_dims[1], dim // 4, 1)
        self.decoder = MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=8 * dim, num_heads=8),
            transformer_dim=dim, iou_head_depth=3, iou_head_hidden_dim=dim, use_high_res_features=True,
            iou_prediction_use_sigmoid=True, pred_obj_scores=True, pred_obj_scores_mlp=True,
            use_multimask_token_for_obj_ptr=True,
        )

    def forward(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, sparse_prompt_embeddings: torch.Tensor,
                dense_prompt_embeddings: torch.Tensor, multimask_output: bool, repeat_image: bool,
                high_res_features: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        s0, s1 = self.proj_s0(high_res_features[0]), self.proj_s1(high_res_features[1])
        b = sparse_prompt_embeddings.shape[0]
        if repeat_image:
            # one image for B prompts: the high-res features are repeated to B here (SAM2 adds them
            # by broadcasting, which OpenVINO's CPU plugin rejects once fused into the upscaling)
            s0, s1 = s0.repeat(b, 1, 1, 1), s1.repeat(b, 1, 1, 1)
        return self.decoder(image_embeddings=self.proj(image_embeddings), image_pe=image_pe,
                            sparse_prompt_embeddings=sparse_prompt_embeddings,
                            dense_prompt_embeddings=dense_prompt_embeddings, multimask_output=multimask_output,
                            repeat_image=repeat_image, high_res_features=[s0, s1])


def build_prompt_heads(config: LapSamConfig) -> tuple[nn.Module, nn.Module]:
    """SAM2's prompt encoder (resized to the student's grid) and the mask decoder.

    ``config.decoder == "sam2"``: SAM2's mask decoder from the teacher config (with the teacher's
    weights when it has a checkpoint), or at ``config.decoder_dim`` < 256 a :class:`NarrowMaskDecoder`
    (random weights; its prompt encoder is that wide too); ``"lite"``: a :class:`LiteMaskDecoder`.
    """
    from sam2.modeling.sam.prompt_encoder import PromptEncoder

    s = config.student.input_size
    pe = PromptEncoder(
        embed_dim=config.decoder_dim,
        image_embedding_size=(s // 16, s // 16),
        input_image_size=(s, s),
        mask_in_chans=16,
    )
    if config.decoder_dim != EMBED_DIM:
        if config.decoder != "sam2":
            raise ValueError(f"decoder_dim {config.decoder_dim} is for the sam2 decoder, not {config.decoder!r}")
        if config.teacher_checkpoint:
            raise ValueError(f"decoder_dim {config.decoder_dim}: a teacher's decoder weights are {EMBED_DIM} wide; "
                             "use decoder_dim 256 with a teacher checkpoint")
        return pe, NarrowMaskDecoder(config.decoder_dim)
    teacher_cfg, teacher_size = resolve_sam2_name(config.teacher)
    sam = build_sam2_model(teacher_cfg, config.teacher_checkpoint, teacher_size)
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
