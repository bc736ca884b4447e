"""``lapsam app``: image formats and geometry, the session (cache, propagation, cancel, undo), the
HTTP server (bad input, host check), and the page in a real headless Chromium.

References are independent of the app's code: ``lapsam predict`` / ``Predictor`` on a challenge
case holding the same box, nibabel / SimpleITK reading files the app wrote, windows computed by
hand. The browser test needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs
them): it is skipped where they are missing, except under CI (``CI=true``) where it fails.
"""

from __future__ import annotations

import gzip
import io
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from lapsam.case import case_from_arrays, load_case
from lapsam.errors import CaseError
from lapsam.format2025 import write_case_2025
from lapsam.manifest import Preprocessing
from lapsam.preprocess import resize_2d
from lapsam.writers import atomic_savez

nib = pytest.importorskip("nibabel")
sitk = pytest.importorskip("SimpleITK")
Image = pytest.importorskip("PIL.Image")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from lapsam.runtime import Predictor, PredictorConfig  # noqa: E402
from lapsam.runtime.app.segmenter import CachingEngine, Cancelled, Segmenter  # noqa: E402
from lapsam.runtime.app.session import Busy, Session, SessionConfig  # noqa: E402
from lapsam.runtime.app.volume import (  # noqa: E402
    ImageTooLarge,
    mask_bytes,
    open_image,
    parse_window,
)
from lapsam.runtime.interactive import ClassPrompt, SliceBox  # noqa: E402

CASE_2D = "2DBox_CT_amos_0004_75"
CASE_3D = "3DBox_CT_TotalSegSmall"  # 8 objects
S = 128
PP = Preprocessing(input_size=S)


# ---- fakes --------------------------------------------------------------------------------
class FakeEngine:
    """Masks = bright pixels inside the prompt box (as tests/test_runtime.py); counts calls."""

    def __init__(self) -> None:
        self.encodes = 0
        self.decodes = 0

    def encode(self, image: np.ndarray):
        self.encodes += 1
        e = S // 16
        hr0 = np.zeros((1, 32, 4 * e, 4 * e), np.float32)
        hr0[0, 0] = resize_2d(image[0, 0], (4 * e, 4 * e))
        return np.zeros((1, 256, e, e), np.float32), hr0, np.zeros((1, 64, 2 * e, 2 * e), np.float32)

    def decode(self, feats, boxes, point_coords, point_labels, mask_input, has_mask_input):
        self.decodes += 1
        b = boxes.shape[0]
        low = feats[1].shape[-1]
        bright = feats[1][0, 0] > 0.0
        scale = low / S
        yy, xx = np.mgrid[0:low, 0:low] + 0.5
        out = np.full((b, 1, low, low), -10.0, np.float32)
        for i, (x0, y0, x1, y1) in enumerate(boxes * scale):
            inside = (xx >= x0) & (xx <= x1 + scale) & (yy >= y0) & (yy <= y1 + scale)
            out[i, 0][inside & bright] = 10.0
        return out, np.ones((b, 1), np.float32)


