"""``lapsam segment IMAGE --box ... -o MASK``: NIfTI / DICOM / PNG in, a mask with the input's geometry
out, equal to ``lapsam predict`` on a challenge case holding the same image and boxes; bad input is a
one-line error (exit 2) and writes nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lapsam.case import load_case
from lapsam.cli import main
from lapsam.writers import atomic_savez

nib = pytest.importorskip("nibabel")
sitk = pytest.importorskip("SimpleITK")
Image = pytest.importorskip("PIL.Image")

CASE_2D = "2DBox_CT_amos_0004_75"
CASE_3D = "3DBox_CT_TotalSegSmall"


def _predict(model: Path, tmp: Path, name: str, image: np.ndarray, boxes) -> np.ndarray:
    """``lapsam predict`` on a challenge case holding ``image`` and ``boxes`` (the reference)."""
    inp, out = tmp / "ref_in", tmp / "ref_out"
    atomic_savez(inp / f"{name}.npz", imgs=image, boxes=np.asarray(boxes, np.int64))
    assert main(["predict", "-i", str(inp), "-o", str(out), "--model", str(model), "--threads", "1",
                 "--no-progress"]) == 0
    with np.load(out / f"{name}.npz") as z:
        return z["segs"]


def _segment(model: Path, *args: str) -> int:
    return main(["segment", *args, "--model", str(model), "--threads", "1", "--no-progress"])


def test_png_in_png_and_npz_out(small_model_dir: Path, imgs_dir: Path, tmp_path: Path):
    case = load_case(imgs_dir / f"{CASE_2D}.npz")
    Image.fromarray(case.image).save(tmp_path / "slice.png")
    boxes = [[150, 140, 300, 330], [100, 100, 200, 200]]
    ref = _predict(small_model_dir, tmp_path, CASE_2D, case.image, boxes)
    args = [str(tmp_path / "slice.png"), "--box", "150,140,300,330", "--box", "100,100,200,200"]
    assert _segment(small_model_dir, *args, "-o", str(tmp_path / "mask.png")) == 0
    assert _segment(small_model_dir, *args, "-o", str(tmp_path / "mask.npz")) == 0
    png = np.asarray(Image.open(tmp_path / "mask.png"))
    np.testing.assert_array_equal(png, ref)
    with np.load(tmp_path / "mask.npz") as z:
        np.testing.assert_array_equal(z["segs"], ref)
    assert ref.max() == 2 or (ref == 1).any()  # something was segmented


def test_nifti_3d_keeps_affine_and_equals_predict(small_model_dir: Path, imgs_dir: Path, tmp_path: Path):
    case = load_case(imgs_dir / f"{CASE_3D}.npz")
    affine = np.array([[0.0, -3.0, 0.0, 100.0], [-3.0, 0.0, 0.0, 50.0], [0.0, 0.0, 3.0, -20.0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(np.ascontiguousarray(case.image.transpose(2, 1, 0)), affine), tmp_path / "ct.nii.gz")
    boxes = case.boxes[:3]
    ref = _predict(small_model_dir, tmp_path, CASE_3D, case.image, boxes)
    args = [str(tmp_path / "ct.nii.gz"), "-o", str(tmp_path / "mask.nii.gz")]
    for b in boxes:
        args += ["--box", ",".join(str(int(v)) for v in b)]
    assert _segment(small_model_dir, *args) == 0  # uint8 NIfTI: used as stored, like the npz
    out = nib.load(tmp_path / "mask.nii.gz")
    np.testing.assert_allclose(out.affine, affine)
    m = np.asanyarray(out.dataobj)
    assert m.shape == case.image.shape[::-1] and m.dtype == np.uint8
    np.testing.assert_array_equal(m.transpose(2, 1, 0), ref)
    assert ref.max() >= 1


def test_dicom_series_to_nifti_with_ct_window(small_model_dir: Path, tmp_path: Path):
    from test_app import write_dicom_series

    rng = np.random.default_rng(3)
    hu = rng.integers(-300, 400, (6, 48, 64)).astype(np.int16)
    hu[:, 10:30, 20:40] = 60
    write_dicom_series(tmp_path / "series", hu)
    box = [18, 8, 1, 42, 32, 4]
    # the CT soft-tissue window (level 40, width 400) written out by hand
    u8 = np.rint((np.clip(hu.astype(np.float64), -160, 240) + 160) * 255.0 / 400.0).astype(np.uint8)
    ref = _predict(small_model_dir, tmp_path, "3DBox_CT_series", u8, [box])
    assert _segment(small_model_dir, str(tmp_path / "series"), "--box", ",".join(map(str, box)),
                    "-o", str(tmp_path / "m.nii.gz")) == 0
    r = sitk.ImageSeriesReader()
    r.SetFileNames(r.GetGDCMSeriesFileNames(str(tmp_path / "series")))
    img, m = r.Execute(), sitk.ReadImage(str(tmp_path / "m.nii.gz"))
    assert m.GetOrigin() == pytest.approx(img.GetOrigin(), abs=1e-4)
    assert m.GetDirection() == pytest.approx(img.GetDirection(), abs=1e-5)
    assert m.GetSpacing() == pytest.approx(img.GetSpacing(), abs=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(m), ref)


def test_bad_input_one_line_exit_2_nothing_written(small_model_dir: Path, imgs_dir: Path, tmp_path: Path):
    case = load_case(imgs_dir / f"{CASE_3D}.npz")
    nib.save(nib.Nifti1Image(np.ascontiguousarray(case.image.transpose(2, 1, 0)), np.eye(4)), tmp_path / "v.nii.gz")
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "p.png")
    (tmp_path / "notes.txt").write_text("x")
    v, p = str(tmp_path / "v.nii.gz"), str(tmp_path / "p.png")
    bad = [
        ([v, "--box", "1,2,3,4", "-o", "m.nii.gz"], "x0,y0,z0,x1,y1,z1"),
        ([p, "--box", "1,2,0,3,4,1", "-o", "m.png"], "x0,y0,x1,y1"),
        ([p, "--box", "1,2,x,4", "-o", "m.png"], "integers"),
        ([p, "--box", "40,50,60,70", "-o", "m.png"], "wholly outside"),
        ([p, "--box", "9,2,3,4", "-o", "m.png"], "inverted"),
        ([v, "--box", "1,2,3,10,12,5", "-o", "m.png"], "PNG masks are 2D"),
        ([p, "--box", "1,2,3,4", "-o", "m.tif"], "must end in"),
        ([p, "-o", "m.png"], "at least one --box"),
        ([str(tmp_path / "notes.txt"), "--box", "1,2,3,4", "-o", "m.png"], "unsupported file type"),
        ([str(tmp_path / "nope.nii"), "--box", "1,2,3,4", "-o", "m.png"], "does not exist"),
        ([v, "--window", "ct-sfot", "--box", "1,2,3,10,12,5", "-o", "m.npz"], "window"),
    ]
    env = dict(os.environ)
    env.pop("LAPSAM_MODEL_DIR", None)
    for args, what in bad:
        r = subprocess.run([sys.executable, "-m", "lapsam.cli", "segment", *args, "--model", str(small_model_dir),
                            "--no-progress"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
        err = r.stderr.strip()
        assert r.returncode in (1, 2) and what in err, (args, r.returncode, err)
        assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert not [f for f in tmp_path.iterdir() if f.name.startswith("m.")]  # nothing written
