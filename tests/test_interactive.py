"""The 2025 interactive format: runtime (box dicts, clicks, prev_pred), the click simulator, the
6-step evaluator, and building 2025 cases from 2024 ones.

Runtime tests use fake engines that "see" the image (the encoder passes the first input channel
on at the low-res grid) so that masks follow synthetic objects:

* ``IdealEngine``: a perfect decoder, every bright pixel of the slice whatever the prompt;
* ``ClickEngine``: bright pixels inside the box, plus a disk around each fg click, minus a disk
  around each bg click; clicks alone: the bright region connected to the fg clicks.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from lapsam.eval.interactive import (
    InteractiveConfig,
    ModelRunner,
    auc,
    evaluate_interactive,
    score_step,
    simulate_click,
    write_outputs,
)
from lapsam.runtime import Predictor, PredictorConfig, predict_folder
from lapsam.runtime.interactive import ClassPrompt, SliceBox, mask_to_logits, prompts_from_case
from lapsam.runtime.run import PredictOptions

from lapsam.case import case_from_arrays, load_case
from lapsam.cli import main
from lapsam.errors import CaseError
from lapsam.format2025 import box_dict_from_mask, write_case_2025
from lapsam.manifest import Preprocessing
from lapsam.preprocess import get_transform, resize_2d
from lapsam.safe_npz import load_npz

S = 256  # fake model input size
PP = Preprocessing(input_size=S)
LOW = PP.low_res_size


class _SeeingEngine:
    def __init__(self) -> None:
        self.calls: list[dict] = []
        self.encoded = 0

    def encode(self, image: np.ndarray):
        assert image.shape == (1, 3, S, S)
        self.encoded += 1
        e = S // 16
        hr0 = np.zeros((1, 32, 4 * e, 4 * e), np.float32)
        hr0[0, 0] = resize_2d(image[0, 0], (4 * e, 4 * e))
        return np.zeros((1, 256, e, e), np.float32), hr0, np.zeros((1, 64, 2 * e, 2 * e), np.float32)

    def _record(self, boxes, pc, pl, mi, hm) -> None:
        b = boxes.shape[0]
        assert pc.shape[:2] == pl.shape == (b, pc.shape[1]) and mi.shape == (b, 1, LOW, LOW) and hm.shape == (b,)
        self.calls.append({"boxes": boxes.copy(), "pc": pc.copy(), "pl": pl.copy(), "mi": mi.copy(), "hm": hm.copy()})


class IdealEngine(_SeeingEngine):
    def decode(self, feats, boxes, pc, pl, mi, hm):
        self._record(boxes, pc, pl, mi, hm)
        bright = feats[1][0, 0] > 0.0
        out = np.where(bright, 10.0, -10.0).astype(np.float32)
        return np.repeat(out[None, None], boxes.shape[0], axis=0), np.ones((boxes.shape[0], 1), np.float32)


class ClickEngine(_SeeingEngine):
    def __init__(self, radius_px: float = 8.0) -> None:
        super().__init__()
        self.r = radius_px * LOW / S  # disk radius: model-input pixels -> low-res cells

    def decode(self, feats, boxes, pc, pl, mi, hm):
        from scipy import ndimage

        self._record(boxes, pc, pl, mi, hm)
        bright = feats[1][0, 0] > 0.0
        sc = LOW / S
        yy, xx = np.mgrid[0:LOW, 0:LOW] + 0.5
        out = np.full((boxes.shape[0], 1, LOW, LOW), -10.0, np.float32)
        for i, (x0, y0, x1, y1) in enumerate(boxes * sc):
            if x1 >= 0:
                m = bright & (xx >= x0) & (xx <= x1 + sc) & (yy >= y0) & (yy <= y1 + sc)
            else:  # clicks only: the bright region holding a fg click
                comp, _ = ndimage.label(bright)
                ids = {int(comp[int(py), int(px)]) for (px, py), lab in zip(pc[i] * sc, pl[i], strict=True) if lab == 1}
                m = np.isin(comp, [k for k in ids if k > 0])
            for (px, py), lab in zip(pc[i] * sc, pl[i], strict=True):
                disk = (xx - px) ** 2 + (yy - py) ** 2 <= self.r**2
                if lab == 1:
                    m |= disk
                elif lab == 0:
                    m &= ~disk
            out[i, 0][m] = 10.0
        return out, np.ones((boxes.shape[0], 1), np.float32)


def predictor(engine, **cfg) -> Predictor:
    return Predictor(engine, PP, PredictorConfig(**cfg))


def noise(d: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 40, (d, h, w), dtype=np.uint8)


def case2025(vol: np.ndarray, boxes: list[dict] | None, clicks=None, order=None, prev=None, name="3DBox_CT_x",
             tmp: Path | None = None):
    """A 2025 case written with numpy (object keys pickled) and read back with the safe loader."""
    assert tmp is not None
    path = tmp / f"{name}.npz"
    write_case_2025(path, vol, (1.0, 1.0, 1.0), boxes, clicks, order, prev)
    return load_case(path)


def tight_box(mask: np.ndarray) -> dict:
    return box_dict_from_mask(mask, max_shift=0)


def double_cone(d: int, h: int, w: int, r0: float, dr: float) -> np.ndarray:
    """Two cones tip to tip along z: radius r0 + dr * |z - middle| around the slice centre."""
    z, y, x = np.ogrid[:d, :h, :w]
    return (y - h / 2) ** 2 + (x - w / 2) ** 2 <= (r0 + dr * np.abs(z - d // 2)) ** 2


def ideal_slice(img2d: np.ndarray) -> np.ndarray:
    """What the ideal decoder finds on one slice with no window at all (the best any window can keep)."""
    from lapsam.preprocess import postprocess_masks, preprocess_image

    eng = IdealEngine()
    x, tf = preprocess_image(img2d, PP)
    logits, _ = eng.decode(eng.encode(x), np.zeros((1, 4), np.float32), np.zeros((1, 0, 2), np.float32),
                           np.zeros((1, 0), np.float32), np.zeros((1, 1, LOW, LOW), np.float32), np.zeros(1, np.float32))
    return postprocess_masks(logits[:, 0], tf)[0]


def dsc(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


# ---- runtime: the window follows the propagated prompt -------------------------------------------
def test_object_wider_than_its_middle_box_keeps_full_extent(tmp_path):
    d, h, w = 31, 128, 128
    obj = double_cone(d, h, w, 4.0, 2.5)  # radius 4 on the middle slice, 41.5 on the first and last
    vol = noise(d, h, w)
    vol[obj] = 250
    box = tight_box(obj)
    assert box["z_mid"] in (15, 16) and box["z_mid_x_max"] - box["z_mid_x_min"] < 16
    segs = predictor(IdealEngine()).predict(case2025(vol, [box], tmp=tmp_path))
    got = segs == 1
    end = d - 1
    for z in range(d):  # every slice as found with no window at all, the widest ones too
        np.testing.assert_array_equal(got[z], ideal_slice(vol[z]))
    assert dsc(got, obj) > 0.97  # the rest is the low-res decoder grid's rounding
    # the same object as a 2024 case (a tight 3D box around the middle slice's extent): the window
    # stays around the given box, as before (its end slices are cut)
    b3 = [box["z_mid_x_min"], box["z_mid_y_min"], 0, box["z_mid_x_max"], box["z_mid_y_max"], end]
    old = predictor(IdealEngine()).predict(case_from_arrays("3DBox_CT_y.npz", {"imgs": vol, "boxes": np.array([b3])}))
    assert ((old[end] == 1) & obj[end]).sum() / obj[end].sum() < 0.3


def test_2025_vanished_mask_falls_back_to_last_prompt_not_mid_box(tmp_path):
    d, h, w = 21, 96, 96
    vol = noise(d, h, w, 1)
    obj = np.zeros((d, h, w), bool)
    for z in range(d):  # a bar drifting in x: far from the middle box at the ends
        obj[z, 40:56, 10 + 2 * z : 30 + 2 * z] = True
    vol[obj] = 250
    vol[15] = 5  # the object disappears on slice 15
    box = tight_box(obj)
    assert box["z_mid"] == 10 and box["z_mid_x_max"] == 49
    # on slice 16 the bar (x 42..61) reaches far beyond the middle box's window (x <= 49 + 2 + 8)
    segs = predictor(IdealEngine(), on_empty="box").predict(case2025(vol, [box], tmp=tmp_path))
    got = segs == 1
    # the slice after the gap is found again from the last prompt (slice 14's), not the middle box
    assert not got[15].any()
    for z in range(16, d):
        np.testing.assert_array_equal(got[z], ideal_slice(vol[z]))


# ---- runtime: a 2025 case round-trips ------------------------------------------------------------
def test_2025_case_round_trips_through_predict_and_predict_folder(tmp_path):
    d, h, w = 12, 64, 64
    vol = noise(d, h, w, 2)
    a = np.zeros((d, h, w), bool)
    a[2:10, 10:30, 10:30] = True
    b = np.zeros((d, h, w), bool)
    b[4:9, 35:55, 30:50] = True
    c = np.zeros((d, h, w), bool)
    c[3:7, 40:52, 5:20] = True  # the third class has clicks only
    vol[a | b | c] = 250
    boxes = [tight_box(a), tight_box(b)]
    clicks = [{"fg": [], "bg": []}, {"fg": [], "bg": []}, {"fg": [[5, 46, 12]], "bg": []}]
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    write_case_2025(inp / "3DBox_CT_a.npz", vol, (1, 1, 1), boxes, clicks, [[], [], ["fg"]])
    write_case_2025(inp / "3DBox_CT_bad.npz", vol, (1, 1, 1), boxes, clicks, [[], [], ["fg"]],
                    prev_pred=np.zeros((d, h, w - 1), np.uint8))
    case = load_case(inp / "3DBox_CT_a.npz")
    assert case.format == "2025" and [p.label for p in prompts_from_case(case)] == [1, 2, 3]
    pred = predictor(ClickEngine())
    segs = pred.predict(case)
    assert segs.shape == (d, h, w) and segs.dtype == np.uint8 and set(np.unique(segs)) == {0, 1, 2, 3}
    assert dsc(segs == 1, a) > 0.9 and dsc(segs == 2, b) > 0.9
    assert dsc(segs == 3, c) > 0.9  # grown from one click over the object's whole z extent, both ways
    with pytest.raises(CaseError, match="prev_pred has shape"):
        load_case(inp / "3DBox_CT_bad.npz")
    s = predict_folder(inp, out, "unused", PredictOptions(progress=False), predictor=pred)
    assert (s.ok, s.failed) == (1, 1) and "prev_pred has shape" in s.failures["3DBox_CT_bad.npz"]
    np.testing.assert_array_equal(np.load(out / "3DBox_CT_a.npz")["segs"], segs)
    assert not (out / "3DBox_CT_bad.npz").exists()


def test_clicks_only_prompt_sends_a_no_box_row(tmp_path):
    d, h, w = 6, 48, 48
    vol = noise(d, h, w, 3)
    vol[:, 10:30, 10:30] = 250
    eng = ClickEngine()
    segs = predictor(eng).predict_prompts(vol, [ClassPrompt(1, None, fg=[(3, 20, 20)])])
    first = eng.calls[0]
    np.testing.assert_array_equal(first["boxes"], -np.ones((1, 4), np.float32))  # no box: clicks only
    np.testing.assert_allclose(first["pc"][0], [[20.5 * S / w, 20.5 * S / h]])
    np.testing.assert_array_equal(first["pl"], [[1.0]])
    assert (segs[:, 12:28, 12:28] == 1).all()


# ---- runtime: clicks change the prediction where they fall, and nowhere far away ---------------
RADIUS_ORIG = 5.0  # the fake decoder's click disk, in image pixels


def _two_step_setup(tmp_path):
    d, h, w = 24, 96, 96
    vol = noise(d, h, w, 4)
    obj = np.zeros((d, h, w), bool)
    obj[3:21, 30:66, 30:66] = True
    vol[obj] = 250
    yy, xx = np.mgrid[0:h, 0:w]
    blob = np.zeros((d, h, w), bool)
    blob[12] = (yy - 13) ** 2 + (xx - 13) ** 2 <= 9  # a separate bright piece on one slice: the box step misses it
    vol[blob] = 250
    box = tight_box(obj)
    pred = predictor(ClickEngine(radius_px=RADIUS_ORIG * S / w))
    step0 = pred.predict(case2025(vol, [box], tmp=tmp_path, name="3DBox_CT_s0"))
    return vol, obj, blob, box, pred, step0


def test_bg_click_changes_only_its_neighbourhood(tmp_path):
    vol, obj, _, box, pred, step0 = _two_step_setup(tmp_path)
    assert (step0[obj] == 1).all()
    z, y, x = 7, 48, 48  # inside the object
    clicks = [{"fg": [], "bg": [[z, y, x]]}]
    step1 = pred.predict(case2025(vol, [box], clicks, [["bg"]], step0, tmp=tmp_path, name="3DBox_CT_s1"))
    assert step1[z, y, x] == 0
    changed = np.argwhere(step1 != step0)
    assert changed.size and set(changed[:, 0]) == {z}
    dist = np.hypot(changed[:, 1] - y, changed[:, 2] - x)
    assert dist.max() <= RADIUS_ORIG + 2  # the bg disk and its rounding
    r = pred.last_report
    assert r.pending_clicks == 1 and r.swept_classes == [] and r.refined_slices == 3  # the slice + one settled each way


def test_fg_click_adds_missed_piece_and_prev_pred_is_kept_elsewhere(tmp_path):
    vol, obj, blob, box, pred, step0 = _two_step_setup(tmp_path)
    assert not (step0[blob] == 1).any()
    clicks = [{"fg": [[12, 13, 13]], "bg": []}]
    step1 = pred.predict(case2025(vol, [box], clicks, [["fg"]], step0, tmp=tmp_path, name="3DBox_CT_s1"))
    assert (step1[blob] == 1).all()
    changed = np.argwhere(step1 != step0)
    assert set(changed[:, 0]) == {12}  # the neighbours were re-segmented with the wider box, found no change
    # the clicked slice keeps the object and gains the piece
    assert (step1[12][obj[12]] == 1).all()
    # a third run with the same clicks and prev_pred = step1: nothing is pending, nothing runs
    eng_calls = len(pred.engine.inner.calls)
    step2 = pred.predict(case2025(vol, [box], clicks, [["fg"]], step1, tmp=tmp_path, name="3DBox_CT_s2"))
    np.testing.assert_array_equal(step2, step1)
    assert pred.last_report.decoder_calls == 0 and len(pred.engine.inner.calls) == eng_calls


def test_change_propagates_until_it_settles(tmp_path):
    # prev_pred has the object too small on slices 8..15 (a cut corner); one fg click on slice 8
    # grows the prompt, and the change travels up while each slice still changes
    d, h, w = 20, 80, 80
    vol = noise(d, h, w, 5)
    obj = np.zeros((d, h, w), bool)
    obj[2:18, 20:60, 20:60] = True
    vol[obj] = 250
    prev = obj.astype(np.uint8)
    prev[8:16, 20:60, 40:60] = 0
    p = ClassPrompt(1, SliceBox.from_dict(tight_box(obj)), fg=[(8, 40, 50)])
    pred = predictor(ClickEngine(radius_px=4), margin_px=2)
    segs = pred.predict_prompts(vol, [p], prev)
    assert dsc(segs[8:16] == 1, obj[8:16]) > 0.97  # fixed on every cut slice
    np.testing.assert_array_equal(segs[:7], prev[:7])  # below: settled right away (slice 7 unchanged)
    np.testing.assert_array_equal(segs[17:], prev[17:])
    assert pred.last_report.refined_slices == len(range(7, 17))


def test_prev_mask_input_is_given_to_the_decoder_when_asked(tmp_path):
    d, h, w = 8, 64, 64
    vol = noise(d, h, w, 6)
    vol[:, 16:48, 16:48] = 250
    prev = np.zeros((d, h, w), np.uint8)
    prev[:, 16:48, 16:48] = 1
    p = ClassPrompt(1, None, bg=[(4, 30, 30)])
    for on in (False, True):
        eng = ClickEngine()
        predictor(eng, prev_mask_input=on).predict_prompts(vol, [p], prev)
        c = eng.calls[0]
        assert c["hm"][0] == (1.0 if on else 0.0)
        if on:
            lo = c["mi"][0, 0]
            ref = mask_to_logits(prev[4] == 1, get_transform((h, w), PP), LOW, 10.0)
            np.testing.assert_allclose(lo, ref)
            assert lo[LOW // 2, LOW // 2] > 0 and lo[1, 1] < 0
        else:
            assert not c["mi"].any()


def test_clicks_outside_the_volume_are_ignored_and_reported():
    vol = noise(4, 32, 32, 7)
    pred = predictor(ClickEngine())
    segs = pred.predict_prompts(vol, [ClassPrompt(1, None, fg=[(9, 5, 5)])])
    assert not segs.any() and len(pred.last_report.ignored_clicks) == 1


# ---- eval: the click simulator, scores, AUC --------------------------------------------------------
def test_click_simulator_fg_in_missed_region_bg_in_false_positive():
    ref = np.zeros((20, 40, 40), bool)
    ref[2:18, 5:35, 5:35] = True
    pred = ref.copy()
    pred[6:13, 10:17, 20:27] = False  # a 7 x 7 x 7 miss inside the object: its centre (9, 13, 23) is unique
    kind, (z, y, x) = simulate_click(pred, ref)
    assert kind == "fg" and not pred[z, y, x] and ref[z, y, x]
    assert (z, y, x) == (9, 13, 23)
    # add a larger false positive outside the object: it becomes the largest error
    pred[2:18, 36:40, 0:40] = True  # touches the volume's edge at x = 39: the edge counts as outside
    kind, (z, y, x) = simulate_click(pred, ref)
    assert kind == "bg" and pred[z, y, x] and not ref[z, y, x]
    assert 36 <= y <= 39 and y in (37, 38)  # the middle of the 4-voxel-thick slab, not its border
    assert simulate_click(ref, ref) is None


def test_click_simulator_ties_follow_the_organisers_seeded_choice():
    # a 5 x 6 x 8 miss: many voxels share the largest distance to the error's outside
    ref = np.ones((12, 12, 14), bool)
    pred = ref.copy()
    pred[3:8, 3:9, 3:11] = False
    err = pred != ref
    # brute force: distance from each error voxel to the nearest non-error voxel, the volume's
    # outside (a border of non-error voxels, as the organisers' zero-padded crop) included
    padded = np.pad(err, 1)
    outside = np.argwhere(~padded)
    inside = np.argwhere(padded)
    dist = np.sqrt(((inside[:, None, :] - outside[None, :, :]) ** 2).sum(-1)).min(1)
    peaks = inside[dist == dist.max()] - 1  # C order, as np.argwhere gives them
    assert len(peaks) > 1
    for seed in (42, 7):
        want = tuple(int(v) for v in peaks[np.random.RandomState(seed).choice(len(peaks))])
        assert simulate_click(pred, ref, seed=seed) == ("fg", want)


def test_click_simulator_uses_26_connectivity():
    ref = np.zeros((10, 10, 10), bool)
    pred = np.zeros_like(ref)
    # two diagonal-only-touching cubes form one 26-connected component (2 x 8 voxels) ...
    pred[1:3, 1:3, 1:3] = True
    pred[3:5, 3:5, 3:5] = True
    # ... larger than a separate 3 x 2 x 2 block (12 voxels)
    pred[7:10, 7:9, 0:2] = True
    kind, p = simulate_click(pred, ref)
    assert kind == "bg" and max(p) <= 4  # in the diagonal pair, not the separate block


def test_auc_is_the_trapezoid_rule():
    vals = [0.5, 0.6, 0.8, 0.85, 0.9]
    assert auc(vals) == pytest.approx(0.5 / 2 + 0.6 + 0.8 + 0.85 + 0.9 / 2)
    assert auc([0.7] * 5) == pytest.approx(4 * 0.7)  # five click steps: x = 0..4
    assert auc([0.3]) == 0.0


def test_score_step_classes_present_and_nsd_rule():
    ref = np.zeros((6, 20, 20), np.uint8)
    ref[1:5, 2:10, 2:10] = 1
    ref[1:5, 12:18, 12:18] = 3  # label 2 absent: only present labels count
    seg = ref.copy()
    dsc_v, nsd_v = score_step(ref, seg, (1, 1, 1))
    assert dsc_v == 1.0 and nsd_v == 1.0
    seg[seg == 3] = 0
    dsc_v, nsd_v = score_step(ref, seg, (1, 1, 1))
    assert dsc_v == pytest.approx(0.5) and nsd_v == pytest.approx(0.5)
    dsc_v, nsd_v = score_step(ref, np.zeros_like(ref), (1, 1, 1))
    assert dsc_v == 0.0 and nsd_v == 0.0  # NSD only above DSC 0.2


# ---- eval: the whole protocol --------------------------------------------------------------------
def test_protocol_six_steps_rewrites_inputs_and_writes_outputs(tmp_path, monkeypatch):
    d, h, w = 16, 64, 64
    vol = noise(d, h, w, 8)
    a = np.zeros((d, h, w), bool)
    a[3:13, 10:40, 10:40] = True
    b = np.zeros((d, h, w), bool)
    b[5:11, 45:60, 40:60] = True
    vol[a | b] = 250
    vol[7:10, 14:26, 14:26] = 5  # a dark region the decoder leaves out ...
    ref = a.astype(np.uint8) + 2 * b.astype(np.uint8)  # ... but the reference has: a miss for the clicks to fix
    cases, gts = tmp_path / "imgs", tmp_path / "gts"
    write_case_2025(cases / "3DBox_CT_p.npz", vol, (1, 1, 2), [tight_box(a), tight_box(b)])
    gts.mkdir()
    np.savez(gts / "3DBox_CT_p.npz", gts=ref, spacing=np.array([1.0, 1.0, 2.0]))
    # a clicks-only case (no boxes) and a 2024-format case
    np.savez(cases / "3DBox_CT_q.npz", imgs=vol, spacing=np.array([1.0, 1.0, 2.0]), gts=ref)
    np.savez(gts / "3DBox_CT_q.npz", gts=ref)
    np.savez(cases / "3DBox_CT_r.npz", imgs=vol, boxes=np.array([[10, 10, 3, 39, 39, 12]]))
    np.savez(gts / "3DBox_CT_r.npz", gts=ref)

    seen: list[dict] = []
    real_load = load_npz

    class Recording(ModelRunner):
        def run(self, input_path: Path):
            seen.append(real_load(input_path))
            return super().run(input_path)

    pred = predictor(ClickEngine(radius_px=24))
    out = tmp_path / "out"
    (out / "work" / "outputs").mkdir(parents=True)
    runner = Recording(pred, out / "work" / "outputs", "fake")
    run = evaluate_interactive(cases, runner, out, gts, InteractiveConfig(), progress=False)
    paths = write_outputs(run, out)
    res = {r.case: r for r in run.results}
    p = res["3DBox_CT_p.npz"]
    assert p.status == "ok" and len(p.steps) == 6 and p.num_class == 2
    assert p.dsc_final > p.steps[0].dsc  # the hole is fixed by clicks
    assert p.dsc_auc == pytest.approx(auc(p.dscs[1:])) and p.within_limit
    # one click per class and step while the class has an error; the first one falls in the missed region
    z, y, x = p.clicks[0]["fg"][0]
    assert 7 <= z <= 9 and 14 <= y < 26 and 14 <= x < 26 and p.clicks_order[0][0] == "fg"
    # step inputs: step 1 holds boxes only; later ones the accumulated clicks and prev_pred
    p_inputs = seen[:6]
    assert "clicks" not in p_inputs[0] and "prev_pred" not in p_inputs[0] and "gts" not in p_inputs[0]
    for k in range(1, 6):
        got = p_inputs[k]
        assert got["prev_pred"].shape == (d, h, w) and "gts" not in got
        n_clicks = sum(len(c["fg"]) + len(c["bg"]) for c in got["clicks"])
        assert n_clicks == sum(s.clicks_added for s in p.steps[1 : k + 1])
    final = np.load(out / "segs" / "3DBox_CT_p.npz")
    assert final["all_segs"].shape == (6, d, h, w)
    np.testing.assert_array_equal(final["all_segs"][2], p_inputs[3]["prev_pred"])  # prev_pred = the last step's segs
    # no boxes: step 1 is skipped and scores 0, clicks alone grow the classes
    q = res["3DBox_CT_q.npz"]
    assert q.steps[0].skipped and q.steps[0].dsc == 0 and q.steps[0].seconds == 0
    assert q.steps[1].clicks_added == 2 and q.dsc_final > 0.9
    # the 2024 case is a clear per-case error; the others completed
    assert res["3DBox_CT_r.npz"].status == "failed" and "to2025" in res["3DBox_CT_r.npz"].error
    # outputs
    names = {x.name for x in paths}
    assert names == {"interactive.csv", "interactive.md", "dsc_per_step.png", "clicks.json"}
    rows = (out / "interactive.csv").read_text().splitlines()
    header = rows[0].split(",")
    for col in ("DSC_AUC", "NSD_AUC", "DSC_Final", "NSD_Final", "DSC_6", "NSD_1", "RunningTime_6", "TotalRunningTime",
                "runtime_upperbound", "within_time_limit"):
        assert col in header
    row_p = dict(zip(header, rows[[r.split(",")[0] for r in rows].index("3DBox_CT_p.npz")].split(","), strict=False))
    assert float(row_p["runtime_upperbound"]) == 180 and float(row_p["DSC_AUC"]) == pytest.approx(p.dsc_auc, abs=1e-4)
    assert (out / "dsc_per_step.png").read_bytes()[:4] == b"\x89PNG"
    assert "DSC_AUC" in (out / "interactive.md").read_text()
    assert json.loads((out / "clicks.json").read_text())["3DBox_CT_p.npz"]["clicks"] == p.clicks
    assert not (out / "work").exists()


def test_eval_interactive_cli_with_exported_model(tmp_path, small_model_dir, repo_root):
    """The real exported decoder with clicks, clicks-only rows and prev_pred (random weights: behaviour only)."""
    cases = tmp_path / "cases"
    cases.mkdir()
    shutil.copy(repo_root / "demo/data/interactive/imgs/3DBox_MR_Breast1.npz", cases)
    out = tmp_path / "out"
    rc = main(["eval", "interactive", "--cases", str(cases), "--gts", str(repo_root / "demo/data/interactive/gts"),
               "--model", str(small_model_dir), "--backend", "onnxruntime", "-o", str(out), "--clicks", "2",
               "--threads", "1"])
    assert rc == 0
    text = (out / "interactive.csv").read_text().splitlines()
    assert len(text) == 2 and text[1].split(",")[-2] == "ok"
    segs = np.load(out / "segs" / "3DBox_MR_Breast1.npz")["all_segs"]
    assert segs.shape[0] == 3


# ---- building 2025 cases -----------------------------------------------------------------------
def test_box_dict_is_median_voxel_slice_and_its_extent():
    m = np.zeros((10, 30, 30), bool)
    m[2, 5:8, 5:8] = True  # 9 voxels
    m[6, 10:20, 3:25] = True  # 220 voxels: the median voxel lies here
    m[7, 1:2, 1:2] = True
    b = box_dict_from_mask(m)
    assert b == {"z_min": 2, "z_max": 7, "z_mid": 6, "z_mid_x_min": 3, "z_mid_y_min": 10, "z_mid_x_max": 24,
                 "z_mid_y_max": 19}
    zs = np.nonzero(m)[0]
    assert b["z_mid"] == zs[len(zs) // 2]  # the organisers' rule, computed the plain way
    shifted = box_dict_from_mask(m, max_shift=5, rng=np.random.default_rng(0))
    assert shifted["z_mid_x_min"] <= 3 and shifted["z_mid_x_max"] >= 24 and shifted["z_mid_x_max"] <= 29


def test_to2025_command_builds_cases_from_2024_ones(tmp_path, imgs_dir, gts_dir):
    inp = tmp_path / "in"
    inp.mkdir()
    for n in ("3DBox_MR_Breast1", "2DBox_CT_amos_0004_75", "3DBox_CT_TotalSegSmall"):
        shutil.copy(imgs_dir / f"{n}.npz", inp)
    np.savez(inp / "3DBox_CT_noref.npz", imgs=np.zeros((3, 8, 8), np.uint8), boxes=np.array([[0, 0, 0, 2, 2, 2]]))
    out = tmp_path / "out"
    rc = main(["data", "to2025", str(inp), str(out), "--gts", str(gts_dir), "--box-shift", "0"])
    assert rc == 1  # the case without a reference failed, the others were written
    assert sorted(p.name for p in (out / "imgs").iterdir()) == ["3DBox_CT_TotalSegSmall.npz", "3DBox_MR_Breast1.npz"]
    case = load_case(out / "imgs" / "3DBox_CT_TotalSegSmall.npz")
    ref = np.load(out / "gts" / "3DBox_CT_TotalSegSmall.npz")["gts"]
    orig = np.load(gts_dir / "3DBox_CT_TotalSegSmall.npz")["gts"]
    assert case.format == "2025" and case.num_boxes == len(np.unique(orig)) - 1 == 8
    np.testing.assert_array_equal(case.image, np.load(imgs_dir / "3DBox_CT_TotalSegSmall.npz")["imgs"])
    for i, bd in enumerate(case.box_dicts):
        m = ref == i + 1
        zs, ys, xs = np.nonzero(m)
        assert (bd["z_min"], bd["z_max"]) == (zs.min(), zs.max())
        mid_y, mid_x = np.nonzero(m[bd["z_mid"]])
        assert [bd["z_mid_x_min"], bd["z_mid_y_min"], bd["z_mid_x_max"], bd["z_mid_y_max"]] == [
            mid_x.min(), mid_y.min(), mid_x.max(), mid_y.max()]
    assert not list(out.glob("*/3DBox_CT_noref.npz"))


def test_bundled_interactive_cases_match_their_sources(repo_root):
    base = repo_root / "demo" / "data"
    names = sorted(p.name for p in (base / "interactive" / "imgs").iterdir())
    assert names and names == sorted(p.name for p in (base / "interactive" / "gts").iterdir())
    for n in names:
        case = load_case(base / "interactive" / "imgs" / n)
        ref = np.load(base / "interactive" / "gts" / n)["gts"]
        src = np.load(base / "gts" / n)["gts"]
        assert case.format == "2025" and case.clicks is None and case.prev_pred is None
        np.testing.assert_array_equal(ref, src)  # labels already 1..K in the sources
        np.testing.assert_array_equal(case.image, np.load(base / "imgs" / n)["imgs"])
        for i, bd in enumerate(case.box_dicts):
            zs = np.nonzero((ref == i + 1).any(axis=(1, 2)))[0]
            assert (bd["z_min"], bd["z_max"]) == (zs[0], zs[-1])
            y, x = np.nonzero(ref[bd["z_mid"]] == i + 1)
            # the organisers' perturbation: up to 5 px at 256 scale outside the slice's extent
            sy, sx = math.ceil(5 * ref.shape[1] / 256), math.ceil(5 * ref.shape[2] / 256)
            assert x.min() - sx <= bd["z_mid_x_min"] <= x.min() and x.max() <= bd["z_mid_x_max"] <= x.max() + sx
            assert y.min() - sy <= bd["z_mid_y_min"] <= y.min() and y.max() <= bd["z_mid_y_max"] <= y.max() + sy


@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
def test_exported_decoder_takes_clicks_no_box_rows_and_mask_input(small_model_dir, repo_root, backend):
    """Random weights: behaviour only (runs, shapes, the refinement touches only clicked classes)."""
    case = load_case(repo_root / "demo/data/interactive/imgs/3DBox_CT_TotalSegSmall.npz")
    vol = case.image
    prompts = prompts_from_case(case)
    cfg = PredictorConfig(prev_mask_input=True)
    pred = Predictor.from_model_dir(small_model_dir, backend=backend, threads=1, config=cfg)
    step0 = pred.predict(case)
    assert step0.shape == vol.shape and pred.last_report.swept_classes == list(range(1, 9))
    ref = np.load(repo_root / "demo/data/interactive/gts/3DBox_CT_TotalSegSmall.npz")["gts"]
    # class 2: a click where the prediction is wrong; class 9: clicks only, no box
    kind, pt = simulate_click(step0 == 2, ref == 2)
    prompts[1] = ClassPrompt(2, prompts[1].box, fg=[pt] if kind == "fg" else [], bg=[pt] if kind == "bg" else [])
    z, y, x = (int(v) for v in np.argwhere(ref == 3)[0])
    prompts.append(ClassPrompt(9, None, fg=[(z, y, x)]))
    segs = pred.predict_prompts(vol, prompts, step0)
    r = pred.last_report
    assert r.pending_clicks == 2 and r.refined_slices >= 2 and r.swept_classes == []
    # only the clicked classes changed: every changed voxel left or joined class 2 or 9
    assert not ((segs != step0) & (step0 != 2) & (segs != 2) & (segs != 9) & (step0 != 9)).any()


# ---- eval: --image, one docker run per step (few: each run starts a container) -------------------
@pytest.mark.docker
def test_eval_interactive_with_docker_image(tmp_path, repo_root):
    """A tiny offline image whose predict.sh copies a baked all-zero ``segs``: 6 runs, 5 fg clicks."""
    import io
    import subprocess
    import uuid

    from lapsam.eval.timing import DockerError, docker_server_version
    from test_eval_timing import PREDICT_GOOD, _rootfs

    try:
        docker_server_version()
    except DockerError as exc:
        import os

        if os.environ.get("LAPSAM_SKIP_DOCKER") == "1":
            pytest.skip(f"LAPSAM_SKIP_DOCKER=1 and {exc}")
        pytest.fail(f"{exc}. Start a Docker engine (.ci/docker.sh start) or set LAPSAM_SKIP_DOCKER=1.", pytrace=False)
    name = "3DBox_MR_Breast1.npz"
    cases = tmp_path / "cases"
    cases.mkdir()
    shutil.copy(repo_root / "demo/data/interactive/imgs" / name, cases)
    shape = np.load(cases / name)["imgs"].shape
    seg = io.BytesIO()
    np.savez_compressed(seg, segs=np.zeros(shape, np.uint8))
    tag = f"lapsam-inter-{uuid.uuid4().hex[:8]}:latest"
    subprocess.run(["docker", "import", "--change", "WORKDIR /workspace", "-", tag],
                   input=_rootfs(PREDICT_GOOD, seg.getvalue()), capture_output=True, check=True, timeout=120)
    try:
        out = tmp_path / "out"
        rc = main(["eval", "interactive", "--cases", str(cases), "--gts", str(repo_root / "demo/data/interactive/gts"),
                   "--image", tag, "-o", str(out), "--network", "none", "--memory", "1G"])
    finally:
        subprocess.run(["docker", "rmi", "-f", tag], capture_output=True, timeout=120)
    assert rc == 0
    header, row = (out / "interactive.csv").read_text().splitlines()
    r = dict(zip(header.split(","), row.split(","), strict=True))
    assert all(float(r[f"RunningTime_{i}"]) > 0 for i in range(1, 7)) and r["status"] == "ok"
    assert all(float(r[f"DSC_{i}"]) == 0 for i in range(1, 7))
    clicks = json.loads((out / "clicks.json").read_text())[name]
    assert clicks["clicks_order"] == [["fg"] * 5] and len(clicks["clicks"][0]["fg"]) == 5
    assert np.load(out / "segs" / name)["all_segs"].shape == (6, *shape)
