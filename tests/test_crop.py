"""Crop windows (``Preprocessing.crop_context`` / ``crop_mode``): the rule, the runtime, training.

The rule (:func:`lapsam.preprocess.box_windows`) is checked against windows worked out by
hand; the runtime against masks computed directly from synthetic images with numpy (the fake
engine of ``test_runtime`` segments bright pixels inside the prompt box, at its coarse
low-res grid, so a small object is only found well when its window is enlarged); training
against the runtime's own window.
"""

from __future__ import annotations

import numpy as np
import pytest
from lapsam.runtime import Predictor, PredictorConfig
from lapsam.runtime.interactive import ClassPrompt, SliceBox
from test_runtime import FakeEngine, case2d, case3d

from lapsam.manifest import Preprocessing
from lapsam.preprocess import box_windows, crop_window, preprocess_image

S = 128
BOX = Preprocessing(input_size=S, crop_context=2.5, crop_mode="box", crop_min_px=32, crop_shared_frac=0.5)
UNION = Preprocessing(input_size=S, crop_context=2.5, crop_mode="union")
OFF = Preprocessing(input_size=S)


def dsc(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


# ---- the rule ---------------------------------------------------------------------------------
def test_rule_by_hand() -> None:
    boxes = np.array([[100, 100, 109, 109],   # 10 px: own window 32 px (the minimum), centred
                      [300, 50, 339, 69],     # 40 x 20: own window 100 px
                      [0, 0, 299, 299],       # covers most of the image: shared
                      [200, 200, 389, 389]])  # 190 px -> 475 px window, clipped: shared
    groups = box_windows(boxes, 400, 400, BOX)
    assert [g[1] for g in groups] == [[2, 3], [0], [1]]
    # shared group: the union rule (2.5 x 390 px > 400: the whole image -> None)
    assert groups[0][0] is None
    # box 0: centre 110 (inclusive box 100..109 -> centre 105+0.5*... = (100+109+1)/2 = 105), side 32
    assert groups[1][0] == (89, 121, 89, 121)
    # box 1: centre x (300+339+1)/2 = 320, y (50+69+1)/2 = 60; side 2.5*40 = 100
    assert groups[2][0] == (10, 110, 270, 370)
    # the union rule puts everything in one window, never smaller than the input size
    assert box_windows(boxes[:1], 400, 400, UNION) == [((41, 169, 41, 169), [0])]
    assert box_windows(boxes, 400, 400, OFF) == [(None, [0, 1, 2, 3])]
    # a window at the border is shifted inside the image, not cut
    (win, idx), = box_windows(np.array([[0, 390, 5, 399]]), 400, 400, BOX)
    assert win == (368, 400, 0, 32) and idx == [0]


def test_rule_matches_crop_window() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        h, w = (int(v) for v in rng.integers(40, 600, 2))
        x0, y0 = int(rng.integers(0, w - 2)), int(rng.integers(0, h - 2))
        box = np.array([x0, y0, int(rng.integers(x0, w)), int(rng.integers(y0, h))])
        (win, idx), = box_windows(box[None], h, w, BOX)
        own = crop_window(box, h, w, BOX.crop_min_px, BOX.crop_context)
        area = (own[1] - own[0]) * (own[3] - own[2])
        if area >= 0.5 * h * w:
            full = crop_window(box, h, w, S, BOX.crop_context)
            assert win == (None if full == (0, h, 0, w) else full)
        else:
            assert win == own
            y0w, y1w, x0w, x1w = win
            assert y0w <= box[1] and box[3] < y1w and x0w <= box[0] and box[2] < x1w  # the box is inside


# ---- runtime ----------------------------------------------------------------------------------
def _scene_2d() -> tuple[np.ndarray, list[list[int]], list[np.ndarray]]:
    img = np.zeros((400, 400, 3), np.uint8)
    masks = []
    yy, xx = np.mgrid[:400, :400]
    for cy, cx, r in ((60, 60, 5), (200, 330, 7)):  # two small discs (11 and 15 px across)
        m = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        masks.append(m)
    big = np.zeros((400, 400), bool)
    big[120:380, 20:280] = True
    masks.append(big)
    for m in masks:
        img[m] = 250
    boxes = []
    for m in masks:
        ys, xs = np.nonzero(m)
        boxes.append([int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())])
    return img, boxes, masks


