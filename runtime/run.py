"""Run a predictor over a folder of cases: progress, per-case log, summary, atomic outputs.

Order of work (each step is a check that fails fast, before the costly ones):

1. list the input cases (absent or empty input: :class:`~lapsam.errors.UsageError`, exit 2);
2. check the output folder: created if absent, must be a folder this process can write
   (:func:`lapsam.writers.check_output_dir`; :class:`~lapsam.errors.UsageError`, exit 2), so that
   no case is computed only to be lost at the write;
3. remove the temporary files an earlier run killed mid-write (SIGKILL) left for these cases;
4. load the model once, then run every case; a failing case does not stop the others.

The model load starts the encoder and decoder compiles (or ONNX Runtime sessions) in two worker
threads and returns (:func:`lapsam.runtime.engines.load_engine` with ``background=True``): the first
case is read and pre-processed while they run, and the engine waits for each graph at its first
call. A graph that cannot be opened (:class:`~lapsam.runtime.engines.ModelLoadError`) ends the run
there, like a model that cannot load before: it is not a failure of that case.

SIGINT and SIGTERM (``docker stop``, timeouts) stop the run between two Python steps: the
output being written is discarded (its temporary file removed by :func:`lapsam.writers.atomic_write`),
the finished outputs stay, the summary of the finished cases is logged, and the
KeyboardInterrupt / :class:`~lapsam.errors.Terminated` goes on to the caller (``lapsam``
exits 130 / 143).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from lapsam import timings
from lapsam.case import load_case, require_cases
from lapsam.errors import CaseError, Terminated
from lapsam.writers import check_output_dir, remove_stale_temp_files, write_segs

from .engines import ModelLoadError
from .predictor import Predictor, PredictorConfig

log = logging.getLogger(__name__)


@dataclass
class PredictOptions:
    backend: str = "openvino"
    threads: int | None = None
    precision: str = "fp32"
    precision_hint: str | None = None
    cache_dir: str | None = None
    decoder_batch: int = 16
    margin_px: int = 2
    on_empty: str = "box"
    prompt_3d: str = "ellipsoid"
    overlap: str = "nested"
    progress: bool = True


@dataclass
class FolderSummary:
    total: int = 0
    ok: int = 0
    failed: int = 0
    seconds: float = 0.0
    load_seconds: float = 0.0  # time the run spent on the model load: opening it + waiting for its compiles
    failures: dict[str, str] = field(default_factory=dict)
    case_seconds: dict[str, float] = field(default_factory=dict)
    interrupted: str | None = None  # "SIGINT" / "SIGTERM" when the run was stopped
    removed_temp_files: int = 0

    @property
    def not_run(self) -> int:
        return self.total - self.ok - self.failed

    @property
    def exit_code(self) -> int:
        """0: every case written; 1: a case failed. (A run stopped by SIGINT / SIGTERM does not
        return: :func:`predict_folder` logs this summary and re-raises, and ``lapsam`` exits 130 / 143.)"""
        return 0 if self.failed == 0 and self.total > 0 else 1

    def lines(self) -> list[str]:
        """The summary as ``lapsam predict`` prints it: one line, then one per failed or unfinished case."""
        head = (f"{self.total} case(s): {self.ok} ok, {self.failed} failed; total {self.seconds:.2f} s "
                f"(model load {self.load_seconds:.2f} s)")
        if self.interrupted:
            head = f"stopped by {self.interrupted}: {head}, {self.not_run} not run"
        out = [head]
        out += [f"FAILED {name}: {why}" for name, why in self.failures.items()]
        return out


def _problem(exc: BaseException) -> str:
    """One line for a failed case, without repeating the file name the caller prints."""
    if isinstance(exc, CaseError):
        return exc.problem
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


@contextmanager
def sigterm_as_exception() -> Iterator[None]:
    """Within the block SIGTERM raises :class:`~lapsam.errors.Terminated` (like SIGINT's
    KeyboardInterrupt); the previous handler is restored afterwards. No-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def predict_folder(input_dir: str | Path, output_dir: str | Path, model_dir: str | Path, opts: PredictOptions,
                   predictor: Predictor | None = None,
                   on_case: Callable[[str, bool], None] | None = None,
                   on_loaded: Callable[[Predictor], None] | None = None) -> FolderSummary:
    """Segment every ``.npz`` in ``input_dir`` into ``output_dir``; a failing case does not stop the others.

    ``on_case(file_name, ok)`` is called after each case (progress hooks, memory probes);
    ``on_loaded(predictor)`` once the model is loaded (``lapsam predict`` keeps it, so that its
    engines are not torn down before the process ends: :func:`lapsam.cli.main`).
    Raises :class:`~lapsam.errors.UsageError` before loading the model when the input has no
    case or the output folder cannot be written.
    """
    t0 = time.perf_counter()
    summary = FolderSummary()
    with timings.phase("list cases, check output folder"):
        files = require_cases(input_dir, "input")
        summary.total = len(files)
        out_dir = check_output_dir(output_dir)
        summary.removed_temp_files = len(remove_stale_temp_files(out_dir, [f.name for f in files]))
    with sigterm_as_exception():
        try:
            if predictor is None:
                cfg = PredictorConfig(decoder_batch=opts.decoder_batch, margin_px=opts.margin_px,
                                      on_empty=opts.on_empty, prompt_3d=opts.prompt_3d,
                                      overlap=opts.overlap)
                with timings.phase("model load (all)"):
                    predictor = Predictor.from_model_dir(model_dir, backend=opts.backend, threads=opts.threads,
                                                         precision=opts.precision, cache_dir=opts.cache_dir,
                                                         precision_hint=opts.precision_hint, config=cfg,
                                                         background=True)
            summary.load_seconds = time.perf_counter() - t0
            if on_loaded is not None:
                on_loaded(predictor)
            try:
                _run_cases(files, out_dir, predictor, opts, summary, on_case)
            finally:
                summary.load_seconds += _load_wait(predictor)
        except (KeyboardInterrupt, Terminated) as exc:
            # Report what finished, then let the interruption go on (the CLI exits 130 / 143).
            summary.interrupted = "SIGINT" if isinstance(exc, KeyboardInterrupt) else "SIGTERM"
            summary.seconds = time.perf_counter() - t0
            log.error("stopped by %s: the case in progress was not written; finished cases are kept",
                      summary.interrupted)
            for line in summary.lines():
                log.error("%s", line)
            raise
    summary.seconds = time.perf_counter() - t0
    log.debug("%s", summary.lines()[0])
    return summary


