"""Faults and bad input (issue 11): check before computing, fail loudly, leave nothing behind.

One section per item of the issue. The ``lapsam predict`` tests replace the model by a fake
predictor that paints each box (in a child process where signals or privileges matter), so
they need no exported model; the soak test (tests/test_soak.py) runs the real one.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from lapsam.case import load_case
from lapsam.cli import main
from lapsam.errors import CaseError
from lapsam.safe_npz import load_npz
from lapsam.writers import atomic_savez, write_segs

CASE_2D = "2DBox_CT_amos_0004_75"


# --------------------------------------------------------------------------- helpers

def _img2d(h: int = 32, w: int = 40) -> np.ndarray:
    img = np.zeros((h, w, 3), np.uint8)
    img[8:24, 8:24] = 200
    return img


def _save_2d(path: Path, boxes=((8, 8, 23, 23),)) -> Path:
    np.savez(path, imgs=_img2d(), boxes=np.array(boxes, np.int64))
    return path


def _save_3d(path: Path, boxes=((4, 5, 1, 20, 22, 5),)) -> Path:
    np.savez(path, imgs=np.full((8, 32, 40), 50, np.uint8), boxes=np.array(boxes, np.int64),
             spacing=np.array([1.0, 1.0, 2.0]))
    return path


def _box_dict(z_min=1, z_max=5, z_mid=3, x0=4, y0=5, x1=20, y1=22) -> dict:
    return {"z_min": z_min, "z_max": z_max, "z_mid": z_mid, "z_mid_x_min": x0, "z_mid_y_min": y0,
            "z_mid_x_max": x1, "z_mid_y_max": y1}


def _save_2025(path: Path, dicts: list[dict], **extra) -> Path:
    np.savez(path, imgs=np.full((8, 32, 40), 50, np.uint8), spacing=np.array([1.0, 1.0, 2.0]),
             boxes=np.array(dicts, dtype=object), **extra)
    return path


def _expected_segs(case_path: Path) -> np.ndarray:
    """What the fake predictor paints: each valid box filled with its label (an independent reference)."""
    c = load_case(case_path)
    segs = np.zeros(c.spatial_shape, np.uint8)
    for i in c.valid_box_indices:
        b = c.boxes[i]
        if c.is_3d:
            segs[b[2]:b[5] + 1, b[1]:b[4] + 1, b[0]:b[3] + 1] = i + 1
        else:
            segs[b[1]:b[3] + 1, b[0]:b[2] + 1] = i + 1
    return segs


class FakePredictor:
    """Paints every valid box with its label; ``last_report`` as the real one has."""

    last_report = None

    def predict(self, case):
        segs = case.empty_segs()
        for i in case.valid_box_indices:
            b = case.boxes[i]
            if case.is_3d:
                segs[b[2]:b[5] + 1, b[1]:b[4] + 1, b[0]:b[3] + 1] = i + 1
            else:
                segs[b[1]:b[3] + 1, b[0]:b[2] + 1] = i + 1
        return segs


def _model_dir(tmp_path: Path) -> Path:
    """A folder with a valid manifest.json (no graph files): what --model checks before loading."""
    import json

    from lapsam.manifest import ModelManifest, Preprocessing

    d = tmp_path / "model"
    if not d.is_dir():
        d.mkdir()
        manifest = ModelManifest(name="fake", preprocessing=Preprocessing(input_size=256))
        (d / "manifest.json").write_text(json.dumps(manifest.to_dict()))
    return d


@pytest.fixture
def fake_model(monkeypatch, tmp_path: Path) -> dict:
    """``Predictor.from_model_dir`` replaced by the fake; ``loads`` counts model loads."""
    from lapsam.runtime import run

    state = {"loads": 0, "dir": _model_dir(tmp_path)}

    def load(cls, *args, **kwargs):
        state["loads"] += 1
        return FakePredictor()

    monkeypatch.setattr(run.Predictor, "from_model_dir", classmethod(load))
    monkeypatch.delenv("LAPSAM_MODEL_DIR", raising=False)
    return state


# A child process running `lapsam ...` with the fake predictor. HOOK runs inside the atomic
# write of every output (its temporary file half-written) with `n`, the number of the write.
_CHILD = '''
import os, signal, sys, time
import numpy as np
# Ctrl-C as in a terminal, even when the test runner itself runs in the background (a shell
# starts background jobs with SIGINT ignored, and Python then keeps it ignored).
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.path.insert(0, {tests!r})
from test_faults import FakePredictor
from lapsam.runtime import run
from lapsam import writers

def load(cls, *a, **k):
    print("MODEL LOADED", flush=True)
    return FakePredictor()

run.Predictor.from_model_dir = classmethod(load)
_calls = [0]

def atomic_savez(path, compressed=True, **arrays):
    _calls[0] += 1
    n = _calls[0]
    with writers.atomic_write(path) as fp:
        np.savez_compressed(fp, **arrays)
        fp.flush()
{hook}
    return path

writers.atomic_savez = atomic_savez
from lapsam.cli import main
sys.exit(main(sys.argv[1:]))
'''


def _child(tmp_path: Path, args: list[str], hook: str = "        pass", prefix: list[str] | None = None,
           timeout: float = 120) -> subprocess.CompletedProcess:
    script = tmp_path / "child_lapsam.py"
    script.write_text(_CHILD.format(tests=str(Path(__file__).resolve().parent), hook=hook))
    env = dict(os.environ)
    env.pop("LAPSAM_MODEL_DIR", None)
    return subprocess.run([*(prefix or []), sys.executable, str(script), *args], capture_output=True, text=True,
                          encoding="utf-8", errors="replace", env=env, timeout=timeout)


def _unprivileged() -> list[str]:
    """A command prefix under which file permissions apply (root ignores them otherwise)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: a folder cannot be made unwritable")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--"]


