"""Images in, masks out: the formats of ``lapsam app`` and ``lapsam segment``.

Inputs (:func:`open_image`):

* challenge ``.npz`` (2024 box and 2025 interactive formats), read with :func:`lapsam.case.load_case`
  (no unrestricted unpickling);
* NIfTI ``.nii`` / ``.nii.gz`` with nibabel (the header and affine are kept to write masks back);
* DICOM: a folder holding a series (SimpleITK's ``ImageSeriesReader``; the largest series when
  there are several) or one ``.dcm`` file;
* ``.png`` / ``.jpg`` / ``.jpeg`` with Pillow (8-bit images as RGB, 16-bit ones as grey values).

Arrays are held as SimpleITK and the challenge's npz hold them: 3D (D, H, W) = (z, y, x), so a box
``[x0, y0, z0, x1, y1, z1]`` means the same voxels in every format (a NIfTI's (x, y, z) array is
transposed). 2D colour images are (1, H, W, 3) uint8.

The model sees uint8 images; :class:`Window` maps stored values to 0..255 exactly as
``lapsam distill prepare`` made the training data: CT by a level/width window (default 40/400),
other modalities by the 0.5..99.5 percentiles of the non-zero voxels (zeros stay 0). uint8
images (challenge npz, PNG, JPG) are used as stored.

Outputs (:func:`mask_bytes`, :func:`write_mask`): NIfTI with the input's geometry (NIfTI input:
its own header and affine; DICOM: its origin, spacing and direction; npz: its spacing), challenge
``segs`` npz, or a label PNG (values = labels; for a 3D image one slice).

Bad input raises :class:`~lapsam.errors.CaseError` (one line naming the file); an image that would
not fit in memory raises :class:`ImageTooLarge` before it is read.
"""

from __future__ import annotations

import gzip
import io
import logging
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lapsam.case import Case, load_case, segs_dtype
from lapsam.errors import CaseError, LapsamError, UsageError
from lapsam.writers import atomic_write

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg")
DICOM_SUFFIXES = (".dcm", ".dicom")
MASK_FORMATS = ("nii.gz", "nii", "npz", "png")
SUPPORTED = "challenge .npz, NIfTI (.nii, .nii.gz), a DICOM series folder or .dcm file, PNG, JPG"
MEMORY_FRACTION = 0.8  # an image may use at most this fraction of the memory available at open time


class ImageTooLarge(LapsamError):
    """The image would not fit in the memory this process may use."""


# ---- intensity windows ------------------------------------------------------------------
@dataclass(frozen=True)
class Window:
    """How stored values become the uint8 image the model (and the page) sees.

    ``kind``: ``"stored"`` (uint8 data as it is), ``"level"`` (``level`` +- ``width``/2 -> 0..255),
    ``"percentile"`` (0.5..99.5 percentiles of the non-zero voxels -> 0..255, zeros stay 0),
    ``"range"`` (min..max -> 0..255).
    """

    name: str
    label: str
    kind: str
    level: float = 0.0
    width: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "label": self.label, "kind": self.kind, "level": self.level, "width": self.width}


STORED = Window("stored", "as stored (uint8)", "stored")
PERCENTILE = Window("percentile", "MR/PET/other: 0.5-99.5 percentile", "percentile")
FULL_RANGE = Window("range", "full range (min-max)", "range")
CT_PRESETS = (
    Window("ct-soft", "CT soft tissue (L40 W400)", "level", 40.0, 400.0),
    Window("ct-lung", "CT lung (L-600 W1500)", "level", -600.0, 1500.0),
    Window("ct-bone", "CT bone (L400 W1800)", "level", 400.0, 1800.0),
    Window("ct-brain", "CT brain (L40 W80)", "level", 40.0, 80.0),
    Window("ct-liver", "CT liver (L30 W150)", "level", 30.0, 150.0),
)
PERCENTILES = (0.5, 99.5)


def window_names() -> list[str]:
    return [w.name for w in (STORED, PERCENTILE, FULL_RANGE, *CT_PRESETS)]


