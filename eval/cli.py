"""``lapsam eval metrics|timing|report|model``: score predictions, time a submission image, report both,
compare a model with box-fill and ellipse-fill."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger("lapsam.eval")


def register(sub: argparse._SubParsersAction) -> None:
    from lapsam.runtime.cli import add_engine_args

    p = sub.add_parser("eval", help="metrics (DSC/NSD), the official timing protocol, reports",
                       description="Evaluate segmentations and submission images as the CVPR 2024 organisers do.")
    p.set_defaults(part_parser=p)
    esub = p.add_subparsers(dest="eval_command", metavar="<command>")

    m = esub.add_parser(
        "metrics",
        help="DSC and NSD per case and label, means per modality",
        description="Score every reference in GTS_DIR (key 'gts') against the prediction of the same name in "
        "SEGS_DIR (key 'segs'). Writes OUT (case,dsc,nsd as the organisers' CSV), OUT_labels.csv (per label) "
        "and OUT.md; prints the tables. Missing or malformed predictions are failures scored 0. OUT is checked "
        "before scoring. Exit codes: 0 every case scored, 1 a prediction or reference failed (still scored "
        "and written), 2 bad folders, options or OUT.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="modes:\n"
        "  challenge  the organisers' compute_metrics.py: labels 1..max(gt), NSD only when case DSC > 0.2,\n"
        "             2D as one-slice 3D slabs with spacing [1,1,1], 3D spacing in stored (x,y,z) order\n"
        "  exact      2D as true 2D contours, 3D spacing reordered to the array's (z,y,x), NSD always,\n"
        "             labels empty in both masks left out of the case mean",
    )
    m.add_argument("-s", "--segs", dest="segs_dir", type=Path, required=True, help="folder of predictions (.npz, key 'segs')")
    m.add_argument("-g", "--gts", dest="gts_dir", type=Path, required=True, help="folder of references (.npz, key 'gts')")
    m.add_argument("-o", "--output", type=Path, default=Path("metrics.csv"), help="CSV to write (default: metrics.csv)")
    m.add_argument("--mode", choices=("challenge", "exact"), default="challenge", help="scoring semantics (default: challenge)")
    m.add_argument("--tolerance", type=float, default=2.0, help="NSD tolerance in mm (default: 2.0)")
    m.add_argument("-j", "--workers", type=int, default=1, help="processes scoring cases in parallel (default: 1)")
    m.set_defaults(func=cmd_metrics)

    t = esub.add_parser(
        "timing",
        help="time a submission image with the official per-case docker protocol",
        description="For each case: copy it alone into an empty inputs/ folder, run `docker container run -m 8G "
        "--name NAME --rm -v inputs/:/workspace/inputs/ -v outputs/:/workspace/outputs/ IMAGE /bin/bash -c "
        "\"sh predict.sh\"`, time it, check outputs/<case name>. Writes OUT_DIR/NAME/NAME_running_time.csv "
        "(CaseName,RunningTime), the segmentations next to it, and OUT_DIR/timing.md. With --compare the two "
        "images alternate case by case (A B A B) and the table shows the per-case ratio B/A. "
        "Exit code 1 if any run failed.",
    )
    t.add_argument("--image", required=True, help="image tag known to docker, or a saved .tar/.tar.gz (docker load-ed)")
    t.add_argument("--cases", type=Path, required=True, help="folder of input cases (.npz)")
    t.add_argument("--compare", help="a second image (tag or .tar/.tar.gz) to alternate with")
    t.add_argument("-o", "--output", type=Path, default=Path("timing"), help="output folder (default: ./timing)")
    t.add_argument("--memory", default="8G", help="container memory limit, as the organisers' -m 8G (default: 8G)")
    t.add_argument("--timeout", type=float, default=None, help="kill a case's container after this many seconds")
    t.add_argument("--clean-outputs", action="store_true",
                   help="empty outputs/ before every case (the official timer does not: caches left there persist)")
    t.add_argument("--network", default=None,
                   help="add --network NAME to the run (e.g. none); the official command has no such flag")
    t.add_argument("--keep-work", action="store_true", help="keep the inputs/outputs work folders afterwards")
    t.set_defaults(func=cmd_timing)

    add_interactive_parser(esub)

    r = esub.add_parser(
        "report",
        help="markdown report with plots, joining metrics and running time",
        description="Join a metrics CSV (case,dsc,nsd) with running-time CSVs (CaseName,RunningTime) per case and "
        "per modality; write report.md and PNG plots into OUT_DIR.",
    )
    r.add_argument("--metrics", type=Path, required=True, help="metrics CSV from `lapsam eval metrics`")
    r.add_argument("--timing", type=Path, help="NAME_running_time.csv of image A")
    r.add_argument("--compare-timing", type=Path, help="NAME_running_time.csv of image B (needs --timing)")
    r.add_argument("-o", "--output", type=Path, default=Path("report"), help="report folder (default: ./report)")
    r.set_defaults(func=cmd_report)

    mm = esub.add_parser(
        "model",
        help="a model on cases next to box-fill and ellipse-fill: predict, score, one table, one PNG per case",
        description="Segment every case of CASES (imgs/ + gts/) with the exported model (torch-free runtime), "
        "score it, the box-fill reference (every pixel inside each box) and the ellipse-fill reference (the "
        "ellipse / ellipsoid inscribed in each box) with the challenge metrics, print one table (case, DSC, "
        "NSD, seconds, box-fill DSC/NSD, ellipse-fill DSC) and write OUT/model_vs_boxfill.md/.csv, "
        "OUT/segs/, OUT/boxfill/, OUT/ellipsefill/ and OUT/png/<case>.png (reference and prediction contours). "
        "Exit code 1 if any case failed.",
    )
    mm.add_argument("--cases", type=Path, required=True, help="folder with imgs/ and gts/ (e.g. demo/data)")
    mm.add_argument("--model", type=Path, default=None,
                    help="exported model folder (default: $LAPSAM_MODEL_DIR, else models/default)")
    mm.add_argument("-o", "--output", type=Path, default=Path("eval-model"), help="output folder (default: ./eval-model)")
    add_engine_args(mm)
    mm.add_argument("--no-png", action="store_true", help="skip the per-case pictures")
    mm.add_argument("--no-progress", action="store_true", help="no progress bar")
    mm.set_defaults(func=cmd_model)


def cmd_metrics(args: argparse.Namespace) -> int:
    from .metrics import OK, MetricsConfig, check_outputs, evaluate_folder, print_tables, write_outputs

    try:
        cfg = MetricsConfig(mode=args.mode, tolerance=args.tolerance)
        check_outputs(args.output)  # before scoring: a UsageError (exit 2) if -o cannot be written
        result = evaluate_folder(args.segs_dir, args.gts_dir, cfg, workers=max(1, args.workers),
                                 progress=not getattr(args, "quiet", False))
    except (ValueError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 2
    paths = write_outputs(result, args.output, args.segs_dir, args.gts_dir)
    print(print_tables(result))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 1 if any(c.status != OK for c in result.cases) else 0


def cmd_timing(args: argparse.Namespace) -> int:
    from .timing import DockerError, run_protocol, timing_table, write_timing_markdown

    images = [args.image] + ([args.compare] if args.compare else [])
    try:
        result = run_protocol(images, args.cases, args.output, memory=args.memory, timeout=args.timeout,
                              clean_outputs=args.clean_outputs, keep_work=args.keep_work,
                              progress=not getattr(args, "quiet", False), network=args.network)
    except (DockerError, FileNotFoundError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    md = write_timing_markdown(result, args.output)
    print(timing_table(result))
    print("wrote " + ", ".join([str(r.csv_path) for r in result.runners] + [str(md)]))
    return 1 if result.failed else 0


def add_interactive_parser(esub: argparse._SubParsersAction) -> None:
    i = esub.add_parser(
        "interactive",
        help="the CVPR 2025 interactive protocol: a box step, then 5 correction-click steps per case",
        description="For every 3D case of CASES (2025 format: box dicts, see `lapsam data to2025`): run the model "
        "with the boxes, then 5 times add one simulated click per class (the organisers' rule: centre of the "
        "largest 26-connected error component; fg for a miss, bg for a false positive) and rerun it with the "
        "accumulated clicks and prev_pred. Scores DSC/NSD per step, DSC_AUC/NSD_AUC over the click steps, the "
        "final DSC/NSD, time per step and the 90 s x classes limit. Writes OUT/interactive.csv, "
        "OUT/interactive.md, OUT/dsc_per_step.png, OUT/clicks.json and OUT/segs/<case>.npz (segs, all_segs). "
        "Exit code 1 if any case or step failed.",
    )
    i.add_argument("--cases", type=Path, required=True, help="folder of 2025-format cases (.npz) or one case")
    who = i.add_mutually_exclusive_group(required=True)
    who.add_argument("--model", type=Path, help="exported model folder: run the runtime in this process")
    who.add_argument("--image", help="docker image tag or saved .tar/.tar.gz: one `docker container run` per step")
    i.add_argument("-g", "--gts", type=Path, default=None,
                   help="folder of references (key 'gts', same names); default: the 'gts' key of each case")
    i.add_argument("-o", "--output", type=Path, default=Path("interactive"), help="output folder (default: ./interactive)")
    i.add_argument("--clicks", type=int, default=5, help="correction steps after the box step (default: 5)")
    i.add_argument("--seed", type=int, default=42, help="tie-break seed of the click simulation (default: 42)")
    i.add_argument("--seconds-per-class", type=float, default=90.0, help="time limit per class per case (default: 90)")
    i.add_argument("--tolerance", type=float, default=2.0, help="NSD tolerance in mm (default: 2.0)")
    g = i.add_argument_group("with --model (runtime settings)")
    g.add_argument("--backend", choices=("openvino", "onnxruntime"), default="openvino",
                   help="inference engine (default: openvino)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: all available)")
    g.add_argument("--settle-dsc", type=float, default=None,
                   help="stop propagating a click's change at a slice whose new mask has this DSC with the old "
                        "(default: the predictor's 0.95)")
    g.add_argument("--prev-mask-input", action="store_true",
                   help="also give the decoder the previous mask as mask_input (the model is not trained for it)")
    d = i.add_argument_group("with --image (docker)")
    d.add_argument("--memory", default="32G", help="container memory limit (default: 32G as the 2025 organisers; "
                   "the laptop challenge used 8G)")
    d.add_argument("--timeout", type=float, default=None, help="kill a step's container after this many seconds")
    d.add_argument("--network", default=None, help="add --network NAME to the run (e.g. none)")
    d.add_argument("--keep-work", action="store_true", help="keep the docker inputs/outputs work folders")
    i.set_defaults(func=cmd_interactive)


def cmd_interactive(args: argparse.Namespace) -> int:
    from lapsam.errors import LapsamError

    from .interactive import (
        DockerRunner,
        InteractiveConfig,
        evaluate_interactive,
        make_model_runner,
        print_table,
        write_outputs,
    )
    from .timing import DockerError

    try:
        cfg = InteractiveConfig(clicks=args.clicks, seed=args.seed, seconds_per_class=args.seconds_per_class,
                                tolerance=args.tolerance)
        if not args.cases.exists():
            raise FileNotFoundError(f"--cases {args.cases} does not exist")
        if args.model is not None:
            from lapsam.runtime.predictor import PredictorConfig

            extra = {} if args.settle_dsc is None else {"settle_dsc": args.settle_dsc}
            pcfg = PredictorConfig(prev_mask_input=args.prev_mask_input, **extra)
            runner = make_model_runner(args.model, args.output, backend=args.backend, threads=args.threads,
                                       predictor_config=pcfg)
        else:
            runner = DockerRunner(args.image, args.output / "docker", memory=args.memory, timeout=args.timeout,
                                  network=args.network, keep_work=args.keep_work)
        run = evaluate_interactive(args.cases, runner, args.output, args.gts, cfg,
                                   progress=not getattr(args, "quiet", False))
    except (DockerError, FileNotFoundError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    except LapsamError:
        raise
    paths = write_outputs(run, args.output)
    print(print_table(run))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 1 if any(r.error for r in run.results) else 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import build_report

    try:
        path = build_report(args.metrics, args.output, args.timing, args.compare_timing)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        log.error("%s", exc)
        return 2
    print(f"wrote {path}")
    return 0


def cmd_model(args: argparse.Namespace) -> int:
    from lapsam.runtime.cli import default_model_dir, engine_options

    from lapsam.errors import LapsamError

    from .modelcheck import evaluate_model, render_table

    try:
        model = args.model or default_model_dir()
        if not (Path(model) / "manifest.json").is_file():
            raise FileNotFoundError(f"{model}: no manifest.json (not an exported model folder)")
        rows, failed = evaluate_model(args.cases, args.output, model, engine_options(args, progress=not args.no_progress),
                                      pngs=not args.no_png)
    except (LapsamError, FileNotFoundError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    print(render_table(rows))
    print(f"wrote {args.output / 'model_vs_boxfill.md'}, {args.output / 'model_vs_boxfill.csv'}"
          + ("" if args.no_png else f" and {len(rows)} PNG(s) in {args.output / 'png'}/"))
    return 1 if failed else 0