@pytest.fixture
def readonly_dir(tmp_path: Path):
    d = tmp_path / "readonly"
    d.mkdir()
    d.chmod(0o555)
    yield d
    d.chmod(0o755)


def _no_traceback(text: str) -> None:
    assert "Traceback" not in text, text


def _tmp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# --------------------------------------------------------------------------- 1. predict checks -o first

def test_predict_output_is_a_file_fails_before_the_model_loads(tmp_path: Path, fake_model, caplog) -> None:
    inp = tmp_path / "in"
    inp.mkdir()
    _save_2d(inp / "2DBox_US_a.npz")
    out = tmp_path / "out.npz"
    out.write_bytes(b"x")
    rc = main(["predict", "-i", str(inp), "-o", str(out), "--model", str(fake_model["dir"]), "--no-progress"])
    assert rc == 2 and fake_model["loads"] == 0
    assert "is not a folder" in caplog.text and str(out) in caplog.text
    # -o below a file: cannot be created
    rc = main(["predict", "-i", str(inp), "-o", str(out / "sub"), "--model", str(fake_model["dir"])])
    assert rc == 2 and fake_model["loads"] == 0
    assert "cannot be created" in caplog.text


def test_predict_unwritable_output_fails_before_the_model_loads(tmp_path: Path, readonly_dir: Path) -> None:
    inp = tmp_path / "in"
    inp.mkdir()
    _save_2d(inp / "2DBox_US_a.npz")
    r = _child(tmp_path, ["predict", "-i", str(inp), "-o", str(readonly_dir), "--model", str(_model_dir(tmp_path)),
                          "--no-progress"], prefix=_unprivileged())
    text = r.stdout + r.stderr
    assert r.returncode == 2, text
    assert "MODEL LOADED" not in r.stdout and "not writable" in text, text
    _no_traceback(text)
    assert sum("not writable" in line for line in text.splitlines()) == 1, text


