"""``lapsam bench distill``: training throughput and student size/latency next to the teacher.

Prints (no assertions):
1. stage 1 images/s with the teacher run every step, and with the teacher-feature cache
   (measured in the same process, same data, after warm-up steps);
2. stage 2 images/s;
3. per student: encoder parameters, whole-LapSam parameters, encoder latency (fp32, eager,
   batch 1) at each ``--latency-sizes``, with the teacher's image encoder in the first row.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time

log = logging.getLogger(__name__)


def _time_steps(stage, net, model, loader_items, steps: int) -> float:
    """images/s over ``steps`` optimiser steps (after one warm-up step)."""
    import torch

    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    net.train()
    n = 0
    t0 = 0.0
    for i, batch in enumerate(loader_items(steps + 1)):
        if i == 1:
            t0 = time.perf_counter()
        res = stage.step(net, model, batch)
        opt.zero_grad(set_to_none=True)
        res.loss.backward()
        opt.step()
        if i >= 1:
            n += res.images
    return n / (time.perf_counter() - t0)


def _batches(dataset, batch_size: int):
    from .trainer import _collate

    def gen(k: int):
        idx = 0
        for _ in range(k):
            items = [dataset[(idx + j) % len(dataset)] for j in range(batch_size)]
            idx += batch_size
            yield _collate(items)

    return gen


def _latency(fn, x, repeats: int) -> float:
    import torch

    with torch.no_grad():
        fn(x)
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn(x)
            ts.append(time.perf_counter() - t)
    return min(ts) * 1000


def run_bench(args: argparse.Namespace) -> None:
    import torch

    from .config import EncoderConfig, FinetuneConfig, load_config
    from .encoder_stage import EncoderStage
    from .finetune_stage import FinetuneStage
    from .modeling import SUPPORTED_BACKBONES, build_student, param_count, student_table
    from .sam2_factory import resolve_sam2_name
    from .teacher import Teacher
    from .trainer import DistInfo, build_model

    torch.set_num_threads(args.threads)
    info = DistInfo()
    tname, tsize = resolve_sam2_name(args.teacher, args.teacher_image_size)
    print(f"# lapsam bench distill: {args.backbone}@{args.input_size}, teacher {tname}@{tsize}, "
          f"batch {args.batch_size}, {args.steps} timed steps, {args.threads} threads, data {args.data}")
    if not args.skip_throughput:
        with tempfile.TemporaryDirectory() as tmp:
            common = [f"data.train=[{','.join(args.data)}]", f"data.max_slices_per_case={args.max_slices_per_case}", "data.val=[]", "data.num_workers=0",
                      f"model.backbone={args.backbone}", f"model.input_size={args.input_size}",
                      f"model.teacher={args.teacher}", f"train.batch_size={args.batch_size}", f"train.out_dir={tmp}",
                      "model.init_checkpoint=null"]
            if args.teacher_image_size:
                common.append(f"model.teacher_image_size={args.teacher_image_size}")
            ecfg = load_config(EncoderConfig, "encoder.yaml", common + ["cache.enabled=false"])
            model = build_model(ecfg.model, 0)
            st = EncoderStage(ecfg, info, model)
            st.prepare(info)
            ips_teacher = _time_steps(st, model.image_encoder, model, _batches(st.dataset, args.batch_size), args.steps)
            ecfg.cache.enabled = True
            st2 = EncoderStage(ecfg, info, model)
            t0 = time.perf_counter()
            st2.prepare(info)
            fill_s = time.perf_counter() - t0
            ips_cache = _time_steps(st2, model.image_encoder, model, _batches(st2.dataset, args.batch_size), args.steps)
            fcfg = load_config(FinetuneConfig, "finetune.yaml", common)
            fst = FinetuneStage(fcfg, info, model)
            net = fst.trainable(model)
            ips_ft = _time_steps(fst, net, model, _batches(fst.dataset, args.batch_size), args.steps)
            print("\n## training throughput (images/s, fp32 CPU)")
            print("| what | images/s |")
            print("|---|---|")
            print(f"| stage 1, teacher run every step | {ips_teacher:.2f} |")
            print(f"| stage 1, teacher-feature cache | {ips_cache:.2f} |")
            print(f"| stage 1 cache speed-up | {ips_cache / ips_teacher:.1f}x |")
            print(f"| (one-off cache fill: {len(st2.refs) + len(st2.val_refs)} slices) | {fill_s:.1f} s |")
            print(f"| stage 2 ({fcfg.prompt.objects_per_image} prompt/image) | {ips_ft:.2f} |")
    if not args.skip_latency:
        names = args.students or list(SUPPORTED_BACKBONES)
        sizes = args.latency_sizes
        print("\n## encoders: parameters and latency (fp32, eager, batch 1, best of "
              f"{args.latency_repeats}, {args.threads} threads)")
        print("| model | encoder params | LapSam params | " + " | ".join(f"{s} ms" for s in sizes) + " |")
        print("|---|---|---|" + "---|" * len(sizes))
        teacher = Teacher(tname, None, tsize)
        tp = param_count(teacher.image_encoder)
        tms = _latency(teacher, torch.randn(1, 3, tsize, tsize), args.latency_repeats)
        print(f"| teacher {tname} image encoder @{tsize} | {tp / 1e6:.2f}M | - | " +
              " | ".join(f"{tms:.0f} (at {tsize})" if s == sizes[0] else "-" for s in sizes) + " |")
        del teacher
        rows = {r["name"]: r for r in student_table(sizes[0], names)}
        for name in names:
            enc = build_student(name, sizes[0]).eval()
            lat = []
            for s in sizes:
                lat.append(_latency(enc, torch.randn(1, 3, s, s), args.latency_repeats))
            r = rows[name]
            print(f"| {name} | {r['encoder_params'] / 1e6:.2f}M | {r['total_params'] / 1e6:.2f}M | " +
                  " | ".join(f"{v:.0f}" for v in lat) + " |")


def main() -> None:  # pragma: no cover - convenience
    from .cli import register_bench

    p = argparse.ArgumentParser()
    sub = p.add_subparsers()
    register_bench(sub)
    run_bench(p.parse_args(["distill", *__import__("sys").argv[1:]]))


if __name__ == "__main__":  # pragma: no cover
    main()
