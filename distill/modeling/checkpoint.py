"""``LapSam`` checkpoints: ``{"format", "version", "config", "model", **extra}`` files, written atomically.

The format ``lapsam export`` reads and the training stages write (``best.pt``, ``last.pt``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lapsam.writers import atomic_write

from .lapsam import LapSam, LapSamConfig, build_lapsam

CHECKPOINT_FORMAT = "lapsam-checkpoint"
CHECKPOINT_VERSION = 1


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