def test_2d_each_small_box_on_its_own_window() -> None:
    img, boxes, masks = _scene_2d()
    eng = FakeEngine()
    segs = Predictor(eng, BOX).predict(case2d(img, boxes))
    # two own windows + one shared window: three encoder calls
    assert len(eng.encoded) == 3
    for i, m in enumerate(masks):
        assert dsc(segs == i + 1, m) > 0.9, i
    # without the crop the small discs are found only at the coarse grid: the test can fail
    plain = Predictor(FakeEngine(), OFF).predict(case2d(img, boxes))
    assert min(dsc(plain == i + 1, masks[i]) for i in range(2)) < 0.8


def test_3d_windows_per_box_and_slices_encoded_per_window() -> None:
    vol = np.zeros((12, 300, 300), np.uint8)
    z, y, x = np.ogrid[:12, :300, :300]
    small = (z - 5) ** 2 * 4 + (y - 50) ** 2 + (x - 250) ** 2 <= 36  # r 6 px in-plane, z 2..8
    big = (np.abs(y - 180) <= 100) & (np.abs(x - 120) <= 100) & (z >= 2) & (z <= 9)
    vol[small | big] = 250

    def bbox(m):
        zz, yy, xx = np.nonzero(m)
        return [int(xx.min()), int(yy.min()), int(zz.min()), int(xx.max()), int(yy.max()), int(zz.max())]

    eng = FakeEngine()
    given = PredictorConfig(prompt_3d="given")  # the big object is a cuboid: its box on every slice
    pred = Predictor(eng, BOX, given)
    case = case3d(vol, [bbox(big), bbox(small)])
    segs = pred.predict(case)
    plain = Predictor(FakeEngine(), OFF, given).predict(case)
    assert dsc(segs == 1, big) > 0.95 and dsc(segs == 2, small) > 0.8
    assert dsc(segs == 2, small) > dsc(plain == 2, small) + 0.1
    # the big box's slices 2..9 on the shared window, the small one's 2..8 on its own
    assert len(eng.encoded) == 8 + 7 == pred.last_report.encoder_calls
    assert pred.last_report.slices_needed == 15


def test_2025_sweep_uses_the_windows() -> None:
    vol = np.zeros((9, 256, 256), np.uint8)
    z, y, x = np.ogrid[:9, :256, :256]
    small = (z - 4) ** 2 * 4 + (y - 200) ** 2 + (x - 40) ** 2 <= 30
    vol[small] = 250
    zz, yy, xx = np.nonzero(small)
    mid = 4
    m = small[mid]
    ys, xs = np.nonzero(m)
    box = SliceBox(int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()), mid, int(zz.min()), int(zz.max()))
    segs_crop = Predictor(FakeEngine(), BOX).predict_prompts(vol, [ClassPrompt(1, box)])
    segs_off = Predictor(FakeEngine(), OFF).predict_prompts(vol, [ClassPrompt(1, box)])
    assert dsc(segs_crop[mid] == 1, m) > 0.85
    assert dsc(segs_crop[mid] == 1, m) > dsc(segs_off[mid] == 1, m)


