"""Inference engines over the exported graphs (ONNX Runtime or OpenVINO): the one engine layer.

The runtime, ``lapsam export check`` and the benchmarks all open exported files through this
module, so the parity check runs the code that ships. Two levels:

* a **graph**: one exported file opened with its backend (:func:`open_graph`: a sha256-checked
  manifest entry; :class:`OrtGraph` / :class:`OvGraph` for a path). ``graph.run(feeds, outputs)``
  casts each input to the graph's dtype and returns float32 copies of the outputs;
* an **engine**: the encoder and decoder graph of one model variant (:func:`load_engine`),
  following the graph contract in :mod:`lapsam.manifest`:

  - ``encode(image)``: (1, 3, S, S) float32 -> ``(image_embed, high_res_feats_0, high_res_feats_1)``;
  - ``decode(feats, boxes, point_coords, point_labels, mask_input, has_mask_input)``
    -> ``(masks (B, 1, L, L) logits, iou_predictions (B, 1))``.

Backends are named ``openvino`` and ``onnxruntime`` (the manifest records ONNX files as
``onnx``; that word is accepted as an alias). Both are imported lazily, never torch. Every
file is checked against its sha256 before it is loaded (unless the image build already checked
it: :mod:`lapsam.runtime.verified`); each model is loaded/compiled once.

Loading: :func:`load_engine` checks both files' sha256 and imports the backend on the calling
thread, then opens the encoder and the decoder at once, each in its own worker thread
(:class:`GraphLoad`: OpenVINO's ``compile_model`` and ONNX Runtime's session creation run in C++);
it returns once both are open or, with ``background=True``, at once: the engine then waits for a
graph the first time it needs it (:meth:`GraphEngine.ready`), so that the caller's own work (reading
the first case, pre-processing it, the encoder call while the decoder still compiles) overlaps the
load. A graph that cannot be opened raises :class:`ModelLoadError` (one line, the file named) at
load or at that first use, once no worker is left running. ``$LAPSAM_MODEL_LOAD=serial``
(``EngineOptions.concurrent_load=False``) opens them one after the other on the calling thread.

ONNX Runtime: worker threads do not spin while idle (``EngineOptions.ort_spinning=False``):
between engine calls the runtime does numpy work (resizing, mask upsampling) on the same few
CPUs, and spinning workers would compete with it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from lapsam import timings
from lapsam.errors import LapsamError, UsageError
from lapsam.manifest import (
    DECODER_INPUTS,
    DECODER_OUTPUTS,
    ENCODER_INPUT,
    ENCODER_OUTPUTS,
    PRECISIONS,
    ModelFile,
    ModelManifest,
    verify_file,
)

from .backends import BACKENDS, OV_PRECISIONS, backend_name, file_backend
from .cpus import available_cpus
from .verified import verified_at_build

log = logging.getLogger(__name__)

Feats = tuple[np.ndarray, np.ndarray, np.ndarray]

OV_CACHE_ENV = "LAPSAM_OV_CACHE_DIR"
#: OpenVINO's CACHE_MODE for that cache: OPTIMIZE_SPEED (OpenVINO's default: the blob holds the
#: compiled weights) or OPTIMIZE_SIZE (the blob holds no weights, about 1 MB: they are read from
#: the IR's .bin at load; not every graph loads back from such a blob). A blob is only loaded in
#: the mode it was made in (in the other, OpenVINO compiles and rewrites it).
OV_CACHE_MODE_ENV = "LAPSAM_OV_CACHE_MODE"
OV_CACHE_MODES = ("OPTIMIZE_SPEED", "OPTIMIZE_SIZE")
#: In a cache folder: {role: CACHE_MODE}, the mode each graph's blob was made in (written by the
#: submission image's warm-up, which keeps OPTIMIZE_SIZE where the graph loads back from it).
OV_CACHE_MODES_FILE = "lapsam-cache-modes.json"
#: ``serial``: open the encoder and decoder one after the other on the calling thread;
#: ``concurrent`` (default): at once, in two worker threads (:func:`load_engine`).
MODEL_LOAD_ENV = "LAPSAM_MODEL_LOAD"
MODEL_LOAD_MODES = ("concurrent", "serial")
#: OpenVINO CPU plugin's snippets (JIT-fused subgraphs): ``DISABLE`` (default) or ``ENABLE`` (the
#: plugin's own default). Disabled, both graphs load from the compile cache faster (the fused
#: kernels are generated at every load, cache or not) at the same inference speed: measured in
#: BENCHMARKS.md (issue #15). A plugin that does not know the key compiles without it.
OV_SNIPPETS_ENV = "LAPSAM_OV_SNIPPETS"
OV_SNIPPETS_MODES = ("DISABLE", "ENABLE")


class ModelLoadError(LapsamError):
    """A backend could not open an exported graph file (the message names the file)."""


def cpu_has_bf16() -> bool:
    """Whether OpenVINO can execute in bf16 on this CPU (AVX512-BF16 or AMX)."""
    import openvino as ov

    try:
        return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except RuntimeError:
        return False


def read_manifest(model_dir: str | Path) -> ModelManifest:
    """The manifest of an exported model folder; a folder that is not one gives a one-line UsageError."""
    try:
        return ModelManifest.load(model_dir)
    except (FileNotFoundError, ValueError, TypeError) as exc:
        raise UsageError(f"--model {model_dir}: {exc}") from None


class Engine(Protocol):
    """What the predictor needs from a backend (also implemented by test fakes)."""

    def encode(self, image: np.ndarray) -> Feats: ...

    def decode(
        self,
        feats: Feats,
        boxes: np.ndarray,
        point_coords: np.ndarray,
        point_labels: np.ndarray,
        mask_input: np.ndarray,
        has_mask_input: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]: ...


class Graph(Protocol):
    """One opened graph file."""

    inputs: dict[str, np.dtype]
    output_names: list[str]

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> list[np.ndarray]: ...


@dataclass
class EngineOptions:
    """How to load a model: backend, which files, threads and backend settings."""

    backend: str = "openvino"  # openvino | onnxruntime (alias: onnx)
    precision: str = "fp32"  # which exported files: fp32 | fp16 | int8 (a missing decoder falls back to fp32)
    threads: int | None = None  # None: the CPUs available to this process
    cache_dir: str | None = None  # OpenVINO CACHE_DIR; default: env LAPSAM_OV_CACHE_DIR
    cache_mode: str | None = None  # OpenVINO CACHE_MODE (OV_CACHE_MODES); default: env LAPSAM_OV_CACHE_MODE, else OpenVINO's
    precision_hint: str | None = None  # OpenVINO execution precision f32 | bf16 (None: f32, on every CPU)
    ort_spinning: bool = False  # ONNX Runtime: idle worker threads busy-wait (session.intra_op.allow_spinning)
    verify: bool = True  # check the sha256 of every file before loading it
    concurrent_load: bool | None = None  # open encoder + decoder at once; None: $LAPSAM_MODEL_LOAD, else True

    def __post_init__(self) -> None:
        self.backend = backend_name(self.backend)
        if self.concurrent_load is None:
            mode = os.environ.get(MODEL_LOAD_ENV, "").strip().lower() or "concurrent"
            if mode not in MODEL_LOAD_MODES:
                raise UsageError(f"${MODEL_LOAD_ENV} must be one of {'|'.join(MODEL_LOAD_MODES)}, got {mode!r}")
            self.concurrent_load = mode == "concurrent"
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.precision_hint is not None and self.precision_hint not in OV_PRECISIONS:
            raise ValueError(f"OpenVINO precision must be one of {OV_PRECISIONS}, got {self.precision_hint!r}")
        if self.cache_mode is not None and self.cache_mode not in OV_CACHE_MODES:
            raise ValueError(f"OpenVINO cache mode must be one of {OV_CACHE_MODES}, got {self.cache_mode!r}")


@dataclass
class CallStats:
    """Counts and seconds spent in engine calls (for logs and the benchmark).

    ``load_wait_s``: seconds the calls waited for a graph still being opened (a ``background`` load,
    :func:`load_engine`), not counted in ``encoder_s`` / ``decoder_s``; a total since the engine was
    made, which :meth:`reset` (the per-case counters) keeps.
    """

    encoder_calls: int = 0
    decoder_calls: int = 0
    decoder_items: int = 0
    encoder_s: float = 0.0
    decoder_s: float = 0.0
    load_wait_s: float = 0.0

    def reset(self) -> None:
        self.encoder_calls = self.decoder_calls = self.decoder_items = 0
        self.encoder_s = self.decoder_s = 0.0


@dataclass
class CountingEngine:
    """Wraps an engine and counts/timings its calls (a wait for the model load apart)."""

    inner: Engine
    stats: CallStats = field(default_factory=CallStats)

    def _ready(self, role: str) -> None:
        """Wait for ``role``'s graph if the engine is still opening it (:meth:`GraphEngine.ready`)."""
        ready = getattr(self.inner, "ready", None)
        if ready is not None:
            self.stats.load_wait_s += ready(role)

    def encode(self, image: np.ndarray) -> Feats:
        self._ready("encoder")
        t = time.perf_counter()
        out = self.inner.encode(image)
        self.stats.encoder_s += time.perf_counter() - t
        self.stats.encoder_calls += 1
        return out

    def decode(self, feats, boxes, point_coords, point_labels, mask_input, has_mask_input):  # type: ignore[no-untyped-def]
        self._ready("decoder")
        t = time.perf_counter()
        out = self.inner.decode(feats, boxes, point_coords, point_labels, mask_input, has_mask_input)
        self.stats.decoder_s += time.perf_counter() - t
        self.stats.decoder_calls += 1
        self.stats.decoder_items += int(boxes.shape[0])
        return out


