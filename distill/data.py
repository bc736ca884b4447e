"""Training data: 2D slices (of 2D cases and of 3D volumes) with their masks, balanced by modality.

Sources (``data.train`` / ``data.val`` in the configs) are a list of entries, each one of:

* a folder with ``imgs/`` and ``gts/`` sub-folders (the layout of ``demo/data`` and of
  ``lapsam distill prepare``),
* a folder of image npz files whose references are in a sibling ``gts/`` folder,
* one image npz (reference in ``../gts/<name>.npz``, or a ``gts`` key in the same file).

Every image goes through :func:`lapsam.preprocess.preprocess_image` with the student's
:class:`~lapsam.manifest.Preprocessing`, so training sees exactly what the runtime feeds the
encoder. Randomness (augmentation, prompts) comes from ``numpy.random.default_rng((seed,
epoch, index))``: a sample is a pure function of those three numbers, which makes resume
and DDP runs reproducible.
"""

from __future__ import annotations

import logging
import math
import re
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lapsam.manifest import Preprocessing
from lapsam.modality import parse_modality
from lapsam.preprocess import crop_window, ellipsoid_section, preprocess_image, resize_2d
from lapsam.safe_npz import load_npz

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CaseFiles:
    name: str
    image: Path
    gt: Path | None  # None: the ``gts`` key is in the image file
    modality: str


def case_group(name: str) -> str:
    """Source group of a case: its name without the last ``_``-separated part.

    ``2DBox_US_BUSI_10089`` -> ``2DBox_US_BUSI``; ``3DBox_CT_Lesion_000001_02_01_008-023`` ->
    ``3DBox_CT_Lesion_000001_02_01`` (names without a source part are their own group).
    """
    stem = name[:-4] if name.endswith(".npz") else name
    return stem.rsplit("_", 1)[0] if stem.count("_") >= 2 else stem


_PATIENT = re.compile(r"(STS\d+|pat\d+|P\d+)")


def case_patient(name: str) -> str:
    """A key shared by the cases of one patient (or one image tile), for patient-wise splits.

    Cross-group ids (``STS012`` of the IBSI sarcoma PET/CT/MR groups, ``pat0003`` of BraTS
    FLAIR/T1c) are keys on their own; otherwise ``group/id`` with the slice number after a
    ``-`` dropped (``CURVAS_10001-458`` and ``CURVAS_10001-650`` are one patient) and the
    ``flipped-`` / ``rotated-N-`` prefixes of augmented copies removed.
    """
    stem = name[:-4] if name.endswith(".npz") else name
    group = case_group(stem)
    ident = stem[len(group) + 1:] if stem != group else stem
    ident = re.sub(r"^(flipped-|rotated-\d+-)", "", ident)
    m = _PATIENT.search(ident)
    if m:
        key = m.group(1)
        return key if key.startswith(("STS", "pat")) else f"{group}/{key}"
    head = ident.split("-", 1)[0]
    return f"{group}/{head if head.isdigit() else ident}"


def _gt_for(img: Path) -> Path | None:
    cand = img.parent.parent / "gts" / img.name
    return cand if cand.is_file() else None


def find_cases(entries: Sequence[str | Path]) -> list[CaseFiles]:
    """Resolve source entries (see module doc) to image/reference file pairs, sorted by name."""
    out: dict[str, CaseFiles] = {}
    for e in entries:
        p = Path(e)
        if p.is_dir() and (p / "imgs").is_dir():
            files = sorted((p / "imgs").glob("*.npz"))
        elif p.is_dir():
            files = sorted(p.glob("*.npz"))
        elif p.is_file():
            files = [p]
        else:
            raise FileNotFoundError(f"training data {p} does not exist")
        for f in files:
            if f.name.startswith("."):
                continue
            gt = _gt_for(f)
            if gt is None and "gts" not in load_npz(f):
                log.warning("%s: no reference (gts) found; skipped", f)
                continue
            out[f.stem] = CaseFiles(f.stem, f, gt, parse_modality(f.stem))
    if not out:
        raise FileNotFoundError(f"no cases with references in {list(map(str, entries))}")
    return [out[k] for k in sorted(out)]


@dataclass(frozen=True)
class SliceRef:
    case: int  # index into the case list
    z: int  # slice index (-1 for 2D cases)
    modality: str


