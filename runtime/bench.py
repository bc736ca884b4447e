"""``lapsam bench runtime``: how fast the runtime is, and where its time goes.

Figures (each case run in a fresh child process, as the challenge runs each case):

* engines: encoder ms per slice, decoder ms per call at B=1 and B=16 (median of repeats);
* per case: wall time of ``predict``, encoder calls, decoder calls (and boxes decoded),
  peak RSS of the whole child process (``ru_maxrss``);
* wall / encoder = wall / (encoder calls x encoder ms), and the same over the encoder time
  measured inside the run: what decoding and pre/post-processing add to the encoder's time
  (issue #15 asks for at most 1.3 on a 6-box 3D case);
* overhead ratio = wall / (encoder calls x encoder ms + decoder cost), the decoder cost
  taken linear in the batch size between the B=1 and B=16 figures; also the in-run ratio
  wall / (time measured inside the engine calls of that run), which machine load disturbs less;
* the same case through a naive pipeline (same model: every slice re-encoded for every
  box, one decoder call per box and slice, as the LiteMedSAM baseline does) and the
  speed-up; ``--naive-max-pairs`` replaces very long naive runs by an estimate from the
  engine figures (marked ``est``);
* cold start: a fresh Python process that imports the runtime, loads the model and runs a
  tiny case (with and without a warm OpenVINO cache).

Cases: the 14 shapes and object counts of the challenge's validation cases, made by
resampling the real cases in demo/data (images linearly, labels by nearest neighbour) and
taking boxes from the resampled masks.

Model: ``--model DIR``, by default the default model (``$LAPSAM_MODEL_DIR``, else
``models/default``). Speed does not depend on weight values: before a trained model exists,
``lapsam export random --out DIR`` exports a random one. This module imports only the
runtime (never torch, distill or export).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .backends import OV_PRECISIONS

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class CaseSpec:
    name: str
    shape: tuple[int, ...]
    objects: int
    source: str


CHALLENGE_CASES: tuple[CaseSpec, ...] = (
    CaseSpec("3DBox_CT_0566", (287, 512, 512), 6, "3DBox_CT_TotalSegSmall"),
    CaseSpec("3DBox_CT_0888", (237, 512, 512), 6, "3DBox_CT_TotalSegSmall"),
    CaseSpec("3DBox_CT_0860", (246, 512, 512), 1, "3DBox_CT_TotalSegSmall"),
    CaseSpec("3DBox_MR_0621", (115, 400, 400), 6, "3DBox_CT_TotalSegSmall"),
    CaseSpec("3DBox_MR_0121", (64, 290, 320), 6, "3DBox_CT_TotalSegSmall"),
    CaseSpec("3DBox_MR_0179", (84, 512, 512), 1, "3DBox_MR_Breast1"),
    CaseSpec("3DBox_PET_0001", (264, 200, 200), 1, "3DBox_CT_TotalSegSmall"),
    CaseSpec("2DBox_US_0001", (256, 256), 1, "2DBox_CT_amos_0004_75"),
    CaseSpec("2DBox_X-Ray_0001", (320, 640), 34, "2DBox_Microscope_Nuclei"),
    CaseSpec("2DBox_Dermoscopy_0001", (3024, 4032), 1, "2DBox_CT_amos_0006_90"),
    CaseSpec("2DBox_Endoscopy_0001", (480, 560), 1, "2DBox_CT_s0114_111"),
    CaseSpec("2DBox_Fundus_0001", (2048, 2048), 1, "2DBox_CT_amos_0004_75"),
    CaseSpec("2DBox_Microscope_0001", (1536, 2040), 19, "2DBox_Microscope_Nuclei"),
    CaseSpec("2DBox_Microscope_0002", (1920, 2560), 241, "2DBox_Microscope_Nuclei"),
)
QUICK = ("3DBox_MR_0121", "2DBox_X-Ray_0001", "2DBox_Microscope_0002")


# ---- building the cases ---------------------------------------------------------------------
def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    return np.minimum(((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.int64), n_in - 1)


def _pick_labels(gts: np.ndarray, k: int) -> list[int]:
    labels, counts = np.unique(gts[gts > 0], return_counts=True)
    order = labels[np.argsort(-counts, kind="stable")]
    return sorted(int(v) for v in order[:k])


def build_case(spec: CaseSpec, data_dir: Path, gts_dir: Path) -> dict[str, np.ndarray]:
    """Resample a real case (image + reference) to ``spec.shape``; boxes from the resampled masks."""
    from lapsam.preprocess import resize_2d, resize_matrix
    from lapsam.safe_npz import load_npz

    src = load_npz(data_dir / f"{spec.source}.npz")
    gts = load_npz(gts_dir / f"{spec.source}.npz")["gts"]
    img = np.asarray(src["imgs"])
    if len(spec.shape) == 3:
        d, h, w = spec.shape
        if img.ndim != 3:
            raise ValueError(f"{spec.source} is not 3D")
        # along z first (small in-plane), then each slice in-plane
        mz = resize_matrix(img.shape[0], d)
        zimg = np.tensordot(mz, img.astype(np.float32), axes=(1, 0))
        zi = _nearest_index(img.shape[0], d)
        yi, xi = _nearest_index(img.shape[1], h), _nearest_index(img.shape[2], w)
        out = np.empty((d, h, w), np.uint8)
        for z in range(d):
            out[z] = np.clip(np.rint(resize_2d(zimg[z], (h, w))), 0, 255)
        labels = _pick_labels(gts, spec.objects)
        lab = gts[zi][:, yi][:, :, xi]
        boxes = []
        for v in labels:
            zz, yy, xx = np.nonzero(lab == v)
            boxes.append([xx.min(), yy.min(), zz.min(), xx.max(), yy.max(), zz.max()])
        return {"imgs": out, "boxes": np.array(boxes, np.int64), "spacing": np.array([1.0, 1.0, 1.0])}
    h, w = spec.shape
    reps = 1
    nlab = len(np.unique(gts[gts > 0]))
    while nlab * reps * reps < spec.objects:
        reps += 1
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    if reps > 1:  # tile the image (and its labels, renumbered) to have enough objects
        img = np.tile(img, (reps, reps, 1))
        gh, gw = gts.shape
        tiles = np.zeros((gh * reps, gw * reps), np.int64)
        for a in range(reps):
            for b in range(reps):
                t = gts.astype(np.int64)
                tiles[a * gh : (a + 1) * gh, b * gw : (b + 1) * gw] = np.where(t > 0, t + (a * reps + b) * (int(gts.max()) + 1), 0)
        gts = tiles
    out = np.clip(np.rint(resize_2d(img, (h, w))), 0, 255).astype(np.uint8)
    lab = gts[_nearest_index(gts.shape[0], h)][:, _nearest_index(gts.shape[1], w)]
    labels = _pick_labels(lab, spec.objects)
    boxes = []
    for v in labels:
        yy, xx = np.nonzero(lab == v)
        boxes.append([xx.min(), yy.min(), xx.max(), yy.max()])
    return {"imgs": out, "boxes": np.array(boxes, np.int64), "spacing": np.array([1.0, 1.0, 1.0])}


def z_stats(boxes: np.ndarray) -> tuple[int, int]:
    """(sum of box z-extents, size of the union of z-ranges) of 3D boxes."""
    zs: set[int] = set()
    total = 0
    for b in boxes:
        total += int(b[5] - b[2] + 1)
        zs |= set(range(int(b[2]), int(b[5]) + 1))
    return total, len(zs)


# ---- the naive pipeline ---------------------------------------------------------------------
def naive_predict(pred, case) -> np.ndarray:  # type: ignore[no-untyped-def]
    """LiteMedSAM-style: per box, every slice encoded again, one decoder call per (box, slice).

    Same model, same pre/post-processing and propagation rule as :class:`Predictor`.
    """
    from lapsam.preprocess import ellipsoid_section, transform_boxes

    pred.stats.reset()
    segs = case.empty_segs()
    scores = np.full(segs.shape, -np.inf, np.float16)  # overlaps: the higher logit wins, as in Predictor
    if not case.is_3d:
        feats, tf = pred._encode(case.image)
        for i in case.valid_box_indices:
            logits = pred._decode(feats, transform_boxes(case.boxes[i : i + 1], tf))
            pred._paste(segs, logits[0], tf, case.boxes[i], i + 1, score2d=scores)
        return segs
    d, h, w = case.image.shape
    shrink = pred.config.prompt_3d == "ellipsoid"
    mid = pred.mid_slices(case)
    stop = pred.config.on_empty == "stop"
    for i in case.valid_box_indices:
        b = case.boxes[i]
        given = b[[0, 1, 3, 4]].astype(np.float32)
        m = int(mid[i])
        up = [(z, z == m) for z in range(m, int(b[5]) + 1)]
        down = [(z, False) for z in range(m - 1, int(b[2]) - 1, -1)]
        mid_bb = None
        for chain in (up, down):
            prev = mid_bb
            for z, start in chain:
                if shrink:
                    prompt = ellipsoid_section(b, z)
                elif start or pred.config.prompt_3d == "given":
                    prompt = given
                elif prev is not None:
                    prompt = pred._grow(prev, h, w)
                elif stop:
                    break
                else:
                    prompt = given
                feats, tf = pred._encode(case.image[z])
                logits = pred._decode(feats, transform_boxes(prompt[None], tf))
                prev = pred._paste(segs[z], logits[0], tf, given, i + 1, score2d=scores[z], fill_box=shrink,
                                   fill_xy=prompt if shrink else None)
                if start:
                    mid_bb = prev
    return segs


# ---- child process: one case, one variant -----------------------------------------------------
def peak_rss_mb() -> float:
    """Peak resident set of this process in MiB: ``VmHWM`` (reset at exec, unlike ``ru_maxrss``,
    which on Linux keeps the forking parent's peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def child_main(argv: list[str]) -> int:
    a = json.loads(argv[0])
    from lapsam.runtime.predictor import Predictor

    from lapsam.case import load_case

    t0 = time.perf_counter()
    pred = Predictor.from_model_dir(a["model"], backend=a["backend"], threads=a["threads"],
                                    precision_hint=a.get("hint"), cache_dir=a.get("cache_dir"))
    load_s = time.perf_counter() - t0
    case = load_case(a["case"])
    t = time.perf_counter()
    if a["mode"] == "naive":
        naive_predict(pred, case)
        s = pred.stats
        enc, dec, items, enc_s, dec_s = s.encoder_calls, s.decoder_calls, s.decoder_items, s.encoder_s, s.decoder_s
    else:
        pred.predict(case)
        r = pred.last_report
        enc, dec, items, enc_s, dec_s = r.encoder_calls, r.decoder_calls, r.decoder_items, r.encoder_s, r.decoder_s
    wall = time.perf_counter() - t
    rss = peak_rss_mb()
    print("RESULT " + json.dumps({"wall": wall, "load": load_s, "enc": enc, "dec": dec, "items": items,
                                  "enc_s": enc_s, "dec_s": dec_s, "rss_mb": rss}))
    return 0


def _run_child(args: dict) -> dict:
    r = subprocess.run([sys.executable, "-m", "lapsam.runtime.bench", "--child", json.dumps(args)],
                       capture_output=True, text=True)
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"child failed ({r.returncode}): {r.stderr[-2000:]}")


