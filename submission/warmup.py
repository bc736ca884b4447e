"""Build-time warm-up: check the model once, then run ``lapsam predict`` as a container will.

``python -m lapsam.submission.warmup --model DIR [--marker FILE] [--cache DIR]``:

1. ``--marker``: checks every model file against its sha256 and writes the marker that lets the
   image's containers skip that check (:mod:`lapsam.runtime.verified`); a mismatch fails the build;
2. writes two small synthetic cases (a 2D case with two boxes, a 3D case with two boxes), runs the
   real command line on them (with ``LAPSAM_OV_CACHE_DIR`` pointing at ``--cache`` when given,
   without any cache otherwise) and checks that every output was written;
3. reports what landed in the cache.

The Dockerfile runs it as root, so the image also ships: OpenVINO's compiled-model cache (a
container skips compilation at start-up), and the ``.pyc`` files of every module ``lapsam
predict`` imports (Python writes them as it imports; the container's user could not). The cache
is keyed by OpenVINO to the model path, the compile options and the device; on a CPU that does
not match, OpenVINO compiles again instead (and, if it can, writes a new entry), so a stale cache
costs time, never correctness.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
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


_COMPILE_PHASE = re.compile(r"^model load: (\w+) compile \((.+)\)$")


def loaded_from_cache(stderr: str) -> dict[str, bool]:
    """Role -> whether ``lapsam predict`` (run with timings) loaded that graph from OpenVINO's cache."""
    from lapsam import timings

    rep = timings.parse(stderr) or {}
    out = {}
    for name, _, _ in rep.get("phases", []):  # type: ignore[union-attr]
        m = _COMPILE_PHASE.match(name)
        if m:
            out[m.group(1)] = m.group(2) == "from cache"
    return out


def choose_cache_modes(run: Callable[[str | None], str], cache: Path) -> dict[str, bool]:
    """Fill ``cache`` with the smallest blobs that load, and record each graph's mode in it.

    ``run(mode)`` runs ``lapsam predict`` once (``mode``: $LAPSAM_OV_CACHE_MODE for that run,
    None: the cache folder's modes file decides) and returns its stderr. Weight-less blobs
    (OPTIMIZE_SIZE, about 1 MB) are tried first; a graph that does not load back from such a
    blob (the default model's decoder) is cached whole (OPTIMIZE_SPEED). The choice goes to
    ``cache/lapsam-cache-modes.json``, which the runtime reads (the same mode must be used at
    load: OpenVINO rewrites a blob made in the other mode). Returns role -> loaded from cache
    in the last run (what a container will do on this CPU).
    """
    from lapsam.runtime.engines import OV_CACHE_MODES_FILE

    run("OPTIMIZE_SIZE")  # fill
    small_ok = loaded_from_cache(run("OPTIMIZE_SIZE"))
    modes = {role: "OPTIMIZE_SIZE" if ok else "OPTIMIZE_SPEED" for role, ok in sorted(small_ok.items())}
    (cache / OV_CACHE_MODES_FILE).write_text(json.dumps(modes, indent=1) + "\n")
    print(f"warm-up: OpenVINO cache modes {modes}", flush=True)
    if all(small_ok.values()):
        return small_ok
    run(None)  # fill the whole blobs
    return loaded_from_cache(run(None))


def warm_up(model: Path, cache: Path | None, extra_args: list[str] | None = None,
            marker: Path | None = None) -> int:
    if marker is not None:
        from lapsam.runtime.verified import write_marker

        from lapsam.errors import LapsamError

        try:
            rec = write_marker(model, marker)
        except (LapsamError, OSError, ValueError) as exc:
            print(f"warm-up: the model does not match its manifest: {exc}", file=sys.stderr)
            return 1
        print(f"warm-up: sha256 of {len(rec['files'])} model files checked; marker {marker}", flush=True)
    from lapsam.runtime.engines import OV_CACHE_ENV, OV_CACHE_MODE_ENV

    env = dict(os.environ, LAPSAM_MODEL_DIR=str(model), LAPSAM_TIMINGS="1")
    env.pop(OV_CACHE_MODE_ENV, None)
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        env[OV_CACHE_ENV] = str(cache)
    else:
        env.pop(OV_CACHE_ENV, None)
    with tempfile.TemporaryDirectory(prefix="lapsam-warmup-") as tmp:
        inputs = Path(tmp) / "inputs"
        outputs = Path(tmp) / "outputs"
        cases = write_synthetic_cases(inputs)
        cmd = [sys.executable, "-m", "lapsam.cli", "predict", "-i", str(inputs), "-o", str(outputs),
               "--model", str(model), *(extra_args or [])]
        print("warm-up:", " ".join(cmd), flush=True)

        def run(mode: str | None) -> str:
            shutil.rmtree(outputs, ignore_errors=True)
            run_env = dict(env, **({OV_CACHE_MODE_ENV: mode} if mode else {}))
            proc = subprocess.run(cmd, env=run_env, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.stdout.write(proc.stdout)
                sys.stderr.write(proc.stderr)
                raise WarmupError(f"lapsam predict failed with exit code {proc.returncode}")
            missing = [c.name for c in cases if not (outputs / c.name).is_file()]
            if missing:
                raise WarmupError(f"no output for {', '.join(missing)}")
            print(f"warm-up: run ok ({OV_CACHE_MODE_ENV}={mode or '-'}; from cache: "
                  f"{loaded_from_cache(proc.stderr) or '-'})", flush=True)
            return proc.stderr

        try:
            if cache is None:
                run(None)
                return 0
            cached = choose_cache_modes(run, cache)
        except WarmupError as exc:
            print(f"warm-up: {exc}", file=sys.stderr)
            return 1
    files = [f for f in cache_files(cache) if f.suffix == ".blob"]
    total = sum(f.stat().st_size for f in files)
    print(f"warm-up: compile cache {cache}: {len(files)} blobs, {total / 1e6:.1f} MB", flush=True)
    missed = sorted(role for role, ok in cached.items() if not ok)
    if missed or not files:
        print(f"warm-up: WARNING: a container would compile {', '.join(missed) or 'every graph'} again "
              "(OpenVINO did not load it from the cache)", flush=True)
    return 0


class WarmupError(Exception):
    """The warm-up's ``lapsam predict`` failed."""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Check the model's sha256 once (--marker) and run lapsam predict "
                                 "on synthetic cases, filling OpenVINO's compiled-model cache (--cache).")
    ap.add_argument("--model", type=Path, required=True, help="exported model folder")
    ap.add_argument("--cache", type=Path, default=None, help="compile cache folder to fill (default: no cache)")
    ap.add_argument("--marker", type=Path, default=None,
                    help="check every model file's sha256 and write the verified marker here")
    ap.add_argument("predict_args", nargs="*", help="extra arguments for lapsam predict (after --)")
    args = ap.parse_args(argv)
    return warm_up(args.model, args.cache, args.predict_args, marker=args.marker)


if __name__ == "__main__":
    sys.exit(main())
