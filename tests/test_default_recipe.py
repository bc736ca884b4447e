"""The default-model recipe: box prior, hold-out split, group balancing, neighbour-slice boxes,
box-fill reference, training curve, and a tiny run through config -> train -> export -> predict -> metrics."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from lapsam.distill.data import (  # noqa: E402
    AugmentConfig,
    CaseFiles,
    CaseStore,
    FinetuneItemConfig,
    PromptConfig,
    PromptSliceDataset,
    SliceRef,
    case_group,
    case_patient,
    modality_weights,
    split_cases,
)
from lapsam.distill.modeling import BoxPrior  # noqa: E402
from lapsam.manifest import Preprocessing  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _prior_reference(low: int, size: int, box: tuple[float, float, float, float], scale: float) -> np.ndarray:
    """Independent loop: +scale where the low-res cell centre lies in [x0, x1+1) x [y0, y1+1)."""
    x0, y0, x1, y1 = box
    out = np.empty((low, low), np.float32)
    cell = size / low
    for i in range(low):
        for j in range(low):
            cy, cx = (i + 0.5) * cell, (j + 0.5) * cell
            out[i, j] = scale if (x0 <= cx < x1 + 1 and y0 <= cy < y1 + 1) else -scale
    return out


def test_box_prior_matches_a_direct_loop_and_skips_click_only_prompts():
    prior = BoxPrior(3.0, 64)
    low = torch.zeros(3, 1, 16, 16)
    coords = torch.tensor([[[10.0, 20.0], [30.0, 41.0]], [[0.0, 0.0], [63.0, 63.0]], [[5.0, 5.0], [9.0, 9.0]]])
    labels = torch.tensor([[2, 3], [2, 3], [-1, -1]])
    out = prior(low, coords, labels)[:, 0].detach().numpy()
    np.testing.assert_array_equal(out[0], _prior_reference(16, 64, (10, 20, 30, 41), 3.0))
    np.testing.assert_array_equal(out[1], np.full((16, 16), 3.0, np.float32))
    np.testing.assert_array_equal(out[2], np.zeros((16, 16), np.float32))  # clicks only: no prior
    # the scale is learned: it gets a gradient
    prior(low, coords, labels).sum().backward()
    assert prior.scale.grad is not None and float(prior.scale.grad) != 0.0


def test_exported_decoder_applies_the_same_prior_and_minus_one_boxes_mean_clicks_only(tmp_path):
    from lapsam.distill.modeling import LapSamConfig, StudentConfig, build_lapsam
    from lapsam.export.graphs import DecoderGraph, example_decoder_inputs

    torch.manual_seed(0)
    model = build_lapsam(LapSamConfig(student=StudentConfig(backbone="efficientvit_b0", input_size=64), box_prior=4.0)).eval()
    graph = DecoderGraph(model).eval()
    ins = list(example_decoder_inputs(64, num_boxes=2, num_points=1))
    with torch.no_grad():
        got, _ = graph(*ins)
        want, _ = model.decode(ins[0], ins[1], ins[2], boxes=ins[3], point_coords=ins[4], point_labels=ins[5],
                               repeat_image=True)
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5)
        # a -1 box: the graph equals the model prompted with the clicks alone after two padding points
        ins[3] = torch.tensor([[-1.0, -1.0, -1.0, -1.0]] * 2)
        got, _ = graph(*ins)
        pad_c = torch.zeros(2, 2, 2)
        pad_l = -torch.ones(2, 2)
        want, _ = model.decode(ins[0], ins[1], ins[2], point_coords=torch.cat([pad_c, ins[4]], 1),
                               point_labels=torch.cat([pad_l, ins[5]], 1), repeat_image=True)
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5)


def test_case_groups_and_patients():
    assert case_group("2DBox_US_BUSI_10089") == "2DBox_US_BUSI"
    assert case_patient("2DBox_CT_CURVAS_10001-458") == case_patient("2DBox_CT_CURVAS_10001-650")
    assert case_patient("2DBox_CT_CURVAS_10001-458") != case_patient("2DBox_MR_HVSMR2_10001-173")
    assert case_patient("3DBox_PET_IBSISarcomaPET_STS005") == case_patient("3DBox_CT_IBSISarcomaCT_STS005")
    assert case_patient("2DBox_Microscope_Lizard_rotated-180-crag-33") == case_patient("2DBox_Microscope_Lizard_crag-33")
    assert case_patient("2DBox_Mammography_CDDCESM_flipped-P121-L-DM-CC") == case_patient("2DBox_Mammography_CDDCESM_P121-R-CM-MLO")


def _names() -> list[str]:
    names = [f"2DBox_US_A_{i:03d}" for i in range(20)]
    names += [f"2DBox_CT_B_{p}-{s}" for p in (1, 2, 3, 4, 5) for s in (10, 20)]
    names += [f"3DBox_PET_SarcPET_STS{p:03d}" for p in range(10)] + [f"3DBox_CT_SarcCT_STS{p:03d}" for p in range(10)]
    names += [f"2DBox_Endoscopy_Held_{i}" for i in range(4)]
    return names


def test_split_holds_groups_and_whole_patients():
    cases = [CaseFiles(n, Path(n), None, n.split("_")[1]) for n in _names()]
    train, val = split_cases(cases, 0.2, seed=3, val_groups=["Held"])
    tn, vn = {c.name for c in train}, {c.name for c in val}
    assert tn.isdisjoint(vn) and len(tn) + len(vn) == len(cases)
    assert {f"2DBox_Endoscopy_Held_{i}" for i in range(4)} <= vn
    assert {case_patient(n) for n in tn}.isdisjoint({case_patient(n) for n in vn})
    for g in ("2DBox_US_A", "2DBox_CT_B", "3DBox_PET_SarcPET", "3DBox_CT_SarcCT"):
        assert any(case_group(n) == g for n in vn) and any(case_group(n) == g for n in tn)


def test_group_balanced_weights():
    refs = [SliceRef(i, -1, "CT") for i in range(9)] + [SliceRef(9, -1, "CT")] + [SliceRef(10, z, "MR") for z in range(5)]
    groups = ["big"] * 9 + ["small"] + ["mr"] * 5
    w = modality_weights(refs, groups)
    assert w.sum() == pytest.approx(1.0)
    assert w[:10].sum() == pytest.approx(0.5) and w[10:].sum() == pytest.approx(0.5)
    assert w[:9].sum() == pytest.approx(0.25) and w[9] == pytest.approx(0.25)


def _cone_case(tmp_path: Path) -> tuple[CaseStore, np.ndarray]:
    """A 9-slice CT volume whose one object (a bright cone) is wider on every slice."""
    vol = np.zeros((9, 64, 64), np.uint8)
    gts = np.zeros((9, 64, 64), np.uint8)
    for z in range(9):
        r = 4 + 2 * z  # a cone: wider on every slice
        gts[z, 32 - r // 2: 32 + r // 2 + 1, 10: 10 + r] = 1
        vol[z] = 40 + 150 * gts[z]
    (tmp_path / "imgs").mkdir()
    (tmp_path / "gts").mkdir()
    np.savez(tmp_path / "imgs" / "3DBox_CT_cone_1.npz", imgs=vol, boxes=np.zeros((1, 6), np.int64), spacing=np.ones(3))
    np.savez(tmp_path / "gts" / "3DBox_CT_cone_1.npz", gts=gts, spacing=np.ones(3))
    store = CaseStore([CaseFiles("3DBox_CT_cone_1", tmp_path / "imgs" / "3DBox_CT_cone_1.npz",
                                 tmp_path / "gts" / "3DBox_CT_cone_1.npz", "CT")])
    return store, gts


def test_neighbour_slice_box(tmp_path):
    """With neighbour_box_prob=1 the prompt box is the object's box on a slice 1..3 away."""
    store, gts = _cone_case(tmp_path)
    pp = Preprocessing(input_size=64)
    cfg = FinetuneItemConfig(AugmentConfig(enabled=False),
                             PromptConfig(box_jitter=0.0, point_prob=0.0, box_prob=1.0, objects_per_image=1,
                                          neighbour_box_prob=1.0, neighbour_max_offset=3))
    z = 4
    ds = PromptSliceDataset(store, [SliceRef(0, z, "CT")], pp, cfg, seed=0, train=True)
    boxes_seen = set()
    for epoch in range(12):
        ds.set_epoch(epoch)
        it = ds[0]
        box = tuple(int(v) for v in it["boxes"][0])
        mask_box = tuple(int(v) for v in (np.nonzero(it["masks"][0])[1].min(), np.nonzero(it["masks"][0])[0].min(),
                                          np.nonzero(it["masks"][0])[1].max(), np.nonzero(it["masks"][0])[0].max()))
        ys, xs = np.nonzero(gts[z])
        assert mask_box == (xs.min(), ys.min(), xs.max(), ys.max())  # the target is this slice's mask
        candidates = set()
        for d in (-3, -2, -1, 1, 2, 3):
            yy, xx = np.nonzero(gts[z + d])
            candidates.add((xx.min(), yy.min(), xx.max(), yy.max()))
        assert box in candidates
        boxes_seen.add(box)
    assert len(boxes_seen) > 1