# ---- engine micro-benchmark -------------------------------------------------------------------
def engine_figures(model: Path, backend: str, hint: str | None, threads: int, repeats: int = 5) -> dict[str, float]:
    from lapsam.runtime.predictor import Predictor

    pred = Predictor.from_model_dir(model, backend=backend, threads=threads, precision_hint=hint)
    s = pred.pp.input_size
    eng = pred.engine.inner
    x = np.random.default_rng(0).standard_normal((1, 3, s, s)).astype(np.float32)
    feats = eng.encode(x)

    def med(fn) -> float:  # type: ignore[no-untyped-def]
        fn()
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return float(np.median(ts)) * 1000

    out = {"enc_ms": med(lambda: eng.encode(x))}
    for b in (1, 16):
        boxes = np.tile(np.array([[s * 0.2, s * 0.2, s * 0.6, s * 0.7]], np.float32), (b, 1))
        pc, pl, mi, hm = pred._prompt_zeros(b)
        out[f"dec{b}_ms"] = med(lambda: eng.decode(feats, boxes, pc, pl, mi, hm))  # noqa: B023
    return out


def dec_cost_ms(calls: int, items: int, fig: dict[str, float]) -> float:
    """Decoder time predicted from the B=1 / B=16 figures, linear in the batch size."""
    per_extra = (fig["dec16_ms"] - fig["dec1_ms"]) / 15.0
    return calls * fig["dec1_ms"] + (items - calls) * per_extra


