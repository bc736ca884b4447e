"""lapsam.eval.metrics: closed-form cases, the organisers' quirks, the exact mode, the metrics CLI."""

from __future__ import annotations

import csv
import math
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from lapsam.eval.metrics import (
    FAILED,
    GT_ERROR,
    OK,
    MetricsConfig,
    evaluate_case,
    label_nsd,
    read_metrics_csv,
    score_arrays,
    summarize,
)

from lapsam.cli import main
from lapsam.safe_npz import load_npz
from lapsam.writers import atomic_savez, write_segs

CH = MetricsConfig("challenge")
EX = MetricsConfig("exact")
SQRT2 = math.sqrt(2.0)


def square(shift: int = 0, side: int = 20, shape: tuple[int, int] = (40, 56), label: int = 1) -> np.ndarray:
    a = np.zeros(shape, np.uint8)
    a[10:10 + side, 10 + shift:10 + shift + side] = label
    return a


def cube(shift: tuple[int, int, int] = (0, 0, 0), side: int = 8, shape: tuple[int, int, int] = (20, 24, 28)) -> np.ndarray:
    a = np.zeros(shape, np.uint8)
    z, y, x = (6 + s for s in shift)
    a[z:z + side, y:y + side, x:x + side] = 1
    return a


def disk(cx: float, radius: float = 30, shape: tuple[int, int] = (128, 140)) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return ((yy - 64) ** 2 + (xx - cx) ** 2 <= radius ** 2).astype(np.uint8)


# --------------------------------------------------------------------------- closed forms

@pytest.mark.parametrize("config", [CH, EX], ids=["challenge", "exact"])
def test_identical_masks_score_one(config):
    g2 = square() + 2 * square(shift=24, side=8)  # labels 1 and 2
    assert score_arrays(g2, g2.copy(), is_3d=False, config=config)[:2] == (1.0, 1.0)
    g3 = cube()
    dsc, nsd, labels = score_arrays(g3, g3.copy(), is_3d=True, spacing=(0.7, 0.7, 2.5), config=config)
    assert (dsc, nsd) == (1.0, 1.0)
    assert [(lab.label, lab.dsc, lab.nsd) for lab in labels] == [(1, 1.0, 1.0)]


def test_disjoint_masks_score_zero():
    gt, pred = square(side=10), square(shift=30, side=10)
    assert score_arrays(gt, pred, is_3d=False, config=CH)[:2] == (0.0, 0.0)
    dsc, nsd, labels = score_arrays(gt, pred, is_3d=False, config=EX)
    assert (dsc, nsd) == (0.0, 0.0)
    assert labels[0].nsd == 0.0  # exact mode computes it: every surfel is 20 px away


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("config", [CH, EX], ids=["challenge", "exact"])
def test_shift_within_tolerance(k, config):
    # DSC = (L - k) / L; every gt surfel has its shifted copy k <= 2 mm away, so NSD = 1.
    dsc, nsd, _ = score_arrays(square(0), square(k), is_3d=False, config=config)
    assert dsc == pytest.approx((20 - k) / 20)
    assert nsd == pytest.approx(1.0)


def test_square_shift_3_exact_2d_contour_closed_form():
    # Side L, shifted 3 px, tolerance 2. Contour = 4L-4 unit edges + 4 corner diagonals of sqrt(2)/2.
    # Out of tolerance on each surface: the far edge (L-1 edges + 2 diagonals) and the L-5 middle
    # edges of the opposite side (nearer than 3 only within 2 px of a corner).
    L = 20
    dsc, nsd, _ = score_arrays(square(0, L), square(3, L), is_3d=False, config=EX)
    assert dsc == pytest.approx((L - 3) / L)
    assert nsd == pytest.approx(1 - (2 * L - 6 + SQRT2) / (4 * L - 4 + 2 * SQRT2), abs=1e-12)


