"""Runtime scheduling and post-processing with fake engines (no model files, fast).

The fake engine "sees" the image: its embedding carries the downsampled first input
channel, and its decoder returns positive logits where the image is bright AND inside the
prompt box. So masks follow a synthetic object, and propagation/vanishing can be tested.
"""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from lapsam.runtime import Predictor, PredictorConfig, predict_folder
from lapsam.runtime.cache import EmbeddingCache
from lapsam.runtime.cpus import available_cpus, cgroup_cpu_limit
from lapsam.runtime.run import PredictOptions

from lapsam.case import case_from_arrays
from lapsam.manifest import Preprocessing
from lapsam.preprocess import preprocess_image

S = 128  # fake model input size
PP = Preprocessing(input_size=S)


class FakeEngine:
    """Records every call; masks = bright pixels inside the prompt box."""

    def __init__(self) -> None:
        self.encoded: list[str] = []
        self.decode_batches: list[np.ndarray] = []

    def encode(self, image: np.ndarray):
        assert image.shape == (1, 3, S, S) and image.dtype == np.float32
        self.encoded.append(hashlib.sha1(image.tobytes()).hexdigest())
        e = S // 16
        embed = np.zeros((1, 256, e, e), np.float32)
        hr0 = np.zeros((1, 32, 4 * e, 4 * e), np.float32)
        k = S // (4 * e)  # brightness at the low-res grid: the brightest input pixel of each k x k block
        hr0[0, 0] = image[0, 0].reshape(4 * e, k, 4 * e, k).max(axis=(1, 3))
        return embed, hr0, np.zeros((1, 64, 2 * e, 2 * e), np.float32)

    def decode(self, feats, boxes, point_coords, point_labels, mask_input, has_mask_input):
        b = boxes.shape[0]
        low = feats[1].shape[-1]
        assert point_coords.shape == (b, 0, 2) and point_labels.shape == (b, 0)
        assert mask_input.shape == (b, 1, low, low) and has_mask_input.shape == (b,)
        self.decode_batches.append(boxes.copy())
        bright = feats[1][0, 0] > 0.0
        scale = low / S
        yy, xx = np.mgrid[0:low, 0:low] + 0.5
        out = np.full((b, 1, low, low), -10.0, np.float32)
        for i, (x0, y0, x1, y1) in enumerate(boxes * scale):
            inside = (xx >= x0) & (xx <= x1 + scale) & (yy >= y0) & (yy <= y1 + scale)
            out[i, 0][inside & bright] = 10.0
        return out, np.ones((b, 1), np.float32)


def make_predictor(**cfg) -> tuple[Predictor, FakeEngine]:
    eng = FakeEngine()
    return Predictor(eng, PP, PredictorConfig(**cfg)), eng


def case3d(img: np.ndarray, boxes: list[list[int]], name: str = "3DBox_CT_fake"):
    return case_from_arrays(f"{name}.npz", {"imgs": img, "boxes": np.array(boxes, np.int64),
                                            "spacing": np.array([1.0, 1.0, 1.0])})


def case2d(img: np.ndarray, boxes: list[list[int]] | np.ndarray, name: str = "2DBox_US_fake"):
    return case_from_arrays(f"{name}.npz", {"imgs": img, "boxes": np.asarray(boxes, np.int64)})