def test_boxfill_reference(tmp_path):
    from lapsam.case import case_from_arrays
    from lapsam.eval.modelcheck import boxfill_segs

    img = np.zeros((5, 20, 30), np.uint8)
    boxes = np.array([[2, 3, 1, 10, 8, 3], [5, 5, 2, 6, 6, 4]], np.int64)
    case = case_from_arrays("3DBox_CT_x", {"imgs": img, "boxes": boxes, "spacing": np.ones(3)})
    segs = boxfill_segs(case)
    ref = np.zeros_like(segs)
    for z in range(5):
        for y in range(20):
            for x in range(30):
                for i, (x0, y0, z0, x1, y1, z1) in enumerate(boxes):
                    if x0 <= x <= x1 and y0 <= y <= y1 and z0 <= z <= z1:
                        ref[z, y, x] = i + 1
    np.testing.assert_array_equal(segs, ref)


def test_ellipsefill_reference():
    """Ellipse-fill: a voxel is in when its centre lies in the ellipsoid (3D) / ellipse (2D) whose
    axes span the box's inclusive extent, checked voxel by voxel with the ellipse equation."""
    from lapsam.case import case_from_arrays
    from lapsam.eval.modelcheck import ellipsefill_segs

    boxes = np.array([[2, 3, 1, 12, 9, 4], [5, 5, 2, 6, 6, 4]], np.int64)
    case = case_from_arrays("3DBox_CT_x", {"imgs": np.zeros((6, 20, 30), np.uint8), "boxes": boxes,
                                           "spacing": np.ones(3)})
    segs = ellipsefill_segs(case)
    ref = np.zeros_like(segs)
    for z in range(6):
        for y in range(20):
            for x in range(30):
                for i, (x0, y0, z0, x1, y1, z1) in enumerate(boxes):
                    q = sum(((v - (a + c) / 2) / ((c - a + 1) / 2)) ** 2 for v, a, c in
                            ((x, x0, x1), (y, y0, y1), (z, z0, z1)))
                    if q <= 1:
                        ref[z, y, x] = i + 1
    np.testing.assert_array_equal(segs, ref)
    assert (segs == 1).sum() < 11 * 7 * 4  # less than its box
    boxes2 = np.array([[0, 0, 9, 3], [20, 10, 29, 19]], np.int64)
    case2 = case_from_arrays("2DBox_US_x", {"imgs": np.zeros((20, 30, 3), np.uint8), "boxes": boxes2})
    segs2 = ellipsefill_segs(case2)
    ref2 = np.zeros_like(segs2)
    for y in range(20):
        for x in range(30):
            for i, (x0, y0, x1, y1) in enumerate(boxes2):
                if ((x - (x0 + x1) / 2) / ((x1 - x0 + 1) / 2)) ** 2 + ((y - (y0 + y1) / 2) / ((y1 - y0 + 1) / 2)) ** 2 <= 1:
                    ref2[y, x] = i + 1
    np.testing.assert_array_equal(segs2, ref2)
    assert segs2[15, 25] == 2 and segs2[10, 20] == 0  # centre in, corner out


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lapsam.cli", *args], cwd=cwd, capture_output=True, text=True,
                          encoding="utf-8", errors="replace", timeout=900)