def _load_wait(predictor: Predictor) -> float:
    """Seconds the predictor's engine calls waited for the model load (0 for an engine without stats)."""
    st = getattr(predictor, "stats", None)
    return float(st.load_wait_s) if st is not None else 0.0


def _predict_timed(predictor: Predictor, case):  # type: ignore[no-untyped-def]
    """``predictor.predict(case)``; with timings on, its encoder / decoder / other time as phases.

    A wait for the model load during the case is recorded by the engine itself (``waiting for model
    load: ROLE``) and left out of these three phases, which are placed after it."""
    if not timings.enabled():
        return predictor.predict(case)
    st = getattr(predictor, "stats", None)
    if st is not None:
        st.reset()  # the engine's counters then hold this case's encoder and decoder seconds
    waited = _load_wait(predictor)
    t = time.time()
    segs = predictor.predict(case)
    end = time.time()
    enc, dec = (st.encoder_s, st.decoder_s) if st is not None else (0.0, 0.0)
    start = t + _load_wait(predictor) - waited
    timings.record_seconds("case: encoder", enc, start + enc)
    timings.record_seconds("case: decoder", dec, start + enc + dec)
    timings.record_seconds("case: preprocess, prompts, postprocess", max(0.0, end - start - enc - dec), end)
    return segs


def _run_cases(files: list[Path], out_dir: Path, predictor: Predictor, opts: PredictOptions,
               summary: FolderSummary, on_case: Callable[[str, bool], None] | None) -> None:
    bar = None
    if opts.progress and len(files) >= 2:  # tqdm is imported only when a bar is shown
        from tqdm import tqdm

        bar = tqdm(files, unit="case", dynamic_ncols=True)
    try:
        for f in bar if bar is not None else files:
            if bar is not None:
                bar.set_postfix_str(f.name[:40])
            tc = time.perf_counter()
            try:
                with timings.phase("case: read"):
                    case = load_case(f)
                segs = _predict_timed(predictor, case)
                with timings.phase("case: write"):
                    write_segs(out_dir / f"{case.name}.npz", segs, case.num_objects)
            except ModelLoadError:
                raise  # the model, not this case: no case can run
            except Exception as exc:  # noqa: BLE001 - one bad case must not stop the others
                summary.failed += 1
                summary.failures[f.name] = _problem(exc)
                log.error("%s: FAILED: %s", f.name, summary.failures[f.name])
                if on_case is not None:
                    on_case(f.name, False)
                continue
            dt = time.perf_counter() - tc
            summary.ok += 1
            summary.case_seconds[f.name] = dt
            r = predictor.last_report
            extra = ""
            if r is not None:
                extra = f" (encoder calls {r.encoder_calls}, decoder calls {r.decoder_calls}"
                if r.skipped_boxes:
                    extra += f", skipped boxes {sorted(i + 1 for i in r.skipped_boxes)}"
                extra += ")"
            log.info("%s: %.2f s%s", f.name, dt, extra)
            if on_case is not None:
                on_case(f.name, True)
    finally:
        if bar is not None:
            bar.close()
