"""`lapsam distill prepare`, the slice datasets, configs with overrides."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lapsam.case import load_case
from lapsam.manifest import Preprocessing
from lapsam.preprocess import preprocess_image
from lapsam.safe_npz import load_npz


def _volume(shape=(6, 40, 50)):
    rng = np.random.default_rng(0)
    img = rng.normal(40, 30, size=shape).astype(np.int16)
    img[:, 10:20, 10:25] = 300  # bright
    lab = np.zeros(shape, np.uint8)
    lab[1:5, 10:20, 10:25] = 3  # 600 voxels: kept
    lab[2, 30:32, 40:42] = 7  # 4 voxels: removed as too small
    return img, lab


def _write_sitk(arr: np.ndarray, path: Path, spacing=(0.8, 0.7, 2.5)) -> None:
    import SimpleITK as sitk

    im = sitk.GetImageFromArray(arr)
    im.SetSpacing(spacing)
    sitk.WriteImage(im, str(path))


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_prepare_ct_volume(tmp_path: Path, suffix: str) -> None:
    from lapsam.distill.prepare import PrepareConfig, prepare

    img, lab = _volume()
    (tmp_path / "im").mkdir()
    (tmp_path / "lb").mkdir()
    _write_sitk(img, tmp_path / "im" / f"case1{suffix}")
    _write_sitk(lab, tmp_path / "lb" / f"case1{suffix}")
    written, errors = prepare(tmp_path / "im", tmp_path / "lb", tmp_path / "out",
                              PrepareConfig(modality="CT", min_size_3d=100, min_size_slice=10))
    assert errors == [] and len(written) == 1
    assert written[0].name == "3DBox_CT_case1.npz"
    case = load_case(written[0])
    gts = load_npz(tmp_path / "out" / "gts" / "3DBox_CT_case1.npz")["gts"]
    # cropped to the labelled slices 1..4, labels renumbered 1..N, the small object gone
    assert case.image.shape == (4, 40, 50) and gts.shape == (4, 40, 50)
    assert sorted(np.unique(gts).tolist()) == [0, 1]
    assert case.boxes.tolist() == [[10, 10, 0, 24, 19, 3]]
    assert case.spacing == pytest.approx((0.8, 0.7, 2.5))
    # window 40/400: 300 HU -> 255, -160 HU -> 0, 40 HU -> 127.5
    assert case.image[0, 12, 12] == 255
    expect = np.clip(np.rint((np.clip(img[1:5].astype(np.float64), -160, 240) + 160) * 255 / 400), 0, 255)
    assert np.array_equal(case.image, expect.astype(np.uint8))


def test_prepare_mr_dicom_series_and_bad_case(tmp_path: Path) -> None:
    """A DICOM series (modality from its tags) converts; a mismatched label fails alone."""
    import SimpleITK as sitk
    from lapsam.distill.prepare import PrepareConfig, convert_case, prepare

    img, lab = _volume((5, 32, 32))
    img = np.abs(img).astype(np.int16) + 1
    series = tmp_path / "dcm"
    series.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(img.shape[0]):
        sl = sitk.GetImageFromArray(img[z])
        sl.SetSpacing((0.9, 0.9))
        sl.SetMetaData("0008|0060", "MR")
        sl.SetMetaData("0020|0013", str(z + 1))
        sl.SetMetaData("0020|0032", f"0\\0\\{z * 3.0}")
        sl.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.1")
        sl.SetMetaData("0020|000d", "1.2.826.0.1.3680043.2.1125.2")
        writer.SetFileName(str(series / f"s{z:03d}.dcm"))
        writer.Execute(sl)
    _write_sitk(lab[:, :32, :32], tmp_path / "lab.nii.gz", (0.9, 0.9, 3.0))
    out = convert_case(series, tmp_path / "lab.nii.gz", tmp_path / "out", PrepareConfig(min_size_3d=10, min_size_slice=5))
    assert out is not None and out.name == "3DBox_MR_dcm.npz"
    imgs = load_npz(out)["imgs"]
    assert imgs.dtype == np.uint8 and imgs.shape[0] == 4 and imgs.max() == 255
    # a label of the wrong size: that case fails with a clear message, nothing is written for it
    _write_sitk(np.zeros((5, 10, 10), np.uint8), tmp_path / "bad.nii.gz")
    written, errors = prepare(series, tmp_path / "bad.nii.gz", tmp_path / "out2", PrepareConfig())
    assert written == [] and len(errors) == 1 and "differs from image shape" in errors[0]
    assert not (tmp_path / "out2" / "imgs").exists() or not any((tmp_path / "out2" / "imgs").iterdir())


def test_slice_dataset_uses_runtime_preprocessing(imgs_dir: Path) -> None:
    from lapsam.distill.data import (
        CaseStore,
        FeatureSliceDataset,
        PromptSliceDataset,
        find_cases,
        index_slices,
        modality_weights,
    )

    cases = find_cases([imgs_dir / "3DBox_MR_Breast1.npz", imgs_dir / "3DBox_CT_TotalSegSmall.npz",
                        imgs_dir / "2DBox_CT_s0114_111.npz"])
    assert [c.modality for c in cases] == ["CT", "CT", "MR"]
    store = CaseStore(cases)
    refs = index_slices(store, fg_only=True)
    n_mr = sum(r.modality == "MR" for r in refs)
    gts_mr = load_npz(imgs_dir.parent / "gts" / "3DBox_MR_Breast1.npz")["gts"]
    assert n_mr == int(gts_mr.reshape(gts_mr.shape[0], -1).any(1).sum())
    w = modality_weights(refs)
    assert w[[r.modality == "MR" for r in refs]].sum() == pytest.approx(0.5)
    pp = Preprocessing(input_size=128, resize="stretch")
    ds = FeatureSliceDataset(store, refs, pp, Preprocessing(256))
    i = next(k for k, r in enumerate(refs) if r.z >= 0)
    item = ds[i]
    img = load_npz(cases[refs[i].case].image)["imgs"][refs[i].z]
    assert np.array_equal(item["image"], preprocess_image(img, pp)[0][0])
    assert item["teacher_image"].shape == (3, 256, 256)
    # stage 2 items: masks match the image geometry, prompts lie on the object
    from lapsam.distill.data import AugmentConfig, FinetuneItemConfig, PromptConfig

    cfg = FinetuneItemConfig(AugmentConfig(enabled=False), PromptConfig(box_jitter=0.0, point_prob=1.0, objects_per_image=2))
    pds = PromptSliceDataset(store, refs, pp, cfg, seed=0)
    it = pds[i]
    assert it["masks"].shape == (2, 128, 128) and it["boxes"].shape == (2, 4)
    m = it["masks"][0] > 0
    ys, xs = np.nonzero(m)
    assert it["boxes"][0].tolist() == [xs.min(), ys.min(), xs.max(), ys.max()]
    first = it["point_coords"][0, 0].astype(int)
    assert it["point_labels"][0, 0] == 1 and m[first[1], first[0]]
    # deterministic in (seed, epoch, index)
    assert np.array_equal(pds[i]["point_coords"], it["point_coords"])


def test_config_overrides(tmp_path: Path) -> None:
    from lapsam.distill.config import EncoderConfig, FinetuneConfig, load_config

    cfg = load_config(FinetuneConfig, "finetune.yaml", ["train.lr=1e-4", "data.train=[a, b]", "augment.scale=[0.9, 1.1]",
                                                       "model.init_checkpoint=null"])
    assert cfg.train.lr == 1e-4 and cfg.data.train == ["a", "b"] and cfg.augment.scale == (0.9, 1.1)
    assert cfg.model.init_checkpoint is None
    enc = load_config(EncoderConfig, "encoder.yaml", [])
    assert enc.cache.enabled is True and enc.model.teacher == "sam2.1_hiera_t"
    with pytest.raises(ValueError, match="unknown config key 'train.lrr'"):
        load_config(FinetuneConfig, None, ["train.lrr=1"])
    with pytest.raises(ValueError, match="integer"):
        load_config(FinetuneConfig, None, ["train.batch_size=2.5"])