def test_square_shift_anisotropic_spacing_closed_form():
    # Spacing (1, 0.5): a 6-column shift is 3 mm. Edge lengths: vertical 1, horizontal 0.5,
    # corner diagonals d = 0.5 * sqrt(1 + 0.25). Out: the far edge (L-1 + 2d), one horizontal edge
    # at each end of the top and bottom rows (2.5 mm away), the L-5 middle edges of the opposite side.
    L = 20
    d = 0.5 * math.sqrt(1 + 0.25)
    gt, pred = square(0, L).astype(bool), square(6, L).astype(bool)
    expected = 1 - ((L - 1) + 2 * d + 2 * 0.5 + (L - 5)) / (2 * (L - 1) * 1.5 + 4 * d)
    assert label_nsd(gt, pred, (1.0, 0.5)) == pytest.approx(expected, abs=1e-12)
    # Same shift with spacing (1, 1/3): 2 mm, all within tolerance.
    assert label_nsd(gt, pred, (1.0, 1 / 3)) == pytest.approx(1.0)
    # Isotropic 1 mm, 6 mm shift: out are the far edge, 3 unit edges at each end of the top and
    # bottom rows, and the L-5 middle edges of the opposite side.
    assert label_nsd(gt, pred, (1.0, 1.0)) == pytest.approx(1 - (2 * L + SQRT2) / (4 * L - 4 + 2 * SQRT2), abs=1e-12)


def test_empty_prediction():
    gt = square()
    pred = np.zeros_like(gt)
    dsc, nsd, labels = score_arrays(gt, pred, is_3d=False, config=CH)
    assert (dsc, nsd) == (0.0, 0.0)
    assert labels[0].nsd is None  # DSC <= 0.2: the organisers do not compute NSD
    # exact mode computes it: a path that needs np.Inf inside surface-distance (removed in numpy 2)
    assert score_arrays(gt, pred, is_3d=False, config=EX)[:2] == (0.0, 0.0)
    assert score_arrays(cube(), np.zeros_like(cube()), is_3d=True, spacing=(1, 1, 1), config=EX)[:2] == (0.0, 0.0)


def test_empty_gt_label():
    # gt holds label 2 only; the prediction also paints label 1 somewhere.
    gt = square(label=2)
    pred = gt.copy()
    pred[0:3, 0:3] = 1
    for cfg in (CH, EX):
        dsc, nsd, labels = score_arrays(gt, pred, is_3d=False, config=cfg)
        assert [lab.dsc for lab in labels] == [0.0, 1.0]
        assert (dsc, nsd) == (0.5, 0.5)
    # An all-zero gt has no labels: DSC NaN, and the organisers' NSD is then 0.
    dsc, nsd, labels = score_arrays(np.zeros((8, 8), np.uint8), np.ones((8, 8), np.uint8), is_3d=False, config=CH)
    assert math.isnan(dsc) and nsd == 0.0 and labels == []