# ---- training sees the runtime's window ------------------------------------------------------
def test_training_crop_is_the_runtime_window(tmp_path) -> None:
    pytest.importorskip("scipy")
    from lapsam.distill.data import (AugmentConfig, CaseStore, FinetuneItemConfig, PromptConfig,
                                     PromptSliceDataset, find_cases, index_slices)

    img, boxes, masks = _scene_2d()
    lab = np.zeros(img.shape[:2], np.uint8)
    for i, m in enumerate(masks):
        lab[m] = i + 1
    (tmp_path / "imgs").mkdir()
    (tmp_path / "gts").mkdir()
    np.savez(tmp_path / "imgs" / "2DBox_US_fake_0001.npz", imgs=img, boxes=np.array(boxes))
    np.savez(tmp_path / "gts" / "2DBox_US_fake_0001.npz", gts=lab)
    store = CaseStore(find_cases([tmp_path]))
    refs = index_slices(store)
    aug = AugmentConfig(enabled=True, hflip=0, vflip=0, affine_prob=0, intensity_prob=0, crop_prob=1.0,
                        crop_scale=(1.0, 1.0))
    cfg = FinetuneItemConfig(aug, PromptConfig(objects_per_image=2, box_jitter=0.0, point_prob=0.0))
    ds = PromptSliceDataset(store, refs, BOX, cfg, seed=0, train=True)
    windows = {tuple(win) if win else None: idx for win, idx in box_windows(np.array(boxes), 400, 400, BOX)}
    seen = set()
    for epoch in range(12):
        ds.set_epoch(epoch)
        item = ds[0]
        # which window was it? the one whose preprocessed crop is the item's image
        match = [w for w in windows
                 if np.array_equal(preprocess_image(img if w is None else img[w[0]:w[1], w[2]:w[3]], BOX)[0][0],
                                   item["image"])]
        assert len(match) == 1
        seen.add(match[0])
        if match[0] is not None:  # an own window: the one object is the only target
            obj = windows[match[0]][0]
            y0, y1, x0, x1 = match[0]
            ref = preprocess_image(masks[obj][y0:y1, x0:x1].astype(np.uint8) * 255, BOX)[0][0, 0] > 0
            assert all(dsc(item["masks"][j] > 0, ref) > 0.9 for j in range(2))
    assert len(seen) >= 2  # own windows are drawn (and the shared object falls back to the union)


def test_window_neighbours_train_nearby_objects_of_similar_size(tmp_path) -> None:
    """prompt.window_neighbours: an own window also trains the objects that lie wholly inside it
    and are not much smaller; without it the cropped object is the only target."""
    from lapsam.distill.data import (AugmentConfig, CaseStore, FinetuneItemConfig, PromptConfig,
                                     PromptSliceDataset, find_cases, index_slices)

    yy, xx = np.mgrid[:400, :400]

    def disc(cy: int, cx: int, r: int) -> np.ndarray:
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r

    objs = {1: disc(100, 100, 20),  # A: 41 px; its window is 2.5 x 41 = 103 px around it
            2: disc(132, 100, 10),  # B: 21 px, wholly inside A's window, >= half A's side
            3: disc(70, 72, 3),  # C: 7 px, inside A's window but too small to ride along
            4: disc(100, 142, 20)}  # D: as large as A, half outside A's window
    lab = np.zeros((400, 400), np.uint8)
    for v, m in objs.items():
        lab[m] = v
    img = np.where(lab > 0, 250, 20).astype(np.uint8)
    (tmp_path / "imgs").mkdir()
    (tmp_path / "gts").mkdir()
    np.savez(tmp_path / "imgs" / "2DBox_US_fake_0001.npz", imgs=img, boxes=np.zeros((4, 4), np.int64))
    np.savez(tmp_path / "gts" / "2DBox_US_fake_0001.npz", gts=lab)
    store = CaseStore(find_cases([tmp_path]))
    refs = index_slices(store)
    aug = AugmentConfig(enabled=True, hflip=0, vflip=0, affine_prob=0, intensity_prob=0, crop_prob=1.0,
                        crop_scale=(1.0, 1.0))
    boxes = {}
    for v, m in objs.items():
        ys, xs = np.nonzero(m)
        boxes[v] = np.array([xs.min(), ys.min(), xs.max(), ys.max()])
    wins = {v: crop_window(b, 400, 400, BOX.crop_min_px, BOX.crop_context) for v, b in boxes.items()}

    def targets_of(ratio: float) -> dict[int, set[int]]:
        cfg = FinetuneItemConfig(aug, PromptConfig(objects_per_image=4, box_jitter=0.0, point_prob=0.0,
                                                   window_neighbours=ratio))
        ds = PromptSliceDataset(store, refs, BOX, cfg, seed=0, train=True)
        out: dict[int, set[int]] = {}
        for epoch in range(16):
            ds.set_epoch(epoch)
            item = ds[0]
            own = [v for v, (y0, y1, x0, x1) in wins.items()
                   if np.array_equal(preprocess_image(img[y0:y1, x0:x1], BOX)[0][0], item["image"])]
            assert len(own) == 1
            y0, y1, x0, x1 = wins[own[0]]
            found = set()
            for t in item["masks"]:  # which objects' masks (as cropped and resized) are the targets
                for v, m in objs.items():
                    ref = preprocess_image(m[y0:y1, x0:x1].astype(np.uint8) * 255, BOX)[0][0, 0] > 0
                    if ref.any() and dsc(t > 0, ref) > 0.9:
                        found.add(v)
            out.setdefault(own[0], set()).update(found)
        return out

    on, off = targets_of(0.5), targets_of(0.0)
    assert 1 in on and on[1] == {1, 2}  # A's window: A and B, not the tiny C nor the cut D
    assert all(found == {v} for v, found in off.items())  # off: the cropped object alone
    assert 1 in off