# ---- cold start -------------------------------------------------------------------------------
COLD_CODE = (
    "import time, sys; t0 = time.perf_counter(); "
    "from lapsam.case import load_case; from lapsam.runtime import Predictor; t1 = time.perf_counter(); "
    "p = Predictor.from_model_dir(sys.argv[1], backend=sys.argv[2], threads=int(sys.argv[3]), cache_dir=sys.argv[5] or None); "
    "t2 = time.perf_counter(); p.predict(load_case(sys.argv[4])); t3 = time.perf_counter(); "
    "print('INPROC', t3 - t0, t1 - t0, t2 - t1, t3 - t2)"
)


def cold_start(model: Path, backend: str, threads: int, tiny_case: Path, cache_dir: str) -> tuple[float, list[float]]:
    """Wall seconds of a fresh python process (import + load + first tiny case), and the
    in-process seconds [total, imports, model load incl. sha256 + compile, first predict]."""
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", COLD_CODE, str(model), backend, str(threads), str(tiny_case), cache_dir],
                       capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode:
        raise RuntimeError(r.stderr[-2000:])
    parts = next(line.split()[1:] for line in r.stdout.splitlines() if line.startswith("INPROC"))
    return wall, [float(v) for v in parts]


# ---- the command ------------------------------------------------------------------------------
def machine() -> str:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from lapsam.runtime.cpus import available_cpus

    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem = float("nan")
    return f"{cpu}, {available_cpus()} CPUs available, {mem:.0f} GiB RAM, {platform.system()} {platform.release()}"