def test_both_empty_label():
    # Label 1 absent from both: its DSC is NaN. The organisers' plain mean makes the case NaN (NSD 0);
    # exact mode leaves that label out.
    gt = square(label=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning from 0/0 either
        dsc, nsd, labels = score_arrays(gt, gt.copy(), is_3d=False, config=CH)
        assert math.isnan(labels[0].dsc) and math.isnan(dsc) and nsd == 0.0
        dsc, nsd, labels = score_arrays(gt, gt.copy(), is_3d=False, config=EX)
        assert (dsc, nsd) == (1.0, 1.0)
        assert math.isnan(labels[0].dsc) and math.isnan(labels[0].nsd)


def test_nsd_only_above_dsc_02_in_challenge_mode():
    gt = square(side=20)
    pred = square(shift=17, side=20)  # DSC 3/20 = 0.15, NSD would be > 0
    dsc, nsd, _ = score_arrays(gt, pred, is_3d=False, config=CH)
    assert dsc == pytest.approx(0.15) and nsd == 0.0
    assert score_arrays(gt, pred, is_3d=False, config=EX)[1] > 0.0


def test_disk_slab_quirk():
    gt, pred = disk(60), disk(65)  # radius 30, shifted 5 px
    ch = score_arrays(gt, pred, is_3d=False, config=CH)
    ex = score_arrays(gt, pred, is_3d=False, config=EX)
    assert ch[0] == ex[0]  # same DSC
    assert ch[1] == pytest.approx(0.955, abs=0.002)  # one-slice slab: every pixel is a surfel
    assert ex[1] == pytest.approx(0.333, abs=0.002)  # true 2D contour


def test_spacing_order_differs_between_modes():
    stored = (0.5, 0.5, 3.0)  # (x, y, z) as stored; arrays are (z, y, x)
    gt = cube()
    # Shift one slice along z: 3 mm in truth (exact < 1); the organisers pair axis 0 with 0.5 mm (= 1).
    pz = cube(shift=(1, 0, 0))
    ch = score_arrays(gt, pz, is_3d=True, spacing=stored, config=CH)
    ex = score_arrays(gt, pz, is_3d=True, spacing=stored, config=EX)
    assert ch[0] == ex[0] == pytest.approx(7 / 8)
    assert ch[1] == pytest.approx(1.0)
    assert ex[1] < 0.95
    # Shift three columns along x: 1.5 mm in truth (exact = 1); the organisers pair axis 2 with 3 mm.
    px = cube(shift=(0, 0, 3))
    ch = score_arrays(gt, px, is_3d=True, spacing=stored, config=CH)
    ex = score_arrays(gt, px, is_3d=True, spacing=stored, config=EX)
    assert ex[1] == pytest.approx(1.0)
    assert ch[1] < 0.95


def test_label_255_in_uint8_is_scored():
    # numpy 2 keeps uint8 in gt.max() + 1 (255 + 1 wraps to 0); the labels must still be 1..255.
    gt = np.arange(256, dtype=np.uint8).reshape(16, 16)
    dsc, nsd, labels = score_arrays(gt, gt.copy(), is_3d=False, config=CH)
    assert len(labels) == 255 and (dsc, nsd) == (1.0, 1.0)


def test_mode_and_tolerance_validated():
    with pytest.raises(ValueError):
        MetricsConfig("organisers")
    with pytest.raises(ValueError):
        MetricsConfig(tolerance=-1)
    # a wider tolerance forgives the 3 px shift
    assert score_arrays(square(0), square(3), is_3d=False, config=MetricsConfig("exact", 3.0))[1] == pytest.approx(1.0)


# --------------------------------------------------------------------------- files

def test_case_files_failures_never_raise(tmp_path):
    gt = tmp_path / "gts" / "2DBox_US_0001.npz"
    atomic_savez(gt, gts=square(), spacing=np.ones(3))
    segs = tmp_path / "segs"
    segs.mkdir()
    r = evaluate_case(gt, segs / gt.name)
    assert (r.status, r.dsc, r.nsd) == (FAILED, 0.0, 0.0) and "missing" in r.error
    atomic_savez(segs / gt.name, masks=square())
    r = evaluate_case(gt, segs / gt.name)
    assert r.status == FAILED and "'segs'" in r.error
    write_segs(segs / gt.name, square()[:, :30])
    r = evaluate_case(gt, segs / gt.name)
    assert r.status == FAILED and "shape" in r.error
    (segs / gt.name).write_bytes(b"not a zip")
    r = evaluate_case(gt, segs / gt.name)
    assert r.status == FAILED and r.dsc == 0.0
    write_segs(segs / gt.name, square(1))
    r = evaluate_case(gt, segs / gt.name)
    assert r.status == OK and r.dsc == pytest.approx(0.95) and r.kind == "2D" and r.modality == "US"
    bad_gt = tmp_path / "gts" / "3DBox_CT_0002.npz"
    atomic_savez(bad_gt, segs=cube())
    r = evaluate_case(bad_gt, segs / bad_gt.name)
    assert r.status == GT_ERROR and math.isnan(r.dsc)


def _read(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as fp:
        return {row["case"]: row for row in csv.DictReader(fp)}


@pytest.fixture(scope="module")
def self_segs(tmp_path_factory, gts_dir) -> Path:
    """The shared references rewritten as predictions (key 'segs')."""
    d = tmp_path_factory.mktemp("self_segs")
    for f in sorted(gts_dir.glob("*.npz")):
        write_segs(d / f.name, load_npz(f)["gts"])
    return d


def test_cli_gts_against_themselves(self_segs, gts_dir, tmp_path, capsys):
    out = tmp_path / "m.csv"
    assert main(["eval", "metrics", "-s", str(self_segs), "-g", str(gts_dir), "-o", str(out)]) == 0
    rows = _read(out)
    assert sorted(rows) == sorted(p.name for p in gts_dir.glob("*.npz"))
    assert list(next(iter(rows.values()))) == ["case", "dsc", "nsd"]
    assert all(r["dsc"] == "1.0" and r["nsd"] == "1.0" for r in rows.values())
    assert (tmp_path / "m_labels.csv").exists() and (tmp_path / "m.md").exists()
    printed = capsys.readouterr().out
    assert "Overall" in printed and "Microscopy" in printed
    md = (tmp_path / "m.md").read_text()
    assert "| Overall | 10 | 1.0000 | 1.0000 |" in md


def test_cli_perturbed_predictions(self_segs, gts_dir, tmp_path):
    segs = tmp_path / "segs"
    shutil.copytree(self_segs, segs)
    missing = "3DBox_MR_Breast1.npz"
    (segs / missing).unlink()
    wrong_shape = "2DBox_CT_s0114_111.npz"
    write_segs(segs / wrong_shape, np.zeros((10, 10), np.uint8))
    (segs / "2DBox_CT_amos_0004_75.npz").rename(segs / "2DBox_CT_amos_0004_75_pred.npz")  # a wrong name
    shifted = "3DBox_CT_TotalSegSmall.npz"
    g = load_npz(gts_dir / shifted)["gts"]
    write_segs(segs / shifted, np.roll(g, 1, axis=0))  # one slice (3 mm) along z
    out = tmp_path / "challenge.csv"
    # exit code 1: cases failed (they are still scored 0 and written)
    assert main(["eval", "metrics", "-s", str(segs), "-g", str(gts_dir), "-o", str(out), "-j", "2"]) == 1
    rows = _read(out)
    assert len(rows) == 10
    for name in (missing, wrong_shape, "2DBox_CT_amos_0004_75.npz"):
        assert (rows[name]["dsc"], rows[name]["nsd"]) == ("0.0", "0.0")
    assert 0.2 < float(rows[shifted]["dsc"]) < 1.0
    assert rows["2DBox_Microscope_Nuclei.npz"]["dsc"] == "1.0"
    back = {m.case: m for m in read_metrics_csv(out)}
    assert back[missing].status == FAILED and "missing" in back[missing].error
    assert back[wrong_shape].status == FAILED and "shape" in back[wrong_shape].error
    md = (tmp_path / "challenge.md").read_text()
    assert "## Failures" in md and "2DBox_CT_amos_0004_75_pred.npz" in md

    out_ex = tmp_path / "exact.csv"
    assert main(["eval", "metrics", "-s", str(segs), "-g", str(gts_dir), "-o", str(out_ex), "--mode", "exact"]) == 1
    ex = _read(out_ex)
    assert ex[shifted]["dsc"] == rows[shifted]["dsc"]
    # spacing 3 mm everywhere: the stored order does not matter, the 3 mm shift is out of tolerance in both
    assert float(ex[shifted]["nsd"]) == pytest.approx(float(rows[shifted]["nsd"]))


def test_summary_means():
    from lapsam.eval.metrics import CaseResult

    cases = [
        CaseResult("2DBox_US_1.npz", "US", "2D", 0.8, 0.9),
        CaseResult("2DBox_US_2.npz", "US", "2D", 0.0, 0.0, status=FAILED),
        CaseResult("3DBox_CT_1.npz", "CT", "3D", math.nan, 0.0),
        CaseResult("3DBox_CT_2.npz", "CT", "3D", 0.6, 0.7),
        CaseResult("3DBox_CT_3.npz", "CT", "3D", math.nan, math.nan, status=GT_ERROR),
    ]
    s = {g.group: g for g in summarize(cases)}
    assert (s["US"].n, s["US"].dsc, s["US"].nsd, s["US"].n_failed) == (2, 0.4, 0.45, 1)
    assert (s["CT"].n, s["CT"].dsc, s["CT"].nsd, s["CT"].n_nan) == (2, 0.6, 0.35, 1)
    assert s["Overall"].n == 4 and s["Overall"].dsc == pytest.approx(1.4 / 3)


def test_cli_missing_folder(tmp_path):
    assert main(["eval", "metrics", "-s", str(tmp_path / "nope"), "-g", str(tmp_path), "-o", str(tmp_path / "x.csv")]) == 2


def test_eval_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys, lapsam.eval.metrics, lapsam.eval.timing, lapsam.eval.report, lapsam.eval.cli; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