class CaseStore:
    """Loads (image, gts) of cases, keeping the last few in memory (per DataLoader worker)."""

    def __init__(self, cases: Sequence[CaseFiles], max_cached: int = 4):
        self.cases = list(cases)
        self.max_cached = max_cached
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._boxes: dict[tuple[int, int], np.ndarray | None] = {}
        self._zranges: dict[tuple[int, int], tuple[int, int]] = {}

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        c = self.cases[i]
        arrays = load_npz(c.image)
        gts = load_npz(c.gt)["gts"] if c.gt is not None else arrays["gts"]
        imgs = np.asarray(arrays["imgs"])
        if imgs.dtype != np.uint8:
            raise ValueError(f"{c.image}: imgs dtype {imgs.dtype}; training expects uint8 (run `lapsam distill prepare`)")
        spatial = imgs.shape if imgs.ndim == 3 and gts.ndim == 3 else imgs.shape[:2]
        if tuple(gts.shape) != tuple(spatial):
            raise ValueError(f"{c.gt or c.image}: gts shape {gts.shape} does not match imgs shape {imgs.shape}")
        self._cache[i] = (imgs, np.asarray(gts))
        while len(self._cache) > self.max_cached:
            self._cache.popitem(last=False)
        return self._cache[i]

    def label_box(self, i: int, v: int) -> np.ndarray | None:
        """Inclusive ``[x0, y0, x1, y1]`` of label ``v`` of case ``i`` (over all slices of a 3D case)."""
        key = (i, int(v))
        if key not in self._boxes:
            self._boxes[key] = label_union(self.get(i)[1] == v)
        return self._boxes[key]

    def label_zrange(self, i: int, v: int) -> tuple[int, int]:
        """First and last slice (inclusive) of label ``v`` of the 3D case ``i``."""
        key = (i, int(v))
        if key not in self._zranges:
            zs = np.flatnonzero((self.get(i)[1] == v).any(axis=(1, 2)))
            self._zranges[key] = (int(zs[0]), int(zs[-1])) if zs.size else (0, 0)
        return self._zranges[key]

    def is_3d(self, i: int) -> bool:
        imgs, gts = self.get(i)
        return gts.ndim == 3

    def slice(self, ref: SliceRef) -> tuple[np.ndarray, np.ndarray]:
        """(image uint8 (H, W) or (H, W, 3), labels (H, W))."""
        imgs, gts = self.get(ref.case)
        if ref.z < 0:
            return imgs, gts
        return imgs[ref.z], gts[ref.z]


def index_slices(store: CaseStore, fg_only: bool = True, slice_stride: int = 1,
                 max_slices_per_case: int | None = None) -> list[SliceRef]:
    """Slices to sample: 2D cases whole, 3D cases per slice (only slices with labels if ``fg_only``)."""
    refs: list[SliceRef] = []
    for i, c in enumerate(store.cases):
        imgs, gts = store.get(i)
        if gts.ndim == 2:
            if not fg_only or gts.any():
                refs.append(SliceRef(i, -1, c.modality))
            continue
        zs = np.arange(gts.shape[0])
        if fg_only:
            zs = zs[gts.reshape(gts.shape[0], -1).any(axis=1)]
        zs = zs[:: max(1, slice_stride)]
        if max_slices_per_case and len(zs) > max_slices_per_case:
            zs = zs[np.linspace(0, len(zs) - 1, max_slices_per_case).round().astype(int)]
        refs.extend(SliceRef(i, int(z), c.modality) for z in zs)
    return refs


def modality_weights(refs: Sequence[SliceRef], groups: Sequence[str] | None = None) -> np.ndarray:
    """Per-slice sampling weights giving every modality the same total weight.

    With ``groups`` (the source group of each ref) a modality's weight is further shared
    equally by its groups, so a group with many slices (a 3D source) does not crowd out the
    others of its modality.
    """
    mods = [r.modality for r in refs]
    keys = list(zip(mods, groups, strict=True)) if groups is not None else [(m, "") for m in mods]
    n_slices: dict[tuple[str, str], int] = {}
    for k in keys:
        n_slices[k] = n_slices.get(k, 0) + 1
    n_groups: dict[str, int] = {}
    for m, _g in n_slices:
        n_groups[m] = n_groups.get(m, 0) + 1
    w = np.array([1.0 / (n_groups[k[0]] * n_slices[k]) for k in keys], np.float64)
    return w / w.sum()


