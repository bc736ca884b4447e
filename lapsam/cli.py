"""``lapsam <part> ...``: one command line for all parts.

Each part has a light ``cli`` module with ``register(subparsers)``; it adds its
subcommands and sets ``func`` (taking the parsed args, returning an exit code). A part
may also define ``register_bench(bench_subparsers)`` to add ``lapsam bench <name>``. Heavy
imports (torch, onnx, docker) happen inside ``func``, so ``lapsam --help`` stays fast and
torch-free.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import NoReturn

from . import __version__, timings
from .errors import LapsamError, Terminated

# Module with register() -> the top-level commands it adds, in the order --help lists them.
# `lapsam CMD ...` imports only the module that adds CMD (tests/test_cli_core.py checks this
# table against what each module registers); --help, `bench` and unknown commands import all.
_PART_CLIS: dict[str, tuple[str, ...]] = {
    "lapsam.data_cli": ("data",),
    "lapsam.distill.cli": ("distill",),
    "lapsam.export.cli": ("export",),
    "lapsam.runtime.cli": ("predict",),
    "lapsam.runtime.segment": ("segment",),
    "lapsam.runtime.app.cli": ("app",),
    "lapsam.submission.cli": ("submission",),
    "lapsam.eval.cli": ("eval",),
}


def command_of(argv: Sequence[str]) -> str | None:
    """The top-level command of an argument list (its first word that is not an option)."""
    return next((a for a in argv if not a.startswith("-")), None)


def part_modules(command: str | None = None) -> list[str]:
    """The part modules to import for ``command``: the one that adds it, else every part."""
    owners = [m for m, cmds in _PART_CLIS.items() if command in cmds]
    return owners or list(_PART_CLIS)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with ``command``, only the part that adds it (a faster start)."""
    parser = argparse.ArgumentParser(
        prog="lapsam",
        description="Promptable medical image segmentation on a laptop CPU: "
        "distill SAM2 into a small student, export it, run it, ship it, score it.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"lapsam {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="debug log output of lapsam (-vv: of every library too); default: info")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="<part>")
    bench = sub.add_parser("bench", help="benchmarks that print figures (speed ratios, sizes)",
                           description="Benchmarks: each prints its figures; none asserts timings.")
    bench.set_defaults(part_parser=bench)
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="<what>")
    for mod_name in part_modules(command):
        if importlib.util.find_spec(mod_name) is None:
            continue
        mod = importlib.import_module(mod_name)
        mod.register(sub)
        # A part may add benchmarks under `lapsam bench <name>`.
        if hasattr(mod, "register_bench"):
            mod.register_bench(bench_sub)
    return parser


def expand_argv(argv: Sequence[str]) -> list[str]:
    """Each part's shorthand forms written out (a part's ``expand_argv``, e.g. ``lapsam export CKPT``)."""
    out = list(argv)
    for mod_name in _PART_CLIS:
        expand = getattr(sys.modules.get(mod_name), "expand_argv", None)
        if expand is not None:
            out = expand(out)
    return out


class LineFormatter(logging.Formatter):
    """One line per record: ``error: ...`` / ``warning: ...`` / the message (info) / ``debug: NAME: ...``.

    The same ``error: MESSAGE`` form as every command's own error lines.
    """

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info and record.levelno <= logging.DEBUG:
            msg += "\n" + self.formatException(record.exc_info)
        if record.levelno >= logging.ERROR:
            return f"error: {msg}"
        if record.levelno >= logging.WARNING:
            return f"warning: {msg}"
        if record.levelno >= logging.INFO:
            return msg
        return f"debug: {record.name}: {msg}"


def setup_logging(verbose: int = 0, quiet: bool = False) -> None:
    """Log level: -q WARNING, default INFO, -v DEBUG for lapsam, -vv DEBUG for every library.

    matplotlib logs warnings only unless -vv: its first run's "generated new fontManager" is not
    one of lapsam's lines. Records go to stderr, formatted by :class:`LineFormatter`.
    """
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 0 else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LineFormatter())
    every_library = verbose > 1 and not quiet
    logging.basicConfig(level=logging.DEBUG if every_library else max(level, logging.INFO), handlers=[handler])
    logging.getLogger("lapsam").setLevel(level)
    logging.getLogger("matplotlib").setLevel(logging.NOTSET if every_library else max(level, logging.WARNING))


def main(argv: Sequence[str] | None = None) -> int:
    process_entry = argv is None  # the command line of this process (console script, python -m lapsam.cli)
    argv = list(sys.argv[1:] if argv is None else argv)
    t_cli = time.time()
    parser = build_parser(command_of(argv))
    args = parser.parse_args(expand_argv(argv))
    setup_logging(args.verbose, args.quiet)
    func = getattr(args, "func", None)
    if func is None:
        # A part given without a subcommand prints that part's help.
        (getattr(args, "part_parser", None) or parser).print_help()
        return 0 if args.command is None else 2
    if getattr(args, "timings", False):  # a command's --timings (LAPSAM_TIMINGS=1 does it for all)
        timings.enable()
    timings.record("cli: imports, parser, arguments", t_cli, time.time())
    try:
        code = int(func(args) or 0)
    except LapsamError as exc:
        logging.getLogger("lapsam").error("%s", exc)
        code = exc.exit_code  # 1, or 2 for a UsageError (README: "Exit codes")
    except KeyboardInterrupt:
        logging.getLogger("lapsam").error("interrupted (SIGINT)")
        code = 130
    except Terminated:
        logging.getLogger("lapsam").error("terminated (SIGTERM)")
        code = Terminated.exit_code
    timings.emit()
    if process_entry and getattr(args, "exit_fast", False):
        exit_now(code)
    return code


def exit_now(code: int) -> NoReturn:
    """End the process at once: flush stdout/stderr, then ``os._exit`` without Python's shutdown.

    For commands that set ``exit_fast`` (``lapsam predict``) when run as a program (``main()``
    without an argument list): everything they write is closed and renamed by then, and tearing
    down the loaded engines (OpenVINO's compiled models and thread pools) and the interpreter would
    only add time to every container of the challenge's one-case-per-container protocol.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
