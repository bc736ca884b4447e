"""Overlapping boxes of a 2024 case: each pixel goes to the mask with the highest logit.

The fake engine of ``test_runtime`` segments bright pixels inside each prompt box; here each
box also gets its own confidence (the logit it returns inside its mask), so the expected labels
can be written down with numpy: in an overlap, the more confident box's label; on ties the later
box's label (the rule without scores). The same must hold when the boxes are segmented on
different crop windows (2D and 3D), since the windows write into views of one label and one
score map.
"""

from __future__ import annotations

import numpy as np
from lapsam.runtime import Predictor
from lapsam.runtime.crop import case_windows
from lapsam.runtime.predictor import PredictorConfig
from test_runtime import PP, S, FakeEngine, case2d, case3d

from lapsam.manifest import Preprocessing


class ConfidentEngine(FakeEngine):
    """Like FakeEngine, but box i's positive logits are ``conf(box)`` instead of 10."""

    def __init__(self, conf) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.conf = conf

    def decode(self, feats, boxes, point_coords, point_labels, mask_input, has_mask_input):  # type: ignore[no-untyped-def]
        out, iou = super().decode(feats, boxes, point_coords, point_labels, mask_input, has_mask_input)
        for i, box in enumerate(boxes):
            out[i, 0][out[i, 0] > 0] = self.conf(box)
        return out, iou


def by_width(box) -> float:  # type: ignore[no-untyped-def]
    """Narrower boxes (in model-input pixels) are more confident."""
    return float(40.0 - (box[2] - box[0]) / 8.0)


def expected(shape: tuple[int, int], bright: np.ndarray, boxes: list[list[int]], conf: list[float]) -> np.ndarray:
    out = np.zeros(shape, np.uint8)
    best = np.full(shape, -np.inf)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        m = np.zeros(shape, bool)
        m[y0:y1 + 1, x0:x1 + 1] = True
        m &= bright
        win = m & (conf[i] >= best)
        out[win] = i + 1
        best[win] = conf[i]
    return out


def test_2d_overlap_goes_to_the_more_confident_box() -> None:
    img = np.zeros((128, 128, 3), np.uint8)
    img[20:100, 20:100] = 255
    # box 1 narrow and confident, box 2 wide and later: the overlap is box 1's
    boxes = [[40, 20, 59, 99], [20, 40, 99, 79]]
    pred = Predictor(ConfidentEngine(by_width), PP, PredictorConfig())
    segs = pred.predict(case2d(img, boxes))
    assert (segs[45:75, 42:58] == 1).all()  # the overlap
    assert (segs[45:75, 25:38] == 2).all() and (segs[45:75, 62:95] == 2).all()
    assert (segs[25:38, 42:58] == 1).all()
    # the same boxes with equal confidence: the later box wins, as without scores
    pred = Predictor(ConfidentEngine(lambda b: 10.0), PP, PredictorConfig())
    assert (pred.predict(case2d(img, boxes))[45:75, 42:58] == 2).all()


def test_2d_overlap_across_crop_windows_matches_numpy() -> None:
    """Small boxes on their own windows: the scores are shared across windows."""
    pp = Preprocessing(input_size=S, crop_context=2.5, crop_mode="box", crop_min_px=32, crop_shared_frac=0.5)
    img = np.zeros((400, 400, 3), np.uint8)
    img[100:140, 100:140] = 255
    img[300:330, 50:90] = 255
    boxes = [[100, 100, 129, 139], [110, 100, 139, 139], [50, 300, 89, 329], [60, 300, 79, 329]]
    # each box's confidence, handed out in the order the runtime decodes the boxes (their
    # model-input coordinates differ between windows, so they cannot key it)
    confs = [5.0, 3.0, 2.0, 9.0]

    class ByOrder(FakeEngine):
        queue: list[float] = []

        def decode(self, feats, b, pc, pl, mi, hm):  # type: ignore[no-untyped-def]
            out, iou = super().decode(feats, b, pc, pl, mi, hm)
            for i in range(b.shape[0]):
                out[i, 0][out[i, 0] > 0] = self.queue.pop(0)
            return out, iou

    eng = ByOrder()
    pred = Predictor(eng, pp, PredictorConfig())
    case = case2d(img, boxes)
    order = [i for _, idx in case_windows(case, pp) for i in idx]
    eng.queue = [confs[i] for i in order]
    segs = pred.predict(case)
    bright = img[..., 0] > 0
    want = expected((400, 400), bright, boxes, confs)
    assert (segs == want).mean() > 0.995  # window edges: the low-res grid of the fake engine
    assert (segs[105:135, 112:127] == 1).all()  # box 1 (5.0) beats the later box 2 (3.0)
    assert (segs[305:325, 62:78] == 4).all()  # box 4 (9.0) beats box 3 (2.0)
    assert len(eng.encoded) >= 2  # the two pairs were segmented on different windows


