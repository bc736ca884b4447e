"""The ``LapSam`` model: a timm student image encoder + SAM2's prompt encoder and mask decoder.

The student outputs exactly what SAM2's mask decoder consumes (see ``lapsam.manifest``):
``image_embed`` (N, 256, S/16, S/16), ``high_res_feats_0`` (N, 32, S/4, S/4) and
``high_res_feats_1`` (N, 64, S/8, S/8). Build with :func:`build_lapsam`; save/load with
:func:`save_checkpoint` / :func:`load_lapsam`.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lapsam.io import atomic_write
from lapsam.manifest import Preprocessing

from .sam2_factory import build_sam2_model, load_state_dict, resolve_sam2_name

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "lapsam-checkpoint"
CHECKPOINT_VERSION = 1

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
        )


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


class LapSam(nn.Module):
    """Student encoder + SAM2 prompt encoder + SAM2 mask decoder, single-mask output."""

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
        coords, labels = _concat_prompts(boxes, point_coords, point_labels)
        sparse, dense = self.prompt_encoder(points=(coords, labels), boxes=None, masks=mask_input)
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


def _concat_prompts(
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
    """SAM2's prompt encoder (resized to the student's grid) and mask decoder, from the teacher config."""
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
    decoder = copy.deepcopy(sam.sam_mask_decoder)
    # The student outputs already-projected high-res features: conv_s0/conv_s1 are unused.
    decoder.conv_s0 = nn.Identity()
    decoder.conv_s1 = nn.Identity()
    return pe, decoder


def build_lapsam(config: LapSamConfig | None = None) -> LapSam:
    config = config or LapSamConfig()
    encoder = StudentEncoder(config.student)
    pe, dec = build_prompt_heads(config)
    return LapSam(config, encoder, pe, dec)


def save_checkpoint(path: str | Path, model: LapSam, **extra: Any) -> Path:
    """Write ``{"format", "version", "config", "model", **extra}`` atomically."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": model.config.to_dict(),
        "model": model.state_dict(),
        **extra,
    }
    with atomic_write(path) as fp:
        torch.save(state, fp)
    return Path(path)


def load_checkpoint_dict(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a lapsam checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    return ckpt


def load_lapsam(path: str | Path) -> LapSam:
    """Rebuild a :class:`LapSam` from a checkpoint (no teacher weights needed: all are inside)."""
    ckpt = load_checkpoint_dict(path)
    config = LapSamConfig.from_dict(ckpt["config"])
    config.teacher_checkpoint = None  # the checkpoint already holds the decoder weights
    config.student.backbone_weights = None
    model = build_lapsam(config)
    model.load_state_dict(ckpt["model"])
    return model.eval()
