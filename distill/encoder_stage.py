"""Stage 1: distil the teacher's three decoder inputs into the student encoder.

Loss per map m in (image_embed, high_res_feats_0, high_res_feats_1):
``w_m * MSE(student_m, teacher_m) + cosine * (1 - cos over channels)``; weights in
``loss`` of ``configs/encoder.yaml``. Teacher maps are matched to the student's grid
(:func:`lapsam.distill.teacher.match_grid`). With ``cache.enabled`` the teacher runs once over
all training (and validation) slices before training and its features are read from fp16
memory maps afterwards (:mod:`lapsam.distill.feature_cache`). Only the student encoder is
trained (prompt encoder and mask decoder stay as built). Validation: the loss terms on the
held-back slices; the best checkpoint has the lowest total MSE.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import EncoderConfig
from .data import (
    CaseStore,
    FeatureSliceDataset,
    build_split,
)
from .feature_cache import FeatureCache, fingerprint
from .modeling import LapSam
from .teacher import FEATURE_NAMES, Teacher
from .trainer import DistInfo, Stage, StepResult, barrier

log = logging.getLogger(__name__)

SHORT = ("embed", "hr0", "hr1")


def feature_loss(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...], weights: tuple[float, float, float],
                 cosine: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    total = student[0].new_zeros((), dtype=torch.float32)
    logs: dict[str, float] = {}
    for name, s, t, w in zip(SHORT, student, teacher, weights, strict=False):
        s, t = s.float(), t.float()
        mse = F.mse_loss(s, t)
        logs[f"mse_{name}"] = float(mse.detach())
        total = total + w * mse
        if cosine > 0:
            cos = 1 - F.cosine_similarity(s, t, dim=1).mean()
            logs[f"cos_{name}"] = float(cos.detach())
            total = total + cosine * cos
    return total, logs


def _teacher_meta(cfg: EncoderConfig, teacher_size: int, refs: list, store: CaseStore, split: str) -> dict[str, Any]:
    ck = cfg.model.teacher_checkpoint
    ck_id = None
    if ck:
        st = Path(ck).stat()
        ck_id = [str(Path(ck).resolve()), st.st_size, int(st.st_mtime)]
    return {
        "split": split,
        "teacher": cfg.model.teacher,
        "teacher_checkpoint": ck_id,
        "teacher_size": teacher_size,
        "resize": cfg.model.resize,
        "slices": fingerprint([(store.cases[r.case].name, r.z) for r in refs]),
    }


class EncoderStage(Stage):
    name = "encoder"
    score_name = "neg_val_mse"

    def __init__(self, cfg: EncoderConfig, info: DistInfo, model: LapSam):
        from lapsam.distill.sam2_factory import resolve_sam2_name

        self.cfg, self.info, self.model = cfg, info, model
        d = cfg.data
        split = build_split(d, cfg.train.seed, d.fg_only, d.slice_stride, d.slice_stride)
        self.store, self.refs, self.val_store, self.val_refs = split.store, split.refs, split.val_store, split.val_refs
        _, tsize = resolve_sam2_name(cfg.model.teacher, cfg.model.teacher_image_size)
        self.teacher_size = tsize
        pp = model.preprocessing
        from lapsam.manifest import Preprocessing

        self.teacher_pp = Preprocessing(input_size=tsize, resize=cfg.model.resize)
        self.dataset = FeatureSliceDataset(self.store, self.refs, pp, self.teacher_pp)
        self.val_dataset = FeatureSliceDataset(self.val_store, self.val_refs, pp, self.teacher_pp)
        self.weights = (cfg.loss.mse_image_embed, cfg.loss.mse_high_res_0, cfg.loss.mse_high_res_1)
        self.teacher: Teacher | None = None
        self.cache: FeatureCache | None = None
        self.val_cache: FeatureCache | None = None
        # Only the student encoder learns in stage 1.
        for mod in (model.prompt_encoder, model.mask_decoder):
            for p in mod.parameters():
                p.requires_grad_(False)
        if info.is_main:
            log.info("stage 1: %d training slices from %d cases, %d validation slices from %d cases; teacher %s@%d",
                     len(self.refs), len(self.store.cases), len(self.val_refs), len(self.val_store.cases), cfg.model.teacher, tsize)

    def trainable(self, model: LapSam) -> nn.Module:
        return model.image_encoder

    def _get_teacher(self) -> Teacher:
        if self.teacher is None:
            m = self.cfg.model
            self.teacher = Teacher(m.teacher, m.teacher_checkpoint, self.teacher_size).to(self.info.device)
        return self.teacher

    def prepare(self, info: DistInfo) -> None:
        c = self.cfg.cache
        s = self.cfg.model.input_size
        if c.enabled:
            root = Path(c.dir) if c.dir else Path(self.cfg.train.out_dir) / "teacher_cache"
            caches = []
            for split, ds, refs, store in (("train", self.dataset, self.refs, self.store),
                                           ("val", self.val_dataset, self.val_refs, self.val_store)):
                if not refs:
                    caches.append(None)
                    continue
                meta = _teacher_meta(self.cfg, self.teacher_size, refs, store, split)
                if info.is_main:
                    FeatureCache(root / split, len(refs), s, meta, create=True)
                barrier(info)
                cache = FeatureCache(root / split, len(refs), s, meta, create=False)
                if not cache.matches():
                    raise RuntimeError(f"teacher cache {root / split}: meta.json does not match this run")
                if not cache.complete:
                    ds.with_teacher_image = True
                    n = cache.fill(self._get_teacher(), ds, s, info.device, info.rank, info.world,
                                   self.cfg.train.batch_size, show=info.is_main)
                    log.debug("rank %d wrote %d cache rows", info.rank, n)
                barrier(info)
                cache.reopen()
                if not cache.complete:
                    raise RuntimeError(f"teacher cache {root / split} incomplete after filling")
                caches.append(cache)
            self.cache, self.val_cache = caches
            # From here on the teacher never runs: free it and stop preparing its inputs.
            self.teacher = None
            self.dataset.with_teacher_image = False
            self.val_dataset.with_teacher_image = False
        else:
            self._get_teacher()
            if self.val_refs and info.is_main:
                # Validation targets computed once, kept in RAM.
                meta = _teacher_meta(self.cfg, self.teacher_size, self.val_refs, self.val_store, "val")
                self.val_cache = FeatureCache(None, len(self.val_refs), s, meta)
                self.val_cache.fill(self._get_teacher(), self.val_dataset, s, info.device, batch_size=self.cfg.train.batch_size,
                                    show=False)
            self.val_dataset.with_teacher_image = False

    def targets(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        if self.cache is not None:
            return self.cache.get(batch["index"], self.info.device)
        return self._get_teacher()(batch["teacher_image"], out_size=self.cfg.model.input_size)

    def step(self, net: nn.Module, model: LapSam, batch: dict[str, torch.Tensor]) -> StepResult:
        tgt = self.targets(batch)
        pred = net(batch["image"])
        loss, logs = feature_loss(pred, tgt, self.weights, self.cfg.loss.cosine)
        return StepResult(loss, logs, int(batch["image"].shape[0]))

    def validate(self, model: LapSam) -> dict[str, float]:
        if not self.val_refs or self.val_cache is None:
            return {}
        sums = {k: 0.0 for k in SHORT}
        bs = self.cfg.train.batch_size
        n = len(self.val_dataset)
        for s in range(0, n, bs):
            idx = list(range(s, min(n, s + bs)))
            x = torch.stack([torch.from_numpy(self.val_dataset[i]["image"]) for i in idx]).to(self.info.device)
            pred = model.encode(x)
            tgt = self.val_cache.get(idx, self.info.device)
            for k, p, t in zip(SHORT, pred, tgt, strict=False):
                sums[k] += float(F.mse_loss(p.float(), t, reduction="sum")) / t[0].numel()
        out = {f"val_mse_{k}": v / n for k, v in sums.items()}
        out["val_mse"] = sum(w * out[f"val_mse_{k}"] for k, w in zip(SHORT, self.weights, strict=False))
        out["neg_val_mse"] = -out["val_mse"]
        return out


def train_encoder(cfg: EncoderConfig, progress: bool = True) -> dict[str, Any]:
    """Run stage 1 (single process, or one rank under torchrun); returns the run summary."""
    from .trainer import run_stage

    return run_stage(lambda c, i, m: EncoderStage(c, i, m), cfg, progress)


__all__ = ["EncoderStage", "feature_loss", "train_encoder", "FEATURE_NAMES"]