# ---- graphs -----------------------------------------------------------------------------------
_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
    "tensor(uint8)": np.uint8,
}


def _feed(graph: Graph, feeds: Mapping[str, np.ndarray], path: Path) -> dict[str, np.ndarray]:
    missing = [k for k in graph.inputs if k not in feeds]
    if missing:
        raise LapsamError(f"{path.name}: no value for graph inputs {missing}")
    return {k: np.ascontiguousarray(feeds[k], dtype=dt) for k, dt in graph.inputs.items()}


class OrtGraph:
    """One ONNX Runtime CPU session (sequential, all graph optimisations)."""

    def __init__(self, path: str | Path, threads: int, spinning: bool = False):
        import onnxruntime as ort

        self.path = Path(path)
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        self.session = ort.InferenceSession(str(self.path), sess_options=so, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: np.dtype(_ORT_DTYPES.get(i.type, np.float32)) for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> list[np.ndarray]:
        out = self.session.run(list(outputs or self.output_names), _feed(self, feeds, self.path))
        return [np.asarray(o, np.float32) for o in out]


def _ov_compile(core, path: Path, config: dict[str, object], cache_dir: str | None,  # type: ignore[no-untyped-def]
                cache_mode: str | None = None):
    """Compile with CACHE_DIR if one is set; a cache that cannot be used falls back to a plain compile."""
    if cache_dir:
        try:
            os.makedirs(cache_dir, exist_ok=True)
            extra: dict[str, object] = {"CACHE_DIR": str(cache_dir)}
            if cache_mode:
                extra["CACHE_MODE"] = cache_mode
            return core.compile_model(str(path), "CPU", {**config, **extra})
        except Exception as exc:  # noqa: BLE001 - any cache problem must not stop inference
            log.warning("OpenVINO cache %s unusable (%s); compiling without it", cache_dir, backend_message(exc))
    return core.compile_model(core.read_model(str(path)), "CPU", config)


class OvGraph:
    """One OpenVINO compiled model on the CPU (LATENCY hint) with one reused infer request."""

    def __init__(self, path: str | Path, threads: int, precision_hint: str | None = None,
                 cache_dir: str | None = None, core=None, cache_mode: str | None = None):  # type: ignore[no-untyped-def]
        import openvino as ov

        self.path = Path(path)
        # f32 unless bf16 is asked for: the plugin's own default is bf16 on CPUs with AVX512-BF16/AMX,
        # which moves mask boundaries away from ONNX Runtime, `export check` and the challenge's Skylake
        config: dict[str, object] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": int(threads),
                                     "INFERENCE_PRECISION_HINT": precision_hint or "f32"}
        snippets = ov_snippets_mode()
        core = core or ov.Core()
        try:
            self.compiled = _ov_compile(core, self.path, {**config, "SNIPPETS_MODE": snippets}, cache_dir, cache_mode)
        except RuntimeError as exc:
            if "SNIPPETS_MODE" not in str(exc):
                raise
            log.debug("OpenVINO %s: no SNIPPETS_MODE property; compiling with the plugin's default", ov.__version__)
            snippets = None
            self.compiled = _ov_compile(core, self.path, config, cache_dir, cache_mode)
        self.snippets_mode = snippets
        self.loaded_from_cache = _loaded_from_cache(self.compiled)
        self.request = self.compiled.create_infer_request()
        self.inputs = {p.get_any_name(): np.dtype(p.get_element_type().to_dtype()) for p in self.compiled.inputs}
        self.output_names = [o.get_any_name() for o in self.compiled.outputs]

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> list[np.ndarray]:
        self.request.infer(_feed(self, feeds, self.path), share_inputs=True)
        # copies: the request's output buffers are reused by the next call
        return [np.array(self.request.get_tensor(n).data, np.float32) for n in (outputs or self.output_names)]