def test_3d_overlap_goes_to_the_more_confident_box() -> None:
    vol = np.zeros((6, 128, 128), np.uint8)
    vol[:, 20:100, 20:100] = 255
    boxes = [[40, 20, 0, 59, 99, 5], [20, 40, 0, 99, 79, 5]]
    given = PredictorConfig(prompt_3d="given")  # cuboid objects: their box on every slice
    pred = Predictor(ConfidentEngine(by_width), PP, given)
    segs = pred.predict(case3d(vol, boxes))
    assert (segs[:, 45:75, 42:58] == 1).all()
    assert (segs[:, 45:75, 22:30] == 2).all()
    pred = Predictor(ConfidentEngine(lambda b: 10.0), PP, given)
    assert (pred.predict(case3d(vol, boxes))[:, 45:75, 42:58] == 2).all()


def test_nested_fallback_boxes_keep_the_inner_box_and_lose_to_real_masks() -> None:
    """Boxes whose masks are too small (``min_mask_fill``) become their box; where two such boxes
    overlap, the smaller keeps its pixels; a real mask beats both."""
    pp = Preprocessing(input_size=S, min_mask_fill=0.5)
    img = np.zeros((128, 128, 3), np.uint8)
    img[64:128, 64:128] = 255  # box 3 finds a real mask (bright pixels); boxes 1 and 2 see none
    boxes = [[30, 30, 59, 59], [20, 20, 89, 89], [64, 64, 127, 127]]  # box 1 inside box 2; box 3 overlaps box 2
    pred = Predictor(FakeEngine(), pp, PredictorConfig())
    segs = pred.predict(case2d(img, boxes))
    assert (segs[30:60, 30:60] == 1).all()  # the nested, smaller fallback box keeps its area
    assert (segs[20:30, 20:90] == 2).all() and (segs[20:64, 60:64] == 2).all()  # the outer one the rest
    assert (segs[66:128, 66:128] == 3).all()  # the real mask beats the fallback box 2 in the overlap
    # without scores (the old rule) the later, larger box 2 would have covered box 1
    assert not (segs[30:60, 30:60] == 2).any()


def test_nested_box_takes_its_mask_from_the_outer_box() -> None:
    """overlap="nested" (default): a box wholly inside another box keeps its own mask's pixels even
    where the outer box's mask is more confident (labels are disjoint); "logit" gives them to the
    more confident mask. Boxes that are not nested still go by logit."""
    img = np.zeros((128, 128, 3), np.uint8)
    img[20:110, 20:110] = 255
    # box 1 wide (outer, confident); box 2 inside box 1; box 3 overlaps box 1 without being inside it
    boxes = [[20, 20, 109, 109], [50, 50, 69, 69], [90, 30, 125, 60]]
    conf = {1: 9.0, 2: 2.0, 3: 1.0}

    def by_label(box) -> float:  # type: ignore[no-untyped-def]
        w = float(box[2] - box[0])
        return conf[1] if w > 80 * S / 128 else conf[2] if w < 25 * S / 128 else conf[3]

    for mode in ("nested", "logit"):
        segs = Predictor(ConfidentEngine(by_label), PP, PredictorConfig(overlap=mode)).predict(case2d(img, boxes))
        inner = segs[52:68, 52:68]
        assert (inner == (2 if mode == "nested" else 1)).all(), mode
        # box 3's overlap with box 1 goes by logit in both modes: box 1 (9.0) beats box 3 (1.0)
        assert (segs[32:58, 92:108] == 1).all(), mode
        assert (segs[32:58, 112:124] == 0).all()  # outside the bright square: nobody's mask
        assert (segs[72:108, 72:88] == 1).all()  # the outer box's own pixels outside box 2


def test_nested_boxes_matrix() -> None:
    from lapsam.runtime.predictor import nested_boxes

    boxes = np.array([[0, 0, 10, 10], [2, 2, 5, 5], [2, 2, 5, 5], [8, 8, 12, 12]])
    m = nested_boxes(boxes, [0, 1, 2, 3])
    assert m.shape == (5, 5)
    assert m[2, 1] and m[3, 1] and not m[1, 2] and not m[2, 3] and not m[3, 2]  # equal boxes: neither
    assert not m[4, 1] and not m[1, 4] and not m[:, 0].any() and not m[0].any()
    assert not nested_boxes(boxes, [0, 2, 3])[2, 1]  # an invalid box takes no part
    b3 = np.array([[0, 0, 0, 9, 9, 9], [1, 1, 1, 3, 3, 3], [1, 1, 0, 3, 3, 12]])
    m3 = nested_boxes(b3, [0, 1, 2])
    assert m3[2, 1] and not m3[3, 1]  # 3D: z counts too