def test_predict_missing_input_is_exit_2_and_creates_nothing(tmp_path: Path, fake_model) -> None:
    out = tmp_path / "out"
    rc = main(["predict", "-i", str(tmp_path / "nope"), "-o", str(out), "--model", str(fake_model["dir"])])
    assert rc == 2 and not out.exists() and fake_model["loads"] == 0


# --------------------------------------------------------------------------- 2, 3. eval metrics exit code, -o

@pytest.fixture
def eval_dirs(tmp_path: Path) -> tuple[Path, Path]:
    gts, segs = tmp_path / "gts", tmp_path / "segs"
    g = np.zeros((30, 30), np.uint8)
    g[5:15, 5:15] = 1
    for name in ("2DBox_US_a.npz", "2DBox_US_b.npz"):
        atomic_savez(gts / name, gts=g)
        write_segs(segs / name, g)
    return gts, segs


def test_eval_metrics_exit_code_says_when_a_case_failed(eval_dirs, tmp_path: Path) -> None:
    gts, segs = eval_dirs
    out = tmp_path / "m.csv"
    assert main(["eval", "metrics", "-s", str(segs), "-g", str(gts), "-o", str(out)]) == 0
    for breakage in ("missing", "corrupt", "shape"):
        p = segs / "2DBox_US_b.npz"
        if breakage == "missing":
            p.unlink()
        elif breakage == "corrupt":
            p.write_bytes(b"PK\x03\x04 broken")
        else:
            write_segs(p, np.zeros((3, 3), np.uint8))
        out.unlink()
        assert main(["eval", "metrics", "-s", str(segs), "-g", str(gts), "-o", str(out)]) == 1, breakage
        assert out.read_text().splitlines()[1:] == ["2DBox_US_a.npz,1.0,1.0", "2DBox_US_b.npz,0.0,0.0"]
    # an unreadable reference fails the run too
    write_segs(segs / "2DBox_US_b.npz", np.zeros((30, 30), np.uint8))
    (gts / "2DBox_US_b.npz").write_bytes(b"junk")
    assert main(["eval", "metrics", "-s", str(segs), "-g", str(gts), "-o", str(out)]) == 1


def test_eval_metrics_checks_output_before_scoring(eval_dirs, tmp_path: Path, monkeypatch, caplog) -> None:
    from lapsam.eval import metrics

    gts, segs = eval_dirs

    def no_scoring(*a, **k):
        raise AssertionError("scored before checking -o")

    monkeypatch.setattr(metrics, "evaluate_folder", no_scoring)
    folder = tmp_path / "a_folder"
    folder.mkdir()
    assert main(["eval", "metrics", "-s", str(segs), "-g", str(gts), "-o", str(folder)]) == 2
    assert "is a folder" in caplog.text
    (tmp_path / "m_labels.csv").mkdir()  # a sibling output in the way
    assert main(["eval", "metrics", "-s", str(segs), "-g", str(gts), "-o", str(tmp_path / "m.csv")]) == 2
    assert not (tmp_path / "m.csv").exists()


def test_eval_metrics_unwritable_output_is_one_line_exit_2(eval_dirs, tmp_path: Path, readonly_dir: Path) -> None:
    gts, segs = eval_dirs
    r = subprocess.run([*_unprivileged(), sys.executable, "-m", "lapsam.cli", "eval", "metrics", "-s", str(segs),
                        "-g", str(gts), "-o", str(readonly_dir / "m.csv")], capture_output=True, text=True,
                       timeout=120)
    text = r.stdout + r.stderr
    assert r.returncode == 2, text
    _no_traceback(text)
    assert "not writable" in text and "metrics (" not in text, text  # no progress bar: nothing was scored