def ov_snippets_mode() -> str:
    """$LAPSAM_OV_SNIPPETS (:data:`OV_SNIPPETS_MODES`), else ``DISABLE``."""
    mode = os.environ.get(OV_SNIPPETS_ENV, "").strip().upper() or "DISABLE"
    if mode not in OV_SNIPPETS_MODES:
        raise UsageError(f"${OV_SNIPPETS_ENV} must be one of {'|'.join(OV_SNIPPETS_MODES)}, got {mode!r}")
    return mode


def ov_cache_mode(role: str, cache_dir: str, explicit: str | None = None) -> str | None:
    """The CACHE_MODE to compile ``role``'s graph with: ``explicit`` (EngineOptions.cache_mode, else
    $LAPSAM_OV_CACHE_MODE), else the cache folder's :data:`OV_CACHE_MODES_FILE`, else OpenVINO's default."""
    if explicit:
        return explicit
    try:
        mode = json.loads((Path(cache_dir) / OV_CACHE_MODES_FILE).read_text()).get(role)
    except (OSError, ValueError, AttributeError):
        return None
    return mode if mode in OV_CACHE_MODES else None


def _loaded_from_cache(compiled) -> bool | None:  # type: ignore[no-untyped-def]
    """Whether OpenVINO imported this model from its CACHE_DIR (None: it cannot tell)."""
    try:
        return bool(compiled.get_property("LOADED_FROM_CACHE"))
    except Exception:  # noqa: BLE001 - an older OpenVINO without the property
        return None


