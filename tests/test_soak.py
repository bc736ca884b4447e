"""Soak (issue 11): ``lapsam predict`` on 200 small mixed cases in one process.

2D, 3D and 2025-format cases (box dicts, clicks, prev_pred) of varied sizes, one in ten
broken in a different way each time, all run by the real small exported model in one
``lapsam predict`` process. Every good case must be written (complete, right shape), every
bad one reported, no temporary file left, and memory must not grow with the number of cases:
the RSS after 20 cases and after 200 are printed (run with ``-s`` to see them) and their
difference is held to a generous bound (a leak of one 256-px embedding per case would
already exceed it). Nothing here is timed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

N_CASES = 200
GROWTH_BOUND_MB = 64.0  # RSS after 200 cases minus after 20; one leaked 256-px fp32 embedding is 4 MiB

_CHILD = '''
import json, resource, sys
import psutil
import lapsam.runtime.run as run

proc = psutil.Process()
probe = {}
calls = [0]
real_load_case = run.load_case

def peak_mb():
    # VmHWM: this process image's peak RSS. (ru_maxrss would report the forking parent's -
    # pytest's, with torch loaded - because Linux keeps it across exec.)
    try:
        with open("/proc/self/status") as fp:
            for line in fp:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

def memory():
    return {"rss_mb": proc.memory_info().rss / 2**20, "peak_mb": peak_mb()}

def load_case(path):
    calls[0] += 1
    if calls[0] == 21:
        probe["after_20"] = memory()
    return real_load_case(path)

run.load_case = load_case
from lapsam.cli import main
rc = main(sys.argv[2:])
probe["after_200"] = memory()
probe["cases_started"] = calls[0]
with open(sys.argv[1], "w") as fp:
    json.dump(probe, fp)
sys.exit(rc)
'''


def _box2d(rng: np.random.Generator, h: int, w: int) -> list[int]:
    x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
    return [x0, y0, int(rng.integers(x0 + 4, w)), int(rng.integers(y0 + 4, h))]


def _image2d(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _volume(rng: np.random.Generator, d: int, h: int, w: int) -> np.ndarray:
    return rng.integers(0, 256, (d, h, w), dtype=np.uint8)


def _box_dict(rng: np.random.Generator, d: int, h: int, w: int) -> dict:
    x0, y0, x1, y1 = _box2d(rng, h, w)
    z0 = int(rng.integers(0, d // 2))
    z1 = int(rng.integers(z0, d))
    return {"z_min": z0, "z_max": z1, "z_mid": (z0 + z1) // 2, "z_mid_x_min": x0, "z_mid_y_min": y0,
            "z_mid_x_max": x1, "z_mid_y_max": y1}


def _bad_case(k: int, path: Path, rng: np.random.Generator) -> None:
    """Ten ways to be broken, in turn."""
    h, w = 48, 56
    kind = k % 10
    if kind == 0:
        path.write_bytes(b"PK\x03\x04 truncated")
    elif kind == 1:
        np.savez(path, imgs=_image2d(rng, h, w), boxes=np.array([[30, 5, 10, 20]]))  # inverted
    elif kind == 2:
        np.savez(path, boxes=np.array([[1, 1, 5, 5]]))  # no imgs
    elif kind == 3:
        np.savez(path, imgs=_image2d(rng, h, w))  # no boxes
    elif kind == 4:
        img = _image2d(rng, h, w).astype(np.float32)
        img[0, 0, 0] = np.nan
        np.savez(path, imgs=img, boxes=np.array([[1, 1, 5, 5]]))
    elif kind == 5:
        np.savez(path, imgs=_image2d(rng, h, w), boxes=np.array([[0.0, 0.0, 1e30, 10.0]]))
    elif kind == 6:
        bd = _box_dict(rng, 6, h, w)
        bd["z_max"] = 2**70
        np.savez(path, imgs=_volume(rng, 6, h, w), boxes=np.array([bd], dtype=object))
    elif kind == 7:
        prev = np.zeros((6, h, w), np.uint8)
        prev[0, 0, 0] = 9
        np.savez(path, imgs=_volume(rng, 6, h, w), boxes=np.array([_box_dict(rng, 6, h, w)], dtype=object),
                 prev_pred=prev)
    elif kind == 8:
        path.write_bytes(os.urandom(2000))
    else:
        np.savez(path, imgs=_image2d(rng, h, w)[..., :2], boxes=np.array([[1, 1, 5, 5]]))  # 2 channels


def _make_cases(folder: Path, n: int = N_CASES, seed: int = 0) -> tuple[list[str], list[str]]:
    """n cases: per ten, 4 2D, 3 3D (2024), 2 2025-format, 1 broken. Returns (good, bad) file names."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    good, bad = [], []
    for k in range(n):
        slot = k % 10
        h, w = int(rng.integers(40, 97)), int(rng.integers(40, 97))
        if slot < 4:
            name = f"2DBox_US_soak{k:03d}.npz"
            boxes = [_box2d(rng, h, w) for _ in range(int(rng.integers(0, 4)))]
            np.savez(folder / name, imgs=_image2d(rng, h, w), boxes=np.array(boxes, np.int64).reshape(-1, 4))
        elif slot < 7:
            name = f"3DBox_CT_soak{k:03d}.npz"
            d = int(rng.integers(3, 9))
            boxes = []
            for _ in range(int(rng.integers(1, 3))):
                x0, y0, x1, y1 = _box2d(rng, h, w)
                z0 = int(rng.integers(0, d))
                boxes.append([x0, y0, z0, x1, y1, int(rng.integers(z0, d))])
            np.savez(folder / name, imgs=_volume(rng, d, h, w), boxes=np.array(boxes, np.int64),
                     spacing=np.array([0.8, 0.8, 2.5]))
        elif slot < 9:
            name = f"3DBox_MR_soak2025_{k:03d}.npz"
            d = int(rng.integers(3, 9))
            dicts = [_box_dict(rng, d, h, w) for _ in range(int(rng.integers(1, 3)))]
            arrays = dict(imgs=_volume(rng, d, h, w), spacing=np.array([1.0, 1.0, 3.0]),
                          boxes=np.array(dicts, dtype=object))
            if slot == 8:  # a later interactive round: clicks and the previous prediction
                arrays["clicks"] = np.array([{"fg": [[dd["z_mid"], dd["z_mid_y_min"], dd["z_mid_x_min"]]], "bg": []}
                                             for dd in dicts], dtype=object)
                arrays["clicks_order"] = np.array([["fg"] for _ in dicts], dtype=object)
                arrays["prev_pred"] = np.zeros((d, h, w), np.uint8)
            np.savez(folder / name, **arrays)
        else:
            kind = k // 10
            name = f"{'3DBox' if kind % 10 in (6, 7) else '2DBox'}_CT_soakbad{k:03d}.npz"
            _bad_case(kind, folder / name, rng)
            bad.append(name)
            continue
        good.append(name)
    return good, bad