def unique_volume(d: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """Dark noise (every slice distinct, so encoder inputs can be told apart)."""
    return np.random.default_rng(seed).integers(0, 40, (d, h, w), dtype=np.uint8)


def sphere(vol: np.ndarray, c: tuple[int, int, int], r: float) -> np.ndarray:
    d, h, w = vol.shape
    z, y, x = np.ogrid[:d, :h, :w]
    m = (z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 <= r * r
    vol[m] = 250
    return m


def bbox3d(m: np.ndarray) -> list[int]:
    z, y, x = np.nonzero(m)
    return [int(x.min()), int(y.min()), int(z.min()), int(x.max()), int(y.max()), int(z.max())]


# ---- 2D -----------------------------------------------------------------------------------
def test_2d_one_encode_chunked_decode_overlap_and_labels():
    img = np.zeros((96, 128, 3), np.uint8)
    img[10:50, 10:60] = 255
    img[30:80, 40:120] = 255
    boxes = [[10, 10, 59, 49], [40, 30, 119, 79], [0, 0, 5, 5]] + [[100, 5, 110, 12]] * 4
    pred, eng = make_predictor(decoder_batch=3)
    segs = pred.predict(case2d(img, boxes))
    assert segs.shape == (96, 128) and segs.dtype == np.uint8
    assert len(eng.encoded) == 1
    assert pred.last_report.decoder_calls == math.ceil(len(boxes) / 3) == len(eng.decode_batches)
    assert sorted(b.shape[0] for b in eng.decode_batches) == [1, 3, 3]
    # overlap [30:50, 40:60] belongs to the later box (label 2); label 1 keeps the rest of its square
    assert (segs[34:46, 44:56] == 2).all()
    assert (segs[14:26, 14:36] == 1).all()
    assert (segs[36:76, 64:116] == 2).all()
    # box 3 covers a dark region: empty; nothing outside the bright regions
    assert not (segs == 3).any()
    assert not segs[84:].any() and not segs[54:, :36].any() and not segs[:26, 66:].any()


def test_2d_box_outside_image_is_skipped_and_reported():
    img = np.full((64, 64, 3), 255, np.uint8)
    pred, eng = make_predictor()
    case = case2d(img, [[500, 500, 600, 600], [4, 4, 20, 20]])
    assert 0 in case.box_errors
    segs = pred.predict(case)
    assert pred.last_report.skipped_boxes.keys() == {0}
    assert not (segs == 1).any() and (segs == 2).any()
    assert sum(b.shape[0] for b in eng.decode_batches) == 1


def test_2d_many_boxes_uint16_and_large_image_bounded_batches():
    # 300 boxes -> uint16 labels; a 1920 x 2560 image like the 241-object microscopy case
    h, w = 1920, 2560
    img = np.zeros((h, w, 3), np.uint8)
    boxes = []
    for k in range(300):
        y, x = 40 + (k // 20) * 120, 40 + (k % 20) * 120
        img[y : y + 60, x : x + 60] = 255
        boxes.append([x, y, x + 59, y + 59])
    pred, eng = make_predictor(decoder_batch=16)
    segs = pred.predict(case2d(img, boxes, "2DBox_Microscope_big"))
    assert segs.dtype == np.uint16
    assert len(eng.encoded) == 1 and len(eng.decode_batches) == math.ceil(300 / 16)
    assert max(b.shape[0] for b in eng.decode_batches) == 16
    assert set(np.unique(segs)) == set(range(301))
    assert (segs[40 + 14 * 120 + 30, 40 + 19 * 120 + 30]) == 300


# ---- 3D -----------------------------------------------------------------------------------
def test_3d_each_slice_encoded_once_and_decoder_calls_counted():
    d, h, w = 40, 48, 48
    vol = unique_volume(d, h, w)
    # boxes with different middles, one disjoint range leaving a gap of unencoded slices
    boxes = [[5, 5, 2, 30, 30, 20], [10, 10, 8, 40, 40, 25], [0, 0, 5, 20, 20, 9], [20, 20, 32, 40, 40, 38]]
    pred, eng = make_predictor(decoder_batch=2)
    pred.predict(case3d(vol, boxes))
    r = pred.last_report
    union = set()
    for b in boxes:
        union |= set(range(b[2], b[5] + 1))
    assert len(eng.encoded) == len(set(eng.encoded)) == len(union) == r.encoder_calls == r.slices_needed
    # independent count of decoder calls: sweep up over middle..z_max, sweep down over z_min..middle-1
    mids = [(b[2] + b[5]) // 2 for b in boxes]
    expect = 0
    for z in range(d):
        up = sum(1 for b, m in zip(boxes, mids, strict=False) if m <= z <= b[5])
        down = sum(1 for b, m in zip(boxes, mids, strict=False) if b[2] <= z < m)
        expect += math.ceil(up / 2) + math.ceil(down / 2)
    assert r.decoder_calls == expect == len(eng.decode_batches)
    assert r.decoder_items == sum(b[5] - b[2] + 1 for b in boxes)
    # the cache only ever holds slices between the lowest and highest middle slice
    assert 0 < r.cache_peak_slices <= max(mids) - min(mids)
    assert r.reencoded == 0


def test_3d_propagation_follows_object_and_respects_z_range():
    d, h, w = 30, 64, 64
    vol = unique_volume(d, h, w, 1)
    obj = sphere(vol, (15, 30, 32), 10)
    box = bbox3d(obj)
    pred, _ = make_predictor(margin_px=2)
    segs = pred.predict(case3d(vol, [box]))
    pred_m = segs == 1
    dice = 2 * (pred_m & obj).sum() / (pred_m.sum() + obj.sum())
    assert dice > 0.9
    assert not pred_m[: box[2]].any() and not pred_m[box[5] + 1 :].any()


def test_3d_prompt_is_previous_mask_bbox_plus_margin():
    d, h, w = 12, 64, 64
    vol = unique_volume(d, h, w, 2)
    vol[:, 20:40, 24:44] = 250  # a bright bar: same 20 x 20 square on every slice
    given = [10, 10, 3, 54, 54, 9]  # much larger than the object
    pred, eng = make_predictor(margin_px=3, decoder_batch=4, prompt_3d="propagate")
    pred.predict(case3d(vol, [given]))
    sx = S / w
    first, second = eng.decode_batches[0][0], eng.decode_batches[1][0]
    np.testing.assert_allclose(first, np.array([10, 10, 54, 54]) * sx)  # middle slice: the given box
    np.testing.assert_allclose(second, np.array([24 - 3, 20 - 3, 43 + 3, 39 + 3]) * sx)  # mask bbox + margin


def test_3d_given_prompts_every_slice_with_the_given_box():
    """2024 boxes, prompt_3d="given": every slice's prompt is the given box, and a
    vanished mask changes nothing (no fallback, no stop)."""
    d, h, w = 12, 64, 64
    vol = unique_volume(d, h, w, 2)
    vol[3:7, 20:40, 24:44] = 250  # the object ends at slice 6; the box runs to slice 9
    given = [10, 10, 3, 54, 54, 9]
    for on_empty in ("box", "stop"):
        pred, eng = make_predictor(on_empty=on_empty, prompt_3d="given")
        segs = pred.predict(case3d(vol, [given]))
        sent = np.concatenate(eng.decode_batches)
        np.testing.assert_allclose(sent, np.tile(np.array([[10, 10, 54, 54]]) * (S / w), (7, 1)))
        assert pred.last_report.empty_fallbacks == 0 and pred.last_report.stopped == 0
        assert (segs[3:7, 22:38, 26:42] == 1).all() and not segs[7:].any()
    with pytest.raises(ValueError, match="prompt_3d"):
        PredictorConfig(prompt_3d="tight")


def test_3d_default_prompts_ellipsoid_sections_and_fills_weak_masks():
    """2024 boxes, prompt_3d="ellipsoid" (the default): slice z of a box spanning z0..z1 is prompted
    with the given box scaled about its centre by sqrt(1 - t^2), t = (z - zc) / ((z1 - z0 + 1) / 2);
    with min_mask_fill a weak mask becomes the ellipse inscribed in that slice's box."""
    d, h, w = 9, 64, 64
    vol = unique_volume(d, h, w, 4)
    vol[4, 14:50, 14:50] = 250  # an object on the middle slice only (2/3 of its box)
    given = [10, 10, 0, 53, 53, 8]  # centre (31.5, 31.5, 4), x/y half-extent 21.5, z semi-axis 4.5
    order = [4, 5, 6, 7, 8, 3, 2, 1, 0]  # sweep up from the middle slice, then down

    def section(z: int) -> list[float]:
        s = math.sqrt(1 - ((z - 4) / 4.5) ** 2)
        return [31.5 - 21.5 * s, 31.5 - 21.5 * s, 31.5 + 21.5 * s, 31.5 + 21.5 * s]

    pred, eng = make_predictor()
    assert pred.config.prompt_3d == "ellipsoid"
    segs = pred.predict(case3d(vol, [given]))
    sent = np.concatenate(eng.decode_batches)
    np.testing.assert_allclose(sent, np.array([section(z) for z in order]) * (S / w), rtol=1e-5)
    assert (segs[4, 16:48, 16:48] == 1).all() and not segs[np.arange(d) != 4].any()  # no fill: weak masks stay
    # with the fallback: slices without the object get the ellipse of their (rounded) section box
    filled = Predictor(FakeEngine(), Preprocessing(input_size=S, min_mask_fill=0.5, fill_shape="ellipse"),
                       PredictorConfig()).predict(case3d(vol, [given]))
    yy, xx = np.mgrid[:h, :w]
    for z in range(d):
        if z == 4:
            assert np.array_equal(filled[4], segs[4])
            continue
        x0, y0, x1, y1 = (int(round(v)) for v in section(z))
        cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0 + 1) / 2, (y1 - y0 + 1) / 2
        ell = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
        assert np.array_equal(filled[z] == 1, ell), z
    assert (filled[0] == 1).sum() < (filled[2] == 1).sum() < (filled[3] == 1).sum()  # smaller towards the ends
    # `lapsam predict` and friends default to it
    from lapsam.cli import build_parser
    from lapsam.runtime.predictor import PROMPT_3D

    args = build_parser().parse_args(["predict", "-i", "in", "-o", "out"])
    assert args.prompt_3d == "ellipsoid"
    action = next(a for a in build_parser()._subparsers._group_actions[0].choices["predict"]._actions
                  if a.dest == "prompt_3d")
    assert set(action.choices) == set(PROMPT_3D)


@pytest.mark.parametrize("on_empty", ["box", "stop"])
def test_3d_vanishing_mask_policy(on_empty: str):
    d, h, w = 20, 48, 48
    vol = unique_volume(d, h, w, 3)
    vol[:, 14:34, 14:34] = 250
    vol[14] = 5  # the object disappears on slice 14 (between middle 10 and z_max 18)
    vol[5] = 5  # ... and on slice 5 (between z_min 2 and middle)
    pred, eng = make_predictor(on_empty=on_empty, prompt_3d="propagate")
    segs = pred.predict(case3d(vol, [[12, 12, 2, 36, 36, 18]]))
    r = pred.last_report
    present = [z for z in range(d) if (segs[z] == 1).any()]
    if on_empty == "box":
        assert present == [z for z in range(2, 19) if z not in (5, 14)]
        assert r.empty_fallbacks == 2 and r.stopped == 0
        assert r.decoder_items == 17
    else:
        assert present == list(range(6, 14))
        assert r.stopped == 2 and r.empty_fallbacks == 0
        assert r.decoder_items == len(range(5, 15))
    # slices after a stop are not encoded at all
    assert r.encoder_calls == r.decoder_items


def test_3d_equal_logits_go_to_the_larger_label_across_sweeps():
    """Overlaps go to the higher logit; where the fake engine's logits are equal (+10 inside both
    masks, away from the bilinear edges) the larger label wins, whichever sweep wrote last."""
    d, h, w = 16, 40, 40
    vol = unique_volume(d, h, w, 4)
    vol[:, 5:35, 5:35] = 250
    # box 1's middle is high (its downward sweep reaches slice 4 after box 2's upward sweep did)
    boxes = [[5, 5, 0, 34, 34, 15], [5, 5, 2, 34, 34, 6]]

    class BoxBlind(FakeEngine):
        """Every prompt gets the same logits (bright pixels), so all overlaps are ties."""

        def decode(self, feats, boxes, point_coords, point_labels, mask_input, has_mask_input):
            out, iou = super().decode(feats, boxes, point_coords, point_labels, mask_input, has_mask_input)
            out[:] = np.where(feats[1][0, 0] > 0.0, 10.0, -10.0)
            return out, iou

    pred = Predictor(BoxBlind(), PP, PredictorConfig())
    segs = pred.predict(case3d(vol, boxes))
    assert (segs[2:7, 10:30, 10:30] == 2).all()
    assert (segs[8:16, 10:30, 10:30] == 1).all() and (segs[0:2, 10:30, 10:30] == 1).all()


def test_3d_cache_limit_bounds_memory_and_counts_reencodes():
    d, h, w = 30, 32, 32
    vol = unique_volume(d, h, w, 5)
    vol[:, 8:24, 8:24] = 250
    boxes = [[8, 8, 0, 23, 23, 29], [8, 8, 0, 23, 23, 9], [8, 8, 20, 23, 23, 29]]  # middles 14, 4, 24
    e = S // 16
    per_slice = (256 * e * e + 32 * 16 * e * e + 64 * 4 * e * e) * 2  # fp16 bytes
    pred, eng = make_predictor(cache_limit_mb=3.5 * per_slice / 2**20)
    pred.predict(case3d(vol, boxes))
    r = pred.last_report
    assert r.cache_peak_slices == 3 and r.cache_peak_mb * 2**20 <= 3.5 * per_slice
    assert r.reencoded > 0 and r.encoder_calls == 30 + r.reencoded
    pred2, eng2 = make_predictor()
    segs2 = pred2.predict(case3d(vol, boxes))
    assert pred2.last_report.reencoded == 0 and len(set(eng2.encoded)) == len(eng2.encoded) == 30
    up = {z for b in boxes for z in range((b[2] + b[5]) // 2, b[5] + 1)}
    down = {z for b in boxes for z in range(b[2], (b[2] + b[5]) // 2)}
    assert pred2.last_report.cache_peak_slices == len(up & down) == 10
    assert segs2.max() == 3


def test_3d_box_mid_z_of_a_2025_file_is_the_start_slice(tmp_path: Path):
    """A 2025-format file (box dicts with z_mid) loaded from disk: propagation starts on z_mid."""
    from lapsam.case import load_case

    d, h, w = 20, 32, 32
    vol = unique_volume(d, h, w, 6)
    vol[:, 8:24, 8:24] = 250
    box = {"z_min": 2, "z_max": 17, "z_mid": 4, "z_mid_x_min": 8, "z_mid_y_min": 8,
           "z_mid_x_max": 23, "z_mid_y_max": 23}
    path = tmp_path / "3DBox_CT_interactive_fake.npz"
    np.savez(path, imgs=vol, boxes=np.array([box], dtype=object), spacing=np.array([1.0, 1.0, 1.0]))
    case = load_case(path)
    pred, eng = make_predictor()
    segs = pred.predict(case)
    start, _ = preprocess_image(vol[4], PP)  # z_mid, not (z_min + z_max) // 2 = 9
    assert eng.encoded[0] == hashlib.sha1(start.tobytes()).hexdigest()
    np.testing.assert_allclose(eng.decode_batches[0][0], np.array([8, 8, 23, 23]) * S / w)  # the given box
    present = [z for z in range(d) if (segs[z] == 1).any()]
    assert present == list(range(2, 18))


# ---- folder run, errors ------------------------------------------------------------------
def test_predict_folder_reports_bad_case_and_completes_others(tmp_path: Path):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    img = np.zeros((32, 32, 3), np.uint8)
    img[8:24, 8:24] = 255
    np.savez(inp / "2DBox_US_good.npz", imgs=img, boxes=np.array([[8, 8, 23, 23]]))
    np.savez(inp / "2DBox_US_nobox.npz", imgs=img)
    (inp / "2DBox_US_garbage.npz").write_bytes(b"not a zip")
    pred, _ = make_predictor()
    s = predict_folder(inp, out, "unused", PredictOptions(progress=False), predictor=pred)
    assert (s.total, s.ok, s.failed) == (3, 1, 2)
    assert set(s.failures) == {"2DBox_US_nobox.npz", "2DBox_US_garbage.npz"}
    assert "boxes" in s.failures["2DBox_US_nobox.npz"]
    assert sorted(p.name for p in out.iterdir()) == ["2DBox_US_good.npz"]
    with np.load(out / "2DBox_US_good.npz") as z:
        assert list(z.keys()) == ["segs"] and z["segs"].shape == (32, 32) and z["segs"].max() == 1


def test_zero_boxes_gives_empty_segs():
    pred, eng = make_predictor()
    segs = pred.predict(case3d(unique_volume(4, 16, 16), np.zeros((0, 6), np.int64).tolist()))
    assert segs.shape == (4, 16, 16) and not segs.any() and not eng.encoded


# ---- cache, CPUs ---------------------------------------------------------------------------
def test_embedding_cache_bound_and_fp16():
    feats = tuple(np.random.default_rng(0).standard_normal(s).astype(np.float32) for s in [(1, 4), (1, 8), (1, 4)])
    c = EmbeddingCache(limit_bytes=2 * 32, fp16=True)
    assert c.put(1, feats) and c.put(2, feats) and not c.put(3, feats)
    assert c.rejected == 1 and c.nbytes == 64 and 3 not in c
    got = c.get(1)
    assert got[1].dtype == np.float32
    np.testing.assert_allclose(got[1], feats[1], rtol=1e-3)
    c.drop(1)
    assert c.nbytes == 32 and c.get(1) is None and c.put(3, feats)


def _write(p: Path, text: str) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


def test_cgroup_v2_quota(tmp_path: Path):
    _write(tmp_path / "cpu.max", "max 100000\n")
    _write(tmp_path / "lapsam.slice" / "cpu.max", "150000 100000\n")
    assert cgroup_cpu_limit(tmp_path, "0::/lapsam.slice\n") == pytest.approx(1.5)
    assert cgroup_cpu_limit(tmp_path, "0::/\n") is None
    assert available_cpus(tmp_path, "0::/lapsam.slice\n") == min(2, available_cpus(tmp_path, "0::/\n"))


def test_cgroup_v1_quota(tmp_path: Path):
    _write(tmp_path / "cpu,cpuacct" / "cpu.cfs_quota_us", "-1\n")
    _write(tmp_path / "cpu,cpuacct" / "cpu.cfs_period_us", "100000\n")
    _write(tmp_path / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_quota_us", "100000\n")
    _write(tmp_path / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_limit(tmp_path, "4:cpu,cpuacct:/\n") is None
    assert cgroup_cpu_limit(tmp_path, "4:cpu,cpuacct:/docker/abc\n") == pytest.approx(1.0)
    assert available_cpus(tmp_path, "4:cpu,cpuacct:/docker/abc\n") == 1


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this OS")
def test_available_cpus_follows_affinity_set_by_a_child(tmp_path: Path):
    """A process pinned to one CPU (and with no cgroup quota) must be told 1, whatever the host has."""
    code = ("import os, sys; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from lapsam.runtime.cpus import available_cpus; "
            "print(available_cpus(sys.argv[1], '0::/\\n'), os.cpu_count())")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    n, host = (int(v) for v in r.stdout.split())
    assert n == 1 and host >= 1


def test_blas_threads_is_scoped():
    """numpy's BLAS is limited inside the block and restored after it (threadpoolctl's own report)."""
    from lapsam.runtime.cpus import blas_threads
    from threadpoolctl import threadpool_info

    def blas() -> list[int]:
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]

    before = blas()
    if not before:
        pytest.skip("numpy has no BLAS thread pool here")
    with blas_threads(1):
        assert blas() == [1] * len(before)
    assert blas() == before
    with blas_threads(None):
        assert blas() == before


def test_runtime_source_never_imports_training_code():
    """No module of lapsam.runtime imports torch, timm, sam2, distill or export, not even inside a function."""
    import ast

    import lapsam.runtime

    bad = {"torch", "torchvision", "timm", "sam2", "lapsam.distill", "lapsam.export", "distill", "export"}
    found = []
    for f in sorted(Path(lapsam.runtime.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
                if node.level == 2:  # from ..distill import x
                    names = [node.module or ""]
            else:
                continue
            for n in names:
                if n.split(".")[0] in bad or ".".join(n.split(".")[:2]) in bad:
                    found.append(f"{f.name}:{node.lineno} {n}")
    assert not found, found


def test_naive_pipeline_counts_and_same_result_as_scheduled():
    from lapsam.runtime.bench import naive_predict, z_stats

    d, h, w = 24, 48, 48
    vol = unique_volume(d, h, w, 8)
    obj1 = sphere(vol, (8, 20, 20), 6)
    obj2 = sphere(vol, (14, 28, 26), 8)
    boxes = np.array([bbox3d(obj1), bbox3d(obj2), [4, 4, 10, 40, 40, 20]])
    pred, eng = make_predictor(decoder_batch=4)
    fast = pred.predict(case3d(vol, boxes.tolist()))
    naive = naive_predict(pred, case3d(vol, boxes.tolist()))
    total, union = z_stats(boxes)
    assert pred.stats.encoder_calls == pred.stats.decoder_calls == total
    assert pred.last_report.encoder_calls == union < total
    np.testing.assert_array_equal(fast, naive)


def test_bench_case_builder_matches_spec(imgs_dir: Path, gts_dir: Path):
    from lapsam.runtime.bench import CaseSpec, build_case

    a = build_case(CaseSpec("3DBox_MR_x", (20, 60, 50), 3, "3DBox_CT_TotalSegSmall"), imgs_dir, gts_dir)
    assert a["imgs"].shape == (20, 60, 50) and a["imgs"].dtype == np.uint8 and a["boxes"].shape == (3, 6)
    assert (a["boxes"][:, 3:] < [50, 60, 20]).all()
    b = build_case(CaseSpec("2DBox_Microscope_x", (300, 400), 241, "2DBox_Microscope_Nuclei"), imgs_dir, gts_dir)
    assert b["imgs"].shape == (300, 400, 3) and b["boxes"].shape == (241, 4)


# ---- command line: one error line, no traceback; log levels -----------------------------------
def _lapsam(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("LAPSAM_MODEL_DIR", "LAPSAM_OV_CACHE_DIR")}
    return subprocess.run([sys.executable, "-m", "lapsam.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env=env)


def test_cli_bad_model_folder_and_bad_counts_are_one_line_errors(tmp_path: Path):
    inp, not_a_model = tmp_path / "in", tmp_path / "not_a_model"
    inp.mkdir()
    not_a_model.mkdir()
    img = np.zeros((16, 16, 3), np.uint8)
    np.savez(inp / "2DBox_US_a.npz", imgs=img, boxes=np.array([[2, 2, 9, 9]]))
    for argv in (["predict", "-i", str(inp), "-o", str(tmp_path / "o1"), "--model", str(not_a_model)],
                 ["export", "check", str(not_a_model), "--cases", str(inp)]):
        r = _lapsam(*argv, cwd=tmp_path)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2, r.stderr
        assert len(lines) == 1 and lines[0].startswith("error: ") and "manifest.json" in lines[0], r.stderr
    assert not (tmp_path / "o1").exists()
    r = _lapsam("predict", "-i", str(inp), "-o", str(tmp_path / "o2"), "--model", str(not_a_model),
                "--decoder-batch", "0", cwd=tmp_path)
    assert r.returncode == 2 and "--decoder-batch: must be >= 1" in r.stderr and "Traceback" not in r.stderr
    r = _lapsam("predict", "-i", str(inp), "-o", str(tmp_path / "o2"), "--backend", "tensorrt", cwd=tmp_path)
    assert r.returncode == 2 and "use openvino or onnxruntime" in r.stderr


def test_log_levels_and_line_format():
    code = (
        "import logging, sys; from lapsam.cli import setup_logging; "
        "setup_logging(int(sys.argv[1]), sys.argv[2] == 'q'); "
        "[logging.getLogger(n).log(lv, '%s %s', n, logging.getLevelName(lv)) "
        " for n in ('lapsam.x', 'other') for lv in (10, 20, 30, 40)]"
    )

    def lines(v: str, q: str) -> list[str]:
        r = subprocess.run([sys.executable, "-c", code, v, q], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stderr.splitlines()

    assert lines("0", "-") == ["lapsam.x INFO", "warning: lapsam.x WARNING", "error: lapsam.x ERROR",
                               "other INFO", "warning: other WARNING", "error: other ERROR"]
    assert lines("1", "-")[0] == "debug: lapsam.x: lapsam.x DEBUG"  # -v: lapsam's debug ...
    assert not any("other DEBUG" in ln for ln in lines("1", "-"))  # ... not every library's
    assert "debug: other: other DEBUG" in lines("2", "-")
    assert lines("1", "q") == ["warning: lapsam.x WARNING", "error: lapsam.x ERROR", "warning: other WARNING",
                               "error: other ERROR"]


def test_matplotlib_info_is_not_one_of_lapsams_lines():
    """A first run of matplotlib logs "generated new fontManager" at INFO: not on stderr unless -vv."""
    code = ("import logging, sys; from lapsam.cli import setup_logging; setup_logging(int(sys.argv[1])); "
            "logging.getLogger('matplotlib.font_manager').info('generated new fontManager'); "
            "logging.getLogger('matplotlib').warning('mpl WARNING')")

    def lines(v: str) -> list[str]:
        r = subprocess.run([sys.executable, "-c", code, v], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stderr.splitlines()

    assert lines("0") == lines("1") == ["warning: mpl WARNING"]
    assert lines("2") == ["generated new fontManager", "warning: mpl WARNING"]


def test_blas_threads_limited_only_during_predict():
    threadpoolctl = pytest.importorskip("threadpoolctl")

    def blas_threads_now() -> list[int]:
        return [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]

    before = blas_threads_now()
    if not before or max(before) < 2:
        pytest.skip("numpy's BLAS runs one thread here: a limit of 1 cannot be told apart")
    seen: list[list[int]] = []

    class Recording(FakeEngine):
        def encode(self, image):
            seen.append(blas_threads_now())
            return super().encode(image)

    pred = Predictor(Recording(), PP, PredictorConfig(blas_threads=1))
    assert blas_threads_now() == before  # constructing it changes nothing
    img = np.zeros((64, 64, 3), np.uint8)
    pred.predict(case2d(img, [[5, 5, 20, 20]]))
    pred.predict_prompts(unique_volume(3, 32, 32), [])
    assert seen and all(max(s) == 1 for s in seen)
    assert blas_threads_now() == before  # restored after the call


# ---- model load: encoder and decoder opened at once, waited for at first use -------------------
class _FakeGraph:
    """A :class:`lapsam.runtime.engines.Graph` over a FakeEngine (what a worker thread opens)."""

    def __init__(self, eng: FakeEngine, role: str):
        from lapsam.manifest import DECODER_INPUTS, ENCODER_INPUT

        self.role, self._eng = role, eng
        self.inputs = {k: np.dtype(np.float32) for k in ((ENCODER_INPUT,) if role == "encoder" else DECODER_INPUTS)}
        self.output_names: list[str] = []

    def run(self, feeds, outputs=None):
        from lapsam.manifest import DECODER_INPUTS, ENCODER_INPUT

        if self.role == "encoder":
            return list(self._eng.encode(feeds[ENCODER_INPUT]))
        v = [feeds[k] for k in DECODER_INPUTS]
        return list(self._eng.decode(tuple(v[:3]), *v[3:]))


def _workers() -> list:
    import threading

    return [t for t in threading.enumerate() if t.name.startswith("lapsam-model-load")]


def _no_worker_left() -> bool:
    for t in _workers():
        t.join(timeout=30)
    return not _workers()


def test_background_load_runs_the_encoder_while_the_decoder_opens():
    """The engine waits for each graph at its first use only: the encoder runs while the decoder is
    still being opened; the result is the one of the same graphs opened before."""
    import threading

    from lapsam.runtime.engines import GraphEngine, GraphLoad

    ref_pred, _ = make_predictor()
    img = np.zeros((64, 64, 3), np.uint8)
    img[10:40, 12:30] = 255
    case = case2d(img, [[10, 8, 31, 41]])
    ref = ref_pred.predict(case)

    eng = FakeEngine()
    decoder_may_open = threading.Event()

    def open_decoder() -> _FakeGraph:
        assert decoder_may_open.wait(30)
        return _FakeGraph(eng, "decoder")

    load = GraphLoad({"encoder": lambda: _FakeGraph(eng, "encoder"), "decoder": open_decoder}, "model load (fake)")
    engine = GraphEngine(load=load)
    pred = Predictor(engine, PP)
    feats = pred.engine.encode(preprocess_image(img, PP)[0])  # the decoder is not open yet
    assert len(eng.encoded) == 1 and not load.done("decoder") and feats[0].shape[0] == 1
    decoder_may_open.set()
    np.testing.assert_array_equal(pred.predict(case), ref)
    assert pred.stats.load_wait_s >= 0.0 and _no_worker_left()
    pred.stats.reset()  # the per-case counters; the load wait is a total
    assert pred.stats.encoder_calls == 0


def test_a_graph_that_fails_to_open_raises_once_no_worker_runs():
    """The failed graph's error is raised at its first use (every use), only after the other job has
    ended; the other graph still works."""
    import threading

    from lapsam.runtime.engines import GraphEngine, GraphLoad, ModelLoadError

    eng = FakeEngine()
    ended: list[str] = []
    release = threading.Event()

    def bad_encoder() -> _FakeGraph:
        raise ModelLoadError("/m/openvino/encoder_fp32.xml: openvino cannot open it: Unable to read the model")

    def slow_decoder() -> _FakeGraph:
        assert release.wait(30)
        ended.append("decoder")
        return _FakeGraph(eng, "decoder")

    engine = GraphEngine(load=GraphLoad({"encoder": bad_encoder, "decoder": slow_decoder}, "model load (fake)"))
    timer = threading.Timer(0.2, release.set)
    timer.start()
    with pytest.raises(ModelLoadError, match=r"^/m/openvino/encoder_fp32\.xml: openvino cannot open it") as err:
        engine.ready("encoder")
    assert ended == ["decoder"] and _no_worker_left()  # the decoder's open had ended before the error came
    assert "\n" not in str(err.value)
    with pytest.raises(ModelLoadError):
        engine.encode(np.zeros((1, 3, S, S), np.float32))
    assert engine.ready("decoder") >= 0.0 and engine.decoder.role == "decoder"
    timer.join()


def test_counting_engine_keeps_the_load_wait_out_of_the_call_times():
    from lapsam.runtime.engines import CountingEngine

    class Waiting(FakeEngine):
        def __init__(self) -> None:
            super().__init__()
            self.asked: list[str] = []

        def ready(self, role: str) -> float:
            self.asked.append(role)
            return 0.5 if len(self.asked) <= 2 else 0.0  # first use of each graph: "waited" 0.5 s

    inner = Waiting()
    ce = CountingEngine(inner)
    feats = ce.encode(np.zeros((1, 3, S, S), np.float32))
    b = 2
    ce.decode(feats, np.zeros((b, 4), np.float32), np.zeros((b, 0, 2), np.float32), np.zeros((b, 0), np.float32),
              np.zeros((b, 1, S // 4, S // 4), np.float32), np.zeros(b, np.float32))
    ce.encode(np.zeros((1, 3, S, S), np.float32))
    assert inner.asked == ["encoder", "decoder", "encoder"]
    assert ce.stats.load_wait_s == 1.0 and ce.stats.encoder_calls == 2 and ce.stats.decoder_items == b
    ce.stats.reset()
    assert ce.stats.load_wait_s == 1.0 and ce.stats.encoder_calls == 0


def test_predict_folder_timings_with_a_background_load(tmp_path: Path, monkeypatch):
    """With timings on, a run whose model loads in the background records the concurrent load
    (marked concurrent) and the main thread's waits; the steps the bench adds up still equal the
    run's time, the concurrent phases left out."""
    import json

    from lapsam.runtime.engines import GraphEngine, GraphLoad
    from lapsam.submission.bench import case_rows, concurrent_rows
    from lapsam.submission.verify import RunResult

    from lapsam import timings

    monkeypatch.setenv(timings.ENV, "1")
    timings.reset()
    inp = tmp_path / "in"
    inp.mkdir()
    img = np.zeros((32, 32, 3), np.uint8)
    img[8:24, 8:24] = 255
    np.savez(inp / "2DBox_US_good.npz", imgs=img, boxes=np.array([[8, 8, 23, 23]]))
    eng = FakeEngine()

    def opener(role: str):
        def job() -> _FakeGraph:
            t = time.time()
            graph = _FakeGraph(eng, role)
            timings.record(f"model load: {role} compile (compiled)", t, time.time(), concurrent=True)
            return graph
        return job

    pred = Predictor(GraphEngine(load=GraphLoad({r: opener(r) for r in ("encoder", "decoder")},
                                                "model load (encoder + decoder compiles, concurrent)")), PP)
    s = predict_folder(inp, tmp_path / "out", "unused", PredictOptions(progress=False), predictor=pred)
    assert s.ok == 1 and s.load_seconds >= pred.stats.load_wait_s
    rep = timings.report()
    timings.reset()
    names = [p[0] for p in rep["phases"]]
    beside = {names[i] for i in rep["concurrent"]}
    assert beside == {"model load: encoder compile (compiled)", "model load: decoder compile (compiled)",
                      "model load (encoder + decoder compiles, concurrent)"}
    for want in ("waiting for model load: encoder", "waiting for model load: decoder", "case: read", "case: encoder",
                 "case: decoder", "case: preprocess, prompts, postprocess", "case: write"):
        assert names.count(want) == 1, (want, names)
    assert "(concurrent)" in "\n".join(ln for ln in timings.lines(rep) if "compile (compiled)" in ln)
    start, end = rep["t_import"], rep["t_end"]
    run = RunResult(exit_code=0, wall_s=end + 0.2 - (start - 0.3), t_create=start - 0.3, started_at=start - 0.2,
                    finished_at=end + 0.1, t_removed=end + 0.2, log_tail="timings-json: " + json.dumps(rep))
    rows = case_rows(run)
    assert not beside & {n for n, _ in rows}
    assert sum(v for _, v in rows) == pytest.approx(run.wall_s)
    assert [n for n, _ in concurrent_rows(run)][0] == "model load (encoder + decoder compiles, concurrent)"