def check_files(model_dir: str | Path, entry: ModelFile) -> None:
    """``entry``'s files against their sha256, unless the image build checked them
    (:func:`lapsam.runtime.verified.verified_at_build`); a mismatch raises ModelIntegrityError."""
    t = time.time()
    if verified_at_build(model_dir, entry):
        log.debug("%s: sha256 checked at image build (size and mtime unchanged)", entry.path)
        timings.record(f"model load: {entry.role} hash check skipped (verified at build)", t, time.time())
        return
    verify_file(model_dir, entry)
    timings.record(f"model load: {entry.role} hash check (sha256)", t, time.time())


def backend_message(exc: BaseException) -> str:
    """A backend's exception as one line: OpenVINO's ``Exception from src/...`` / ``Check '...' failed at``
    location lines dropped, the rest joined (at most 300 characters)."""
    lines = [ln.strip() for ln in str(exc).splitlines()]
    keep = [ln for ln in lines if ln and not ln.startswith("Exception from ")
            and not (ln.startswith("Check '") and " failed at " in ln)]
    text = " ".join(keep) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _open_file(model_dir: Path, entry: ModelFile, opts: EngineOptions, threads: int, core,  # type: ignore[no-untyped-def]
               concurrent: bool = False) -> Graph:
    """Open ``entry``'s file (its sha256 already checked) with its backend and record the time it took
    (``concurrent``: in a worker thread, beside the caller's phases). A backend error becomes
    :class:`ModelLoadError`, one line naming the file."""
    path = model_dir / entry.path
    t = time.time()
    try:
        if entry.backend == "onnx":
            graph: Graph = OrtGraph(path, threads, opts.ort_spinning)
            name = f"model load: {entry.role} session (onnxruntime)"
        else:
            cache_dir = opts.cache_dir or os.environ.get(OV_CACHE_ENV) or None
            cache_mode = (ov_cache_mode(entry.role, cache_dir, opts.cache_mode or os.environ.get(OV_CACHE_MODE_ENV))
                          if cache_dir else None)
            ov_graph = OvGraph(path, threads, opts.precision_hint, cache_dir, core, cache_mode)
            how = ({True: "from cache", False: "compiled"}.get(ov_graph.loaded_from_cache, "compile")
                   if cache_dir else "compiled")
            graph, name = ov_graph, f"model load: {entry.role} compile ({how})"
    except LapsamError:
        raise
    except Exception as exc:  # noqa: BLE001 - every backend failure is reported the same way
        raise ModelLoadError(f"{path}: {backend_name(entry.backend)} cannot open it: {backend_message(exc)}") from exc
    timings.record(name, t, time.time(), concurrent=concurrent)
    return graph


