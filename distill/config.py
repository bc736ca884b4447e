"""Training configs: dataclasses filled from YAML (``distill/configs/*.yaml``) plus ``--set`` overrides.

``--set train.lr=1e-4`` sets one dotted key; the value is parsed as YAML (numbers, booleans,
lists such as ``data.train=[demo/data]``, ``null``). Unknown keys are errors, so a typo never
goes unnoticed.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data import AugmentConfig, PromptConfig

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclass
class ModelSection:
    backbone: str = "repvit_m0_9"
    input_size: int = 512
    resize: str = "stretch"
    backbone_weights: str | None = None
    teacher: str = "sam2.1_hiera_t"
    teacher_checkpoint: str | None = None
    teacher_image_size: int | None = None  # None: the teacher config's own (1024; medsam2: 512)
    init_checkpoint: str | None = None  # a lapsam checkpoint to start from (e.g. stage 1's best.pt)
    box_prior: float = 0.0  # initial scale of the learned box prior (LapSamConfig.box_prior); 0: off
    crop_context: float = 0.0  # runtime crop around the boxes (Preprocessing.crop_context); 0: off
    crop_mode: str = "union"  # "union": one window around all boxes; "box": a window per box
    crop_min_px: int = 64  # crop_mode "box": a box's window is at least this many pixels
    crop_shared_frac: float = 0.5  # crop_mode "box": boxes whose window covers this much share one
    decoder: str = "sam2"  # "sam2": SAM2's mask decoder; "lite": image-side work once per image (LiteMaskDecoder)
    decoder_dim: int = 256  # sam2 decoder width; < 256: NarrowMaskDecoder (random weights, cheaper per prompt)


@dataclass
class DataSection:
    train: list[str] = field(default_factory=lambda: ["demo/data"])
    val: list[str] = field(default_factory=list)  # held-back cases; empty: use val_fraction
    val_fraction: float = 0.0  # of the patients of each source group (see data.split_cases)
    val_groups: list[str] = field(default_factory=list)  # source groups held back whole
    fg_only: bool = True  # only slices that hold a label
    slice_stride: int = 1
    max_slices_per_case: int | None = None
    val_max_slices_per_case: int | None = 8
    balance_modalities: bool = True
    balance_groups: bool = True  # within a modality, every source group the same weight
    samples_per_epoch: int | None = None  # with balancing; None: the number of slices
    num_workers: int = 2
    cached_cases: int = 4  # volumes kept in memory per worker


@dataclass
class TrainSection:
    out_dir: str = "runs/distill"
    epochs: int = 10
    max_steps: int | None = None  # stop after this many optimiser steps (overrides epochs)
    batch_size: int = 8  # per process
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.01
    warmup_steps: int = 100
    grad_clip: float = 1.0
    seed: int = 0
    amp: bool = True  # bf16 autocast on GPU (ignored on CPU)
    threads: int | None = None  # torch CPU threads per process
    log_every: int = 10
    save_every_steps: int = 500  # also at each epoch end
    keep_step_checkpoints: bool = False  # also keep step_XXXXXXX.pt
    # From this step on, the weights at every checkpoint save (every save_every_steps and each
    # epoch end) join an equal-weight average (torch.optim.swa_utils.AveragedModel, buffers
    # too), written as OUT/average.pt, a checkpoint that `lapsam export` reads. None: off.
    average_from_step: int | None = None
    validate_every_epochs: int = 1  # 0: never validate
    resume: str | None = "auto"  # "auto": OUT/last.pt when present; a path; null: start fresh
    save_rank_params: bool = False  # debug: every rank writes its parameters at the end (DDP check)


@dataclass
class EncoderLoss:
    mse_image_embed: float = 1.0
    mse_high_res_0: float = 1.0
    mse_high_res_1: float = 1.0
    cosine: float = 0.0  # weight of (1 - cosine similarity over channels), per map


@dataclass
class CacheSection:
    enabled: bool = False
    dir: str | None = None  # default OUT/teacher_cache


@dataclass
class FinetuneLoss:
    dice: float = 1.0
    focal: float = 20.0
    bce: float = 0.0
    iou: float = 1.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0


@dataclass
class EncoderConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    loss: EncoderLoss = field(default_factory=EncoderLoss)
    cache: CacheSection = field(default_factory=CacheSection)


@dataclass
class FinetuneConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    loss: FinetuneLoss = field(default_factory=FinetuneLoss)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if value is None:
        if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and type(None) in args:
            return None
        raise ValueError(f"config key {key} may not be null")
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(args[0], v, key) for v in value]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError(f"config key {key} needs {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, key) for a, v in zip(args, value, strict=False))
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"config key {key} needs true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"config key {key} needs an integer, got {value!r}")
        return int(value)
    if tp is float:
        return float(value)
    if tp is str:
        return str(value)
    return value


def _apply(obj: Any, d: dict[str, Any], prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise ValueError(f"unknown config key {key!r}; known: {sorted(names)}")
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            if not isinstance(v, dict):
                raise ValueError(f"config key {key} is a section; give it a mapping")
            _apply(cur, v, key + ".")
        else:
            setattr(obj, k, _coerce(hints[k], v, key))


def parse_override(text: str) -> tuple[list[str], Any]:
    import yaml

    if "=" not in text:
        raise ValueError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | None = None) -> Any:
    """``cls()`` updated from a YAML file, then from ``key=value`` overrides."""
    import yaml

    cfg = cls()
    if path is not None:
        path = Path(path)
        if not path.is_file() and (CONFIG_DIR / path).is_file():
            path = CONFIG_DIR / path
        if not path.is_file():
            raise FileNotFoundError(f"config {path} does not exist")
        with open(path) as fp:
            d = yaml.safe_load(fp) or {}
        if not isinstance(d, dict):
            raise ValueError(f"{path}: top level must be a mapping")
        _apply(cfg, d)
    for text in overrides or []:
        keys, value = parse_override(text)
        nested: dict[str, Any] = {keys[-1]: value}
        for k in reversed(keys[:-1]):
            nested = {k: nested}
        _apply(cfg, nested)
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
