"""The model manifest: the contract between export (writes it) and runtime (reads it).

``models/NAME/manifest.json`` records how images are preprocessed, the tensor names and
shapes of the encoder and decoder graphs, and each exported file with its backend,
precision and sha256. The runtime refuses a file whose sha256 does not match.

Graph contract (all float32 unless noted; S = input size, E = S // 16, L = 4 * E):

encoder  ``image`` (1, 3, S, S), already resized/padded/normalised
         -> ``image_embed`` (1, 256, E, E)  (SAM2's ``no_mem_embed`` already added)
            ``high_res_feats_0`` (1, 32, 4E, 4E), ``high_res_feats_1`` (1, 64, 2E, 2E)
decoder  the three encoder outputs, plus
         ``boxes`` (B, 4) xyxy in model-input pixels (B dynamic: all objects at once; a row
         of -1s: no box, the prompt is its clicks alone),
         ``point_coords`` (B, P, 2) xy in model-input pixels, ``point_labels`` (B, P)
         (1 foreground, 0 background, -1 padding; P dynamic, may be 0),
         ``mask_input`` (B, 1, L, L) logits of a previous mask, ``has_mask_input`` (B,)
         -> ``masks`` (B, 1, L, L) low-res mask logits, ``iou_predictions`` (B, 1)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import ModelIntegrityError

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1

ENCODER_INPUT = "image"
ENCODER_OUTPUTS: tuple[str, ...] = ("image_embed", "high_res_feats_0", "high_res_feats_1")
DECODER_INPUTS: tuple[str, ...] = ENCODER_OUTPUTS + (
    "boxes",
    "point_coords",
    "point_labels",
    "mask_input",
    "has_mask_input",
)
DECODER_OUTPUTS: tuple[str, ...] = ("masks", "iou_predictions")

ROLES = ("encoder", "decoder")
BACKENDS = ("onnx", "openvino")
PRECISIONS = ("fp32", "fp16", "int8")
RESIZE_RULES = ("stretch", "longest_side")

IMAGENET_MEAN_255 = (123.675, 116.28, 103.53)
IMAGENET_STD_255 = (58.395, 57.12, 57.375)


CROP_MODES = ("union", "box")
FILL_SHAPES = ("box", "ellipse")


@dataclass
class Preprocessing:
    """How an image becomes the encoder input; shared by distill, export and runtime.

    ``stretch``: resize H x W to S x S (SAM2's own rule, aspect not kept).
    ``longest_side``: scale so the longest side is S, keep aspect, pad bottom/right with 0
    after normalisation (MedSAM's rule).
    Images are resized like SAM2's torchvision ``Resize`` (bilinear, antialiased), reproduced
    in numpy by ``lapsam.preprocess``. Pixel mean/std are in 0..255 units, per RGB channel.
    ``crop_context`` > 0: before that, the image (every slice of a 3D case) is cropped to a
    square window around the union of the case's boxes, ``crop_context`` times the union's
    longer side and never smaller than ``input_size`` pixels (so small objects keep their
    pixels; :func:`lapsam.preprocess.crop_window`); 0: the whole image.
    ``crop_mode`` ``"box"``: each box gets its own window instead (``crop_context`` times the
    box's longer side, at least ``crop_min_px`` pixels, so a small object is enlarged to fill
    the input); boxes whose window would cover at least ``crop_shared_frac`` of the image share
    one encoding of the union window (:func:`lapsam.preprocess.box_windows`).
    ``min_mask_fill`` > 0 (a post-processing rule of the export): on 2D boxes, a mask that covers
    less than this fraction of its box is replaced by the whole box (the model is unsure, and
    the box is the safer answer); 0: off. ``fill_shape`` ``"ellipse"``: by the ellipse inscribed
    in the box instead (most objects are round-ish blobs: it overlaps them better than the box's
    corners do).
    """

    input_size: int = 1024
    resize: str = "stretch"
    pixel_mean: tuple[float, float, float] = IMAGENET_MEAN_255
    pixel_std: tuple[float, float, float] = IMAGENET_STD_255
    mask_threshold: float = 0.0
    crop_context: float = 0.0
    crop_mode: str = "union"
    crop_min_px: int = 64
    crop_shared_frac: float = 0.5
    min_mask_fill: float = 0.0
    fill_shape: str = "box"

    def __post_init__(self) -> None:
        if self.crop_context < 0:
            raise ValueError(f"crop_context must be >= 0, got {self.crop_context}")
        if self.crop_mode not in CROP_MODES:
            raise ValueError(f"crop_mode must be one of {CROP_MODES}, got {self.crop_mode!r}")
        if not 0.0 <= self.min_mask_fill <= 1.0:
            raise ValueError(f"min_mask_fill must lie in [0, 1], got {self.min_mask_fill}")
        if self.fill_shape not in FILL_SHAPES:
            raise ValueError(f"fill_shape must be one of {FILL_SHAPES}, got {self.fill_shape!r}")
        if self.crop_min_px < 1 or not 0 < self.crop_shared_frac <= 1:
            raise ValueError(f"crop_min_px must be >= 1 and crop_shared_frac in (0, 1]; got "
                             f"{self.crop_min_px}, {self.crop_shared_frac}")
        if self.resize not in RESIZE_RULES:
            raise ValueError(f"resize must be one of {RESIZE_RULES}, got {self.resize!r}")
        if self.input_size % 16:
            raise ValueError(f"input_size must be a multiple of 16, got {self.input_size}")
        self.pixel_mean = tuple(float(v) for v in self.pixel_mean)  # type: ignore[assignment]
        self.pixel_std = tuple(float(v) for v in self.pixel_std)  # type: ignore[assignment]

    @property
    def embed_size(self) -> int:
        return self.input_size // 16

    @property
    def low_res_size(self) -> int:
        return 4 * self.embed_size


@dataclass
class ModelFile:
    """One exported graph. ``files`` maps every file it needs (an IR has .xml + .bin) to its sha256."""

    role: str
    backend: str
    precision: str
    path: str
    files: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.role not in ROLES or self.backend not in BACKENDS or self.precision not in PRECISIONS:
            raise ValueError(f"bad model file entry: {self.role}/{self.backend}/{self.precision}")


@dataclass
class ModelManifest:
    name: str
    preprocessing: Preprocessing
    files: list[ModelFile] = field(default_factory=list)
    backbone: str = ""
    teacher: str | None = None
    tensors: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION

    # ---- selection -------------------------------------------------------------------
    def find(self, role: str, backend: str, precision: str = "fp32") -> ModelFile:
        for f in self.files:
            if (f.role, f.backend, f.precision) == (role, backend, precision):
                return f
        have = sorted({(f.role, f.backend, f.precision) for f in self.files})
        raise KeyError(f"no {role} for backend={backend} precision={precision}; manifest has {have}")

    def variants(self) -> list[tuple[str, str]]:
        """(backend, precision) pairs that have both an encoder and a decoder."""
        enc = {(f.backend, f.precision) for f in self.files if f.role == "encoder"}
        dec = {(f.backend, f.precision) for f in self.files if f.role == "decoder"}
        out = []
        for be, pr in sorted(enc):
            if (be, pr) in dec or (be, "fp32") in dec:
                out.append((be, pr))
        return out

    # ---- (de)serialisation -----------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelManifest:
        if not isinstance(d, dict):
            raise ValueError("manifest must be a JSON object")
        version = d.get("schema_version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise ValueError(f"manifest schema_version {version} is not supported (expected {SCHEMA_VERSION})")
        for key in ("name", "preprocessing", "files"):
            if key not in d:
                raise ValueError(f"manifest lacks '{key}'")
        pp = d["preprocessing"]
        return cls(
            name=str(d["name"]),
            preprocessing=Preprocessing(**pp),
            files=[ModelFile(**f) for f in d["files"]],
            backbone=d.get("backbone", ""),
            teacher=d.get("teacher"),
            tensors=d.get("tensors", {}),
            versions=d.get("versions", {}),
            notes=list(d.get("notes", [])),
            schema_version=version,
        )

    def save(self, model_dir: str | Path) -> Path:
        path = Path(model_dir) / MANIFEST_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")
        return path

    @classmethod
    def load(cls, model_dir: str | Path) -> ModelManifest:
        model_dir = Path(model_dir)
        path = model_dir / MANIFEST_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{model_dir}: no {MANIFEST_NAME} (is this an exported lapsam model folder?)")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON: {exc}") from None
        return cls.from_dict(data)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fp:
        while block := fp.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_file(model_dir: str | Path, entry: ModelFile) -> None:
    """Check every file of ``entry`` against its recorded sha256."""
    model_dir = Path(model_dir)
    for rel, digest in entry.files.items():
        p = model_dir / rel
        if not p.is_file():
            raise ModelIntegrityError(f"{p}: missing (listed in {MANIFEST_NAME})")
        actual = sha256_file(p)
        if actual != digest:
            raise ModelIntegrityError(
                f"{p}: sha256 {actual[:12]}... does not match the manifest ({digest[:12]}...): file corrupt or replaced"
            )