class DistributedWeightedSampler:
    """Weighted sampling with replacement, split across DDP ranks (each rank a disjoint slice).

    Call :meth:`set_epoch` like ``DistributedSampler``: each epoch draws a fresh, seeded sequence.
    """

    def __init__(self, weights: np.ndarray, num_samples: int, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        self.weights = np.asarray(weights, np.float64)
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.epoch = 0
        self.num_samples = int(math.ceil(num_samples / num_replicas))
        self.total_size = self.num_samples * num_replicas

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng((self.seed, self.epoch, 7))
        idx = rng.choice(len(self.weights), size=self.total_size, replace=True, p=self.weights / self.weights.sum())
        return iter(idx[self.rank:: self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples


def _to_chw(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x[0])


class FeatureSliceDataset:
    """Stage 1 items: ``image`` (3, S, S) student input, ``teacher_image`` (3, T, T), ``index``.

    No augmentation: an item is fixed, so the teacher's features of item i can be cached.
    """

    def __init__(self, store: CaseStore, refs: Sequence[SliceRef], pp: Preprocessing,
                 teacher_pp: Preprocessing | None = None):
        self.store, self.refs, self.pp, self.teacher_pp = store, list(refs), pp, teacher_pp
        self.with_teacher_image = teacher_pp is not None
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.refs)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, i: int) -> dict:
        img, _ = self.store.slice(self.refs[i])
        x, _ = preprocess_image(img, self.pp)
        item = {"image": _to_chw(x), "index": i}
        if self.with_teacher_image and self.teacher_pp is not None:
            t, _ = preprocess_image(img, self.teacher_pp)
            item["teacher_image"] = _to_chw(t)
        return item


@dataclass
class AugmentConfig:
    enabled: bool = True
    hflip: float = 0.5
    vflip: float = 0.2
    rotate_deg: float = 15.0
    scale: tuple[float, float] = (0.85, 1.15)
    shift: float = 0.08  # fraction of the input size
    affine_prob: float = 0.5
    intensity_prob: float = 0.5
    brightness: float = 0.1  # fraction of 255
    contrast: tuple[float, float] = (0.85, 1.15)
    gamma: tuple[float, float] = (0.8, 1.25)
    # With the model's Preprocessing.crop_context > 0: crop with the runtime's rule (the labels'
    # union, or with crop_mode "box" one object's own window with that object as the only
    # target), context scaled by a random factor in crop_scale, with this probability.
    crop_prob: float = 0.0
    crop_scale: tuple[float, float] = (0.75, 1.5)


@dataclass
class PromptConfig:
    box_prob: float = 1.0  # otherwise clicks only
    box_jitter: float = 0.1  # each box side moves by up to this fraction of the box size
    box_jitter_max_px: float = 20.0  # ... and at most this many input pixels
    point_prob: float = 0.3  # add clicks to the box
    max_points: int = 3
    objects_per_image: int = 1
    min_pixels: int = 4  # at input size: smaller objects are not sampled
    # 3D slices: prompt with the object's box on a slice up to neighbour_max_offset away (what
    # the runtime's slice-to-slice propagation gives), with this probability.
    neighbour_box_prob: float = 0.0
    neighbour_max_offset: int = 3
    # 3D slices: prompt with the object's x/y extent over the whole volume (the given 3D box
    # that the runtime's prompt_3d "given" puts on every slice, loose near the object's ends),
    # with this probability; checked before neighbour_box_prob.
    volume_box_prob: float = 0.0
    # ... that extent as it is ("box": what prompt_3d "given" gives), or scaled to the slice's
    # cross-section of the ellipsoid inscribed in the object's 3D box ("ellipsoid": what the
    # runtime's default prompt_3d "ellipsoid" gives; lapsam.preprocess.ellipsoid_section)
    volume_box_shape: str = "box"
    # Loose boxes (users' boxes are not tight): each side moves out by up to this fraction.
    loose_box_prob: float = 0.0
    loose_box_max: float = 0.3
    # Per-box crops (crop_mode "box"): also train on the other objects whose box (x/y extent
    # over the volume for 3D) lies inside the window and whose longer side is at least this
    # fraction of the cropped object's, so that objects stay near the runtime's scale and
    # one encoded crop supervises several objects. 0: the cropped object only.
    window_neighbours: float = 0.0

    def __post_init__(self) -> None:
        if self.volume_box_shape not in ("box", "ellipsoid"):
            raise ValueError(f"prompt.volume_box_shape must be 'box' or 'ellipsoid', got {self.volume_box_shape!r}")


@dataclass
class FinetuneItemConfig:
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)


