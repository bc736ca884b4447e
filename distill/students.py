"""``lapsam bench students``: choose the student by measurement (speed and accuracy, one table).

For each candidate ``backbone@size``:

1. **Speed** (random weights: speed does not depend on weight values): the LapSam is exported
   with ``lapsam export``'s own code (OpenVINO IR, fp32) and opened through the runtime's
   engine layer, the code that ships; the encoder (one slice) and the decoder (one box, and
   ``--boxes`` boxes in one call) are timed in interleaved rounds, OpenVINO
   ``INFERENCE_PRECISION_HINT=f32`` (the challenge's Skylake has no bf16), ``--threads``
   threads. All timing happens before any training, so nothing else runs beside it.
2. **Accuracy** after the same short budget: the recipe config (``--config``) with only the
   backbone and input size changed is trained for ``--steps`` optimiser steps (one cosine
   schedule of that length) and validated on its held-back cases (``dsc`` = mean over
   modalities; also per modality and per held-back set).

Prints a markdown table and, with ``--json``, writes every figure. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from lapsam.errors import UsageError

log = logging.getLogger(__name__)


def parse_candidate(text: str) -> tuple[str, int]:
    name, _, size = text.partition("@")
    if not name or not size.isdigit():
        raise argparse.ArgumentTypeError(f"candidate {text!r}: expected BACKBONE@SIZE, e.g. efficientvit_b0@256")
    return name, int(size)


def time_candidates(cands: list[tuple[str, int]], work: Path, threads: int, boxes: int,
                    warmup: int, repeats: int) -> dict[str, dict[str, float]]:
    """Median ms of encoder (1 slice), decoder (1 box) and decoder (``boxes`` boxes) per candidate."""
    import torch

    from lapsam.export.exporter import export_model
    from lapsam.manifest import ModelManifest
    from lapsam.runtime.engines import EngineOptions, load_engine

    from .modeling import LapSamConfig, StudentConfig, build_lapsam, save_checkpoint

    runs: list[tuple[str, str, Any]] = []
    rng = np.random.default_rng(0)
    for backbone, size in cands:
        label = f"{backbone}@{size}"
        torch.manual_seed(0)
        model = build_lapsam(LapSamConfig(student=StudentConfig(backbone=backbone, input_size=size), box_prior=4.0))
        ckpt = save_checkpoint(work / f"{label}.pt", model)
        out = work / label
        export_model(ckpt, out, backends=("openvino",), precisions=("fp32",), simplify=False)
        manifest = ModelManifest.load(out)
        engine = load_engine(out, manifest, EngineOptions(backend="openvino", precision_hint="f32"), threads)
        x = rng.standard_normal((1, 3, size, size)).astype(np.float32)
        feats = engine.encode(x)

        def decode(b: int, engine=engine, feats=feats, size=size):
            bx = np.tile(np.array([[size * 0.2, size * 0.3, size * 0.6, size * 0.7]], np.float32), (b, 1))
            return engine.decode(feats, bx, np.zeros((b, 0, 2), np.float32), np.zeros((b, 0), np.float32),
                                 np.zeros((b, 1, size // 4, size // 4), np.float32), np.zeros(b, np.float32))

        runs.append((label, "encoder_ms", lambda engine=engine, x=x: engine.encode(x)))
        runs.append((label, "decoder_1box_ms", lambda decode=decode: decode(1)))
        runs.append((label, f"decoder_{boxes}box_ms", lambda decode=decode, b=boxes: decode(b)))
        log.info("%s exported and opened", label)
    for _ in range(warmup):
        for _, _, fn in runs:
            fn()
    samples: dict[tuple[str, str], list[float]] = {(lbl, k): [] for lbl, k, _ in runs}
    for _ in range(repeats):
        for lbl, k, fn in runs:
            t0 = time.perf_counter()
            fn()
            samples[(lbl, k)].append(time.perf_counter() - t0)
    out_ms: dict[str, dict[str, float]] = {}
    for (lbl, k), ts in samples.items():
        out_ms.setdefault(lbl, {})[k] = 1000.0 * statistics.median(ts)
    return out_ms


def train_candidate(config: str, overrides: list[str], backbone: str, size: int, steps: int,
                    batch_size: int, out: Path) -> dict[str, float]:
    from .config import FinetuneConfig, load_config
    from .finetune_stage import train_finetune

    ov = list(overrides) + [
        f"model.backbone={backbone}", f"model.input_size={size}", "train.epochs=1",
        f"data.samples_per_epoch={steps * batch_size}", f"train.batch_size={batch_size}",
        f"train.out_dir={out}", "train.resume=null", f"train.save_every_steps={10 * steps}",
        f"train.warmup_steps={max(1, steps // 10)}",
    ]
    cfg = load_config(FinetuneConfig, config, ov)
    t0 = time.perf_counter()
    summary = train_finetune(cfg)
    val = dict(summary.get("val") or {})
    val["train_minutes"] = (time.perf_counter() - t0) / 60.0
    return val


def run_students(args: argparse.Namespace) -> int:
    cands = args.candidates
    if args.steps > 0 and not args.data:
        raise UsageError("--data is needed for the accuracy runs (or --steps 0)")
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="lapsam-students-"))
    work.mkdir(parents=True, exist_ok=True)
    latency = time_candidates(cands, work / "export", args.threads, args.boxes, args.warmup, args.repeats)
    print(f"speed: OpenVINO f32, {args.threads} threads, median of {args.repeats} interleaved rounds (ms)")
    acc: dict[str, dict[str, float]] = {}
    if args.steps > 0:
        overrides = [f"data.train=[{','.join(args.data)}]"] + list(args.overrides)
        train_sizes = args.train_sizes or sorted({s for _, s in cands})
        for backbone, size in cands:
            if size not in train_sizes:
                continue
            label = f"{backbone}@{size}"
            log.info("training %s for %d steps", label, args.steps)
            acc[label] = train_candidate(args.config, overrides, backbone, size, args.steps, args.batch_size,
                                         work / "train" / label)
    mods = sorted({k for v in acc.values() for k in v if k.startswith("dsc_") and not k.startswith("dsc_set_")})
    sets = sorted({k for v in acc.values() for k in v if k.startswith("dsc_set_")})
    dec_key = f"decoder_{args.boxes}box_ms"
    head = ["student", "encoder ms", "decoder ms (1 box)", f"decoder ms ({args.boxes} boxes)", "val DSC"]
    head += [k.replace("dsc_set_", "held-back ") for k in sets] + [k[4:] for k in mods] + ["train min"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for backbone, size in cands:
        label = f"{backbone}@{size}"
        lat, a = latency[label], acc.get(label, {})

        def f(v: float | None, fmt: str = "{:.3f}") -> str:
            return "-" if v is None else fmt.format(v)

        row = [label, f(lat["encoder_ms"], "{:.1f}"), f(lat["decoder_1box_ms"], "{:.1f}"), f(lat[dec_key], "{:.1f}"),
               f(a.get("dsc"))] + [f(a.get(k)) for k in sets] + [f(a.get(k)) for k in mods] + [f(a.get("train_minutes"), "{:.1f}")]
        print("| " + " | ".join(row) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": args.threads, "repeats": args.repeats, "steps": args.steps,
                                               "batch_size": args.batch_size, "latency_ms": latency, "val": acc},
                                              indent=2) + "\n")
    return 0


def add_arguments(b: argparse.ArgumentParser) -> None:
    b.add_argument("--candidates", type=parse_candidate, nargs="+",
                   default=[parse_candidate(c) for c in ("efficientvit_b0@256", "efficientvit_b1@256", "repvit_m0_9@256",
                                                         "efficientvit_b0@512", "efficientvit_b1@512", "repvit_m0_9@512")],
                   metavar="BACKBONE@SIZE", help="students to compare (default: three backbones at 256 and 512)")
    b.add_argument("--data", nargs="*", default=[], help="training data entries (e.g. ../shared/data/train)")
    b.add_argument("--config", default="default_model.yaml", help="recipe config (default: default_model.yaml)")
    b.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config overrides for the accuracy runs")
    b.add_argument("--steps", type=int, default=200, help="optimiser steps per accuracy run (0: speed only)")
    b.add_argument("--batch-size", type=int, default=8)
    b.add_argument("--train-sizes", type=int, nargs="*", default=None,
                   help="input sizes to train (default: every size among the candidates)")
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--boxes", type=int, default=6, help="boxes in the batched decoder call (default 6)")
    b.add_argument("--warmup", type=int, default=3)
    b.add_argument("--repeats", type=int, default=15)
    b.add_argument("--work-dir", default=None, help="keep exports and runs here (default: a temporary folder)")
    b.add_argument("--json", default=None, help="also write every figure to this JSON file")