def open_graph(model_dir: str | Path, entry: ModelFile, opts: EngineOptions | None = None,
               threads: int | None = None, core=None) -> Graph:  # type: ignore[no-untyped-def]
    """Verify ``entry``'s files against their sha256 (``opts.verify``), then open it with its backend.

    ``opts`` gives the threads and backend settings (``opts.backend`` and ``opts.precision``
    are not used: the entry says which file); ``threads`` overrides ``opts.threads``.
    A file the backend cannot open raises :class:`ModelLoadError`.
    """
    opts = opts or EngineOptions(backend=entry.backend)
    model_dir = Path(model_dir)
    if opts.verify:
        check_files(model_dir, entry)
    return _open_file(model_dir, entry, opts, int(threads or opts.threads or available_cpus()), core)


class GraphLoad:
    """Graphs being opened at once, one worker thread per role (:func:`load_engine`).

    The workers are ordinary (non-daemon) threads of a pool that is shut down as soon as the
    jobs are queued: each ends with its job, whatever the caller does meanwhile. ``label`` is
    recorded as a concurrent timing phase from the start to the end of the last job.
    """

    def __init__(self, jobs: Mapping[str, Callable[[], Graph]], label: str):
        self.label = label
        self._t0 = time.time()
        self._left = len(jobs)
        self._lock = threading.Lock()
        pool = ThreadPoolExecutor(max_workers=max(1, len(jobs)), thread_name_prefix="lapsam-model-load")
        try:
            self._futures: dict[str, Future[Graph]] = {role: pool.submit(self._run, job) for role, job in jobs.items()}
        finally:
            pool.shutdown(wait=False)

    def _run(self, job: Callable[[], Graph]) -> Graph:
        try:
            return job()
        finally:
            with self._lock:
                self._left -= 1
                last = self._left == 0
            if last:
                timings.record(self.label, self._t0, time.time(), concurrent=True)

    def done(self, role: str) -> bool:
        return self._futures[role].done()

    def result(self, role: str) -> Graph:
        """``role``'s graph, waiting for it; a failed open raises its error once every job has ended
        (no worker is left running when the error reaches the caller)."""
        try:
            return self._futures[role].result()
        except Exception:
            wait_futures(list(self._futures.values()))
            raise


# ---- engines ----------------------------------------------------------------------------------
class GraphEngine:
    """An encoder graph and a decoder graph: :class:`Engine` for an exported model.

    Made from two open graphs, or from a :class:`GraphLoad` still opening them (``load``): a graph is
    then waited for the first time it is needed (:meth:`ready`, which ``encode`` / ``decode`` call).
    """

    def __init__(self, encoder: Graph | None = None, decoder: Graph | None = None, *,
                 load: GraphLoad | None = None):
        if load is None and (encoder is None or decoder is None):
            raise TypeError("GraphEngine needs an encoder and a decoder graph, or a GraphLoad opening them")
        self._load = load
        self._graphs: dict[str, Graph] = {}
        for role, graph in (("encoder", encoder), ("decoder", decoder)):
            if graph is not None:
                self._set(role, graph)

    def _set(self, role: str, graph: Graph) -> Graph:
        if role == "encoder" and ENCODER_INPUT not in graph.inputs:
            raise LapsamError(f"encoder graph lacks input {ENCODER_INPUT!r} (has {sorted(graph.inputs)})")
        missing = set(DECODER_INPUTS) - set(graph.inputs) if role == "decoder" else set()
        if missing:
            raise LapsamError(f"decoder graph lacks inputs {sorted(missing)}")
        self._graphs[role] = graph
        return graph

    def ready(self, role: str) -> float:
        """Wait until ``role``'s graph (``encoder`` / ``decoder``) is open; returns the seconds waited
        (0 once it is). The wait is recorded as the timing phase ``waiting for model load: ROLE``;
        a graph that could not be opened raises its :class:`ModelLoadError` here, at every call."""
        if role in self._graphs or self._load is None:
            return 0.0
        t = time.time()
        try:
            graph = self._load.result(role)
        finally:
            end = time.time()
            timings.record(f"waiting for model load: {role}", t, end)
        self._set(role, graph)
        return end - t

    def _graph(self, role: str) -> Graph:
        graph = self._graphs.get(role)
        if graph is None:
            self.ready(role)
            graph = self._graphs[role]
        return graph

    @property
    def encoder(self) -> Graph:
        return self._graph("encoder")

    @property
    def decoder(self) -> Graph:
        return self._graph("decoder")

    def encode(self, image: np.ndarray) -> Feats:
        return tuple(self._graph("encoder").run({ENCODER_INPUT: image}, ENCODER_OUTPUTS))  # type: ignore[return-value]

    def decode(self, feats, boxes, point_coords, point_labels, mask_input, has_mask_input):  # type: ignore[no-untyped-def]
        values = (*feats, boxes, point_coords, point_labels, mask_input, has_mask_input)
        masks, iou = self._graph("decoder").run(dict(zip(DECODER_INPUTS, values, strict=True)), DECODER_OUTPUTS)
        return masks, iou