# ---- min_mask_fill: the box instead of a mask that covers too little of it -----------------
def test_min_mask_fill_2d() -> None:
    img = np.zeros((200, 200, 3), np.uint8)
    yy, xx = np.mgrid[:200, :200]
    disc = (yy - 50) ** 2 + (xx - 50) ** 2 <= 30 ** 2
    img[disc] = 250
    img[150:160, 150:160] = 250  # a small bright square in a big box: covers 1/16 of it
    boxes = [[20, 20, 80, 80], [135, 135, 174, 174], [100, 10, 130, 40]]  # disc, square, nothing
    pp = Preprocessing(input_size=S, min_mask_fill=0.5)
    segs = Predictor(FakeEngine(), pp).predict(case2d(img, boxes))
    off = Predictor(FakeEngine(), Preprocessing(input_size=S)).predict(case2d(img, boxes))
    assert dsc(segs == 1, disc) > 0.9 and np.array_equal(segs == 1, off == 1)  # a full mask stays
    for label, (x0, y0, x1, y1) in ((2, boxes[1]), (3, boxes[2])):
        box = np.zeros((200, 200), bool)
        box[y0:y1 + 1, x0:x1 + 1] = True
        assert np.array_equal(segs == label, box), label  # the box, exactly
        assert (off == label).sum() < 0.5 * box.sum()
    with pytest.raises(ValueError):
        Preprocessing(min_mask_fill=1.5)


def test_min_mask_fill_ellipse_2d() -> None:
    """``fill_shape="ellipse"``: a weak mask becomes the ellipse inscribed in its box (pixel
    centres inside it, worked out here from the axis lengths), a full mask stays as it was."""
    img = np.zeros((200, 200, 3), np.uint8)
    yy, xx = np.mgrid[:200, :200]
    disc = (yy - 50) ** 2 + (xx - 50) ** 2 <= 30 ** 2
    img[disc] = 250
    img[150:160, 150:160] = 250  # covers 1/16 of its box
    boxes = [[20, 20, 80, 80], [135, 130, 174, 189]]  # disc; square in a 40 x 60 box
    pp = Preprocessing(input_size=S, min_mask_fill=0.5, fill_shape="ellipse")
    segs = Predictor(FakeEngine(), pp).predict(case2d(img, boxes))
    as_box = Predictor(FakeEngine(), Preprocessing(input_size=S, min_mask_fill=0.5)).predict(case2d(img, boxes))
    assert np.array_equal(segs == 1, as_box == 1) and dsc(segs == 1, disc) > 0.9
    # 40 px wide (x 135..174, centre 154.5, semi-axis 20), 60 px tall (y 130..189, centre 159.5, 30)
    ellipse = (xx - 154.5) ** 2 * 30 ** 2 + (yy - 159.5) ** 2 * 20 ** 2 <= (20 * 30) ** 2
    assert np.array_equal(segs == 2, ellipse)
    assert abs(ellipse.sum() / (40 * 60) - np.pi / 4) < 0.01  # the inscribed ellipse: pi/4 of the box
    assert (segs == 2).sum() < (as_box == 2).sum() == 40 * 60
    with pytest.raises(ValueError):
        Preprocessing(fill_shape="circle")