def test_eval_outputs_are_written_together(tmp_path: Path) -> None:
    from lapsam.eval.tables import atomic_write_texts

    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    a.write_text("old a")
    b.write_text("old b")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OSError):
        atomic_write_texts({a: "new a", b: "new b", blocker / "c.md": "new c"})  # c cannot be written
    assert (a.read_text(), b.read_text()) == ("old a", "old b")
    assert _tmp_files(tmp_path) == []
    atomic_write_texts({a: "new a", b: "new b"})
    assert (a.read_text(), b.read_text()) == ("new a", "new b")


# --------------------------------------------------------------------------- 4. any failure is that case's error

def test_inspect_overflowing_2025_values_are_case_errors(tmp_path: Path, capsys) -> None:
    d = tmp_path / "cases"
    d.mkdir()
    _save_2025(d / "3DBox_CT_a_overflow.npz", [_box_dict(z_max=2**70)])
    _save_2025(d / "3DBox_CT_b_inf_click.npz", [_box_dict()],
               clicks=np.array([{"fg": [[float("inf"), 1, 1]], "bg": []}], dtype=object))
    _save_3d(d / "3DBox_CT_c_good.npz")
    rc = main(["data", "inspect", str(d)])
    out = capsys.readouterr().out
    assert rc == 1, out
    lines = out.splitlines()
    assert lines[0].startswith("3DBox_CT_a_overflow.npz: ERROR") and "boxes[0]['z_max']" in lines[0]
    assert lines[1].startswith("3DBox_CT_b_inf_click.npz: ERROR") and "clicks[0]['fg']" in lines[1]
    assert lines[2].startswith("3DBox_CT_c_good: 2024 3D CT")  # the case after them is still checked
    assert lines[3] == "3 case(s), 1 ok, 2 with errors"


