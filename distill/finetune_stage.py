"""Stage 2: fine-tune the whole LapSam (encoder, prompt encoder, mask decoder) on box/click prompts.

Each item is one augmented slice with K objects (``prompt.objects_per_image``); the image is
encoded once and its features repeated for the K prompts. A prompt is the object's box with
jitter (``prompt.box_jitter``), sometimes with clicks inside/outside the mask, or clicks alone.
Boxes go in as SAM2 does it (two corner points labelled 2 and 3). Loss on the low-res logits
upsampled to the input size: ``dice * Dice + focal * Focal (+ bce * BCE) + iou * MSE(IoU
prediction, actual IoU of the predicted mask)``.

Validation, each epoch, on held-back cases: every object of each 2D case and of (up to
``data.val_max_slices_per_case``) labelled slices of each 3D case is prompted with its tight
box (as the challenge does), the mask is taken back to the original grid with
:func:`lapsam.preprocess.postprocess_masks` and compared with the reference. DSC per object
(accumulated over the evaluated slices for 3D cases), averaged per case, then per modality;
``dsc`` (the mean over modalities) picks ``best.pt``.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lapsam.preprocess import box_windows, postprocess_masks, preprocess_image, transform_boxes

from .config import FinetuneConfig, FinetuneLoss
from .data import (
    CaseStore,
    FinetuneItemConfig,
    PromptSliceDataset,
    build_split,
    case_group,
    label_union,
)
from .modeling import LapSam
from .trainer import DistInfo, Stage, StepResult

log = logging.getLogger(__name__)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    return (1 - (2 * (p * t).sum(1) + eps) / (p.sum(1) + t.sum(1) + eps)).mean()


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    pt = p * target + (1 - p) * (1 - target)
    loss = ce * (1 - pt) ** gamma
    if alpha >= 0:
        loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return loss.flatten(1).mean(1).mean()


def mask_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    pred = (logits > 0).flatten(1).float()
    t = (target > 0.5).flatten(1).float()
    inter = (pred * t).sum(1)
    union = pred.sum(1) + t.sum(1) - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def segmentation_loss(logits: torch.Tensor, iou_pred: torch.Tensor, target: torch.Tensor,
                      w: FinetuneLoss) -> tuple[torch.Tensor, dict[str, float]]:
    """logits/target (B, 1, S, S); iou_pred (B, 1)."""
    logits = logits.float()
    d = dice_loss(logits, target)
    total = w.dice * d
    logs = {"dice": float(d.detach())}
    if w.focal > 0:
        f = focal_loss(logits, target, w.focal_alpha, w.focal_gamma)
        total = total + w.focal * f
        logs["focal"] = float(f.detach())
    if w.bce > 0:
        b = F.binary_cross_entropy_with_logits(logits, target)
        total = total + w.bce * b
        logs["bce"] = float(b.detach())
    if w.iou > 0:
        iou_t = mask_iou(logits.detach(), target)
        i = F.mse_loss(iou_pred.float().reshape(-1), iou_t)
        total = total + w.iou * i
        logs["iou_mse"] = float(i.detach())
        logs["train_iou"] = float(iou_t.mean())
    return total, logs


def prompt_points(boxes: torch.Tensor, has_box: torch.Tensor, coords: torch.Tensor,
                  labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 4) boxes + (B, P, 2) clicks -> SAM2 points: box corners labelled 2/3 (-1 when absent), then clicks."""
    b = boxes.reshape(-1, 2, 2).float()
    bl = torch.tensor([2, 3], device=boxes.device, dtype=torch.float32).expand(b.shape[0], 2)
    bl = torch.where(has_box.reshape(-1, 1) > 0, bl, torch.full_like(bl, -1.0))
    return torch.cat([b, coords.float()], 1), torch.cat([bl, labels.float()], 1).to(torch.int32)


class PromptNet(nn.Module):
    """Encode N images once, decode K prompts each (what DDP wraps in stage 2)."""

    def __init__(self, model: LapSam):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, coords: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = images.shape[0]
        k = coords.shape[0] // n
        feats = self.model.encode(images)
        if k > 1:
            feats = tuple(f.repeat_interleave(k, dim=0) for f in feats)
        return self.model.decode(*feats, point_coords=coords, point_labels=labels)


def dsc(pred: np.ndarray, gt: np.ndarray) -> float:
    s = pred.sum() + gt.sum()
    return float(2 * np.logical_and(pred, gt).sum() / s) if s else float("nan")