def label_union(labels: np.ndarray) -> np.ndarray | None:
    """Inclusive ``[x0, y0, x1, y1]`` of all non-zero labels of a (H, W) or (D, H, W) map (None if empty)."""
    fg = labels != 0
    if fg.ndim == 3:
        fg = fg.any(axis=0)
    rows, cols = np.flatnonzero(fg.any(axis=1)), np.flatnonzero(fg.any(axis=0))
    if rows.size == 0:
        return None
    return np.array([cols[0], rows[0], cols[-1], rows[-1]], np.int64)


def _intensity(img: np.ndarray, rng: np.random.Generator, a: AugmentConfig) -> np.ndarray:
    x = img.astype(np.float32)
    g = rng.uniform(*a.gamma)
    x = 255.0 * (x / 255.0) ** g
    c = rng.uniform(*a.contrast)
    m = float(x.mean())
    x = (x - m) * c + m + rng.uniform(-a.brightness, a.brightness) * 255.0
    return np.clip(x, 0, 255)


def _affine(x: np.ndarray, masks: np.ndarray, rng: np.random.Generator, a: AugmentConfig,
            fill: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rotate/scale/shift (3, S, S) input and (K, S, S) masks about the centre (scipy, order 1 / 0)."""
    from scipy import ndimage

    s = x.shape[-1]
    ang = np.deg2rad(rng.uniform(-a.rotate_deg, a.rotate_deg))
    sc = rng.uniform(*a.scale)
    t = rng.uniform(-a.shift, a.shift, size=2) * s
    rot = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]]) / sc
    c = np.array([(s - 1) / 2, (s - 1) / 2])
    offset = c - rot @ (c + t)
    out = np.stack([ndimage.affine_transform(x[k], rot, offset, order=1, mode="constant", cval=float(fill[k]))
                    for k in range(x.shape[0])]).astype(np.float32)
    m = np.stack([ndimage.affine_transform(masks[k], rot, offset, order=0, mode="constant", cval=0)
                  for k in range(masks.shape[0])])
    return out, m


def box_from_mask(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], np.float32)


def jitter_box(box: np.ndarray, rng: np.random.Generator, p: PromptConfig, size: int) -> np.ndarray:
    w, h = box[2] - box[0] + 1, box[3] - box[1] + 1
    lim = np.minimum(np.array([w, h, w, h], np.float32) * p.box_jitter, p.box_jitter_max_px)
    b = box + rng.uniform(-1, 1, size=4).astype(np.float32) * lim
    b = np.clip(b, 0, size - 1)
    b[2], b[3] = max(b[2], b[0]), max(b[3], b[1])
    return b.astype(np.float32)


def loosen_box(box: np.ndarray, rng: np.random.Generator, max_frac: float, size: int) -> np.ndarray:
    """Move each side outwards by up to ``max_frac`` of the box's width/height (a user's loose box)."""
    w, h = box[2] - box[0] + 1, box[3] - box[1] + 1
    grow = rng.uniform(0, max_frac, size=4).astype(np.float32) * np.array([w, h, w, h], np.float32)
    b = box + grow * np.array([-1, -1, 1, 1], np.float32)
    return np.clip(b, 0, size - 1).astype(np.float32)


def sample_points(mask: np.ndarray, box: np.ndarray | None, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` clicks: the first inside the mask, others inside (1) or outside (0) at random.

    Outside clicks are drawn from the box (or the mask's box grown by a quarter) minus the mask.
    """
    coords = np.zeros((n, 2), np.float32)
    labels = np.zeros(n, np.float32)
    fg = np.argwhere(mask)
    s = mask.shape[0]
    bb = box if box is not None else box_from_mask(mask)
    x0, y0, x1, y1 = bb.astype(int)
    pw, ph = max(2, (x1 - x0) // 4), max(2, (y1 - y0) // 4)
    region = np.zeros_like(mask, dtype=bool)
    region[max(0, y0 - ph): min(s, y1 + ph + 1), max(0, x0 - pw): min(s, x1 + pw + 1)] = True
    bg = np.argwhere(region & ~mask)
    for k in range(n):
        positive = k == 0 or bg.size == 0 or rng.random() < 0.5
        pts = fg if positive else bg
        y, x = pts[rng.integers(len(pts))]
        coords[k] = (x + 0.5, y + 0.5)
        labels[k] = 1.0 if positive else 0.0
    return coords, labels


def window_neighbours(boxes: dict[int, np.ndarray], box: np.ndarray, win: tuple[int, int, int, int],
                      min_ratio: float) -> list[int]:
    """Labels of ``boxes`` (inclusive x0, y0, x1, y1) that lie inside ``win`` (y0, y1, x0, x1, end
    exclusive) and whose longer side is at least ``min_ratio`` times that of ``box``."""
    side = float(max(box[2] - box[0], box[3] - box[1]) + 1)
    y0, y1, x0, x1 = win
    out = []
    for u, b in boxes.items():
        if b is None:
            continue
        inside = b[0] >= x0 and b[1] >= y0 and b[2] < x1 and b[3] < y1
        if inside and max(b[2] - b[0], b[3] - b[1]) + 1 >= min_ratio * side:
            out.append(int(u))
    return sorted(out)


class PromptSliceDataset:
    """Stage 2 items: augmented ``image`` (3, S, S), ``masks`` (K, S, S) of K objects, prompts.

    ``boxes`` (K, 4) and ``point_coords`` (K, P, 2) are in model-input pixels; ``point_labels``
    (K, P) uses 1 / 0 for clicks and -1 for padding (no clicks: all -1); ``has_box`` (K,).
    """

    def __init__(self, store: CaseStore, refs: Sequence[SliceRef], pp: Preprocessing,
                 cfg: FinetuneItemConfig | None = None, seed: int = 0, train: bool = True):
        self.store, self.refs, self.pp = store, list(refs), pp
        self.cfg = cfg or FinetuneItemConfig()
        self.seed, self.train, self.epoch = seed, train, 0
        self.modalities = sorted({r.modality for r in self.refs})
        mean = np.asarray(pp.pixel_mean, np.float32)
        std = np.asarray(pp.pixel_std, np.float32)
        self._black = (0.0 - mean) / std

    def __len__(self) -> int:
        return len(self.refs)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, i: int) -> dict:
        rng = np.random.default_rng((self.seed, self.epoch, i))
        a, p = self.cfg.augment, self.cfg.prompt
        img, lab = self.store.slice(self.refs[i])
        s = self.pp.input_size
        ctx = self.pp.crop_context
        ref = self.refs[i]
        volume = self.store.get(ref.case)[1] if ref.z >= 0 else None
        only: int | None = None  # the one object of a per-box crop (crop_mode "box")
        others: list[int] = []  # ... and the other objects trained in its window (window_neighbours)
        oy, ox = 0, 0  # top-left of the crop window in slice pixels
        if ctx > 0 and (not self.train or (a.enabled and rng.random() < a.crop_prob)):
            # the runtime's crop (lapsam.preprocess.box_windows), the context scaled at random
            if self.train:
                ctx *= float(rng.uniform(*a.crop_scale))
            extent = volume if volume is not None else lab
            hh, ww = lab.shape[:2]
            win = None
            present = [int(v) for v in np.unique(lab) if v != 0]
            if self.pp.crop_mode == "box" and present:
                v = present[int(rng.integers(len(present)))]
                vbox = self.store.label_box(ref.case, v)  # cached; over the whole volume for 3D
                own = crop_window(vbox, hh, ww, self.pp.crop_min_px, ctx)
                if (own[1] - own[0]) * (own[3] - own[2]) < self.pp.crop_shared_frac * hh * ww:
                    win, only = own, v
                    if self.cfg.prompt.window_neighbours > 0:
                        others = window_neighbours({u: self.store.label_box(ref.case, u) for u in present if u != v},
                                                   vbox, own, self.cfg.prompt.window_neighbours)
            if win is None:  # around the union of everything labelled (whole volume for 3D)
                win = crop_window(label_union(extent), hh, ww, s, ctx)
            y0, y1, x0, x1 = win
            oy, ox = y0, x0
            img, lab = img[y0:y1, x0:x1], lab[y0:y1, x0:x1]
            if volume is not None:
                volume = volume[:, y0:y1, x0:x1]
        if self.train and a.enabled and rng.random() < a.intensity_prob:
            img = _intensity(img, rng, a)
        x, tf = preprocess_image(img, self.pp)
        x = x[0]
        k = p.objects_per_image
        if only is not None:  # the cropped object first, then its neighbours in random order
            rng.shuffle(others)
            labels = [only, *others]
        else:
            labels = [int(v) for v in np.unique(lab) if v != 0]
            rng.shuffle(labels)

        def at_input(mask2d: np.ndarray) -> np.ndarray:
            out = np.zeros((s, s), np.uint8)
            out[: tf.new_h, : tf.new_w] = resize_2d(mask2d.astype(np.float32), (tf.new_h, tf.new_w)) >= 0.5
            return out

        # Masks at input size through the same geometry as the image (resize, then pad). A
        # neighbour slice's mask of the same object, when drawn, rides along as an extra
        # channel so that its box sees the same flips and affine transform.
        masks: list[np.ndarray] = []
        box_src: list[int] = []  # per target: the channel whose box prompts it
        extra: list[np.ndarray] = []
        for v in labels:
            m = at_input(lab == v)
            if m.sum() < p.min_pixels:
                continue
            src = len(masks)
            if self.train and volume is not None and p.volume_box_prob > 0 and rng.random() < p.volume_box_prob:
                vb = self.store.label_box(ref.case, v)  # x/y extent over every slice, slice pixels
                if vb is not None and p.volume_box_shape == "ellipsoid":
                    zs = self.store.label_zrange(ref.case, v)
                    sec = ellipsoid_section(np.array([vb[0], vb[1], zs[0], vb[2], vb[3], zs[1]]), ref.z)
                    vb = np.array([int(round(float(c))) for c in sec])
                if vb is not None:
                    rect = np.zeros(lab.shape[:2], bool)
                    rect[max(0, vb[1] - oy): max(0, vb[3] - oy + 1), max(0, vb[0] - ox): max(0, vb[2] - ox + 1)] = True
                    rect = at_input(rect)
                    if rect.any():  # rides along as an extra channel, so it sees the same flips and affine
                        extra.append(rect)
                        src = -len(extra)
            if src >= 0 and self.train and volume is not None and p.neighbour_box_prob > 0 and rng.random() < p.neighbour_box_prob:
                d = int(rng.integers(1, max(1, p.neighbour_max_offset) + 1)) * (1 if rng.random() < 0.5 else -1)
                z2 = ref.z + d
                if 0 <= z2 < volume.shape[0]:
                    nb = at_input(volume[z2] == v)
                    if nb.sum() >= 1:
                        extra.append(nb)
                        src = -len(extra)  # negative: an extra channel
            masks.append(m)
            box_src.append(src)
            if len(masks) == k + 2:
                break
        if not masks:  # every object vanished at this size: an empty target, prompt a box anyway
            masks, box_src = [np.zeros((s, s), np.uint8)], [0]
        n_t = len(masks)
        m = np.stack(masks + extra)
        if self.train and a.enabled:
            if rng.random() < a.hflip:
                x, m = x[:, :, ::-1], m[:, :, ::-1]
            if rng.random() < a.vflip:
                x, m = x[:, ::-1, :], m[:, ::-1, :]
            if rng.random() < a.affine_prob:
                x2, m2 = _affine(np.ascontiguousarray(x), np.ascontiguousarray(m), rng, a, self._black)
                if (m2[:n_t].reshape(n_t, -1).sum(1) >= p.min_pixels).any():
                    x, m = x2, m2
        targets, extras = m[:n_t], m[n_t:]
        keep = [j for j in range(n_t) if targets[j].sum() >= p.min_pixels] or [0]
        keep = keep[:k]
        order = keep + [keep[-1]] * (k - len(keep))
        boxes = np.zeros((k, 4), np.float32)
        has_box = np.zeros(k, np.float32)
        npts = p.max_points
        coords = np.zeros((k, max(1, npts), 2), np.float32)
        plabels = -np.ones((k, max(1, npts)), np.float32)
        out_masks = np.zeros((k, s, s), np.float32)
        for j, t in enumerate(order):
            mj = targets[t].astype(bool)
            out_masks[j] = mj
            if not mj.any():
                boxes[j] = (0, 0, s - 1, s - 1)
                has_box[j] = 1
                continue
            use_box = (not self.train) or rng.random() < p.box_prob
            box = box_from_mask(mj)
            if self.train and box_src[t] < 0:
                nb = extras[-box_src[t] - 1].astype(bool)
                if nb.any():
                    box = box_from_mask(nb)
            if use_box:
                if self.train:
                    box = jitter_box(box, rng, p, s)
                    if p.loose_box_prob > 0 and rng.random() < p.loose_box_prob:
                        box = loosen_box(box, rng, p.loose_box_max, s)
                boxes[j] = box
                has_box[j] = 1
            n = 0
            if self.train and npts > 0 and (not use_box or rng.random() < p.point_prob):
                n = int(rng.integers(1, npts + 1))
                c, lbl = sample_points(mj, boxes[j] if use_box else None, n, rng)
                coords[j, :n], plabels[j, :n] = c, lbl
        m = out_masks
        return {
            "image": np.ascontiguousarray(x, np.float32),
            "masks": np.ascontiguousarray(m, np.float32),
            "boxes": boxes,
            "has_box": has_box,
            "point_coords": coords,
            "point_labels": plabels,
            "modality": self.modalities.index(self.refs[i].modality),
            "index": i,
        }


