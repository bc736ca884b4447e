"""``lapsam submission build|save|verify|context`` and ``lapsam bench submission``."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from lapsam.runtime.backends import BACKEND_METAVAR, backend_arg, file_backend, positive_int

DEFAULT_TAG = "lapsam:latest"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "submission",
        help="build, save and verify the challenge Docker image",
        description="Build the challenge image (offline, from a wheelhouse), save it as NAME.tar.gz, "
        "and verify it the way the organisers run it (one case per fresh container, -m 8G).",
    )
    p.set_defaults(part_parser=p)
    s = p.add_subparsers(dest="submission_command", metavar="<command>")

    b = s.add_parser("build", help="build the image from the repo's Dockerfile with a model baked in",
                     description="Prepare the build context (runtime wheels for Python 3.11 manylinux, a "
                     "lapsam wheel without extras, the model) and docker build it, streaming the log.")
    b.add_argument("--model", type=Path, default=None,
                   help="exported model folder with manifest.json (default: $LAPSAM_MODEL_DIR, else models/default)")
    b.add_argument("--tag", default=DEFAULT_TAG, help=f"image tag (default {DEFAULT_TAG})")
    b.add_argument("--base-image", default=None,
                   help="base image: python:3.11-slim (default, needs Docker Hub) or the offline "
                   "lapsam-base:bookworm from submission/make-base-image.sh")
    b.add_argument("--repo", type=Path, default=None, help="lapsam source tree (default: found from this install)")
    b.add_argument("--context", type=Path, default=None,
                   help="keep the prepared build context in this folder (default: a temporary folder)")
    b.add_argument("--no-compile-cache", action="store_true",
                   help="do not fill OpenVINO's compiled-model cache at build time")
    b.add_argument("--uid", type=int, default=1000, help="uid of the image's non-root user (default 1000)")
    b.add_argument("--only-backend", type=backend_arg, default=None, metavar=BACKEND_METAVAR,
                   help="ship only this backend's model files (predict.sh runs openvino); default: all")
    b.set_defaults(func=cmd_build)

    c = s.add_parser("context", help="only prepare the build context (then: docker build -t NAME DIR)",
                     description="Lay out the build context that the Dockerfile expects, for a plain docker build.")
    c.add_argument("--model", type=Path, default=None,
                   help="exported model folder with manifest.json (default: $LAPSAM_MODEL_DIR, else models/default)")
    c.add_argument("-o", "--out", type=Path, required=True, help="folder to create or refresh")
    c.add_argument("--repo", type=Path, default=None, help="lapsam source tree (default: found from this install)")
    c.add_argument("--only-backend", type=backend_arg, default=None, metavar=BACKEND_METAVAR,
                   help="ship only this backend's model files; default: all")
    c.set_defaults(func=cmd_context)

    sv = s.add_parser("save", help="docker save NAME | gzip > NAME.tar.gz",
                      description="Save the image as a gzip-compressed tar, as the challenge asks.")
    sv.add_argument("--tag", default=DEFAULT_TAG, help=f"image tag (default {DEFAULT_TAG})")
    sv.add_argument("-o", "--out", type=Path, default=None, help="output file (default NAME.tar.gz)")
    sv.set_defaults(func=cmd_save)

    v = s.add_parser("verify", help="run each case in a fresh container as the organisers do and check it",
                     description="One case per fresh container: -m 8G, --network none, inputs/outputs mounted, "
                     "/bin/bash -c 'sh predict.sh'. Checks file name, key segs, shape, dtype, labels 0..N; "
                     "prints per-case wall time. Exit code 1 if any case fails.")
    src = v.add_mutually_exclusive_group(required=True)
    src.add_argument("--tag", help="image tag to run")
    src.add_argument("--tar", type=Path, help="NAME.tar.gz to docker load first")
    v.add_argument("--cases", type=Path, required=True, help="folder of .npz cases (or one case)")
    v.add_argument("--timeout", type=float, default=900.0, help="seconds per case before the container is killed")
    v.set_defaults(func=cmd_verify)


def register_bench(bench_sub: argparse._SubParsersAction) -> None:
    b = bench_sub.add_parser(
        "submission",
        help="where a case's time goes in the organisers' protocol: docker run true vs one small case, step by step",
        description="Alternates fresh containers with the protocol's options: `true` (the baseline) and "
        "`sh predict.sh` on each case with LAPSAM_TIMINGS=1, and prints each step from `docker run` to the "
        "written file (docker create + start, shell, Python start, imports, model load: hash check, OpenVINO "
        "import and compile or cache load, read, encoder, decoder, pre/post-processing, write, exit, removal), "
        "medians over the rounds, and the ratio of the case's total to `docker run ... true`. Each case's "
        "output is checked. The engine must be local (its clock is compared with this machine's).",
    )
    b.add_argument("--tag", default=DEFAULT_TAG, help=f"image tag (default {DEFAULT_TAG})")
    b.add_argument("--cases", type=Path, nargs="*", default=[],
                   help="case files (default: a 256x256 2D case with one box resampled from demo/data)")
    b.add_argument("--repeats", type=positive_int, default=5, help="rounds (default 5)")
    b.add_argument("--vs-tag", default=None, help="also run this image (B) in every round, e.g. one built "
                   "with --no-compile-cache")
    b.add_argument("--vs-env", action="append", default=[], metavar="KEY=VALUE",
                   help="B = --vs-tag (default: --tag) with this environment (repeatable), e.g. "
                   "LAPSAM_OV_CACHE_DIR= (no compile cache) or LAPSAM_VERIFIED_MARKER= (hash every start)")
    b.add_argument("--no-floor", dest="floor", action="store_false",
                   help="skip the floor runs (the image's Python importing numpy and the engine, nothing else)")
    b.set_defaults(func=cmd_bench)


def _print(line: str) -> None:
    print(line, flush=True)


def cmd_context(args: argparse.Namespace) -> int:
    from .context import prepare_context

    backends = (file_backend(args.only_backend),) if args.only_backend else None
    out = prepare_context(_model(args), args.out, repo=args.repo, backends=backends)
    _print(f"build context ready: {out}\n  docker build -t NAME:latest --build-arg BASE_IMAGE=IMG {out}")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from .context import model_backends, predict_backend, prepare_context
    from .image import DEFAULT_BASE, build_image, docker_client, ensure_base_image, human_size

    client = docker_client()
    base = args.base_image or DEFAULT_BASE
    ensure_base_image(base, client)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lapsam-context-") as tmp:
        backends = (file_backend(args.only_backend),) if args.only_backend else None
        ctx = prepare_context(_model(args), args.context or Path(tmp) / "context", repo=args.repo,
                              backends=backends)
        _print(f"context: {ctx} ({time.perf_counter() - t0:.1f} s); building {args.tag} from {base}")
        res = build_image(
            ctx, args.tag, base_image=base, client=client, on_log=_print,
            build_args={"COMPILE_CACHE": "0" if args.no_compile_cache else "1", "UID": str(args.uid),
                        "BACKEND": predict_backend(model_backends(ctx / "model"))},
        )
    _print(f"built {res.tag} ({res.image_id[:19]}): {human_size(res.size_bytes)} uncompressed, "
           f"{time.perf_counter() - t0:.1f} s")
    return 0


def default_tar_name(tag: str) -> Path:
    name = tag.rsplit("/", 1)[-1].split(":", 1)[0]
    return Path(f"{name}.tar.gz")


def cmd_save(args: argparse.Namespace) -> int:
    from .image import human_size, image_size, save_image

    out = args.out or default_tar_name(args.tag)
    t0 = time.perf_counter()
    save_image(args.tag, out)
    _print(f"saved {args.tag} -> {out}: {human_size(out.stat().st_size)} (.tar.gz), "
           f"{human_size(image_size(args.tag))} uncompressed, {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .image import docker_client, load_image
    from .verify import official_command_line, verify_cases

    client = docker_client()
    tag = args.tag
    if args.tar is not None:
        tags = load_image(args.tar, client=client)
        tag = tags[0]
        _print(f"loaded {args.tar}: {', '.join(tags)}")
    _print(f"verifying {tag}, one fresh container per case:\n  {official_command_line(tag)}")

    def show(r) -> None:  # type: ignore[no-untyped-def]
        _print(f"{r.status:12s} {r.wall_s:8.2f} s  {r.name}" + (f"  | {'; '.join(r.problems)}" if r.problems else ""))
        if not r.ok and r.log_tail.strip():
            last = r.log_tail.strip().splitlines()[-3:]
            for line in last:
                _print(f"{'':14s}log: {line}")

    results = verify_cases(args.cases, tag, client=client, timeout_s=args.timeout, on_result=show)
    passed = sum(r.ok for r in results)
    total_t = sum(r.wall_s for r in results)
    _print(f"{passed}/{len(results)} cases passed; total wall time {total_t:.2f} s")
    return 0 if passed == len(results) else 1


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench

    return run_bench(args, emit=_print)


if __name__ == "__main__":  # pragma: no cover
    from lapsam.cli import main

    sys.exit(main(["submission", *sys.argv[1:]]))


def _model(args: argparse.Namespace) -> Path:
    """``--model``, else the default model (``lapsam predict``'s rule)."""
    from lapsam.runtime.cli import default_model_dir

    return args.model or default_model_dir()