@pytest.mark.slow
def test_tiny_recipe_run_config_train_export_predict_metrics(tmp_path):
    """The shipped recipe config, a few steps on two demo cases, through every stage of the pipeline."""
    data = tmp_path / "data"
    for sub in ("imgs", "gts"):
        (data / sub).mkdir(parents=True)
        for n in ("2DBox_CT_amos_0004_75", "3DBox_MR_Breast1"):
            (data / sub / f"{n}.npz").symlink_to(REPO / "demo" / "data" / sub / f"{n}.npz")
    run = tmp_path / "run"
    r = _run("distill", "finetune", "--config", "default_model.yaml", "--set", f"data.train=[{data}]",
             "--set", "model.input_size=64", "--set", "data.samples_per_epoch=8", "--set", "train.epochs=2",
             "--set", "train.batch_size=4", "--set", "data.num_workers=0", "--set", "data.val_fraction=0.0",
             "--set", f"data.val=[{data}]", "--set", "train.warmup_steps=1", "--set", "train.log_every=1",
             "--no-progress", "--out", str(run), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    # --no-progress: no bar, one log line per train.log_every steps (a log file stays readable)
    assert "%|" not in r.stderr and "\r" not in r.stderr
    assert [ln.split()[2] for ln in r.stderr.splitlines() if ln.startswith("finetune step ")] == ["1/4", "2/4", "3/4", "4/4"]
    rows = list(csv.DictReader(open(run / "val_log.csv")))
    assert len(rows) == 2 and all(0.0 <= float(x["dsc"]) <= 1.0 for x in rows)
    r = _run("distill", "plot", str(run), cwd=tmp_path)
    assert r.returncode == 0 and (run / "training_curve.png").read_bytes()[:4] == b"\x89PNG"
    model = tmp_path / "model"
    r = _run("export", str(run / "best.pt"), "--out", str(model), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "eval"
    r = _run("eval", "model", "--cases", str(data), "--model", str(model), "-o", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = list(csv.DictReader(open(out / "model_vs_boxfill.csv")))
    assert [x["case"] for x in rows] == ["2DBox_CT_amos_0004_75", "3DBox_MR_Breast1"]
    assert all(x["status"] == "ok" for x in rows)
    assert all(0.0 < float(x["ellipsefill_dsc"]) <= 1.0 for x in rows)  # the second trivial reference, scored
    assert sorted(p.name for p in (out / "png").iterdir()) == ["2DBox_CT_amos_0004_75.png", "3DBox_MR_Breast1.png"]
    # the predictions are real segs of the input's shape, scored by the metrics
    segs = np.load(out / "segs" / "3DBox_MR_Breast1.npz")["segs"]
    gts = np.load(data / "gts" / "3DBox_MR_Breast1.npz")["gts"]
    assert segs.shape == gts.shape and segs.max() >= 1


def test_volume_box_ellipsoid_prompt_is_the_runtime_section(tmp_path):
    """volume_box_shape="ellipsoid": the prompt is the object's 3D box's ellipsoid section at the slice,
    worked out here from the cone's extent (x 10..29, y 22..42, z 0..8), as the runtime prompts slice z."""
    store, gts = _cone_case(tmp_path)
    pp = Preprocessing(input_size=64)
    cfg = FinetuneItemConfig(AugmentConfig(enabled=False),
                             PromptConfig(box_jitter=0.0, point_prob=0.0, box_prob=1.0, objects_per_image=1,
                                          volume_box_prob=1.0, volume_box_shape="ellipsoid", neighbour_box_prob=0.0))
    for z in (2, 4, 8):
        it = PromptSliceDataset(store, [SliceRef(0, z, "CT")], pp, cfg, seed=0, train=True)[0]
        s = (1 - ((z - 4) / 4.5) ** 2) ** 0.5
        expect = [round(19.5 - 9.5 * s), round(32 - 10 * s), round(19.5 + 9.5 * s), round(32 + 10 * s)]
        assert [int(v) for v in it["boxes"][0]] == expect, z
    assert expect[2] - expect[0] < 29 - 10  # the end slice's box is smaller than the extent
    with pytest.raises(ValueError, match="volume_box_shape"):
        PromptConfig(volume_box_shape="cube")


def test_volume_box_prompt_is_the_given_3d_box(tmp_path):
    """With volume_box_prob=1 a 3D slice is prompted with the object's x/y extent over the whole
    volume (what the runtime's prompt_3d "given" puts on every slice), not with its own box."""
    store, gts = _cone_case(tmp_path)
    # the volume's extent, by an independent scan of every voxel
    zz, yy, xx = np.nonzero(gts)
    given = (xx.min(), yy.min(), xx.max(), yy.max())
    for prob, crop in ((1.0, 0.0), (1.0, 2.5), (0.0, 0.0)):
        pp = Preprocessing(input_size=64, crop_context=crop, crop_mode="box", crop_min_px=16)
        cfg = FinetuneItemConfig(AugmentConfig(enabled=crop > 0, hflip=0, vflip=0, affine_prob=0, intensity_prob=0,
                                               crop_prob=1.0, crop_scale=(1.0, 1.0)),
                                 PromptConfig(box_jitter=0.0, point_prob=0.0, box_prob=1.0, objects_per_image=1,
                                              volume_box_prob=prob, neighbour_box_prob=0.0))
        z = 2
        it = PromptSliceDataset(store, [SliceRef(0, z, "CT")], pp, cfg, seed=0, train=True)[0]
        m = it["masks"][0] > 0
        ys, xs = np.nonzero(m)
        mask_box = np.array([xs.min(), ys.min(), xs.max(), ys.max()])
        box = it["boxes"][0]
        if crop == 0:  # no crop, 64 px input: input pixels are slice pixels
            own = np.nonzero(gts[z])
            assert tuple(mask_box) == (own[1].min(), own[0].min(), own[1].max(), own[0].max())  # target: this slice
            expect = given if prob > 0 else tuple(mask_box)
            assert tuple(int(v) for v in box) == tuple(int(v) for v in expect)
        else:  # cropped and enlarged: the prompt still spans the volume's extent, larger than the slice's mask
            assert box[0] <= mask_box[0] and box[1] < mask_box[1] and box[2] > mask_box[2] and box[3] > mask_box[3]
            side = (given[2] - given[0] + 1, given[3] - given[1] + 1)
            ratio_w = (box[2] - box[0] + 1) / side[0]
            ratio_h = (box[3] - box[1] + 1) / side[1]
            assert ratio_w == pytest.approx(ratio_h, rel=0.1)  # one scale for both axes