def select_files(manifest: ModelManifest, backend: str, precision: str) -> tuple[ModelFile, ModelFile]:
    """Encoder and decoder entries for a backend/precision (the decoder falls back to fp32)."""
    fb = file_backend(backend)
    try:
        enc = manifest.find("encoder", fb, precision)
    except KeyError as exc:
        raise LapsamError(f"model '{manifest.name}': {exc.args[0]}") from None
    try:
        dec = manifest.find("decoder", fb, precision)
    except KeyError:
        try:
            dec = manifest.find("decoder", fb, "fp32")
        except KeyError as exc:
            raise LapsamError(f"model '{manifest.name}': {exc.args[0]}") from None
    return enc, dec


def load_engine(model_dir: str | Path, manifest: ModelManifest, opts: EngineOptions,
                threads: int | None = None, background: bool = False) -> GraphEngine:
    """Verify the selected files' sha256, then open the encoder and decoder with ``opts.backend``.

    The sha256 checks (a missing or changed file: :class:`~lapsam.errors.ModelIntegrityError`) and
    the backend's import run on this thread, before anything is opened. Then both graphs are opened
    at once in two worker threads (:class:`GraphLoad`) and this returns once both are open or, with
    ``background``, at once (the engine waits for each graph at its first use). A graph that cannot
    be opened raises :class:`ModelLoadError` there. ``opts.concurrent_load=False``: one after the
    other on this thread (``background`` is then moot).
    """
    model_dir = Path(model_dir)
    enc, dec = select_files(manifest, opts.backend, opts.precision)
    core = None
    if opts.backend == "openvino":
        with timings.phase("model load: import openvino"):
            import openvino as ov
        with timings.phase("model load: openvino Core()"):
            core = ov.Core()  # one core for both graphs
    if not opts.concurrent_load:
        return GraphEngine(open_graph(model_dir, enc, opts, threads, core), open_graph(model_dir, dec, opts, threads, core))
    if opts.backend == "onnxruntime":
        with timings.phase("model load: import onnxruntime"):
            import onnxruntime  # noqa: F401 - imported here, not in a worker thread
    if opts.verify:
        for entry in (enc, dec):
            check_files(model_dir, entry)
    n = int(threads or opts.threads or available_cpus())
    what = "sessions" if opts.backend == "onnxruntime" else "compiles"
    load = GraphLoad({e.role: (lambda e=e: _open_file(model_dir, e, opts, n, core, concurrent=True)) for e in (enc, dec)},
                     f"model load (encoder + decoder {what}, concurrent)")
    engine = GraphEngine(load=load)
    if not background:
        for role in ("encoder", "decoder"):
            engine.ready(role)
    return engine


__all__ = [
    "BACKENDS",
    "ENCODER_INPUT",
    "MODEL_LOAD_ENV",
    "OV_PRECISIONS",
    "CallStats",
    "CountingEngine",
    "Engine",
    "EngineOptions",
    "Feats",
    "Graph",
    "GraphEngine",
    "GraphLoad",
    "ModelLoadError",
    "OrtGraph",
    "OvGraph",
    "backend_message",
    "backend_name",
    "check_files",
    "cpu_has_bf16",
    "file_backend",
    "load_engine",
    "open_graph",
    "read_manifest",
    "select_files",
]
