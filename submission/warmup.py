"""Build-time warm-up: run ``lapsam predict`` once so OpenVINO's compiled-model cache is filled.

``python -m lapsam.submission.warmup --model DIR --cache DIR`` writes two small synthetic
cases (a 2D case with two boxes, a 3D case with two boxes), runs the real command line on
them with ``LAPSAM_OV_CACHE_DIR`` pointing at ``--cache``, checks that every output was
written, and reports what landed in the cache. The Dockerfile runs it, so the image ships
the compiled blobs and a container skips compilation at start-up. The cache is keyed by
OpenVINO to the model, the compile options and the device; on a CPU that does not match,
OpenVINO compiles again instead (and, if it can, writes a new entry), so a stale cache
costs time, never correctness.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def write_synthetic_cases(folder: Path, seed: int = 0) -> list[Path]:
    """Two small valid cases in the challenge format (not medical data: noise with a bright blob)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    img2d = rng.integers(0, 60, size=(96, 128, 3), dtype=np.uint8)
    img2d[30:60, 40:90] += 150
    p2 = folder / "2DBox_US_warmup.npz"
    np.savez_compressed(
        p2, imgs=img2d, boxes=np.array([[38, 28, 92, 62], [5, 5, 30, 30]], np.int64),
        spacing=np.array([1.0, 1.0, 1.0]),
    )
    img3d = rng.integers(0, 60, size=(6, 64, 64), dtype=np.uint8)
    img3d[1:5, 20:40, 20:44] += 150
    p3 = folder / "3DBox_CT_warmup.npz"
    np.savez_compressed(
        p3, imgs=img3d,
        boxes=np.array([[18, 18, 1, 46, 42, 4], [2, 2, 0, 12, 12, 2]], np.int64),
        spacing=np.array([1.0, 1.0, 3.0]),
    )
    return [p2, p3]


def cache_files(cache: Path) -> list[Path]:
    return sorted(p for p in cache.rglob("*") if p.is_file()) if cache.is_dir() else []


def warm_up(model: Path, cache: Path, extra_args: list[str] | None = None) -> int:
    cache.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, LAPSAM_MODEL_DIR=str(model), LAPSAM_OV_CACHE_DIR=str(cache))
    with tempfile.TemporaryDirectory(prefix="lapsam-warmup-") as tmp:
        inputs = Path(tmp) / "inputs"
        outputs = Path(tmp) / "outputs"
        cases = write_synthetic_cases(inputs)
        cmd = [sys.executable, "-m", "lapsam.cli", "predict", "-i", str(inputs), "-o", str(outputs),
               "--model", str(model), *(extra_args or [])]
        print("warm-up:", " ".join(cmd), flush=True)
        rc = subprocess.run(cmd, env=env).returncode
        if rc != 0:
            print(f"warm-up: lapsam predict failed with exit code {rc}", file=sys.stderr)
            return rc
        missing = [c.name for c in cases if not (outputs / c.name).is_file()]
        if missing:
            print(f"warm-up: no output for {', '.join(missing)}", file=sys.stderr)
            return 1
    files = cache_files(cache)
    total = sum(f.stat().st_size for f in files)
    if files:
        print(f"warm-up: compile cache {cache}: {len(files)} files, {total / 1e6:.1f} MB", flush=True)
    else:
        print(f"warm-up: WARNING: the compile cache {cache} stayed empty "
              "(the runtime did not compile with OpenVINO's CACHE_DIR)", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Fill OpenVINO's compiled-model cache by running lapsam predict once.")
    ap.add_argument("--model", type=Path, required=True, help="exported model folder")
    ap.add_argument("--cache", type=Path, required=True, help="compile cache folder to fill")
    ap.add_argument("predict_args", nargs="*", help="extra arguments for lapsam predict (after --)")
    args = ap.parse_args(argv)
    return warm_up(args.model, args.cache, args.predict_args)


if __name__ == "__main__":
    sys.exit(main())