def split_cases(cases: Sequence[CaseFiles], val_fraction: float, seed: int,
                val_groups: Sequence[str] = ()) -> tuple[list[CaseFiles], list[CaseFiles]]:
    """Hold cases back for validation: whole source groups, then a fraction of the patients of each group.

    ``val_groups``: every case whose :func:`case_group` contains one of these strings is
    held back (sources never seen in training). ``val_fraction``: in every other group with
    at least two patients (:func:`case_patient`), whole patients are held back until about
    that fraction of the group's cases is (at least one patient; never one that holds over
    half of its group), with all their cases in every group, so no patient is on both sides.
    """
    held_groups = {c.name for c in cases if any(g and g in case_group(c.name) for g in val_groups)}
    rest = [c for c in cases if c.name not in held_groups]
    held_patients: set[str] = set()
    if val_fraction > 0:
        rng = np.random.default_rng(seed)
        by_group: dict[str, dict[str, int]] = {}
        for c in rest:
            pats = by_group.setdefault(case_group(c.name), {})
            pats[case_patient(c.name)] = pats.get(case_patient(c.name), 0) + 1
        for g in sorted(by_group):
            counts = by_group[g]
            pats = sorted(counts)
            if len(pats) < 2:
                continue
            n_cases = sum(counts.values())
            target = max(1, int(round(val_fraction * n_cases)))
            held = 0
            for j in rng.permutation(len(pats)):
                # no patient that holds most of its group's cases: the group stays trainable
                if held >= target or counts[pats[j]] * 2 > n_cases:
                    continue
                held_patients.add(pats[j])
                held += counts[pats[j]]
    train = [c for c in rest if case_patient(c.name) not in held_patients]
    val = [c for c in cases if c.name in held_groups or case_patient(c.name) in held_patients]
    return sorted(train, key=lambda c: c.name), sorted(val, key=lambda c: c.name)


@dataclass
class SliceSplit:
    """Training and validation cases with their slice indexes, as both stages use them."""

    store: CaseStore
    refs: list
    val_store: CaseStore
    val_refs: list


def build_split(data_cfg: Any, seed: int, fg_only: bool, slice_stride: int, val_slice_stride: int) -> SliceSplit:
    """Cases from ``data_cfg.train`` (validation from ``data_cfg.val``, else a held-back fraction), indexed."""
    cases = find_cases(data_cfg.train)
    if data_cfg.val:
        train_cases, val_cases = cases, find_cases(data_cfg.val)
    else:
        train_cases, val_cases = split_cases(cases, data_cfg.val_fraction, seed, getattr(data_cfg, "val_groups", ()))
    store = CaseStore(train_cases, data_cfg.cached_cases)
    refs = index_slices(store, fg_only, slice_stride, data_cfg.max_slices_per_case)
    val_store = CaseStore(val_cases, data_cfg.cached_cases)
    val_refs = index_slices(val_store, fg_only, val_slice_stride, data_cfg.val_max_slices_per_case) if val_cases else []
    return SliceSplit(store, refs, val_store, val_refs)
