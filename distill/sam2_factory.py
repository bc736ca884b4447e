"""Build SAM2 / SAM2.1 models from the ``sam2`` package's own configs, weights only from a local path.

Like ``sam2.build_sam.build_sam2`` but: no hub download ever, a chosen input size
(MedSAM2 is SAM2.1 Hiera-Tiny at 512), both checkpoint layouts (``{"model": sd}`` as SAM2
ships, or a bare state dict), and ``weights_only`` loading.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# Short names -> config names inside the sam2 package.
SAM2_CONFIGS: dict[str, str] = {
    "sam2.1_hiera_t": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "sam2.1_hiera_s": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "sam2.1_hiera_b+": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "sam2.1_hiera_l": "configs/sam2.1/sam2.1_hiera_l.yaml",
    "sam2_hiera_t": "configs/sam2/sam2_hiera_t.yaml",
    "sam2_hiera_s": "configs/sam2/sam2_hiera_s.yaml",
    "sam2_hiera_b+": "configs/sam2/sam2_hiera_b+.yaml",
    "sam2_hiera_l": "configs/sam2/sam2_hiera_l.yaml",
}
# Aliases users type.
SAM2_ALIASES: dict[str, tuple[str, int]] = {
    "t": ("sam2.1_hiera_t", 1024),
    "s": ("sam2.1_hiera_s", 1024),
    "b+": ("sam2.1_hiera_b+", 1024),
    "l": ("sam2.1_hiera_l", 1024),
    "medsam2": ("sam2.1_hiera_t", 512),
}


def resolve_sam2_name(name: str, image_size: int | None = None) -> tuple[str, int]:
    """(config short name, input size) for a name or alias; ``image_size`` overrides the size."""
    if name in SAM2_ALIASES:
        cfg, size = SAM2_ALIASES[name]
    elif name in SAM2_CONFIGS:
        cfg, size = name, 1024
    else:
        raise ValueError(f"unknown SAM2 config {name!r}; choose from {sorted(SAM2_CONFIGS) + sorted(SAM2_ALIASES)}")
    return cfg, int(image_size or size)


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A SAM2/MedSAM2 checkpoint's state dict (``{"model": sd}`` or a bare sd), safely."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: not a state dict")
    return obj


def build_sam2_model(
    name: str = "sam2.1_hiera_t",
    checkpoint: str | Path | None = None,
    image_size: int | None = None,
) -> torch.nn.Module:
    """A ``SAM2Base`` in eval mode on the CPU, randomly initialised unless ``checkpoint`` is given."""
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg_name, size = resolve_sam2_name(name, image_size)
    if not GlobalHydra.instance().is_initialized():
        from hydra import initialize_config_module

        initialize_config_module("sam2", version_base="1.2")
    overrides = [f"++model.image_size={size}"]
    cfg = compose(config_name=SAM2_CONFIGS[cfg_name], overrides=overrides)
    OmegaConf.resolve(cfg)
    model = instantiate(cfg.model, _recursive_=True)
    if checkpoint is not None:
        sd = load_state_dict(checkpoint)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if missing:
            raise RuntimeError(f"{checkpoint}: {len(missing)} missing keys for {cfg_name}, e.g. {missing[:5]}")
        if unexpected:
            log.warning("%s: %d unexpected keys ignored, e.g. %s", checkpoint, len(unexpected), unexpected[:5])
    return model.eval()