class BlockingEngine(FakeEngine):
    """Blocks in its second encode until released (to cancel a running propagation)."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def encode(self, image):
        if self.encodes >= 1:
            self.entered.set()
            assert self.release.wait(30)
        return super().encode(image)


def _npz_case(path: Path, image: np.ndarray, boxes, spacing=None) -> Path:
    arrays = {"imgs": image, "boxes": np.asarray(boxes, np.int64)}
    if spacing is not None:
        arrays["spacing"] = np.asarray(spacing, np.float64)
    return atomic_savez(path, **arrays)


def _ball_volume(d: int = 9, h: int = 40, w: int = 48) -> np.ndarray:
    """uint8 (D, H, W): a bright ellipsoid on a dark background (what the fake engine segments)."""
    z, y, x = np.mgrid[0:d, 0:h, 0:w]
    ball = ((z - d // 2) / 3.5) ** 2 + ((y - 20) / 12.0) ** 2 + ((x - 24) / 14.0) ** 2 <= 1.0
    return np.where(ball, 200, 20 + z).astype(np.uint8)  # every slice differs


@pytest.fixture
def fake_session(tmp_path: Path):
    def make(engine=None, **cfg) -> tuple[Session, FakeEngine]:
        eng = engine or FakeEngine()
        return Session(Segmenter(eng, PP), SessionConfig(**cfg)), eng

    return make


# ---- windows ------------------------------------------------------------------------------
def test_ct_window_and_percentile_by_hand(tmp_path: Path):
    hu = np.array([[-1001, -160, 41, 240, 3000]], np.int16)[None]  # (1, 1, 5)
    f = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(hu.transpose(2, 1, 0)), np.eye(4)), f)
    vol = open_image(f)
    assert vol.default_window().name == "ct-soft"  # air at -1000: a CT
    # level 40 width 400 = [-160, 240]: 41 -> 201 * 255 / 400 = 128.1 -> 128
    assert vol.slice_u8(0, parse_window("ct-soft")).tolist() == [[0, 0, 128, 255, 255]]
    # [0, 80]: 41 -> 130.7 -> 131
    assert vol.slice_u8(0, parse_window("40,80")).tolist() == [[0, 0, 131, 255, 255]]
    # [-1350, 150]: -1001 -> 349 * 0.17 = 59.3, -160 -> 202.3, 41 -> 236.5 (236.47)
    assert vol.slice_u8(0, parse_window("-600,1500")).tolist() == [[59, 202, 236, 255, 255]]

    mr = np.zeros((1, 10, 10), np.float32)
    mr[0, 5:] = np.arange(50, dtype=np.float32).reshape(5, 10) + 1  # zeros stay 0 (background)
    f2 = tmp_path / "mr.nii"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(mr.transpose(2, 1, 0)), np.eye(4)), f2)
    vol2 = open_image(f2)
    assert vol2.default_window().name == "percentile"
    lo, hi = np.percentile(np.arange(1, 51), [0.5, 99.5])
    want = np.clip(np.rint((np.clip(mr[0], lo, hi) - lo) / (hi - lo) * 255), 0, 255).astype(np.uint8)
    want[mr[0] == 0] = 0
    np.testing.assert_array_equal(vol2.slice_u8(0, vol2.default_window()), want)
    for bad in ("ct-nope", "40", "40,0", "a,b"):
        with pytest.raises(Exception, match="window"):
            parse_window(bad)


# ---- formats and geometry -------------------------------------------------------------------
def _oblique_affine() -> np.ndarray:
    c, s = np.cos(0.4), np.sin(0.4)
    a = np.array([[-0.8 * c, 0.9 * s, 0.0, 12.5], [0.8 * s, 0.9 * c, 0.0, -40.0], [0.0, 0.0, 2.5, 7.0], [0, 0, 0, 1]])
    return a


def test_nifti_array_order_and_mask_geometry(tmp_path: Path):
    rng = np.random.default_rng(0)
    xyz = rng.uniform(-1000, 90000, (40, 30, 12))  # beyond int16: stored with a slope
    img = nib.Nifti1Image(xyz, _oblique_affine())
    img.header.set_qform(_oblique_affine(), code=1)
    img.set_data_dtype(np.int16)  # stored as int16 with a slope and intercept
    f = tmp_path / "scan.nii.gz"
    nib.save(img, f)
    ref = nib.load(f)
    assert ref.dataobj.slope != 1.0
    vol = open_image(f)
    assert vol.data.shape == (12, 30, 40) and vol.is_3d and vol.spacing == pytest.approx((0.8, 0.9, 2.5))
    np.testing.assert_allclose(vol.data, ref.get_fdata().transpose(2, 1, 0), rtol=1e-6, atol=1e-3)

    labels = np.zeros((12, 30, 40), np.uint8)
    labels[2:5, 10:20, 5:9] = 1
    labels[7, 0, 39] = 2
    out = tmp_path / "mask.nii.gz"
    out.write_bytes(mask_bytes(vol, labels, "nii.gz"))
    back = nib.load(out)
    np.testing.assert_allclose(back.affine, nib.load(f).affine, atol=1e-6)
    assert back.header.get_data_dtype() == np.uint8
    m = np.asanyarray(back.dataobj)
    assert m.shape == (40, 30, 12) and m[39, 0, 7] == 2 and m[5, 10, 2] == 1 and int(m.sum()) == 3 * 10 * 4 + 2
    # SimpleITK sees the same physical geometry in the image and in the mask
    a, b = sitk.ReadImage(str(f)), sitk.ReadImage(str(out))
    assert a.GetOrigin() == pytest.approx(b.GetOrigin(), abs=1e-5)
    assert a.GetDirection() == pytest.approx(b.GetDirection(), abs=1e-6)
    assert a.GetSpacing() == pytest.approx(b.GetSpacing(), abs=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(b), labels)  # same (z, y, x) array order


def write_dicom_series(folder: Path, arr: np.ndarray, spacing=(0.7, 0.8, 2.5), origin=(-10.0, 20.0, 30.0),
                       angle: float = 0.3) -> sitk.Image:
    """A CT series of int16 (z, y, x) slices, one .dcm per slice, with an oblique orientation."""
    folder.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(arr.astype(np.int16))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    c, s = np.cos(angle), np.sin(angle)
    img.SetDirection((c, -s, 0, s, c, 0, 0, 0, 1))
    w = sitk.ImageFileWriter()
    w.KeepOriginalImageUIDOn()
    uid = "1.2.826.0.1.3680043.2.1125.7"
    for i in range(arr.shape[0]):
        sl = img[:, :, i]
        tags = {
            "0008|0060": "CT", "0020|000e": uid + ".2", "0020|000d": uid + ".3",
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
            "0020|0037": "\\".join(f"{v:.8f}" for v in (c, s, 0, -s, c, 0)),
            "0020|0032": "\\".join(f"{v:.6f}" for v in img.TransformIndexToPhysicalPoint((0, 0, i))),
            "0020|0013": str(i + 1), "0028|1052": "0", "0028|1053": "1",
        }
        for k, v in tags.items():
            sl.SetMetaData(k, v)
        w.SetFileName(str(folder / f"slice{i:03d}.dcm"))
        w.Execute(sl)
    return img


def test_dicom_series_modality_and_mask_geometry(tmp_path: Path):
    arr = np.random.default_rng(1).integers(-1000, 1000, (5, 30, 40)).astype(np.int16)
    write_dicom_series(tmp_path / "series", arr)
    vol = open_image(tmp_path / "series")
    assert vol.source == "dicom" and vol.modality == "CT" and vol.default_window().name == "ct-soft"
    np.testing.assert_array_equal(vol.data, arr)
    labels = np.zeros(arr.shape, np.uint8)
    labels[1:3, 4:9, 10:30] = 1
    out = tmp_path / "mask.nii.gz"
    out.write_bytes(mask_bytes(vol, labels, "nii.gz"))
    r = sitk.ImageSeriesReader()
    r.SetFileNames(r.GetGDCMSeriesFileNames(str(tmp_path / "series")))
    ref, m = r.Execute(), sitk.ReadImage(str(out))
    assert m.GetOrigin() == pytest.approx(ref.GetOrigin(), abs=1e-4)
    assert m.GetSpacing() == pytest.approx(ref.GetSpacing(), abs=1e-5)
    assert m.GetDirection() == pytest.approx(ref.GetDirection(), abs=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(m), labels)


def test_pictures_and_npz_masks(tmp_path: Path, imgs_dir: Path):
    case = load_case(imgs_dir / f"{CASE_2D}.npz")
    Image.fromarray(case.image).save(tmp_path / "a.png")
    Image.fromarray(case.image[:, :, 0]).save(tmp_path / "grey.jpg", quality=95)
    Image.fromarray(case.image[:, :, 0].astype(np.uint16) * 200).save(tmp_path / "deep.png")
    v = open_image(tmp_path / "a.png")
    assert v.rgb and not v.is_3d and v.mask_shape == case.image.shape[:2]
    np.testing.assert_array_equal(v.data[0], case.image)
    g = open_image(tmp_path / "grey.jpg")
    assert g.rgb and g.data.shape == (1, *case.image.shape[:2], 3)
    d = open_image(tmp_path / "deep.png")
    assert not d.rgb and d.data.dtype == np.uint16 and d.default_window().name == "percentile"
    labels = np.zeros((1, *case.image.shape[:2]), np.uint8)
    labels[0, 10:20, 30:50] = 3
    png = Image.open(io.BytesIO(mask_bytes(v, labels, "png")))
    np.testing.assert_array_equal(np.asarray(png), labels[0])
    with np.load(io.BytesIO(mask_bytes(v, labels, "npz"))) as z:
        assert list(z.keys()) == ["segs"] and z["segs"].shape == case.image.shape[:2]
        np.testing.assert_array_equal(z["segs"], labels[0])
    many = labels.astype(np.uint16)
    many[0, 0, 0] = 300
    with np.load(io.BytesIO(mask_bytes(v, many, "npz"))) as z:
        assert z["segs"].dtype == np.uint16 and z["segs"][0, 0] == 300


def test_bad_input_is_one_line(tmp_path: Path):
    (tmp_path / "broken.nii.gz").write_bytes(gzip.compress(b"not a nifti at all" * 10))
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "trunc.npz").write_bytes(b"PK\x03\x04 truncated")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 3, 2), np.int16), np.eye(4)), tmp_path / "four.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((64, 64, 16), np.int16), np.eye(4)), tmp_path / "big.nii.gz")
    (tmp_path / "emptydir").mkdir()
    cases = {
        "broken.nii.gz": "cannot read as nifti",
        "notes.txt": "unsupported file type",
        "empty.png": "cannot read as picture",
        "trunc.npz": "npz",
        "four.nii.gz": "give one 3D volume",
        "emptydir": "no DICOM series",
        "missing.nii": "does not exist",
    }
    for name, what in cases.items():
        with pytest.raises(CaseError) as exc:
            open_image(tmp_path / name)
        msg = str(exc.value)
        assert what in msg and "\n" not in msg and msg.startswith(name), msg
    with pytest.raises(ImageTooLarge, match="too large for memory"):
        open_image(tmp_path / "big.nii.gz", max_bytes=64 * 64 * 16)  # needs 5 bytes per voxel


# ---- the embedding cache ---------------------------------------------------------------------
def test_caching_engine_lru_bound_and_cancel():
    inner = FakeEngine()
    per_slice = 4 * (256 * 8 * 8 + 32 * 32 * 32 + 64 * 16 * 16)
    eng = CachingEngine(inner, limit_bytes=2 * per_slice)
    imgs = [np.full((1, 3, S, S), float(i), np.float32) for i in range(3)]
    a = eng.encode(imgs[0])
    b = eng.encode(imgs[0].copy())
    assert inner.encodes == 1 and all(x is y for x, y in zip(a, b, strict=True))
    eng.encode(imgs[1])
    eng.encode(imgs[2])  # evicts imgs[0], the least recently used
    assert len(eng) == 2 and eng.nbytes <= 2 * per_slice and imgs[0] not in eng and imgs[2] in eng
    eng.encode(imgs[0])
    assert inner.encodes == 4
    eng.cancel.set()
    with pytest.raises(Cancelled):
        eng.encode(imgs[1])
    with pytest.raises(Cancelled):
        eng.decode(a, np.zeros((1, 4), np.float32), None, None, None, None)


# ---- the session --------------------------------------------------------------------------
def test_session_boxes_overlap_undo_clear(tmp_path: Path, fake_session):
    img = np.zeros((64, 80, 3), np.uint8)
    img[10:50, 10:70] = 200
    path = _npz_case(tmp_path / "2DBox_US_x.npz", img, [[0, 0, 5, 5]])
    s, eng = fake_session()
    s.open_path(path)
    r1 = s.add_box(0, [20, 20, 40, 40])
    assert r1["label"] == 1 and r1["cached"] is False and eng.encodes == 1
    s.new_object()
    r2 = s.add_box(0, [30, 30, 60, 45])
    assert r2["label"] == 2 and r2["cached"] is True and eng.encodes == 1  # a new box on the slice: decode only
    lab = s.labels[0]
    assert lab[35, 35] == 2 and lab[25, 25] == 1  # the larger label wins the overlap
    s.select(1)
    s.add_box(0, [20, 20, 45, 44])  # object 1 again: replaces its mask, still loses to 2
    assert s.labels[0][35, 35] == 2 and s.labels[0][43, 22] == 1 and s.labels[0][21, 21] == 1
    before = s.labels.copy()
    s.select(2)
    s.add_box(0, [50, 12, 65, 20])
    assert not np.array_equal(s.labels, before)
    assert s.undo().startswith("box")
    np.testing.assert_array_equal(s.labels, before)
    s.clear()
    assert not s.labels.any() and s.objects == []
    s.undo()
    np.testing.assert_array_equal(s.labels, before)
    assert [o.label for o in s.objects] == [1, 2]


def test_session_propagation_matches_predictor_and_cancels(tmp_path: Path, fake_session):
    vol = _ball_volume()
    path = _npz_case(tmp_path / "3DBox_MR_ball.npz", vol, [[0, 0, 0, 1, 1, 1]], spacing=(1, 1, 2))
    s, eng = fake_session()
    s.open_path(path)
    z = 4
    s.add_box(z, [12, 10, 36, 30])
    s.set_mark("start", 2)
    s.set_mark("end", 6)
    job = s.propagate(wait=True)
    assert job.state == "done" and job.done == job.total == 5
    # the runtime's 2025 rule: a box drawn on one slice + its z range
    ref = Predictor(FakeEngine(), PP).predict_prompts(vol, [ClassPrompt(1, SliceBox(12, 10, 36, 30, z, 2, 6))])
    np.testing.assert_array_equal(s.labels, ref)
    assert s.labels[2].max() == 1 and s.labels[6].max() == 1 and s.labels[1].max() == 0
    assert eng.encodes == 5  # slice 4 was kept from the box and not encoded again

    # without marks the propagation runs until the mask vanishes ("stop"), over the whole volume
    s.set_mark("start", None)
    s.set_mark("end", None)
    s.propagate(wait=True)
    ref2 = Predictor(FakeEngine(), PP, PredictorConfig(on_empty="stop")).predict_prompts(
        vol, [ClassPrompt(1, SliceBox(12, 10, 36, 30, z, 0, vol.shape[0] - 1))])
    np.testing.assert_array_equal(s.labels, ref2)
    assert s.labels[1].max() == 1 and s.labels[0].max() == 0 and s.labels[8].max() == 0  # the ball's ends

    # cancel: the job stops, the masks stay as they were, the server-side state is usable again
    blocking = BlockingEngine()
    s2, _ = fake_session(blocking)
    s2.open_path(path)
    s2.add_box(z, [12, 10, 36, 30])
    before = s2.labels.copy()
    job = s2.propagate()
    assert blocking.entered.wait(30)
    with pytest.raises(Busy):
        s2.add_box(z, [0, 0, 5, 5])
    s2.cancel()
    blocking.release.set()
    assert s2.wait(30).state == "cancelled"
    np.testing.assert_array_equal(s2.labels, before)
    assert s2.propagate(wait=True).state == "done"


def test_session_file_boxes_equal_lapsam_predict(small_model_dir: Path, case_copy, imgs_dir: Path, tmp_path: Path):
    from lapsam.cli import main

    inp = case_copy(CASE_2D, CASE_3D)
    case_2025 = "3DBox_MR_Breast1_2025"  # the 2025 format: box dicts (+ clicks), prev_pred rule
    shutil.copy(imgs_dir.parent / "interactive" / "imgs" / "3DBox_MR_Breast1.npz", inp / f"{case_2025}.npz")
    assert load_case(inp / f"{case_2025}.npz").format == "2025"
    assert main(["predict", "-i", str(inp), "-o", str(tmp_path / "ref"), "--model", str(small_model_dir),
                 "--threads", "1", "--no-progress"]) == 0
    seg = Segmenter.from_model_dir(small_model_dir, threads=1)
    s = Session(seg)
    for name in (CASE_2D, CASE_3D, case_2025):
        s.open_path(inp / f"{name}.npz")
        s.run_file_boxes()
        if s.job is not None:  # 3D: a propagation job
            assert s.wait(600).state == "done"
        with np.load(tmp_path / "ref" / f"{name}.npz") as z:
            ref = z["segs"]
        data, fname = s.save("npz")
        assert fname == f"{name}.npz"
        with np.load(io.BytesIO(data)) as z:
            np.testing.assert_array_equal(z["segs"], ref)


def test_session_clicks_equal_lapsam_predict_on_a_2025_case(small_model_dir: Path, imgs_dir: Path,
                                                              tmp_path: Path):
    """Box, marks and clicks in the app == ``lapsam predict`` on a 2025 case holding them and the
    app's masks before the click as ``prev_pred`` (the runtime's click rule, through the file format)."""
    from lapsam.cli import main

    name = "3DBox_MR_Breast1"
    case = load_case(imgs_dir / f"{name}.npz")
    x0, y0, z0, x1, y1, z1 = (int(v) for v in case.boxes[0])
    zm = (z0 + z1) // 2
    s = Session(Segmenter.from_model_dir(small_model_dir, threads=1))
    s.open_path(imgs_dir / f"{name}.npz")
    s.add_box(zm, [x0, y0, x1, y1])
    s.set_mark("start", z0)
    s.set_mark("end", z1)
    fg: list[list[int]] = []
    bg: list[list[int]] = []
    for i, positive in enumerate((True, False)):
        before = s.labels.copy()
        if positive:  # where the object is absent: slice zm + 2 has no mask yet
            z, y, x = zm + 2, (y0 + y1) // 2, (x0 + x1) // 2
            assert before[z, y, x] == 0
        else:  # inside the object's mask on its box slice
            on = np.argwhere(before[zm] == 1)
            assert len(on), "the box gave no mask"
            z, (y, x) = zm, on[len(on) // 2]
        job = s.add_click(z, x + 0.5, y + 0.5, positive, wait=True)
        assert job.state == "done", job.message
        (fg if positive else bg).append([int(z), int(y), int(x)])
        assert s.objects[0].fg == fg and s.objects[0].bg == bg
        box = {"z_min": z0, "z_max": z1, "z_mid": zm, "z_mid_x_min": x0, "z_mid_y_min": y0, "z_mid_x_max": x1,
               "z_mid_y_max": y1}
        ref_in = tmp_path / f"in{i}"
        write_case_2025(ref_in / f"{name}.npz", case.image, case.spacing, boxes=[box],
                        clicks=[{"fg": fg, "bg": bg}], prev_pred=before)
        assert main(["predict", "-i", str(ref_in), "-o", str(tmp_path / f"out{i}"), "--model", str(small_model_dir),
                     "--threads", "1", "--no-progress"]) == 0
        with np.load(tmp_path / f"out{i}" / f"{name}.npz") as zf:
            np.testing.assert_array_equal(s.labels, zf["segs"])
        assert not np.array_equal(s.labels, before)  # the click changed the masks
    assert s.undo().startswith("- click")
    assert s.objects[0].bg == []


# ---- the server (HTTP) ----------------------------------------------------------------------
def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("LAPSAM_MODEL_DIR", None)
    env.pop("LAPSAM_OV_CACHE_DIR", None)
    return env


class AppProcess:
    """``lapsam app`` in a child process on a free port."""

    def __init__(self, model: Path, *extra: str):
        cmd = [sys.executable, "-m", "lapsam.cli", "app", "--model", str(model), "--port", "0", "--no-browser",
               "--threads", "1", *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
        self.lines: list[str] = []
        self.url = ""
        end = time.monotonic() + 180
        while time.monotonic() < end:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            m = re.search(r"lapsam app: (http://\S+)", line)
            if m:
                self.url = m.group(1).rstrip("/")
                break
        if not self.url:
            self.stop()
            raise AssertionError("lapsam app did not start:\n" + "".join(self.lines))
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                ) -> tuple[int, bytes]:
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def json(self, method: str, path: str, obj=None) -> tuple[int, dict]:
        import json

        body = None if obj is None else json.dumps(obj).encode()
        code, data = self.request(method, path, body, {"Content-Type": "application/json"} if body else None)
        return code, json.loads(data)

    def upload(self, name: str, content: bytes, more: list[tuple[str, bytes]] = ()) -> tuple[int, dict]:
        """POST /api/open with one file, or several (a DICOM folder: names with the folder)."""
        import json

        boundary = "lapsamtestboundary"
        body = b""
        for n, c in [(name, content), *more]:
            body += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{n}\"\r\n"
                     f"Content-Type: application/octet-stream\r\n\r\n").encode() + c + b"\r\n"
        body += f"--{boundary}--\r\n".encode()
        code, data = self.request("POST", "/api/open", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        return code, json.loads(data)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture
def app_process(small_model_dir: Path, imgs_dir: Path):
    procs: list[AppProcess] = []

    def start(*extra: str) -> AppProcess:
        p = AppProcess(small_model_dir, *extra)
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.stop()


def test_server_bad_input_keeps_running(app_process, imgs_dir: Path, tmp_path: Path):
    app = app_process(str(imgs_dir / f"{CASE_2D}.npz"), "--max-upload-mb", "1")
    assert app.url.startswith("http://127.0.0.1:")  # this machine only by default
    code, st = app.json("GET", "/api/state")
    assert code == 200 and st["image"]["name"] == CASE_2D
    for name, content, status, what in [
        ("broken.nii.gz", gzip.compress(b"garbage" * 100), 400, "cannot read as nifti"),
        ("notes.txt", b"hello", 400, "unsupported file type"),
        ("2DBox_CT_x.npz", b"PK\x03\x04 truncated", 400, "npz"),
        ("huge.nii", b"\0" * (2 * 2**20), 413, "over the limit"),
    ]:
        code, out = app.upload(name, content)
        assert code == status and what in out["error"] and "\n" not in out["error"], (name, out)
    code, out = app.json("POST", "/api/box", {"z": 0, "box": "nonsense"})
    assert code == 400 and "box" in out["error"]
    code, out = app.json("POST", "/api/open-path", {"path": str(tmp_path / "nothing.nii.gz")})
    assert code == 400 and "does not exist" in out["error"]
    code, _ = app.request("GET", "/api/state", headers={"Host": "attacker.example:80"})
    assert code == 400  # DNS rebinding: only 127.0.0.1 / localhost
    code, st = app.json("GET", "/api/state")  # still up, the first image still open
    assert code == 200 and st["image"]["name"] == CASE_2D
    code, out = app.json("POST", "/api/box", {"z": 0, "box": [100, 100, 200, 200]})
    assert code == 200 and out["label"] == 1
    code, data = app.request("GET", "/api/save?format=nii.gz")
    assert code == 200 and gzip.decompress(data)[:4] in (b"\x5c\x01\x00\x00", b"\x00\x00\x01\x5c")

    # a DICOM folder as the page sends it (every file, with its folder in the name)
    arr = np.random.default_rng(2).integers(-200, 300, (4, 24, 32)).astype(np.int16)
    write_dicom_series(tmp_path / "ser", arr)
    files = [(f"ser/{f.name}", f.read_bytes()) for f in sorted((tmp_path / "ser").iterdir())]
    code, st = app.upload(*files[0], more=files[1:])
    assert code == 200, st
    assert st["image"]["source"] == "dicom" and st["image"]["name"] == "ser" and st["image"]["depth"] == 4
    assert st["window"]["name"] == "ct-soft" and st["objects"] == []
    assert app.proc.poll() is None


# ---- the page in a real browser ----------------------------------------------------------
def _chromium() -> tuple[str, str] | None:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    drv = shutil.which("chromedriver")
    return (exe, drv) if exe and drv else None


def _browser_or_skip():
    ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    found = _chromium()
    try:
        import selenium  # noqa: F401
    except ImportError:
        if ci:
            pytest.fail("CI=true but selenium is missing (pip install -e '.[dev]')")
        pytest.skip("selenium is not installed")
    if found is None:
        if ci:
            pytest.fail("CI=true but chromium / chromedriver are missing: .ci/run installs Debian's chromium and "
                        "chromium-driver")
        pytest.skip("no chromium + chromedriver (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000",
              "--force-device-scale-factor=1"):
        opts.add_argument(a)
    opts.binary_location = found[0]
    return webdriver.Chrome(service=Service(found[1]), options=opts)


def _wait(fn, timeout: float = 120.0, what: str = "condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = fn()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_browser_box_mask_save_equals_lapsam_predict(app_process, small_model_dir: Path, imgs_dir: Path,
                                                      tmp_path: Path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    from lapsam.cli import main

    # a box whose mask is not empty with this random-weight model
    case = load_case(imgs_dir / f"{CASE_2D}.npz")
    pred = Predictor.from_model_dir(small_model_dir, threads=1)
    want = None
    for box in ([150, 140, 300, 330], [120, 200, 260, 300], [260, 180, 400, 330], [60, 60, 450, 450]):
        m = pred.predict(case_from_arrays(f"{CASE_2D}.npz", {"imgs": case.image, "boxes": np.array([box])}))
        if 0 < int(m.sum()) < m.size:
            want = box
            break
    assert want is not None, "no box gives a mask with this model"

    driver = _browser_or_skip()
    app = app_process()
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    try:
        driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
        driver.get(app.url + "/")
        _wait(lambda: driver.execute_script("return window.lapsam && window.lapsam.view.state !== null"),
              what="the page")
        driver.find_element(By.ID, "file").send_keys(str(imgs_dir / f"{CASE_2D}.npz"))  # the page's upload
        _wait(lambda: driver.execute_script(
            "const s = window.lapsam.view.state; return s && s.image && s.image.name === arguments[0]"
            " && window.lapsam.view.image !== null && window.lapsam.view.maskKey !== ''"
            " && document.getElementById('canvas').style.width !== ''", CASE_2D), what="the case to open")
        canvas = driver.find_element(By.ID, "canvas")
        r = driver.execute_script("const r = arguments[0].getBoundingClientRect();"
                                  "return [r.width, r.height, arguments[0].width, arguments[0].height]", canvas)
        sx, sy = r[0] / r[2], r[1] / r[3]
        assert sx > 1 and sy > 1, r  # every image pixel is reachable with the mouse

        def offset(x: int, y: int) -> tuple[int, int]:  # Selenium offsets are from the element's centre
            return round((x + 0.5) * sx - r[0] / 2), round((y + 0.5) * sy - r[1] / 2)

        x0, y0 = offset(want[0], want[1])
        x1, y1 = offset(want[2], want[3])
        ActionChains(driver).move_to_element_with_offset(canvas, x0, y0).click_and_hold() \
            .move_to_element_with_offset(canvas, (x0 + x1) // 2, (y0 + y1) // 2) \
            .move_to_element_with_offset(canvas, x1, y1).release().perform()
        _wait(lambda: driver.execute_script("return window.lapsam.view.maskPixels") > 0, what="a mask in the page")
        state = driver.execute_script("return window.lapsam.view.state")
        assert len(state["objects"]) == 1 and state["last"]["what"] == "box"
        drawn = state["objects"][0]["boxes"]["0"]
        assert np.abs(np.array(drawn) - np.array(want)).max() <= 1, (drawn, want)
        shown = driver.execute_script("return window.lapsam.view.maskPixels")

        driver.find_element(By.CSS_SELECTOR, '.save[data-format="npz"]').click()
        saved = _wait(lambda: next((p for p in downloads.glob("*.npz")), None), what="the download")
        _wait(lambda: not list(downloads.glob("*.crdownload")), what="the download to finish")
        # a foreground click beside the box (where there is no mask yet), with the page's click tool
        with np.load(saved) as z:
            got_box = z["segs"]
        cy = (drawn[1] + drawn[3]) // 2
        free = [x for x in range(drawn[2] + 3, case.image.shape[1]) if got_box[cy, x] == 0]
        cx = free[min(5, len(free) - 1)]
        driver.find_element(By.CSS_SELECTOR, 'input[name="tool"][value="fg"]').click()
        ActionChains(driver).move_to_element_with_offset(canvas, *offset(cx, cy)).click().perform()
        _wait(lambda: driver.execute_script("const s = window.lapsam.view.state; return s.last.what === 'click'"),
              what="the click's mask")
        state = driver.execute_script("return window.lapsam.view.state")
        click = state["objects"][0]["fg"]
        assert len(click) == 1 and abs(click[0][1] - cy) <= 1 and abs(click[0][2] - cx) <= 1, click
        shot = os.environ.get("LAPSAM_APP_SCREENSHOT")
        if shot:
            driver.save_screenshot(shot)
        code, data = app.request("GET", "/api/save?format=npz")  # before the drop below replaces the image
        assert code == 200

        # drag and drop: a PNG made in the page, dropped on it
        driver.execute_script("""
            const c = document.createElement('canvas'); c.width = 48; c.height = 40;
            const g = c.getContext('2d'); g.fillStyle = '#808080'; g.fillRect(0, 0, 48, 40);
            c.toBlob((blob) => {
              const dt = new DataTransfer();
              dt.items.add(new File([blob], 'dropped.png', { type: 'image/png' }));
              document.dispatchEvent(new DragEvent('drop', { dataTransfer: dt, bubbles: true, cancelable: true }));
            }, 'image/png');""")
        _wait(lambda: driver.execute_script(
            "const s = window.lapsam.view.state; return s.image && s.image.name === 'dropped'"), what="the drop")
        st = driver.execute_script("return window.lapsam.view.state.image")
        assert st["source"] == "picture" and (st["height"], st["width"]) == (40, 48)
    finally:
        driver.quit()
    assert code == 200
    with np.load(io.BytesIO(data)) as z:
        got_click = z["segs"]
    ref_click = pred.predict_prompts(case.image[None], [ClassPrompt(1, SliceBox(*drawn, 0, 0, 0), fg=[tuple(click[0])])],
                                     prev_pred=got_box[None])[0]
    np.testing.assert_array_equal(got_click, ref_click)
    assert not np.array_equal(got_click, got_box)
    assert saved.name == f"{CASE_2D}.npz"
    with np.load(saved) as z:
        got = z["segs"]
    assert int((got > 0).sum()) == shown  # what the page showed is what was saved

    # lapsam predict on a challenge case holding the same image and box
    inp = tmp_path / "in"
    _npz_case(inp / f"{CASE_2D}.npz", case.image, [drawn])
    assert main(["predict", "-i", str(inp), "-o", str(tmp_path / "ref"), "--model", str(small_model_dir),
                 "--threads", "1", "--no-progress"]) == 0
    with np.load(tmp_path / "ref" / f"{CASE_2D}.npz") as z:
        ref = z["segs"]
    assert got.shape == ref.shape == case.image.shape[:2] and got.dtype == ref.dtype
    np.testing.assert_array_equal(got, ref)
    assert 0 < int(got.sum())
