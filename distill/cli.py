"""``lapsam distill ...`` (prepare, encoder, finetune, students) and ``lapsam bench distill``.

Torch and friends are imported inside the command functions so ``lapsam --help`` stays light.
Multi-GPU / multi-node: ``torchrun --nproc_per_node 8 -m lapsam.cli distill encoder ...``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from lapsam.errors import LapsamError, UsageError

log = logging.getLogger(__name__)

_TRAIN_EPILOG = """\
Config: a YAML file (a bare name such as encoder.yaml is looked up in lapsam/distill/configs);
override any key with --set section.key=value (YAML value), repeatable, e.g.
  --set train.lr=1e-4 --set data.train=[data/prepared] --set model.backbone=efficientvit_b1
Resume: an interrupted run started again with the same out_dir continues from OUT/last.pt.
Several GPUs or nodes: torchrun --nproc_per_node N -m lapsam.cli distill %s --config ...
"""


def _add_train_args(p: argparse.ArgumentParser, default_cfg: str) -> None:
    p.add_argument("--config", default=default_cfg, help=f"YAML config (default: {default_cfg}, shipped with lapsam)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. train.lr=1e-4 (repeatable)")
    p.add_argument("--out", default=None, help="output folder (same as --set train.out_dir=...)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar: a log line every train.log_every steps instead (for log files)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("distill", help="prepare data, distil SAM2 into a small student, fine-tune it",
                       description="Turn SAM2 (or MedSAM2) into a small timm student: data preparation, "
                                   "stage 1 (encoder distillation), stage 2 (prompt fine-tuning).")
    p.set_defaults(part_parser=p)
    dsub = p.add_subparsers(dest="distill_command", metavar="<command>")

    pr = dsub.add_parser("prepare", help="NIfTI/NRRD/DICOM images + label maps -> challenge-format npz",
                         description="Convert medical volumes with label maps into challenge-format npz "
                                     "(OUT/imgs/*.npz with imgs/boxes/spacing, OUT/gts/*.npz with gts/spacing).")
    pr.add_argument("images", type=Path, help="an image file, a DICOM series folder, or a folder of images")
    pr.add_argument("labels", type=Path, help="the label map file, or a folder of label maps named like the images")
    pr.add_argument("out", type=Path, help="output folder (gets imgs/ and gts/)")
    pr.add_argument("--modality", default=None, help="CT, MR, PET, ... (default: DICOM Modality tag; required otherwise)")
    pr.add_argument("--window-level", type=float, default=40.0, help="CT window level (default 40)")
    pr.add_argument("--window-width", type=float, default=400.0, help="CT window width (default 400)")
    pr.add_argument("--percentiles", type=float, nargs=2, default=(0.5, 99.5), metavar=("LOW", "HIGH"),
                    help="non-CT intensity clip percentiles (default 0.5 99.5)")
    pr.add_argument("--min-size-3d", type=int, default=1000, help="remove 3D label pieces below this many voxels")
    pr.add_argument("--min-size-slice", type=int, default=100, help="remove per-slice label pieces below this many pixels")
    pr.add_argument("--no-crop-z", action="store_true", help="keep slices without labels")
    pr.add_argument("--prefix", default="", help="added before each output name's stem")
    pr.add_argument("--no-progress", action="store_true", help="no progress bar")
    pr.set_defaults(func=cmd_prepare)

    enc = dsub.add_parser("encoder", help="stage 1: distil the teacher's encoder features into the student",
                          description="Stage 1: MSE (+ optional cosine) between the student's three decoder inputs "
                                      "and the SAM2 teacher's, optionally from a teacher-feature cache.",
                          epilog=_TRAIN_EPILOG % "encoder", formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_train_args(enc, "encoder.yaml")
    enc.set_defaults(func=cmd_encoder)

    ft = dsub.add_parser("finetune", help="stage 2: fine-tune the student with box/click prompts",
                         description="Stage 2: Dice + focal + IoU-MSE on box (and click) prompts, with augmentation "
                                     "and per-modality validation DSC each epoch; writes best.pt and last.pt.",
                         epilog=_TRAIN_EPILOG % "finetune", formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_train_args(ft, "finetune.yaml")
    ft.set_defaults(func=cmd_finetune)

    sp = dsub.add_parser("split", help="the train/validation split of a config, as folders of links",
                         description="Resolve the config's data section (data.train, data.val_groups, data.val_fraction, "
                         "train.seed) exactly as training does and write OUT/{train,val}/{imgs,gts}/ with symbolic "
                         "links to the cases, plus OUT/split.csv (case, group, patient, side). Feed OUT/val to "
                         "`lapsam eval model --cases`.")
    _add_train_args(sp, "default_model.yaml")
    sp.set_defaults(func=cmd_split)

    pl = dsub.add_parser("plot", help="the training curve of a run (loss, validation DSC) as a PNG",
                         description="Read RUN_DIR/train_log.csv and val_log.csv and write a two-panel PNG.")
    pl.add_argument("run_dir", type=Path, help="a training output folder (train.out_dir)")
    pl.add_argument("-o", "--output", type=Path, default=None, help="PNG to write (default: RUN_DIR/training_curve.png)")
    pl.add_argument("--title", default=None)
    pl.set_defaults(func=cmd_plot)

    st = dsub.add_parser("students", help="list supported students with their parameter counts",
                         description="Print each supported student's parameters at an input size.")
    st.add_argument("--input-size", type=int, default=512)
    st.set_defaults(func=cmd_students)


def register_bench(bench_sub: argparse._SubParsersAction) -> None:
    b = bench_sub.add_parser("distill", help="training throughput (stage 1 with/without cache, stage 2), "
                                             "student params and encoder latency next to the teacher",
                             description="Prints figures; asserts nothing. Uses demo/data by default.")
    b.add_argument("--data", nargs="+", default=["demo/data"], help="training data entries (default demo/data)")
    b.add_argument("--max-slices-per-case", type=int, default=4, help="slices per 3D case (default 4)")
    b.add_argument("--backbone", default="repvit_m0_9")
    b.add_argument("--input-size", type=int, default=512)
    b.add_argument("--teacher", default="sam2.1_hiera_t")
    b.add_argument("--teacher-image-size", type=int, default=None)
    b.add_argument("--batch-size", type=int, default=4)
    b.add_argument("--steps", type=int, default=6, help="timed training steps per measurement")
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--latency-sizes", type=int, nargs="+", default=[256, 512])
    b.add_argument("--latency-repeats", type=int, default=3)
    b.add_argument("--students", nargs="*", default=None, help="students to time (default: all supported)")
    b.add_argument("--skip-latency", action="store_true")
    b.add_argument("--skip-throughput", action="store_true")
    b.set_defaults(func=cmd_bench)
    from .students import add_arguments

    st = bench_sub.add_parser("students", help="choose the student: encoder/decoder ms (OpenVINO f32) and "
                                               "validation DSC after the same short training, per candidate",
                              description="Prints a markdown table; asserts nothing. Speed is timed first, "
                                          "alone, then each candidate trains for --steps steps.")
    add_arguments(st)
    st.set_defaults(func=cmd_bench_students)


def _load(kind: str, args: argparse.Namespace):
    from .config import EncoderConfig, FinetuneConfig, config_to_dict, load_config

    cls = EncoderConfig if kind == "encoder" else FinetuneConfig
    overrides = list(args.overrides)
    if args.out:
        overrides.append(f"train.out_dir={args.out}")
    try:
        cfg = load_config(cls, args.config, overrides)
    except (ValueError, FileNotFoundError) as exc:
        raise LapsamError(str(exc)) from None  # a config error: one line, exit 1
    if args.print_config:
        import yaml

        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        return None
    return cfg


def _report(summary: dict) -> None:
    import os

    if int(os.environ.get("RANK", "0")) != 0:
        return
    print(f"done: {summary['step']} steps, checkpoints in {summary['out_dir']}")
    if summary.get("val"):
        print("last validation: " + " ".join(f"{k}={v:.4f}" for k, v in summary["val"].items()))


def cmd_encoder(args: argparse.Namespace) -> int:
    cfg = _load("encoder", args)
    if cfg is None:
        return 0
    from .encoder_stage import train_encoder

    _report(train_encoder(cfg, progress=not args.no_progress))
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    cfg = _load("finetune", args)
    if cfg is None:
        return 0
    if cfg.model.init_checkpoint and not Path(cfg.model.init_checkpoint).is_file():
        raise LapsamError(f"model.init_checkpoint {cfg.model.init_checkpoint} does not exist "
                          "(run stage 1 first, or --set model.init_checkpoint=null to start from scratch)")
    from .finetune_stage import train_finetune

    _report(train_finetune(cfg, progress=not args.no_progress))
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from .prepare import PrepareConfig, prepare

    cfg = PrepareConfig(modality=args.modality, window_level=args.window_level, window_width=args.window_width,
                        percentiles=tuple(args.percentiles), min_size_3d=args.min_size_3d,
                        min_size_slice=args.min_size_slice, crop_z=not args.no_crop_z, prefix=args.prefix)
    try:
        written, errors = prepare(args.images, args.labels, args.out, cfg, progress=not args.no_progress)
    except FileNotFoundError as exc:
        raise UsageError(str(exc)) from None
    for w in written:
        print(w)
    print(f"{len(written)} case(s) written to {args.out}, {len(errors)} failed")
    for e in errors:
        print(f"FAILED {e}")  # the summary form of lapsam predict
    return 1 if errors else 0


def cmd_students(args: argparse.Namespace) -> int:
    from .modeling import student_table

    print(f"{'student':<18} {'encoder params':>15} {'total params':>13}")
    for row in student_table(args.input_size):
        print(f"{row['name']:<18} {row['encoder_params'] / 1e6:>14.2f}M {row['total_params'] / 1e6:>12.2f}M")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench

    run_bench(args)
    return 0


def cmd_bench_students(args: argparse.Namespace) -> int:
    from .students import run_students

    return run_students(args)


def cmd_plot(args: argparse.Namespace) -> int:
    from .plot import plot_run

    try:
        path = plot_run(args.run_dir, args.output, args.title)
    except FileNotFoundError as exc:
        raise UsageError(str(exc)) from None
    print(f"wrote {path}")
    return 0


def cmd_split(args: argparse.Namespace) -> int:
    import csv

    from .data import case_group, case_patient, find_cases, split_cases

    if args.out is None:
        raise UsageError("--out DIR is required")
    args.out, out = None, Path(args.out)
    cfg = _load("finetune", args)
    if cfg is None:
        return 0
    d = cfg.data
    cases = find_cases(d.train)
    if d.val:
        train, val = cases, find_cases(d.val)
    else:
        train, val = split_cases(cases, d.val_fraction, cfg.train.seed, d.val_groups)
    rows = []
    for side, cs in (("train", train), ("val", val)):
        for c in cs:
            for sub, src in (("imgs", c.image), ("gts", c.gt)):
                if src is None:
                    continue
                link = out / side / sub / f"{c.name}.npz"
                link.parent.mkdir(parents=True, exist_ok=True)
                if link.is_symlink() or link.exists():
                    link.unlink()
                link.symlink_to(Path(src).resolve())
            rows.append((c.name, case_group(c.name), case_patient(c.name), side))
    with open(out / "split.csv", "w", newline="") as fp:
        w = csv.writer(fp)
        w.writerow(["case", "group", "patient", "side"])
        w.writerows(rows)
    print(f"{len(train)} training and {len(val)} validation cases; wrote {out}/train, {out}/val and {out / 'split.csv'}")
    return 0