def test_soak_200_mixed_cases_one_process(small_model_dir: Path, tmp_path: Path) -> None:
    from lapsam.case import load_case
    from lapsam.safe_npz import load_npz

    inp, out = tmp_path / "cases", tmp_path / "out"
    good, bad = _make_cases(inp)
    assert len(good) + len(bad) == N_CASES and len(bad) == N_CASES // 10
    script, probe_path = tmp_path / "soak_child.py", tmp_path / "probe.json"
    script.write_text(_CHILD)
    env = dict(os.environ)
    env.pop("LAPSAM_OV_CACHE_DIR", None)
    r = subprocess.run(
        [sys.executable, str(script), str(probe_path), "-q", "predict", "-i", str(inp), "-o", str(out),
         "--model", str(small_model_dir), "--threads", "1", "--no-progress"],
        capture_output=True, text=True, env=env, timeout=3600,
    )
    text = r.stdout + r.stderr[-5000:]
    assert r.returncode == 1, text  # the bad cases failed, the run completed
    assert f"{N_CASES} case(s): {len(good)} ok, {len(bad)} failed" in r.stdout, text
    failed = {line.split(":")[0].removeprefix("FAILED ") for line in r.stdout.splitlines() if line.startswith("FAILED ")}
    assert failed == set(bad), text
    assert "Traceback" not in r.stderr, text
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(good)  # every good case, nothing else (no temporary files)
    for name in good:
        case = load_case(inp / name)
        segs = load_npz(out / name)["segs"]
        assert segs.shape == case.spatial_shape and segs.dtype == np.uint8, name
        assert int(segs.max(initial=0)) <= case.num_objects, name

    probe = json.loads(probe_path.read_text())
    assert probe["cases_started"] == N_CASES
    a, b = probe["after_20"], probe["after_200"]
    print(f"\nsoak RSS after 20 cases {a['rss_mb']:.1f} MB (peak {a['peak_mb']:.1f} MB); "
          f"after {N_CASES}: {b['rss_mb']:.1f} MB (peak {b['peak_mb']:.1f} MB)")
    assert b["rss_mb"] - a["rss_mb"] < GROWTH_BOUND_MB, probe
    assert b["peak_mb"] - a["peak_mb"] < GROWTH_BOUND_MB, probe