def test_inspect_unexpected_exception_is_that_case_error(tmp_path: Path, capsys, monkeypatch) -> None:
    from lapsam import data_cli

    d = tmp_path / "cases"
    d.mkdir()
    _save_2d(d / "2DBox_US_a.npz")
    _save_2d(d / "2DBox_US_b.npz")
    real = data_cli.load_case

    def flaky(path):
        if Path(path).name == "2DBox_US_a.npz":
            raise RuntimeError("something unforeseen")
        return real(path)

    monkeypatch.setattr(data_cli, "load_case", flaky)
    assert main(["data", "inspect", str(d)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "2DBox_US_a.npz: ERROR RuntimeError: something unforeseen"
    assert out[1].startswith("2DBox_US_b: 2024 2D")


# --------------------------------------------------------------------------- 5. no loop over absent labels

class _CountingArray(np.ndarray):
    """Counts ``==`` comparisons: one per full-array pass of a per-label loop."""

    eq_calls = 0

    def __eq__(self, other):
        _CountingArray.eq_calls += 1
        return np.asarray(self) == other


def _brute_force(gt: np.ndarray, seg: np.ndarray) -> list[float]:
    """The organisers' per-label DSC over labels 1..max(gt), written out (NaN when both are empty)."""
    out = []
    for lab in range(1, int(gt.max()) + 1):
        a, b = gt == lab, seg == lab
        s = int(a.sum()) + int(b.sum())
        out.append(float("nan") if s == 0 else 2 * int((a & b).sum()) / s)
    return out


def test_stray_large_label_is_not_looped_over() -> None:
    from lapsam.eval.metrics import MetricsConfig, score_arrays

    gt = np.zeros((4, 16, 16), np.uint16)
    gt[1:3, 2:8, 2:8] = 1
    gt[0, 0, 0] = 65535  # one stray voxel
    seg = gt.copy()
    for mode in ("challenge", "exact"):
        _CountingArray.eq_calls = 0
        dsc, nsd, labels = score_arrays(gt.view(_CountingArray), seg.view(_CountingArray), is_3d=True,
                                        spacing=(1, 1, 1), config=MetricsConfig(mode))
        assert _CountingArray.eq_calls <= 10, mode  # a few passes per present label (2), not 65535
        # the organisers' semantics kept: labels 2..65534 absent from both count as NaN
        assert len(labels) == 65535 and labels[0].dsc == 1.0 and labels[-1].dsc == 1.0
        assert all(math.isnan(lab.dsc) for lab in labels[1:-1])
        if mode == "challenge":
            assert math.isnan(dsc) and nsd == 0.0  # one NaN label makes the case NaN, NSD then 0
        else:
            assert (dsc, nsd) == (1.0, 1.0)
            assert all(math.isnan(lab.nsd) for lab in labels[1:-1])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_label_dsc_matches_a_per_label_loop(seed: int) -> None:
    from lapsam.eval.metrics import MetricsConfig, score_arrays

    rng = np.random.default_rng(seed)
    gt = np.zeros((6, 20, 20), np.uint8)
    seg = np.zeros_like(gt)
    for lab in rng.choice(np.arange(1, 40), size=6, replace=False):  # labels with gaps
        z, y, x = rng.integers(0, 4), rng.integers(0, 14), rng.integers(0, 14)
        gt[z:z + 2, y:y + 5, x:x + 5] = lab
        if rng.random() < 0.7:
            seg[z:z + 2, y + 1:y + 6, x:x + 5] = lab
    seg[0, 0, 0] = 200  # a label above max(gt): not scored
    ref = _brute_force(gt, seg)
    for mode in ("challenge", "exact"):
        dsc, _, labels = score_arrays(gt, seg, is_3d=True, spacing=(1, 1, 1), config=MetricsConfig(mode))
        got = [lab.dsc for lab in labels]
        assert len(got) == len(ref)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
        np.testing.assert_allclose(np.nan_to_num(got), np.nan_to_num(ref), rtol=0, atol=1e-15)
        if mode == "challenge":
            assert math.isnan(dsc) == any(math.isnan(v) for v in ref)
        else:
            assert dsc == pytest.approx(np.nanmean(ref))


# --------------------------------------------------------------------------- 6. signals, temp files

@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_mid_write_leaves_no_temp_and_prints_a_summary(tmp_path: Path, sig: int, code: int) -> None:
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    for name in ("2DBox_US_a.npz", "2DBox_US_b.npz", "2DBox_US_c.npz"):
        _save_2d(inp / name)
    # the signal arrives while the second output's temporary file is half-written
    hook = f"        if n == 2:\n            os.kill(os.getpid(), {int(sig)})\n            time.sleep(5)"
    r = _child(tmp_path, ["predict", "-i", str(inp), "-o", str(out), "--model", str(_model_dir(tmp_path)), "--no-progress"],
               hook=hook)
    text = r.stdout + r.stderr
    assert r.returncode == code, text
    assert _tmp_files(out) == [], text
    assert sorted(p.name for p in out.iterdir()) == ["2DBox_US_a.npz"]
    np.testing.assert_array_equal(load_npz(out / "2DBox_US_a.npz")["segs"], _expected_segs(inp / "2DBox_US_a.npz"))
    name = "SIGTERM" if sig == signal.SIGTERM else "SIGINT"
    assert f"stopped by {name}: 3 case(s): 1 ok, 0 failed" in r.stderr and "2 not run" in r.stderr, text
    _no_traceback(text)


def test_sigkill_mid_write_then_rerun_is_complete_and_clean(tmp_path: Path) -> None:
    from lapsam.writers import stale_temp_files

    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    names = ("2DBox_US_a.npz", "2DBox_US_b.npz", "3DBox_CT_c.npz")
    _save_2d(inp / names[0])
    _save_2d(inp / names[1], boxes=((2, 2, 10, 10), (12, 12, 30, 25)))
    _save_3d(inp / names[2])
    args = ["predict", "-i", str(inp), "-o", str(out), "--model", str(_model_dir(tmp_path)), "--no-progress"]
    hook = "        if n == 2:\n            os.kill(os.getpid(), signal.SIGKILL)\n            time.sleep(5)"
    r = _child(tmp_path, args, hook=hook)
    assert r.returncode == -signal.SIGKILL
    assert len(stale_temp_files(out, names)) == 1  # what a SIGKILL leaves: nothing can clean it then
    r = _child(tmp_path, args)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _tmp_files(out) == []
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    for n in names:
        np.testing.assert_array_equal(load_npz(out / n)["segs"], _expected_segs(inp / n))


def test_predict_removes_only_its_own_stale_temp_files(tmp_path: Path, fake_model) -> None:
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    out.mkdir()
    _save_2d(inp / "2DBox_US_a.npz")
    _save_2d(inp / "2DBox_US_b.npz")
    stale = [out / ".2DBox_US_a.npz.k2j_9xq1.tmp", out / ".2DBox_US_b.npz.abcdefgh.tmp"]
    others = [out / ".2DBox_US_other.npz.abcdefgh.tmp", out / "notes.tmp", out / ".2DBox_US_a.npz.txt"]
    for p in stale + others:
        p.write_bytes(b"half")
    rc = main(["predict", "-i", str(inp), "-o", str(out), "--model", str(fake_model["dir"]), "--no-progress"])
    assert rc == 0
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in others)


# --------------------------------------------------------------------------- 7. smaller ones

def test_huge_float_box_is_out_of_range_without_numpy_warning(tmp_path: Path) -> None:
    p = tmp_path / "2DBox_US_huge.npz"
    np.savez(p, imgs=_img2d(), boxes=np.array([[0.0, 0.0, 1e30, 10.0]]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(CaseError, match="out of range") as exc:
            load_case(p)
    assert "inverted" not in str(exc.value)
    np.savez(p, imgs=_img2d(), boxes=np.array([[0, 0, 2**64 - 1, 10]], np.uint64))
    with pytest.raises(CaseError, match="out of range"):
        load_case(p)


def test_z_mid_outside_its_range_is_clipped_with_a_warning(tmp_path: Path) -> None:
    p = _save_2025(tmp_path / "3DBox_CT_zmid.npz", [_box_dict(z_min=1, z_max=5, z_mid=7), _box_dict(z_mid=2)])
    c = load_case(p)
    assert c.box_mid_z.tolist() == [5, 2]
    assert [w for w in c.warnings if "z_mid" in w and "box 1" in w and "7" in w]
    assert not any("box 2" in w for w in c.warnings)


def test_prev_pred_labels_beyond_the_classes_are_an_error(tmp_path: Path) -> None:
    shape = (8, 32, 40)
    good = np.zeros(shape, np.uint8)
    good[2, 5:10, 5:10] = 2
    load_case(_save_2025(tmp_path / "3DBox_CT_ok.npz", [_box_dict(), _box_dict()], prev_pred=good))
    bad = good.copy()
    bad[0, 0, 0] = 7
    with pytest.raises(CaseError, match="prev_pred"):
        load_case(_save_2025(tmp_path / "3DBox_CT_bad.npz", [_box_dict(), _box_dict()], prev_pred=bad))
    with pytest.raises(CaseError, match="prev_pred"):
        load_case(_save_2025(tmp_path / "3DBox_CT_neg.npz", [_box_dict()], prev_pred=-good.astype(np.int16)))


@pytest.mark.parametrize("values,problem", [
    (np.float32(0.5), "non-integer"),
    (np.float32(np.nan), "NaN"),
    (np.int16(-1), "negative"),
])
def test_eval_refuses_float_nan_negative_prediction_labels(tmp_path: Path, values, problem: str) -> None:
    from lapsam.eval.metrics import FAILED, evaluate_case

    g = np.zeros((20, 20), np.uint8)
    g[5:10, 5:10] = 1
    atomic_savez(tmp_path / "gts" / "2DBox_US_a.npz", gts=g)
    seg = g.astype(type(values))
    seg[0, 0] = values
    atomic_savez(tmp_path / "segs" / "2DBox_US_a.npz", segs=seg)
    r = evaluate_case(tmp_path / "gts" / "2DBox_US_a.npz", tmp_path / "segs" / "2DBox_US_a.npz")
    assert r.status == FAILED and problem in r.error and r.dsc == 0.0


def test_eval_reads_whole_number_float_predictions_with_a_warning(tmp_path: Path) -> None:
    from lapsam.eval.metrics import OK, evaluate_case

    g = np.zeros((20, 20), np.uint8)
    g[5:10, 5:10] = 1
    atomic_savez(tmp_path / "gts" / "2DBox_US_a.npz", gts=g)
    atomic_savez(tmp_path / "segs" / "2DBox_US_a.npz", segs=g.astype(np.float64))
    r = evaluate_case(tmp_path / "gts" / "2DBox_US_a.npz", tmp_path / "segs" / "2DBox_US_a.npz")
    assert r.status == OK and r.dsc == 1.0 and any("float64" in w for w in r.warnings)


def test_reference_label_beyond_uint16_is_a_reference_error(tmp_path: Path) -> None:
    from lapsam.eval.metrics import GT_ERROR, evaluate_case

    g = np.zeros((20, 20), np.int32)
    g[0, 0] = 70000
    atomic_savez(tmp_path / "gts" / "2DBox_US_a.npz", gts=g)
    write_segs(tmp_path / "segs" / "2DBox_US_a.npz", np.zeros((20, 20), np.uint8))
    r = evaluate_case(tmp_path / "gts" / "2DBox_US_a.npz", tmp_path / "segs" / "2DBox_US_a.npz")
    assert r.status == GT_ERROR and "70000" in r.error


def test_predict_reports_each_failure_once_per_stream_without_doubled_name(tmp_path: Path) -> None:
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    _save_2d(inp / "2DBox_US_a.npz")
    np.savez(inp / "2DBox_US_bad.npz", imgs=_img2d())  # no boxes
    r = _child(tmp_path, ["predict", "-i", str(inp), "-o", str(out), "--model", str(_model_dir(tmp_path)), "--no-progress"])
    assert r.returncode == 1
    assert "2DBox_US_bad.npz: 2DBox_US_bad.npz" not in r.stdout + r.stderr
    assert r.stdout.count("missing key 'boxes'") == 1, r.stdout  # the summary
    assert r.stderr.count("missing key 'boxes'") == 1, r.stderr  # the log line as it happened
    assert "FAILED 2DBox_US_bad.npz: missing key 'boxes'" in r.stdout
    assert "2 case(s): 1 ok, 1 failed" in r.stdout


def test_predict_case_with_overflowing_values_fails_alone(tmp_path: Path, fake_model, capsys) -> None:
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    _save_2025(inp / "3DBox_CT_a.npz", [_box_dict(x1=2**80)])
    _save_3d(inp / "3DBox_CT_b.npz")
    rc = main(["predict", "-i", str(inp), "-o", str(out), "--model", str(fake_model["dir"]), "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 1 and "FAILED 3DBox_CT_a.npz: boxes[0]['z_mid_x_max']" in text
    assert [p.name for p in out.iterdir()] == ["3DBox_CT_b.npz"]


def test_shared_case_still_runs_with_the_fake(tmp_path: Path, fake_model, case_copy) -> None:
    """The fake predictor stands for the model in these tests: it must run a real case end to end."""
    inp = case_copy(CASE_2D)
    out = tmp_path / "out"
    assert main(["predict", "-i", str(inp), "-o", str(out), "--model", str(fake_model["dir"]), "--no-progress"]) == 0
    np.testing.assert_array_equal(load_npz(out / f"{CASE_2D}.npz")["segs"], _expected_segs(inp / f"{CASE_2D}.npz"))
