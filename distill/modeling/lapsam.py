"""The ``LapSam`` model: a student image encoder + SAM2's prompt encoder and mask decoder.

The student outputs exactly what SAM2's mask decoder consumes (see ``lapsam.manifest``):
``image_embed`` (N, 256, S/16, S/16), ``high_res_feats_0`` (N, 32, S/4, S/4) and
``high_res_feats_1`` (N, 64, S/8, S/8). Build with :func:`build_lapsam`; save/load with
:func:`~lapsam.distill.modeling.checkpoint.save_checkpoint` /
:func:`~lapsam.distill.modeling.checkpoint.load_lapsam`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from lapsam.manifest import Preprocessing

from .lite_decoder import LiteMaskDecoder
from .prompt import BoxPrior, build_prompt_heads, concat_prompts
from .student import SUPPORTED_BACKBONES, StudentConfig, StudentEncoder, build_student, param_count


@dataclass
class LapSamConfig:
    student: StudentConfig = field(default_factory=StudentConfig)
    # SAM2 config the prompt encoder / mask decoder architecture (and, with a checkpoint,
    # their weights) come from.
    teacher: str = "sam2.1_hiera_t"
    teacher_checkpoint: str | None = None
    # Box prior: the decoder predicts a correction to "inside the box" rather than a mask from
    # nothing. ``box_prior`` is the initial value of a learned scale s; the low-res logits get
    # +s inside the prompt's box and -s outside (nothing for prompts without a box). 0: off,
    # SAM2's decoder as it is (what a distilled SAM2/MedSAM2 decoder expects).
    box_prior: float = 0.0
    # Runtime crop around the boxes (Preprocessing.crop_context, crop_mode, crop_min_px,
    # crop_shared_frac); crop_context 0: whole image.
    crop_context: float = 0.0
    crop_mode: str = "union"
    crop_min_px: int = 64
    crop_shared_frac: float = 0.5
    # Mask decoder: "sam2" (SAM2's, per-prompt two-way transformer; loads a teacher's weights)
    # or "lite" (LiteMaskDecoder: image-side work once per image, shared by all its prompts).
    decoder: str = "sam2"
    # Width of SAM2's decoder (and of the prompt encoder): 256 is SAM2's (teacher weights load);
    # below, NarrowMaskDecoder (random weights; cheaper per prompt).
    decoder_dim: int = 256

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing(input_size=self.student.input_size, resize=self.student.resize,
                             crop_context=self.crop_context, crop_mode=self.crop_mode,
                             crop_min_px=self.crop_min_px, crop_shared_frac=self.crop_shared_frac)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LapSamConfig:
        return cls(
            student=StudentConfig(**d.get("student", {})),
            teacher=d.get("teacher", "sam2.1_hiera_t"),
            teacher_checkpoint=d.get("teacher_checkpoint"),
            box_prior=float(d.get("box_prior", 0.0)),
            crop_context=float(d.get("crop_context", 0.0)),
            crop_mode=str(d.get("crop_mode", "union")),
            crop_min_px=int(d.get("crop_min_px", 64)),
            crop_shared_frac=float(d.get("crop_shared_frac", 0.5)),
            decoder=str(d.get("decoder", "sam2")),
            decoder_dim=int(d.get("decoder_dim", 256)),
        )


class LapSam(nn.Module):
    """Student encoder + SAM2 prompt encoder + a mask decoder (SAM2's or the lite one), single-mask output."""

    def __init__(self, config: LapSamConfig, image_encoder: nn.Module, prompt_encoder: nn.Module, mask_decoder: nn.Module):
        super().__init__()
        self.config = config
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.box_prior = BoxPrior(config.box_prior, config.student.input_size) if config.box_prior else None

    @property
    def preprocessing(self) -> Preprocessing:
        return self.config.preprocessing

    @property
    def input_size(self) -> int:
        return self.config.student.input_size

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.image_encoder(images)

    def decode(
        self,
        image_embed: torch.Tensor,
        high_res_feats_0: torch.Tensor,
        high_res_feats_1: torch.Tensor,
        boxes: torch.Tensor | None = None,
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        repeat_image: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts (B, ...) in model-input pixels -> low-res logits (B, 1, L, L), IoU (B, 1).

        ``repeat_image=True``: one image (batch 1 features) for all B prompts;
        ``False``: features and prompts are paired (batch N == B), as in training.
        """
        coords, labels = concat_prompts(boxes, point_coords, point_labels)
        sparse, dense = self.prompt_encoder(points=(coords, labels), boxes=None, masks=mask_input)
        if isinstance(self.mask_decoder, LiteMaskDecoder):
            if not repeat_image and image_embed.shape[0] != sparse.shape[0]:
                raise ValueError("features and prompts must pair up when repeat_image is False")
            out = self.mask_decoder(image_embed, self.prompt_encoder.get_dense_pe(), sparse,
                                    [high_res_feats_0, high_res_feats_1])
        else:
            out = self.mask_decoder(
                image_embeddings=image_embed,
                image_pe=self.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
                repeat_image=repeat_image,
                high_res_features=[high_res_feats_0, high_res_feats_1],
            )
        low_res_masks, iou_pred = out[0], out[1]
        if self.box_prior is not None:
            low_res_masks = self.box_prior(low_res_masks, coords, labels)
        return low_res_masks, iou_pred

    def forward(self, images: torch.Tensor, boxes: torch.Tensor | None = None, point_coords: torch.Tensor | None = None,
                point_labels: torch.Tensor | None = None, mask_input: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Training forward: N images with one prompt set each."""
        feats = self.encode(images)
        return self.decode(*feats, boxes=boxes, point_coords=point_coords, point_labels=point_labels, mask_input=mask_input)


def build_lapsam(config: LapSamConfig | None = None) -> LapSam:
    config = config or LapSamConfig()
    encoder = StudentEncoder(config.student)
    pe, dec = build_prompt_heads(config)
    return LapSam(config, encoder, pe, dec)


def student_table(input_size: int = 512, names: tuple[str, ...] | list[str] | None = None) -> list[dict[str, Any]]:
    """Parameters of each student encoder and of the whole LapSam (with SAM2's prompt encoder + decoder)."""
    pe, dec = build_prompt_heads(LapSamConfig(student=StudentConfig(input_size=input_size)))
    heads = param_count(pe) + param_count(dec)
    rows = []
    for name in names or SUPPORTED_BACKBONES:
        enc = build_student(name, input_size)
        n = param_count(enc)
        rows.append({"name": name, "encoder_params": n, "backbone_params": param_count(enc.backbone),
                     "total_params": n + heads})
    return rows