def run_bench(args: argparse.Namespace) -> int:
    from lapsam.runtime.cpus import available_cpus, blas_threads

    with blas_threads(1):  # building cases is many small matrix products, as in the runtime
        return _run_bench(args, args.threads or available_cpus())


def _run_bench(args: argparse.Namespace, threads: int) -> int:
    from lapsam.runtime.backends import backend_name
    from lapsam.runtime.cli import default_model_dir
    from lapsam.runtime.engines import cpu_has_bf16, read_manifest
    from tqdm import tqdm

    from lapsam.case import load_case
    from lapsam.errors import UsageError

    data = args.data or REPO / "demo" / "data" / "imgs"
    gts = data.parent / "gts"
    names = QUICK if args.quick and not args.cases else (args.cases.split(",") if args.cases else [c.name for c in CHALLENGE_CASES])
    specs = {c.name: c for c in CHALLENGE_CASES}
    unknown = [n for n in names if n not in specs]
    if unknown:
        raise UsageError(f"unknown case(s) {unknown}; known: {', '.join(specs)}")
    try:
        backends = [backend_name(b.strip()) for b in args.backends.split(",") if b.strip()]
    except ValueError as exc:
        raise UsageError(f"--backends: {exc}") from None
    hints = [h.strip() for h in args.ov_precisions.split(",") if h.strip()]
    bad = [h for h in hints if h not in OV_PRECISIONS]
    if bad:
        raise UsageError(f"--ov-precisions: {bad} not in {OV_PRECISIONS}")
    naive_max = args.naive_max_pairs if args.naive_max_pairs is not None else (60 if args.quick else None)
    model = args.model or default_model_dir()
    manifest = read_manifest(model)
    tmp = Path(tempfile.mkdtemp(prefix="lapsam-bench-"))
    variants: list[tuple[str, str | None]] = []
    for b in backends:
        if b == "openvino":
            bf16 = cpu_has_bf16()
            for h in hints:
                if h == "bf16" and not bf16:
                    log.warning("OpenVINO: this CPU has no bf16; skipping --ov-precisions bf16")
                    continue
                variants.append((b, h))
        else:
            variants.append((b, None))

    # cases
    case_dir = tmp / "cases"
    case_dir.mkdir()
    built: dict[str, Path] = {}
    for n in tqdm(names, desc="building cases", unit="case"):
        arrays = build_case(specs[n], data, gts)
        p = case_dir / f"{n}.npz"
        np.savez(p, **arrays)
        built[n] = p
    tiny = case_dir / "2DBox_US_tiny.npz"
    np.savez(tiny, **build_case(CaseSpec("2DBox_US_tiny", (64, 64), 1, "2DBox_CT_amos_0004_75"), data, gts))

    lines: list[str] = []

    def out(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)

    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out(f"## Runtime benchmark ({date})")
    out("")
    out(f"- machine: {machine()}; threads: {threads}")
    out(f"- model: {manifest.name} ({manifest.backbone or '?'}), input {manifest.preprocessing.input_size}, "
        f"cases: {', '.join(names)}")
    if args.note:
        out(f"- note: {args.note}")
    out("")
    out("### Engines")
    out("| backend | OpenVINO precision | encoder ms/slice | decoder ms B=1 | decoder ms B=16 |")
    out("|---|---|---|---|---|")
    figs: dict[tuple[str, str | None], dict[str, float]] = {}
    for v in variants:
        figs[v] = engine_figures(model, v[0], v[1], threads)
        f = figs[v]
        out(f"| {v[0]} | {v[1] or '-'} | {f['enc_ms']:.1f} | {f['dec1_ms']:.1f} | {f['dec16_ms']:.1f} |")
    out("")
    out("### Cases (each run in a fresh child process; wall = predict() only, RSS = whole child)")
    out("| backend | OpenVINO precision | case | shape | boxes | sum z / union z | wall s | enc calls | dec calls (boxes) | "
        "overhead (model) | overhead (in-run) | wall / encoder (model) | wall / encoder (in-run) | peak RSS MB | "
        "naive wall s | naive enc/dec calls | speed-up |")
    out("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for v in variants:
        f = figs[v]
        for n in names:
            case = load_case(built[n])
            sumz, union = z_stats(case.boxes) if case.is_3d else (0, 0)
            base = {"model": str(model), "backend": v[0], "hint": v[1], "threads": threads, "case": str(built[n])}
            r = _run_child({**base, "mode": "fast"})
            model_cost = (r["enc"] * f["enc_ms"] + dec_cost_ms(r["dec"], r["items"], f)) / 1000
            ov_model = r["wall"] / model_cost if model_cost > 0 else float("nan")
            ov_run = r["wall"] / max(1e-9, r["enc_s"] + r["dec_s"])
            # everything that is not the encoder (decoder, pre/post-processing) relative to it
            enc_model = r["wall"] / max(1e-9, r["enc"] * f["enc_ms"] / 1000)
            enc_run = r["wall"] / max(1e-9, r["enc_s"])
            pairs = sumz if case.is_3d else case.num_boxes
            if naive_max is not None and case.is_3d and pairs > naive_max:
                nenc, ndec = pairs, pairs
                nwall = (nenc * f["enc_ms"] + ndec * f["dec1_ms"]) / 1000 * ov_model
                ntxt = f"{nwall:.1f} est"
            else:
                nr = _run_child({**base, "mode": "naive"})
                nwall, nenc, ndec = nr["wall"], nr["enc"], nr["dec"]
                ntxt = f"{nwall:.2f}"
            zs = f"{sumz}/{union} = {sumz / union:.2f}" if case.is_3d else "-"
            out(f"| {v[0]} | {v[1] or '-'} | {n} | {'x'.join(map(str, case.spatial_shape))} | {case.num_boxes} | {zs} | "
                f"{r['wall']:.2f} | {r['enc']} | {r['dec']} ({r['items']}) | {ov_model:.2f} | {ov_run:.2f} | "
                f"{enc_model:.2f} | {enc_run:.2f} | "
                f"{r['rss_mb']:.0f} | {ntxt} | {nenc}/{ndec} | {nwall / r['wall']:.2f}x |")
    out("")
    out("### Cold start (fresh python: import runtime + load model + first inference on a 64x64 2D case)")
    out("| backend | OpenVINO cache | process wall s | in-process s | imports s | model load s | first predict s |")
    out("|---|---|---|---|---|---|---|")

    def cold_row(b: str, label: str, cdir: str) -> None:
        w, parts = cold_start(model, b, threads, tiny, cdir)
        out(f"| {b} | {label} | {w:.2f} | " + " | ".join(f"{v:.2f}" for v in parts) + " |")

    for b in backends:
        if b == "openvino":
            cdir = str(tmp / "ovcache")
            cold_row(b, "none", "")
            cold_start(model, b, threads, tiny, cdir)  # fills the cache
            cold_row(b, "warm CACHE_DIR", cdir)
        else:
            cold_row(b, "-", "")
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    out(f"\n(bare `python -c pass`: {time.perf_counter() - t:.2f} s)")
    if args.write:
        with open(args.write, "a") as fp:
            fp.write("\n".join(lines) + "\n\n")
        print(f"appended to {args.write}")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        sys.exit(child_main(sys.argv[2:]))
    print("usage: lapsam bench runtime --help")
    sys.exit(2)
