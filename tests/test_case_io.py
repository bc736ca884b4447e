"""Case I/O: round trips of the real cases, the 2025 format, safe loading, and the bad-input matrix."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest

from lapsam.case import FORMAT_2025, Case, case_from_arrays, list_cases, load_case, segs_dtype
from lapsam.errors import CaseError, UnsafePickleError
from lapsam.safe_npz import load_npz, restricted_loads
from lapsam.writers import atomic_savez, write_segs


def _save(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


# ---- round trip of every shared case -----------------------------------------------------

def test_shared_cases_round_trip(imgs_dir: Path, gts_dir: Path, tmp_path: Path) -> None:
    files = list_cases(imgs_dir)
    assert len(files) == 10
    for f in files:
        case = load_case(f)
        gt = np.load(gts_dir / f.name, allow_pickle=False)["gts"]
        assert case.spatial_shape == gt.shape
        assert case.num_boxes == int(gt.max())
        assert not case.box_errors and not case.warnings
        # write the reference as if it were a prediction, read it back
        out = write_segs(tmp_path / f.name, gt, case.num_boxes)
        back = load_npz(out)
        assert list(back) == ["segs"]
        np.testing.assert_array_equal(back["segs"], gt)
        assert back["segs"].dtype == case.segs_dtype
        # and the case itself survives a write/read through the safe loader
        again = tmp_path / f"again_{f.name}"
        atomic_savez(again, imgs=case.image, boxes=case.boxes, spacing=np.asarray(case.spacing))
        case2 = load_case(again)
        np.testing.assert_array_equal(case2.image, case.image)
        np.testing.assert_array_equal(case2.boxes, case.boxes)
        assert case2.spacing == case.spacing


def test_case_fields(imgs_dir: Path) -> None:
    c = load_case(imgs_dir / "3DBox_MR_Breast1.npz")
    assert c.is_3d and c.modality == "MR" and c.format == "2024"
    assert c.spacing == pytest.approx((0.664062, 0.664062, 2.1))
    assert c.spacing_zyx == pytest.approx((2.1, 0.664062, 0.664062))
    assert c.boxes.shape == (1, 6) and c.boxes.dtype == np.int64
    c2 = load_case(imgs_dir / "2DBox_Microscope_Nuclei.npz")
    assert not c2.is_3d and c2.modality == "Microscopy" and c2.spatial_shape == (512, 512)


@pytest.mark.parametrize(
    "name, modality",
    [
        ("2DBox_OCT_0001", "OCT"), ("3DBox_CT_0566", "CT"), ("2DBox_X-Ray_0001", "XRay"), ("2DBox_CXR_7", "XRay"),
        ("2DBox_XRay_1", "XRay"), ("2DBox_Endoscope_1", "Endoscopy"), ("2DBox_Endoscopy_1", "Endoscopy"),
        ("2DBox_Microscope_1", "Microscopy"), ("2DBox_Microscopy_1", "Microscopy"), ("3DBox_PET_0001", "PET"),
        ("2DBox_US_0001", "US"), ("2DBox_Fundus_1", "Fundus"), ("2DBox_Dermoscopy_1", "Dermoscopy"),
        ("2DBox_Mammography_1", "Mammography"), ("3DBox_MR_0621", "MR"), ("whatever", "Unknown"),
    ],
)
def test_modality_from_name(name: str, modality: str) -> None:
    from lapsam.modality import parse_modality

    assert parse_modality(name) == modality


# ---- 2025 format ----------------------------------------------------------------------------

def _case_2025(tmp_path: Path, with_boxes: bool = True) -> Path:
    img = np.random.default_rng(0).integers(0, 255, (20, 64, 80), dtype=np.uint8)
    arrays = dict(imgs=img, spacing=np.array([0.8, 0.8, 2.5]))
    if with_boxes:
        arrays["boxes"] = np.array(
            [
                {"z_min": 2, "z_max": 10, "z_mid": 6, "z_mid_x_min": 5, "z_mid_y_min": 6, "z_mid_x_max": 30, "z_mid_y_max": 40},
                {"z_min": np.int64(8), "z_max": np.int64(19), "z_mid": np.int64(12), "z_mid_x_min": 40,
                 "z_mid_y_min": 10, "z_mid_x_max": 79, "z_mid_y_max": 50},
            ],
            dtype=object,
        )
    arrays["clicks"] = np.array(
        [{"fg": [[6, 20, 15]], "bg": [[6, 2, 2], [7, 3, 3]]}, {"fg": [np.array([12, 30, 60])], "bg": []}], dtype=object
    )
    arrays["clicks_order"] = np.array([["fg", "bg", "bg"], ["fg"]], dtype=object)
    arrays["prev_pred"] = np.zeros(img.shape, np.uint8)
    return _save(tmp_path / "3DBox_CT_interactive_0001.npz", **arrays)


def test_2025_case(tmp_path: Path) -> None:
    c = load_case(_case_2025(tmp_path))
    assert c.format == FORMAT_2025 and c.is_3d
    assert c.box_dicts is not None and len(c.box_dicts) == 2
    np.testing.assert_array_equal(c.boxes[1], [40, 10, 8, 79, 50, 19])
    np.testing.assert_array_equal(c.box_mid_z, [6, 12])
    assert c.clicks == [{"fg": [[6, 20, 15]], "bg": [[6, 2, 2], [7, 3, 3]]}, {"fg": [[12, 30, 60]], "bg": []}]
    assert c.clicks_order == [["fg", "bg", "bg"], ["fg"]]
    assert c.prev_pred is not None and c.prev_pred.shape == c.image.shape
    assert all(type(v) is int for d in c.box_dicts for v in d.values())


def test_2025_case_without_boxes(tmp_path: Path) -> None:
    c = load_case(_case_2025(tmp_path, with_boxes=False))
    assert c.box_dicts is None and c.num_boxes == 0 and c.num_objects == 2
    assert c.empty_segs().shape == (20, 64, 80)


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


def test_malicious_pickle_is_rejected_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    _Evil.marker = str(marker)
    path = tmp_path / "3DBox_CT_evil.npz"
    np.savez(path, imgs=np.zeros((2, 8, 8), np.uint8), clicks=np.array([{"fg": [_Evil()]}], dtype=object))
    # sanity: numpy's own unpickling would run it
    with zipfile.ZipFile(path) as zf:
        assert b"system" in zf.read("clicks.npy")
    with pytest.raises(UnsafePickleError, match="forbidden global"):
        load_case(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload",
    [
        pickle.dumps(eval),  # builtins.eval
        pickle.dumps(Path("/etc/passwd")),  # a class outside the allow-list
        pickle.dumps({1, 2, 3}),  # set: not plain data here
    ],
)
def test_restricted_unpickler_refuses_non_plain(payload: bytes) -> None:
    with pytest.raises(pickle.UnpicklingError):
        restricted_loads(payload)


def test_restricted_unpickler_accepts_plain() -> None:
    obj = {"a": [1, 2.5, "x", None, True, (3, 4)], "b": np.arange(3), "c": np.int64(7)}
    back = restricted_loads(pickle.dumps(obj, protocol=4))
    assert back["a"] == obj["a"] and back["c"] == 7
    np.testing.assert_array_equal(back["b"], obj["b"])


# ---- bad input matrix ---------------------------------------------------------------------

def test_missing_imgs(tmp_path: Path) -> None:
    p = _save(tmp_path / "2DBox_US_1.npz", boxes=np.array([[1, 1, 5, 5]]))
    with pytest.raises(CaseError, match="2DBox_US_1.npz: missing key 'imgs'"):
        load_case(p)


def test_missing_boxes(tmp_path: Path) -> None:
    p = _save(tmp_path / "2DBox_US_1.npz", imgs=np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(CaseError, match="missing key 'boxes'"):
        load_case(p)


@pytest.mark.parametrize(
    "name, shape, msg",
    [
        ("3DBox_CT_1", (8, 8), r"expected \(D, H, W\)"),
        ("3DBox_CT_1", (2, 8, 8, 3), r"expected \(D, H, W\)"),
        ("2DBox_US_1", (8, 8), r"expected \(H, W, 3\)"),
        ("2DBox_US_1", (8, 8, 4), r"expected \(H, W, 3\)"),
        ("3DBox_CT_1", (0, 8, 8), "empty"),
    ],
)
def test_wrong_shape(tmp_path: Path, name: str, shape: tuple, msg: str) -> None:
    ncols = 6 if name.startswith("3D") else 4
    p = _save(tmp_path / f"{name}.npz", imgs=np.zeros(shape, np.uint8), boxes=np.zeros((1, ncols), np.int64))
    with pytest.raises(CaseError, match=msg):
        load_case(p)


def test_uint16_image_is_rescaled(tmp_path: Path) -> None:
    img = np.linspace(0, 4000, 2 * 8 * 8).reshape(2, 8, 8).astype(np.uint16)
    p = _save(tmp_path / "3DBox_CT_1.npz", imgs=img, boxes=np.array([[0, 0, 0, 3, 3, 1]]))
    c = load_case(p)
    assert c.image.dtype == np.uint8 and c.image.min() == 0 and c.image.max() == 255
    assert any("rescaled" in w for w in c.warnings)


def test_float_image_in_range_is_cast(tmp_path: Path) -> None:
    img = np.full((8, 8, 3), 17.0, np.float32)
    c = load_case(_save(tmp_path / "2DBox_US_1.npz", imgs=img, boxes=np.array([[0, 0, 3, 3]])))
    assert c.image.dtype == np.uint8 and int(c.image[0, 0, 0]) == 17
    assert any("cast" in w for w in c.warnings)


@pytest.mark.parametrize("bad", [np.full((4, 8, 8), np.nan, np.float32), np.zeros((4, 8, 8), bool)])
def test_bad_image_dtype(tmp_path: Path, bad: np.ndarray) -> None:
    p = _save(tmp_path / "3DBox_CT_1.npz", imgs=bad, boxes=np.array([[0, 0, 0, 3, 3, 1]]))
    with pytest.raises(CaseError, match="imgs"):
        load_case(p)


def test_inverted_box(tmp_path: Path) -> None:
    p = _save(tmp_path / "2DBox_US_1.npz", imgs=np.zeros((16, 16, 3), np.uint8), boxes=np.array([[1, 1, 5, 5], [9, 2, 4, 6]]))
    with pytest.raises(CaseError, match=r"box 2 is inverted \(x_min > x_max\)"):
        load_case(p)


def test_inverted_z(tmp_path: Path) -> None:
    p = _save(tmp_path / "3DBox_CT_1.npz", imgs=np.zeros((6, 16, 16), np.uint8), boxes=np.array([[1, 1, 4, 5, 5, 2]]))
    with pytest.raises(CaseError, match=r"z_min > z_max"):
        load_case(p)


def test_box_partly_outside_is_clipped(tmp_path: Path) -> None:
    p = _save(tmp_path / "2DBox_US_1.npz", imgs=np.zeros((16, 20, 3), np.uint8), boxes=np.array([[-3, 2, 30, 10]]))
    c = load_case(p)
    np.testing.assert_array_equal(c.boxes, [[0, 2, 19, 10]])
    assert any("clipped" in w for w in c.warnings) and not c.box_errors


def test_box_wholly_outside_is_an_error_for_that_box(tmp_path: Path) -> None:
    p = _save(
        tmp_path / "3DBox_CT_1.npz",
        imgs=np.zeros((6, 16, 16), np.uint8),
        boxes=np.array([[1, 1, 0, 5, 5, 2], [1, 1, 7, 5, 5, 9], [20, 20, 0, 30, 30, 1]]),
    )
    c = load_case(p)
    assert set(c.box_errors) == {1, 2}
    assert "wholly outside" in c.box_errors[1]
    assert c.valid_box_indices == [0]


def test_zero_boxes_is_valid(tmp_path: Path) -> None:
    p = _save(tmp_path / "2DBox_US_1.npz", imgs=np.zeros((16, 16, 3), np.uint8), boxes=np.zeros((0, 4), np.int64))
    c = load_case(p)
    assert c.num_boxes == 0
    segs = c.empty_segs()
    assert segs.shape == (16, 16) and segs.dtype == np.uint8 and not segs.any()


def test_boxes_wrong_columns(tmp_path: Path) -> None:
    p = _save(tmp_path / "3DBox_CT_1.npz", imgs=np.zeros((6, 16, 16), np.uint8), boxes=np.array([[1, 1, 5, 5]]))
    with pytest.raises(CaseError, match=r"expected \(N, 6\)"):
        load_case(p)


def test_truncated_file(tmp_path: Path, imgs_dir: Path) -> None:
    data = (imgs_dir / "2DBox_CT_amos_0004_75.npz").read_bytes()
    p = tmp_path / "2DBox_CT_amos_0004_75.npz"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(CaseError, match="2DBox_CT_amos_0004_75.npz: .*(truncated|corrupt|not a valid)"):
        load_case(p)


def test_not_a_zip(tmp_path: Path) -> None:
    p = tmp_path / "2DBox_US_1.npz"
    p.write_text("hello")
    with pytest.raises(CaseError, match="not a valid npz"):
        load_case(p)


def test_corrupt_member(tmp_path: Path) -> None:
    p = tmp_path / "2DBox_US_1.npz"
    np.savez_compressed(p, imgs=np.zeros((64, 64, 3), np.uint8), boxes=np.array([[1, 1, 5, 5]]))
    raw = bytearray(p.read_bytes())
    raw[60:80] = b"\xff" * 20  # inside the first member's compressed data
    p.write_bytes(bytes(raw))
    with pytest.raises(CaseError):
        load_case(p)


def test_hundreds_of_boxes_use_uint16(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    lo = rng.integers(0, 200, (300, 2))
    boxes = np.concatenate([lo, lo + 10], axis=1)
    c = load_case(_save(tmp_path / "2DBox_Microscope_1.npz", imgs=np.zeros((256, 256, 3), np.uint8), boxes=boxes))
    assert c.num_boxes == 300 and c.segs_dtype == np.uint16
    assert segs_dtype(255) == np.uint8 and segs_dtype(256) == np.uint16


# ---- writing ----------------------------------------------------------------------------

def test_write_segs_dtype_and_overflow(tmp_path: Path) -> None:
    segs = np.zeros((4, 4), np.int64)
    segs[0, 0] = 300
    out = write_segs(tmp_path / "x.npz", segs, num_objects=300)
    assert load_npz(out)["segs"].dtype == np.uint16
    with pytest.raises(ValueError):
        write_segs(tmp_path / "y.npz", segs, num_objects=10)
    assert not (tmp_path / "y.npz").exists()


def test_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "out.npz"
    write_segs(target, np.ones((3, 3), np.uint8), 1)
    before = target.read_bytes()

    def boom(*a, **k):
        raise KeyboardInterrupt  # an interrupted run

    monkeypatch.setattr(np, "savez_compressed", boom)
    with pytest.raises(KeyboardInterrupt):
        write_segs(target, np.full((3, 3), 2, np.uint8), 2)
    assert target.read_bytes() == before  # old file intact
    assert [p.name for p in tmp_path.iterdir()] == ["out.npz"]  # no temporary left behind


def test_case_from_arrays_without_path() -> None:
    c = case_from_arrays("2DBox_US_x", {"imgs": np.zeros((8, 8, 3), np.uint8), "boxes": np.array([[0, 0, 2, 2]])})
    assert isinstance(c, Case) and c.path is None and c.modality == "US"