def parse_window(text: str) -> Window:
    """A preset name (``ct-soft``, ``percentile``, ...) or ``LEVEL,WIDTH`` (e.g. ``50,350``)."""
    for w in (STORED, PERCENTILE, FULL_RANGE, *CT_PRESETS):
        if text == w.name:
            return w
    try:
        level, width = (float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"window {text!r}: use one of {', '.join(window_names())} or LEVEL,WIDTH") from None
    if not (np.isfinite(level) and np.isfinite(width)) or width <= 0:
        raise UsageError(f"window {text!r}: the width must be a positive number")
    return Window(f"{level:g},{width:g}", f"custom (L{level:g} W{width:g})", "level", level, width)


def to_uint8(arr: np.ndarray, lo: float, hi: float, keep_zero: bool = False, chunk: int = 16) -> np.ndarray:
    """``clip(arr, lo, hi)`` scaled to 0..255 and rounded (slabs of ``chunk`` slices, float32)."""
    out = np.zeros(arr.shape, np.uint8)
    if hi <= lo:
        return out
    scale = np.float32(255.0 / (hi - lo))
    flat_in = arr.reshape((-1, *arr.shape[-2:])) if arr.ndim >= 2 else arr.reshape(1, -1)
    flat_out = out.reshape(flat_in.shape)
    for s in range(0, flat_in.shape[0], chunk):
        src = flat_in[s : s + chunk]
        a = src.astype(np.float32)
        np.clip(a, lo, hi, out=a)
        a -= np.float32(lo)
        a *= scale
        if keep_zero:
            a[src == 0] = 0
        np.rint(a, out=a)
        np.clip(a, 0, 255, out=a)
        flat_out[s : s + chunk] = a.astype(np.uint8)
    return out


# ---- the image --------------------------------------------------------------------------
@dataclass
class Volume:
    """An opened image: its values, geometry and how masks are written back."""

    name: str
    data: np.ndarray  # (D, H, W) scalar, or (1, H, W, 3) uint8 colour
    is_3d: bool
    source: str  # "npz" | "nifti" | "dicom" | "picture"
    path: Path | None = None
    spacing: tuple[float, float, float] | None = None  # x, y, z (the challenge npz order)
    modality: str | None = None
    case: Case | None = None  # npz inputs: the validated case (boxes / clicks of the file)
    nifti: Any = None  # NIfTI inputs: the nibabel image (header and affine; its data is not kept)
    nifti_shape: tuple[int, ...] | None = None
    itk: dict[str, Any] | None = None  # DICOM inputs: origin, spacing, direction, array shape
    warnings: list[str] = field(default_factory=list)
    _percentiles: tuple[float, float] | None = None
    _range: tuple[float, float] | None = None

    @property
    def rgb(self) -> bool:
        return self.data.ndim == 4

    @property
    def depth(self) -> int:
        return int(self.data.shape[0])

    @property
    def height(self) -> int:
        return int(self.data.shape[1])

    @property
    def width(self) -> int:
        return int(self.data.shape[2])

    @property
    def mask_shape(self) -> tuple[int, ...]:
        """Shape of the saved mask: (D, H, W) for 3D, (H, W) for 2D."""
        return (self.depth, self.height, self.width) if self.is_3d else (self.height, self.width)

    # windows
    def windows(self) -> list[Window]:
        if self.data.dtype == np.uint8:
            return [STORED, PERCENTILE, FULL_RANGE] if not self.rgb else [STORED]
        return [*CT_PRESETS, PERCENTILE, FULL_RANGE]

    def default_window(self) -> Window:
        if self.data.dtype == np.uint8:
            return STORED
        if (self.modality or "").upper() == "CT":
            return CT_PRESETS[0]
        if self.modality is None and self.value_range()[0] <= -500:  # air at -1000 HU: a CT
            return CT_PRESETS[0]
        return PERCENTILE

    def value_range(self) -> tuple[float, float]:
        if self._range is None:
            self._range = (float(self.data.min()), float(self.data.max()))
        return self._range

    def bounds(self, window: Window) -> tuple[float, float, bool]:
        """(lo, hi, keep_zero) of ``window`` on this image."""
        if window.kind == "level":
            return window.level - window.width / 2, window.level + window.width / 2, False
        if window.kind == "percentile":
            if self._percentiles is None:
                step = max(1, self.data.size // 20_000_000)  # at most ~20 M samples
                flat = self.data.reshape(-1)[::step]
                fg = flat[flat > 0]
                ref = fg if fg.size else flat
                lo, hi = (float(v) for v in np.percentile(ref, PERCENTILES))
                self._percentiles = (lo, hi)
            return self._percentiles[0], self._percentiles[1], True
        if window.kind == "range":
            lo, hi = self.value_range()
            return lo, hi, False
        return 0.0, 255.0, False

    def slice_u8(self, z: int, window: Window) -> np.ndarray:
        """The uint8 image of slice ``z``: (H, W) grey or (H, W, 3) colour."""
        img = self.data[z]
        if window.kind == "stored" and img.dtype == np.uint8:
            return img
        lo, hi, keep = self.bounds(window)
        return to_uint8(img, lo, hi, keep)

    def volume_u8(self, window: Window) -> np.ndarray:
        """Every slice through ``window``: (D, H, W) uint8 (3D scalar images)."""
        if window.kind == "stored" and self.data.dtype == np.uint8:
            return self.data
        lo, hi, keep = self.bounds(window)
        return to_uint8(self.data, lo, hi, keep)

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "is_3d": self.is_3d,
            "rgb": self.rgb,
            "depth": self.depth,
            "height": self.height,
            "width": self.width,
            "dtype": str(self.data.dtype),
            "spacing": None if self.spacing is None else [round(float(s), 6) for s in self.spacing],
            "modality": self.modality,
            "boxes_in_file": 0 if self.case is None else self.case.num_boxes,
            "warnings": list(self.warnings),
        }


