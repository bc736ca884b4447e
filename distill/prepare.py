"""``lapsam distill prepare``: medical volumes + label maps -> challenge-format npz.

Readers: SimpleITK for NIfTI (``.nii``/``.nii.gz``), NRRD (``.nrrd``/``.nhdr``), MetaImage and
DICOM (a folder holding one series, read with ``ImageSeriesReader``, or a single file);
pydicom reads the DICOM ``Modality`` tag when no modality is given. The label map is read the
same way and must have the image's size.

Intensity (as MedSAM's ``pre_CT_MR.py``): CT is windowed (level/width, default 40/400) and
scaled to 0..255; MR, PET and other modalities are clipped to the 0.5..99.5 percentiles of
their non-zero voxels and scaled to 0..255. Labels: connected pieces of each label smaller than
``min_size_3d`` voxels (3D) are removed, then, per slice, pieces smaller than
``min_size_slice`` pixels; the surviving labels are renumbered 1..N (box i = label i).
With ``crop_z`` only the slices holding a label are kept.

Output (the layout of ``demo/data``): ``OUT/imgs/<name>.npz`` with ``imgs`` uint8 (D, H, W)
(or (H, W, 3) for a one-slice image), ``boxes`` (N, 6) ``[x_min, y_min, z_min, x_max, y_max,
z_max]`` (or (N, 4)) and ``spacing`` (x, y, z), and ``OUT/gts/<name>.npz`` with ``gts`` and
``spacing``. Names are ``3DBox_<MOD>_<stem>`` / ``2DBox_<MOD>_<stem>``. Files are written
atomically; a case that fails is reported and the others still complete.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lapsam.writers import atomic_savez

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")


@dataclass
class PrepareConfig:
    modality: str | None = None  # CT, MR, PET, ... ; None: from DICOM tags, else required
    window_level: float = 40.0
    window_width: float = 400.0
    percentiles: tuple[float, float] = (0.5, 99.5)
    min_size_3d: int = 1000
    min_size_slice: int = 100
    crop_z: bool = True
    prefix: str = ""  # added before the stem in the output name


@dataclass
class Volume:
    array: np.ndarray  # (D, H, W)
    spacing: tuple[float, float, float]  # (x, y, z), SimpleITK order
    modality: str | None = None


def _stem(path: Path) -> str:
    name = path.name
    for suf in IMAGE_SUFFIXES:
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return path.stem


def _dicom_modality(path: Path) -> str | None:
    import pydicom

    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - not every file in a folder is DICOM
            continue
        mod = str(getattr(ds, "Modality", "") or "").upper()
        if mod:
            return {"PT": "PET", "MRI": "MR"}.get(mod, mod)
    return None


def read_volume(path: str | Path) -> Volume:
    """Read NIfTI / NRRD / MetaImage / DICOM (file or series folder) as (D, H, W) + spacing (x, y, z)."""
    import SimpleITK as sitk

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    modality = None
    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        ids = reader.GetGDCMSeriesIDs(str(path))
        if not ids:
            raise ValueError(f"{path}: no DICOM series in this folder")
        if len(ids) > 1:
            log.warning("%s: %d DICOM series, using the first (%s)", path, len(ids), ids[0])
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path), ids[0]))
        img = reader.Execute()
        modality = _dicom_modality(path)
    else:
        img = sitk.ReadImage(str(path))
        if path.suffix.lower() == ".dcm":
            modality = _dicom_modality(path)
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{path}: {img.GetNumberOfComponentsPerPixel()} components per pixel; expected a scalar image")
    arr = sitk.GetArrayFromImage(img)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"{path}: image has {arr.ndim} dimensions; expected 2 or 3")
    sp = tuple(float(s) for s in img.GetSpacing())
    if len(sp) == 2:
        sp = (sp[0], sp[1], 1.0)
    return Volume(arr, sp[:3], modality)  # type: ignore[arg-type]


def normalise_intensity(arr: np.ndarray, modality: str, cfg: PrepareConfig) -> np.ndarray:
    """CT window or percentile clip, scaled to uint8 0..255."""
    a = arr.astype(np.float32)
    if modality.upper() == "CT":
        lo = cfg.window_level - cfg.window_width / 2
        hi = cfg.window_level + cfg.window_width / 2
    else:
        fg = a[a > 0]
        ref = fg if fg.size else a.ravel()
        lo, hi = (float(v) for v in np.percentile(ref, cfg.percentiles))
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    a = (np.clip(a, lo, hi) - lo) * (255.0 / (hi - lo))
    if modality.upper() != "CT":
        a[arr == 0] = 0
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def _remove_small(mask: np.ndarray, min_size: int) -> np.ndarray:
    from scipy import ndimage

    if min_size <= 1 or not mask.any():
        return mask
    lab, n = ndimage.label(mask)
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    keep = sizes >= min_size
    keep[0] = False
    return keep[lab]


def clean_labels(gt: np.ndarray, cfg: PrepareConfig) -> np.ndarray:
    """Remove small pieces (3D then per slice) and renumber the remaining labels 1..N."""
    out = np.zeros(gt.shape, np.uint16)
    n = 0
    for lab in np.unique(gt):
        if lab == 0:
            continue
        m = gt == lab
        if gt.shape[0] > 1:
            m = _remove_small(m, cfg.min_size_3d)
        for z in np.nonzero(m.any(axis=(1, 2)))[0]:
            m[z] = _remove_small(m[z], cfg.min_size_slice)
        if m.any():
            n += 1
            out[m] = n
    return out.astype(np.uint8) if n <= 255 else out


def boxes_from_labels(gt: np.ndarray) -> np.ndarray:
    """Tight inclusive boxes (N, 6) ``[x0, y0, z0, x1, y1, z1]`` of labels 1..N of a (D, H, W) map."""
    n = int(gt.max(initial=0))
    boxes = np.zeros((n, 6), np.int64)
    for i in range(1, n + 1):
        z, y, x = np.nonzero(gt == i)
        if z.size:
            boxes[i - 1] = [x.min(), y.min(), z.min(), x.max(), y.max(), z.max()]
    return boxes


def convert_case(image: str | Path, label: str | Path, out_dir: str | Path, cfg: PrepareConfig) -> Path | None:
    """Convert one image + label map; returns the image npz path, or None when no label survives."""
    image, label, out_dir = Path(image), Path(label), Path(out_dir)
    vol = read_volume(image)
    lab = read_volume(label)
    if vol.array.shape != lab.array.shape:
        raise ValueError(f"{label}: label shape {lab.array.shape} differs from image shape {vol.array.shape}")
    modality = cfg.modality or vol.modality
    if not modality:
        raise ValueError(f"{image}: modality unknown; pass --modality CT|MR|PET|...")
    modality = modality.upper()
    if not np.issubdtype(lab.array.dtype, np.integer):
        if not np.all(np.floor(lab.array) == lab.array):
            raise ValueError(f"{label}: label map has non-integer values")
    gt = clean_labels(lab.array.astype(np.int64), cfg)
    if gt.max() == 0:
        log.warning("%s: no label left after removing small objects; skipped", label)
        return None
    imgs = normalise_intensity(vol.array, modality, cfg)
    if cfg.crop_z and imgs.shape[0] > 1:
        zs = np.nonzero(gt.any(axis=(1, 2)))[0]
        imgs, gt = imgs[zs.min(): zs.max() + 1], gt[zs.min(): zs.max() + 1]
    stem = cfg.prefix + _stem(image)
    spacing = np.asarray(vol.spacing, np.float64)
    boxes = boxes_from_labels(gt)
    if imgs.shape[0] == 1:
        name = f"2DBox_{modality}_{stem}"
        imgs_out = np.repeat(imgs[0][:, :, None], 3, axis=2)
        gts_out = gt[0]
        boxes = boxes[:, [0, 1, 3, 4]]
        spacing = np.ones(3, np.float64)
    else:
        name = f"3DBox_{modality}_{stem}"
        imgs_out, gts_out = imgs, gt
    img_path = out_dir / "imgs" / f"{name}.npz"
    gt_path = out_dir / "gts" / f"{name}.npz"
    atomic_savez(gt_path, gts=gts_out, spacing=spacing)
    try:
        atomic_savez(img_path, imgs=imgs_out, boxes=boxes, spacing=spacing)
    except BaseException:
        gt_path.unlink(missing_ok=True)
        raise
    log.info("%s: %s %s, %d objects", name, modality, imgs_out.shape, boxes.shape[0])
    return img_path


def _find_images(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist")
    found = sorted(p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES[:-1]))
    # Sub-folders holding DICOM series count as one image each.
    found += sorted(p for p in path.iterdir() if p.is_dir())
    return found


def pair_images_labels(images: Path, labels: Path) -> list[tuple[Path, Path]]:
    """Pairs (image, label): one case (a label *file*), or two folders matched by stem (``_0000`` ignored)."""
    if images.is_file() or labels.is_file():
        # One case: an image file (or a DICOM series folder) and its label map file.
        return [(images, labels)]
    labs = {_stem(p): p for p in _find_images(labels)}
    pairs = []
    for img in _find_images(images):
        stem = _stem(img)
        key = stem if stem in labs else (stem[:-5] if stem.endswith("_0000") and stem[:-5] in labs else None)
        if key is None:
            log.error("%s: no label map named %s in %s", img, stem, labels)
            continue
        pairs.append((img, labs[key]))
    return pairs


def prepare(images: str | Path, labels: str | Path, out_dir: str | Path, cfg: PrepareConfig,
            progress: bool = True) -> tuple[list[Path], list[str]]:
    """Convert every pair; returns (written image npz paths, error messages)."""
    from tqdm import tqdm

    written: list[Path] = []
    errors: list[str] = []
    for img, lab in tqdm(pair_images_labels(Path(images), Path(labels)), desc="prepare", unit="case",
                         disable=not progress):
        try:
            out = convert_case(img, lab, out_dir, cfg)
        except Exception as exc:  # noqa: BLE001 - report this case, continue with the others
            msg = str(exc) if str(exc).startswith(str(img)) else f"{img}: {exc}"
            log.error("%s", msg)
            errors.append(msg)
            continue
        if out is not None:
            written.append(out)
    return written, errors