@torch.no_grad()
def evaluate_cases(model: LapSam, store: CaseStore, refs: list, device: torch.device,
                   case_sets: dict[str, set[int]] | None = None) -> dict[str, float]:
    """DSC per modality (and ``dsc``, their mean) with tight-box prompts; see the module doc.

    ``case_sets``: named sets of case indexes; each adds ``dsc_set_<name>``, the mean case DSC
    over the set's cases.
    """
    pp = model.preprocessing
    inter: dict[tuple[int, int], float] = {}
    sums: dict[tuple[int, int], float] = {}
    for ref in refs:
        img, lab = store.slice(ref)
        labels = [int(v) for v in np.unique(lab) if v != 0]
        if not labels:
            continue
        # the runtime's crop windows (lapsam.preprocess.box_windows) from each object's x/y
        # extent (over the whole volume for 3D, like a 3D box)
        h, w = lab.shape[:2]
        xy = [store.label_box(ref.case, v) if ref.z >= 0 else label_union(lab == v) for v in labels]
        for win, idx in box_windows(np.stack(xy), h, w, pp):
            y0, y1, x0, x1 = win if win is not None else (0, h, 0, w)
            sub, sub_lab = img[y0:y1, x0:x1], lab[y0:y1, x0:x1]
            group = [labels[j] for j in idx]
            x, tf = preprocess_image(sub, pp)
            feats = model.encode(torch.from_numpy(x).to(device))
            boxes = []
            for v in group:
                ys, xs = np.nonzero(sub_lab == v)
                boxes.append([xs.min(), ys.min(), xs.max(), ys.max()])
            b = torch.from_numpy(transform_boxes(np.asarray(boxes), tf)).to(device)
            logits, _ = model.decode(*feats, boxes=b, repeat_image=True)
            masks = postprocess_masks(logits[:, 0].float().cpu().numpy(), tf, pp.mask_threshold)
            for v, m in zip(group, masks, strict=False):
                g = lab == v
                full = np.zeros_like(g)
                full[y0:y1, x0:x1] = m
                key = (ref.case, v)
                inter[key] = inter.get(key, 0.0) + float(np.logical_and(full, g).sum())
                sums[key] = sums.get(key, 0.0) + float(full.sum() + g.sum())
    per_case: dict[int, list[float]] = {}
    for key, s in sums.items():
        if s > 0:
            per_case.setdefault(key[0], []).append(2 * inter[key] / s)
    per_mod: dict[str, list[float]] = {}
    for ci, vals in per_case.items():
        per_mod.setdefault(store.cases[ci].modality, []).append(float(np.mean(vals)))
    out = {f"dsc_{m}": float(np.mean(v)) for m, v in sorted(per_mod.items())}
    out["dsc"] = float(np.mean(list(out.values()))) if out else float("nan")
    for name, members in (case_sets or {}).items():
        vals = [float(np.mean(v)) for ci, v in per_case.items() if ci in members]
        if vals:
            out[f"dsc_set_{name}"] = float(np.mean(vals))
    return out


class FinetuneStage(Stage):
    name = "finetune"
    score_name = "dsc"

    def __init__(self, cfg: FinetuneConfig, info: DistInfo, model: LapSam):
        self.cfg, self.info, self.model = cfg, info, model
        d = cfg.data
        split = build_split(d, cfg.train.seed, True, d.slice_stride, 1)
        self.store, self.refs, self.val_store, self.val_refs = split.store, split.refs, split.val_store, split.val_refs
        item_cfg = FinetuneItemConfig(augment=cfg.augment, prompt=cfg.prompt)
        self.dataset = PromptSliceDataset(self.store, self.refs, model.preprocessing, item_cfg, cfg.train.seed, train=True)
        if info.is_main:
            log.info("stage 2: %d training slices from %d cases, %d validation slices from %d cases",
                     len(self.refs), len(self.store.cases), len(self.val_refs), len(self.val_store.cases))

    def trainable(self, model: LapSam) -> nn.Module:
        return PromptNet(model)

    def ddp_find_unused(self) -> bool:
        return True  # e.g. the mask-input path and the object-score head get no gradient

    def step(self, net: nn.Module, model: LapSam, batch: dict[str, torch.Tensor]) -> StepResult:
        n, k, s, _ = batch["masks"].shape
        coords, labels = prompt_points(batch["boxes"].reshape(n * k, 4), batch["has_box"].reshape(n * k),
                                       batch["point_coords"].reshape(n * k, -1, 2), batch["point_labels"].reshape(n * k, -1))
        low, iou = net(batch["image"], coords, labels)
        logits = F.interpolate(low.float(), size=(s, s), mode="bilinear", align_corners=False)
        loss, logs = segmentation_loss(logits, iou, batch["masks"].reshape(n * k, 1, s, s), self.cfg.loss)
        return StepResult(loss, logs, n)

    def validate(self, model: LapSam) -> dict[str, float]:
        if not self.val_refs:
            return {}
        groups = self.cfg.data.val_groups
        held = {i for i, c in enumerate(self.val_store.cases) if any(g and g in case_group(c.name) for g in groups)}
        sets = {"groups": held, "patients": set(range(len(self.val_store.cases))) - held} if held else None
        return evaluate_cases(model, self.val_store, self.val_refs, self.info.device, sets)


def train_finetune(cfg: FinetuneConfig, progress: bool = True) -> dict[str, Any]:
    """Run stage 2 (single process, or one rank under torchrun); returns the run summary."""
    from .trainer import run_stage

    return run_stage(lambda c, i, m: FinetuneStage(c, i, m), cfg, progress)
