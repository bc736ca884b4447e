"""What both training stages share: DDP set-up, model building, the step loop, checkpoints, logs.

DDP: launched by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the run joins a process
group, ``nccl`` on GPUs and ``gloo`` on CPUs, one process per device; data are split with a
distributed sampler and only rank 0 writes checkpoints and logs. Without torchrun it is a
single process. Multi-node works the same way (``torchrun --nnodes N --node-rank R
--rdzv-endpoint HOST:PORT ...``).

Resume: ``OUT/last.pt`` holds the model, optimiser, scheduler, step, epoch and the torch RNG;
the data order and augmentation are functions of (seed, epoch, index), so a resumed run
continues with exactly the batches and losses of an uninterrupted one. The learning-rate
schedule spans ``epochs`` (``max_steps`` only stops early), so stopping and resuming does not
change it.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .config import ModelSection, TrainSection, config_to_dict
from .modeling import (
    LapSam,
    LapSamConfig,
    StudentConfig,
    build_lapsam,
    load_checkpoint_dict,
    param_count,
    save_checkpoint,
)

log = logging.getLogger(__name__)


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup_distributed() -> DistInfo:
    """Join the torchrun process group (nccl on GPU, gloo on CPU) or run as a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world, local, device)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def cleanup_distributed(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def lapsam_config(m: ModelSection) -> LapSamConfig:
    return LapSamConfig(
        student=StudentConfig(backbone=m.backbone, input_size=m.input_size, resize=m.resize,
                              backbone_weights=m.backbone_weights),
        teacher=m.teacher,
        teacher_checkpoint=m.teacher_checkpoint,
        box_prior=m.box_prior,
        crop_context=m.crop_context,
        crop_mode=m.crop_mode,
        crop_min_px=m.crop_min_px,
        crop_shared_frac=m.crop_shared_frac,
        decoder=m.decoder,
        decoder_dim=m.decoder_dim,
    )


def build_model(m: ModelSection, seed: int) -> LapSam:
    """The student LapSam (same random init on every rank), optionally from ``init_checkpoint``."""
    torch.manual_seed(seed)
    model = build_lapsam(lapsam_config(m))
    if m.init_checkpoint:
        ckpt = load_checkpoint_dict(m.init_checkpoint)
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as exc:
            raise ValueError(f"{m.init_checkpoint}: does not fit model {m.backbone}@{m.input_size}: {str(exc)[:200]}") from None
        log.info("initialised from %s", m.init_checkpoint)
    return model


def make_scheduler(opt: torch.optim.Optimizer, t: TrainSection, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then cosine decay to ``min_lr`` over ``total_steps``."""
    warm = max(0, min(t.warmup_steps, total_steps // 2))
    floor = t.min_lr / t.lr if t.lr > 0 else 0.0

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        p = min(1.0, (step - warm) / max(1, total_steps - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))

    return torch.optim.lr_scheduler.LambdaLR(opt, f)


class CsvLog:
    """Append rows to a CSV (rank 0 only); the header comes from the first row's keys."""

    def __init__(self, path: Path, enabled: bool, truncate_after_step: int | None = None):
        self.path, self.enabled = path, enabled
        self.fields: list[str] | None = None
        if enabled and path.is_file():
            with open(path, newline="") as fp:
                rows = list(csv.DictReader(fp))
            if rows:
                self.fields = list(rows[0].keys())
            if truncate_after_step is not None:
                # A resumed run drops rows logged after the checkpoint it resumes from.
                keep = [r for r in rows if int(float(r.get("step", 0))) <= truncate_after_step]
                with open(path, "w", newline="") as fp:
                    if self.fields:
                        w = csv.DictWriter(fp, fieldnames=self.fields)
                        w.writeheader()
                        w.writerows(keep)
        elif enabled and path.exists() is False:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        new = self.fields is None
        if new:
            self.fields = list(row.keys())
        with open(self.path, "a", newline="") as fp:
            w = csv.DictWriter(fp, fieldnames=self.fields, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on GPU; a no-op on CPU."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


@dataclass
class StepResult:
    loss: torch.Tensor
    logs: dict[str, float]
    images: int


class Stage:
    """One training stage: the trainer calls these hooks."""

    name = "stage"
    score_name = "score"  # higher is better

    def trainable(self, model: LapSam) -> nn.Module:
        """The module wrapped in DDP and optimised."""
        return model

    def ddp_find_unused(self) -> bool:
        return False

    def train_loader_parts(self) -> tuple[Any, Any]:
        """(dataset, sampler): modality-balanced sampling, or a plain shuffled DistributedSampler.

        Uses the stage's ``cfg`` (``data``, ``train``), ``info``, ``refs`` and ``dataset``.
        """
        from torch.utils.data import DistributedSampler

        from .data import DistributedWeightedSampler, case_group, modality_weights

        d, t = self.cfg.data, self.cfg.train
        if d.balance_modalities:
            n = d.samples_per_epoch or len(self.refs)
            groups = [case_group(self.store.cases[r.case].name) for r in self.refs] if d.balance_groups else None
            w = modality_weights(self.refs, groups)
            sampler = DistributedWeightedSampler(w, n, self.info.world, self.info.rank, t.seed)
        else:
            sampler = DistributedSampler(self.dataset, num_replicas=self.info.world, rank=self.info.rank,
                                         shuffle=True, seed=t.seed, drop_last=True)
        return self.dataset, sampler

    def step(self, net: nn.Module, model: LapSam, batch: dict[str, torch.Tensor]) -> StepResult:
        raise NotImplementedError

    def validate(self, model: LapSam) -> dict[str, float]:
        return {}

    def prepare(self, info: DistInfo) -> None:
        """Run before training (e.g. fill the teacher cache)."""


def _collate(items: list[dict]) -> dict[str, torch.Tensor]:
    out = {}
    for k in items[0]:
        vals = [it[k] for it in items]
        out[k] = torch.as_tensor(np.stack(vals)) if isinstance(vals[0], np.ndarray) else torch.as_tensor(vals)
    return out


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def run_training(stage: Stage, cfg: Any, info: DistInfo, model: LapSam, progress: bool = True) -> dict[str, Any]:
    """The loop shared by both stages; returns a summary (steps, last and best validation).

    ``progress=False``: no bar; the main process logs a line every ``train.log_every`` steps instead."""
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    t: TrainSection = cfg.train
    out = Path(t.out_dir)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    barrier(info)
    model.to(info.device)
    module = stage.trainable(model)
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    dataset, sampler = stage.train_loader_parts()
    steps_per_epoch = len(sampler) // t.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(sampler)} samples per process is less than one batch of {t.batch_size}")
    schedule_steps = t.epochs * steps_per_epoch
    total_steps = min(schedule_steps, t.max_steps) if t.max_steps else schedule_steps
    sched = make_scheduler(opt, t, schedule_steps)
    step, best = 0, -math.inf
    averaged, averaged_at = None, -1
    if t.average_from_step is not None:
        from torch.optim.swa_utils import AveragedModel

        averaged = AveragedModel(model, use_buffers=True)

    resume = None
    if t.resume == "auto":
        resume = out / "last.pt" if (out / "last.pt").is_file() else None
    elif t.resume:
        resume = Path(t.resume)
    if resume is not None:
        ck = load_checkpoint_dict(resume)
        if ck.get("stage") != stage.name:
            raise ValueError(f"{resume}: a {ck.get('stage')!r} checkpoint, cannot resume stage {stage.name!r}")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        step = int(ck["step"])
        best = float(ck.get("best_score", -math.inf))
        torch.set_rng_state(ck["rng_torch"])
        if averaged is not None and "average" in ck:
            averaged.load_state_dict(ck["average"])
            averaged_at = step
        if info.is_main:
            log.info("resumed from %s at step %d", resume, step)
    if info.enabled:
        net: nn.Module = nn.parallel.DistributedDataParallel(
            module, device_ids=[info.device.index] if info.device.type == "cuda" else None,
            find_unused_parameters=stage.ddp_find_unused())
    else:
        net = module
    train_log = CsvLog(out / "train_log.csv", info.is_main, truncate_after_step=step if resume else None)
    val_log = CsvLog(out / "val_log.csv", info.is_main, truncate_after_step=step if resume else None)
    stage.prepare(info)

    def save(name: str, epoch: int, metrics: dict[str, float]) -> None:
        if not info.is_main:
            return
        extra = {"average": averaged.state_dict()} if averaged is not None else {}
        save_checkpoint(out / name, model, stage=stage.name, optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                        step=step, epoch=epoch, best_score=best, metrics=metrics, rng_torch=torch.get_rng_state(),
                        train_config=config_to_dict(cfg), **extra)

    def save_point(epoch: int, metrics: dict[str, float]) -> None:
        """A checkpoint save: join the average, then last.pt (+ step_*.pt, average.pt).

        The average takes the weights of the regular save points from ``average_from_step`` on (every
        ``save_every_steps`` steps and each epoch end), once each, so that a stopped and resumed run
        averages the same steps as an uninterrupted one."""
        nonlocal averaged_at
        regular = step % t.save_every_steps == 0 or step % steps_per_epoch == 0
        if averaged is not None and regular and step >= t.average_from_step and step != averaged_at:
            averaged.update_parameters(model)
            averaged_at = step
        save("last.pt", epoch, metrics)
        if t.keep_step_checkpoints:
            save(f"step_{step:07d}.pt", epoch, metrics)
        if averaged is not None and info.is_main and int(averaged.n_averaged) > 0:
            save_checkpoint(out / "average.pt", averaged.module, stage=stage.name, step=step, epoch=epoch,
                            averaged_from_step=t.average_from_step, n_averaged=int(averaged.n_averaged),
                            train_config=config_to_dict(cfg))

    summary: dict[str, Any] = {"val": {}, "best": None}
    bar = tqdm(total=total_steps, initial=step, desc=stage.name, unit="step", disable=not (info.is_main and progress),
               dynamic_ncols=True)
    win_t, win_imgs = time.perf_counter(), 0
    ema = None
    while step < total_steps:
        epoch, skip = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        order = list(sampler)[skip * t.batch_size: steps_per_epoch * t.batch_size]
        loader = DataLoader(dataset, batch_size=t.batch_size, sampler=order, num_workers=cfg.data.num_workers,
                            collate_fn=_collate, drop_last=True, pin_memory=info.device.type == "cuda",
                            persistent_workers=False)
        net.train()
        for batch in loader:
            batch = _to(batch, info.device)
            with autocast(info.device, t.amp):
                res = stage.step(net, model, batch)
            opt.zero_grad(set_to_none=True)
            res.loss.backward()
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
            opt.step()
            sched.step()
            step += 1
            loss = res.loss.detach().float()
            if info.enabled:
                dist.all_reduce(loss)
                loss /= info.world
            lv = float(loss)
            ema = lv if ema is None else 0.9 * ema + 0.1 * lv
            win_imgs += res.images * info.world
            bar.update(1)
            if step % t.log_every == 0 or step == total_steps:
                now = time.perf_counter()
                ips = win_imgs / max(now - win_t, 1e-9)
                win_t, win_imgs = now, 0
                bar.set_postfix(loss=f"{ema:.4f}", img_s=f"{ips:.1f}")
                if info.is_main and not progress:
                    log.info("%s step %d/%d epoch %d loss %.4f img/s %.1f", stage.name, step, total_steps, epoch, ema, ips)
                train_log.write({"step": step, "epoch": epoch, "loss": f"{lv:.8g}", "lr": f"{sched.get_last_lr()[0]:.6g}",
                                 "images_per_s": f"{ips:.3f}", **{k: f"{v:.6g}" for k, v in res.logs.items()}})
            epoch_end = step % steps_per_epoch == 0
            if step % t.save_every_steps == 0 and not epoch_end:
                save_point(epoch, {})
            if epoch_end or step >= total_steps:
                break
        epoch_done = step % steps_per_epoch == 0
        metrics: dict[str, float] = {}
        if t.validate_every_epochs > 0 and ((epoch_done and (epoch + 1) % t.validate_every_epochs == 0) or step >= total_steps):
            if info.is_main:
                model.eval()
                with torch.no_grad(), autocast(info.device, t.amp):
                    metrics = stage.validate(model)
                model.train()
                if metrics:
                    score = metrics[stage.score_name]
                    summary["val"] = metrics
                    val_log.write({"step": step, "epoch": epoch, **{k: f"{v:.6g}" for k, v in metrics.items()}})
                    log.info("epoch %d step %d validation: %s", epoch, step,
                             " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
                    if score > best:
                        best = score
                        summary["best"] = metrics
                        save("best.pt", epoch, metrics)
            barrier(info)
        save_point(epoch, metrics)
    bar.close()
    if t.save_rank_params:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, out / f"rank{info.rank}_params.pt")
    barrier(info)
    summary.update(step=step, best_score=best, out_dir=str(out))
    return summary


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


def run_stage(make_stage: Callable[[Any, DistInfo, LapSam], Stage], cfg: Any, progress: bool = True) -> dict[str, Any]:
    info = setup_distributed()
    try:
        if cfg.train.threads:
            torch.set_num_threads(int(cfg.train.threads))
        seed_everything(cfg.train.seed)
        model = build_model(cfg.model, cfg.train.seed)
        stage = make_stage(cfg, info, model)
        if info.is_main:
            log.info("%s: student %s@%d, %.2fM parameters (encoder %.2fM), %d process(es) on %s", stage.name,
                     cfg.model.backbone, cfg.model.input_size, param_count(model) / 1e6,
                     param_count(model.image_encoder) / 1e6, info.world, info.device)
        return run_training(stage, cfg, info, model, progress)
    finally:
        cleanup_distributed(info)