# ---- memory -----------------------------------------------------------------------------
def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None where it cannot be read)."""
    try:
        with open("/proc/meminfo") as fp:
            for line in fp:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_memory(path: Path, nbytes: int, max_bytes: int | None = None) -> None:
    """Refuse an image needing ``nbytes`` when over ``max_bytes`` (default: 80% of the free memory)."""
    if max_bytes is None:
        avail = available_memory()
        if avail is None:
            return
        max_bytes = int(avail * MEMORY_FRACTION)
    if nbytes > max_bytes:
        raise ImageTooLarge(
            f"{path.name}: too large for memory: needs about {nbytes / 2**20:,.0f} MiB, "
            f"{max_bytes / 2**20:,.0f} MiB may be used"
        )


def _needed(voxels: int, itemsize: int) -> int:
    # stored values + the uint8 image the model sees + uint16 labels at most
    return int(voxels) * (int(itemsize) + 3)


# ---- readers ----------------------------------------------------------------------------
def kind_of(path: Path) -> str:
    """``npz`` | ``nifti`` | ``dicom`` | ``picture``, or a :class:`CaseError` for anything else."""
    if path.is_dir():
        return "dicom"
    name = path.name.lower()
    if name.endswith(".npz"):
        return "npz"
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(PICTURE_SUFFIXES):
        return "picture"
    if name.endswith(DICOM_SUFFIXES):
        return "dicom"
    raise CaseError(path, f"unsupported file type; lapsam opens {SUPPORTED}")


def open_image(path: str | Path, max_bytes: int | None = None) -> Volume:
    """Open any supported image (see the module docstring); bad input -> :class:`CaseError`."""
    path = Path(path)
    if not path.exists():
        raise CaseError(path, "does not exist")
    kind = kind_of(path)
    try:
        vol = {"npz": _open_npz, "nifti": _open_nifti, "dicom": _open_dicom, "picture": _open_picture}[kind](
            path, max_bytes
        )
    except (LapsamError, ImportError):
        raise
    except MemoryError:
        raise ImageTooLarge(f"{path.name}: too large for memory (allocation failed)") from None
    except Exception as exc:  # noqa: BLE001 - reader libraries raise many types for corrupt files
        raise CaseError(path, f"cannot read as {kind}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")) from None
    if vol.data.size == 0:
        raise CaseError(path, f"the image is empty (shape {tuple(vol.data.shape)})")
    if vol.data.dtype.kind == "f" and not np.isfinite(vol.data).all():
        vol.data = np.nan_to_num(vol.data, nan=0.0, posinf=0.0, neginf=0.0)
        vol.warnings.append("NaN/infinite values were set to 0")
    for w in vol.warnings:
        log.warning("%s: %s", path.name, w)
    return vol


def _open_npz(path: Path, max_bytes: int | None) -> Volume:
    try:
        with zipfile.ZipFile(path) as zf:
            size = sum(i.file_size for i in zf.infolist())
    except (zipfile.BadZipFile, OSError) as exc:
        raise CaseError(path, f"not a readable npz file ({exc})") from None
    check_memory(path, size + size // 2, max_bytes)
    case = load_case(path)
    data = case.image if case.is_3d else case.image[None]
    return Volume(name=case.name, data=data, is_3d=case.is_3d, source="npz", path=path, spacing=case.spacing,
                  modality=case.modality, case=case, warnings=list(case.warnings))


def _stem(path: Path) -> str:
    name = path.name
    for suf in (*NIFTI_SUFFIXES, *PICTURE_SUFFIXES, *DICOM_SUFFIXES, ".npz"):
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return name


def _open_nifti(path: Path, max_bytes: int | None) -> Volume:
    import nibabel as nib

    img = nib.load(str(path))
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise CaseError(path, f"{type(img).__name__} is not a NIfTI image")
    shape = tuple(int(s) for s in img.shape)
    spatial = list(shape)
    while len(spatial) > 3 and spatial[-1] == 1:
        spatial.pop()
    if len(spatial) > 3:
        raise CaseError(path, f"{len(shape)}D image of shape {shape}: give one 3D volume")
    if len(spatial) < 2:
        raise CaseError(path, f"image of shape {shape} is not 2D or 3D")
    dtype = img.get_data_dtype()
    if dtype.fields is not None or dtype.kind not in "iuf":
        raise CaseError(path, f"voxel type {dtype} is not supported (scalar images only)")
    slope, inter = getattr(img.dataobj, "slope", 1.0), getattr(img.dataobj, "inter", 0.0)
    scaled = slope != 1.0 or inter != 0.0
    item = 4 if (scaled or dtype.kind == "f") else dtype.itemsize
    check_memory(path, _needed(int(np.prod(shape)), item), max_bytes)
    arr = np.asanyarray(img.dataobj).reshape(spatial)
    if arr.dtype.kind == "f" and arr.dtype != np.float32:
        arr = arr.astype(np.float32)
    if arr.dtype == np.int64 or arr.dtype == np.uint64:
        arr = arr.astype(np.float32)
    if arr.ndim == 2:
        arr = arr.T[None]
    else:
        arr = arr.transpose(2, 1, 0)
    zooms = [float(z) for z in img.header.get_zooms()[:3]] + [1.0, 1.0]
    return Volume(
        name=_stem(path), data=np.ascontiguousarray(arr), is_3d=arr.shape[0] > 1, source="nifti", path=path,
        spacing=(zooms[0], zooms[1], zooms[2]), nifti=img, nifti_shape=shape,
    )


def _itk_geometry(img: Any) -> dict[str, Any]:
    return {
        "origin": tuple(img.GetOrigin()),
        "spacing": tuple(img.GetSpacing()),
        "direction": tuple(img.GetDirection()),
        "dimension": int(img.GetDimension()),
    }


def _open_dicom(path: Path, max_bytes: int | None) -> Volume:
    import SimpleITK as sitk

    modality = None
    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        ids = reader.GetGDCMSeriesIDs(str(path))
        if not ids:
            raise CaseError(path, f"no DICOM series in this folder; lapsam opens {SUPPORTED}")
        series = sorted(((list(reader.GetGDCMSeriesFileNames(str(path), sid)), sid) for sid in ids),
                        key=lambda t: -len(t[0]))
        files, sid = series[0]
        warnings = []
        if len(series) > 1:
            warnings.append(f"{len(series)} DICOM series in the folder; opened the largest ({len(files)} files, {sid})")
        info = sitk.ImageFileReader()
        info.SetFileName(files[0])
        info.ReadImageInformation()
        w, h = info.GetSize()[:2]
        itemsize = 8 if "64" in sitk.GetPixelIDValueAsString(info.GetPixelID()) else 4
        check_memory(path, _needed(w * h * len(files), itemsize), max_bytes)
        if info.HasMetaDataKey("0008|0060"):
            modality = info.GetMetaData("0008|0060").strip() or None
        reader.SetFileNames(files)
        img = reader.Execute()
        name = path.name
    else:
        info = sitk.ImageFileReader()
        info.SetFileName(str(path))
        info.ReadImageInformation()
        size = info.GetSize()
        check_memory(path, _needed(int(np.prod(size)) * info.GetNumberOfComponents(), 4), max_bytes)
        if info.HasMetaDataKey("0008|0060"):
            modality = info.GetMetaData("0008|0060").strip() or None
        img = info.Execute()
        name = _stem(path)
        warnings = []
    arr = sitk.GetArrayFromImage(img)
    comps = img.GetNumberOfComponentsPerPixel()
    geometry = _itk_geometry(img)
    geometry["array_shape"] = tuple(arr.shape[:img.GetDimension()])
    sp = list(img.GetSpacing()) + [1.0]
    spacing = (float(sp[0]), float(sp[1]), float(sp[2]))
    if comps == 3:
        rgb = arr.reshape((-1, *arr.shape[-3:]))
        if rgb.shape[0] != 1:
            raise CaseError(path, "colour DICOM with several frames is not supported")
        if rgb.dtype != np.uint8:
            raise CaseError(path, f"colour DICOM of type {rgb.dtype} is not supported (8-bit only)")
        return Volume(name=name, data=np.ascontiguousarray(rgb), is_3d=False, source="dicom", path=path,
                      spacing=spacing, modality=modality, itk=geometry, warnings=warnings)
    if comps != 1:
        raise CaseError(path, f"{comps} components per pixel; expected grey or RGB")
    if arr.ndim == 2:
        arr = arr[None]
    if arr.dtype.kind == "f" and arr.dtype != np.float32:
        arr = arr.astype(np.float32)
    return Volume(name=name, data=np.ascontiguousarray(arr), is_3d=arr.shape[0] > 1, source="dicom", path=path,
                  spacing=spacing, modality=modality, itk=geometry, warnings=warnings)


def _open_picture(path: Path, max_bytes: int | None) -> Volume:
    from PIL import Image

    try:
        im = Image.open(path)
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"{path.name}: too large ({exc})") from None
    with im:
        w, h = im.size
        check_memory(path, _needed(w * h, 4 if im.mode in ("I", "F") else 3), max_bytes)
        if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            arr = np.asarray(im)
            arr = arr.astype(np.float32) if arr.dtype.kind == "f" else arr.astype(np.int32 if arr.dtype.itemsize > 2 else np.uint16)
            return Volume(name=_stem(path), data=arr[None], is_3d=False, source="picture", path=path)
        rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return Volume(name=_stem(path), data=np.ascontiguousarray(rgb[None]), is_3d=False, source="picture", path=path)


# ---- masks out --------------------------------------------------------------------------
def mask_format(path: str | Path) -> str:
    name = str(path).lower()
    for fmt in MASK_FORMATS:
        if name.endswith("." + fmt):
            return fmt
    raise UsageError(f"{path}: the mask's file name must end in .nii.gz, .nii, .npz or .png")


def mask_filename(vol: Volume, fmt: str, z: int | None = None) -> str:
    base = vol.name.replace("/", "_") or "image"
    if fmt == "png" and vol.is_3d:
        return f"{base}_mask_z{int(z or 0):04d}.png"
    return f"{base}_mask.{fmt}" if fmt != "npz" else f"{base}.npz"


def mask_bytes(vol: Volume, labels: np.ndarray, fmt: str, z: int | None = None) -> bytes:
    """The file content of ``labels`` (D, H, W) saved as ``fmt`` with ``vol``'s geometry.

    ``png`` of a 3D image is slice ``z``. Labels are uint8 up to 255 objects, else uint16.
    """
    if fmt not in MASK_FORMATS:
        raise UsageError(f"mask format {fmt!r}: use one of {', '.join(MASK_FORMATS)}")
    labels = np.asarray(labels).reshape(vol.depth, vol.height, vol.width)
    dtype = segs_dtype(int(labels.max(initial=0)))
    mask = labels.astype(dtype, copy=False).reshape(vol.mask_shape)
    if fmt == "npz":
        buf = io.BytesIO()
        np.savez_compressed(buf, segs=np.ascontiguousarray(mask))
        return buf.getvalue()
    if fmt == "png":
        from PIL import Image

        if vol.is_3d:
            if z is None or not 0 <= int(z) < vol.depth:
                raise UsageError(f"PNG masks of a 3D image are one slice: give a slice in 0..{vol.depth - 1}")
            plane = mask[int(z)]
        else:
            plane = mask
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(plane)).save(buf, format="PNG")
        return buf.getvalue()
    raw = _nifti_bytes(vol, labels.astype(dtype, copy=False))
    return gzip.compress(raw, compresslevel=6, mtime=0) if fmt == "nii.gz" else raw


def _nifti_bytes(vol: Volume, labels: np.ndarray) -> bytes:
    if vol.nifti is not None:
        import nibabel as nib

        src = vol.nifti
        arr = labels.transpose(2, 1, 0) if len(vol.nifti_shape or ()) != 2 else labels[0].T
        arr = np.ascontiguousarray(arr.reshape(vol.nifti_shape))
        hdr = src.header.copy()
        hdr.set_data_dtype(arr.dtype)
        cls = nib.Nifti2Image if isinstance(src, nib.Nifti2Image) else nib.Nifti1Image
        out = cls(arr, src.affine, header=hdr)
        out.header.set_slope_inter(1.0, 0.0)
        out.header["cal_min"], out.header["cal_max"] = 0, float(arr.max(initial=0))
        out.header["descrip"] = b"lapsam mask"
        return out.to_bytes()
    import SimpleITK as sitk

    if vol.itk is not None:
        arr = labels.reshape(vol.itk["array_shape"])
        img = sitk.GetImageFromArray(np.ascontiguousarray(arr))
        if img.GetDimension() == vol.itk["dimension"]:
            img.SetOrigin(vol.itk["origin"])
            img.SetSpacing(vol.itk["spacing"])
            img.SetDirection(vol.itk["direction"])
    else:
        arr = labels if vol.is_3d else labels[0]
        img = sitk.GetImageFromArray(np.ascontiguousarray(arr))
        if vol.spacing is not None:
            img.SetSpacing(vol.spacing[: img.GetDimension()])
    with tempfile.TemporaryDirectory(prefix="lapsam-mask-") as tmp:
        f = os.path.join(tmp, "mask.nii")
        sitk.WriteImage(img, f, useCompression=False)
        return Path(f).read_bytes()


def write_mask(vol: Volume, labels: np.ndarray, path: str | Path, z: int | None = None) -> Path:
    """Write ``labels`` to ``path`` (format from its suffix) atomically: complete or absent."""
    path = Path(path)
    data = mask_bytes(vol, labels, mask_format(path), z)
    with atomic_write(path) as fp:
        fp.write(data)
    return path
