"""What one page works on: the image, its objects and prompts, the label map, undo, jobs.

One :class:`Session` per server (one user, one image at a time). Objects are labels 1..N, each
with its colour and its boxes (one per slice; the latest is where propagation starts) and, in
3D, optional z marks. Overlaps follow the runtime's rule: the larger label wins.

Threads: the web server calls in from a thread pool. ``_lock`` guards the state (held briefly);
``_engine_lock`` serialises model calls. A 3D propagation runs in its own thread on a snapshot
of the prompts, reports progress and can be cancelled; while it runs, edits are refused with
:class:`Busy` and the page keeps polling :meth:`Session.state`.
"""

from __future__ import annotations

import copy
import io
import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lapsam.case import FORMAT_2025
from lapsam.errors import LapsamError

from ..interactive import ClassPrompt, SliceBox, prompts_from_case
from .segmenter import Cancelled, Progress, Segmenter
from .volume import Volume, Window, mask_bytes, mask_filename, open_image, parse_window

log = logging.getLogger(__name__)

# 20 distinct colours (label 1 is the first); repeated beyond 20 objects.
PALETTE = (
    "#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6",
    "#bcf60c", "#fabebe", "#008080", "#e6beff", "#9a6324", "#fffac8", "#800000", "#aaffc3",
    "#808000", "#ffd8b1", "#000075", "#808080",
)


def colour(label: int) -> str:
    return PALETTE[(label - 1) % len(PALETTE)]


class Busy(LapsamError):
    """A propagation is running; the request must wait or cancel it."""


class NoImage(LapsamError):
    """No image is open yet."""


@dataclass
class AppObject:
    """One object: its label, its boxes per slice and (3D) its z marks."""

    label: int
    boxes: dict[int, list[int]] = field(default_factory=dict)  # slice -> [x0, y0, x1, y1]
    key_z: int | None = None  # slice of the latest box: 3D propagation starts there
    z_marks: list[int | None] = field(default_factory=lambda: [None, None])  # first / last slice
    fg: list[list[int]] = field(default_factory=list)  # foreground clicks [z, y, x]
    bg: list[list[int]] = field(default_factory=list)  # background clicks [z, y, x]
    propagated: bool = False

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["boxes"] = {str(z): b for z, b in self.boxes.items()}
        d["colour"] = colour(self.label)
        return d


@dataclass
class Job:
    """A background propagation: progress, and how it ended."""

    what: str
    total: int = 0
    done: int = 0
    state: str = "running"  # running | done | cancelled | failed
    message: str = ""
    started: float = field(default_factory=time.perf_counter)
    seconds: float = 0.0


@dataclass
class _Undo:
    what: str
    z0: int
    slab: np.ndarray  # labels[z0 : z0 + len(slab)] before the change
    objects: list[AppObject]
    current: int | None

    @property
    def nbytes(self) -> int:
        return int(self.slab.nbytes)


@dataclass
class SessionConfig:
    max_image_bytes: int | None = None  # None: 80% of the memory available when a file is opened
    history_mb: float = 512.0  # undo snapshots kept (oldest dropped first)


class Session:
    """The state behind the page; every public method is safe to call from any thread."""

    def __init__(self, segmenter: Segmenter, config: SessionConfig | None = None):
        self.seg = segmenter
        self.config = config or SessionConfig()
        self._lock = threading.RLock()
        self._engine_lock = threading.Lock()
        self.volume: Volume | None = None
        self.window: Window | None = None
        self.labels: np.ndarray | None = None  # (D, H, W)
        self.objects: list[AppObject] = []
        self.current: int | None = None
        self.rev = 0  # bumped on every change of the masks or prompts
        self.generation = 0  # bumped when an image is opened
        self.history: list[_Undo] = []
        self.job: Job | None = None
        self.last: dict[str, Any] = {}
        self.message = ""
        self._u8: tuple[str, np.ndarray] | None = None
        self.max_upload_mb: float | None = None  # set by the server, shown to the page
        self._upload_dirs: list[Path] = []

    # ---- opening ----------------------------------------------------------------------
    def open_path(self, path: str | Path, display_name: str | None = None) -> dict[str, Any]:
        """Open an image; on any error the current image stays open."""
        self._check_idle()
        vol = open_image(path, self.config.max_image_bytes)
        if display_name:
            vol.name = display_name
        with self._lock:
            self._check_idle()
            self.volume = vol
            self.window = vol.default_window()
            self.labels = np.zeros((vol.depth, vol.height, vol.width), np.uint8)
            self.objects = []
            self.current = None
            self.history = []
            self.job = None
            self.last = {}
            self._u8 = None
            self.generation += 1
            self.rev += 1
            self.message = "; ".join(vol.warnings)
            log.info("opened %s: %s", vol.name, vol.summary())
            return self.state()

    def adopt_upload_dir(self, path: Path) -> None:
        """Temporary upload folders are removed when the next upload replaces them (or at close)."""
        with self._lock:
            old, self._upload_dirs = self._upload_dirs, [path]
        for d in old:
            shutil.rmtree(d, ignore_errors=True)

    def close(self) -> None:
        self.seg.cancel()
        for d in self._upload_dirs:
            shutil.rmtree(d, ignore_errors=True)
        self._upload_dirs = []

    # ---- helpers ----------------------------------------------------------------------
    def _vol(self) -> Volume:
        if self.volume is None or self.labels is None:
            raise NoImage("no image open: open a file first")
        return self.volume

    def _check_idle(self) -> None:
        if self.job is not None and self.job.state == "running":
            raise Busy("a propagation is running: wait for it or cancel it")

    def _obj(self, label: int) -> AppObject:
        for o in self.objects:
            if o.label == label:
                return o
        raise LapsamError(f"no object {label}")

    def _slice_u8(self, z: int) -> np.ndarray:
        vol = self._vol()
        assert self.window is not None
        if self._u8 is not None and self._u8[0] == self.window.name:
            return self._u8[1][z]
        return vol.slice_u8(z, self.window)

    def _volume_u8(self) -> np.ndarray:
        vol = self._vol()
        assert self.window is not None
        if self._u8 is None or self._u8[0] != self.window.name:
            self._u8 = (self.window.name, vol.volume_u8(self.window))
        return self._u8[1]

    def _check_z(self, z: int) -> int:
        vol = self._vol()
        z = int(z)
        if not 0 <= z < vol.depth:
            raise LapsamError(f"slice {z} is outside 0..{vol.depth - 1}")
        return z

    def _clip_box(self, box: list[float]) -> list[int]:
        vol = self._vol()
        if len(box) != 4:
            raise LapsamError("a box is [x0, y0, x1, y1]")
        x0, y0, x1, y1 = (int(round(float(v))) for v in box)
        x0, x1 = sorted((x0, x1))
        y0, y1 = sorted((y0, y1))
        x0, x1 = max(0, x0), min(vol.width - 1, x1)
        y0, y1 = max(0, y0), min(vol.height - 1, y1)
        if x1 < x0 or y1 < y0:
            raise LapsamError("the box lies outside the image")
        return [x0, y0, x1, y1]

    def _push_undo(self, what: str, z0: int, z1: int) -> None:
        assert self.labels is not None
        self.history.append(_Undo(what, z0, self.labels[z0 : z1 + 1].copy(), copy.deepcopy(self.objects), self.current))
        limit = int(self.config.history_mb * 2**20)
        while len(self.history) > 1 and sum(h.nbytes for h in self.history) > limit:
            self.history.pop(0)

    def _ensure_dtype(self, label: int) -> None:
        assert self.labels is not None
        if label > np.iinfo(self.labels.dtype).max:
            self.labels = self.labels.astype(np.uint16)

    def _paste(self, z0: int, seg: np.ndarray, label: int, value: int) -> None:
        """Replace ``label`` on slices z0.. by the pixels where ``seg == value`` (larger labels win)."""
        assert self.labels is not None
        slab = self.labels[z0 : z0 + seg.shape[0]]
        slab[slab == label] = 0
        slab[(seg == value) & (slab < label)] = label

    # ---- prompts ----------------------------------------------------------------------
    def new_object(self) -> int:
        with self._lock:
            self._vol()
            self._check_idle()
            label = max((o.label for o in self.objects), default=0) + 1
            if label > 65535:
                raise LapsamError("65535 objects at most")
            self._push_undo(f"new object {label}", 0, -1)
            self.objects.append(AppObject(label))
            self.current = label
            self.rev += 1
            return label

    def select(self, label: int) -> None:
        with self._lock:
            self._obj(int(label))
            self.current = int(label)
            self.rev += 1

    def set_window(self, name: str) -> None:
        with self._lock:
            vol = self._vol()
            w = parse_window(name) if name not in {x.name for x in vol.windows()} else next(
                x for x in vol.windows() if x.name == name)
            if w.kind == "stored" and vol.data.dtype != np.uint8:
                raise LapsamError("'as stored' is for uint8 images; choose a window")
            self.window = w
            self.rev += 1

    def prepare(self, z: int) -> bool:
        """Encode slice ``z`` ahead of a box (the page calls it on mouse-down); False if cached or busy."""
        with self._lock:
            if self.volume is None or (self.job is not None and self.job.state == "running"):
                return False
            z = self._check_z(z)
            img = self._slice_u8(z)
        if not self._engine_lock.acquire(blocking=False):
            return False
        try:
            return self.seg.encode_slice(img)
        finally:
            self._engine_lock.release()

    def add_box(self, z: int, box: list[float], label: int | None = None) -> dict[str, Any]:
        """Segment ``box`` on slice ``z`` for object ``label`` (default: current; a new object if none)."""
        t = time.perf_counter()
        with self._lock:
            vol = self._vol()
            self._check_idle()
            z = self._check_z(z) if vol.is_3d else 0
            b = self._clip_box(box)
            if label is None:
                label = self.current if self.current is not None else self.new_object()
            self._obj(int(label))
            label = int(label)
            img = self._slice_u8(z)
            gen = self.generation
        with self._engine_lock:
            cached = None if self.seg.crops(img) else self.seg.is_cached(img)  # None: the box's window is encoded
            seg = self.seg.segment_slice(img, np.array([b]))
        with self._lock:
            if gen != self.generation:
                raise LapsamError("the image changed meanwhile")
            self._push_undo(f"box on slice {z}", z, z)
            self._ensure_dtype(label)
            self._paste(z, seg[None], label, 1)
            obj = self._obj(label)
            obj.boxes[z] = b
            obj.key_z = z
            obj.fg = [q for q in obj.fg if q[0] != z]  # a new box restarts the object on this slice
            obj.bg = [q for q in obj.bg if q[0] != z]
            self.current = label
            self.rev += 1
            ms = (time.perf_counter() - t) * 1000.0
            self.last = {"what": "box", "ms": round(ms, 1), "cached": cached, "label": label, "z": z,
                         "pixels": int((self.labels[z] == label).sum())}  # type: ignore[index]
            log.info("box %s on slice %d for object %d: %.0f ms (%s)", b, z, label, ms,
                     {True: "slice embedding kept", False: "slice encoded", None: "window around the box encoded"}[cached])
            return dict(self.last)

    def set_mark(self, which: str, z: int | None, label: int | None = None) -> None:
        """Set (or clear with ``z=None``) the first (``start``) or last (``end``) slice of an object."""
        with self._lock:
            vol = self._vol()
            self._check_idle()
            if not vol.is_3d:
                raise LapsamError("z marks are for 3D images")
            label = self.current if label is None else int(label)
            if label is None:
                raise LapsamError("no object selected")
            obj = self._obj(label)
            i = {"start": 0, "end": 1}.get(which)
            if i is None:
                raise LapsamError("which must be 'start' or 'end'")
            self._push_undo(f"z {which} of object {label}", 0, -1)
            obj.z_marks[i] = None if z is None else self._check_z(z)
            self.rev += 1

    # ---- prompts for the runtime's 2025 rule ----------------------------------------------
    def _z_range(self, o: AppObject) -> tuple[int, int, str]:
        """An object's z range and vanished-mask policy: both marks -> that range, ``box``; else ``stop``."""
        vol = self._vol()
        key = 0 if o.key_z is None else o.key_z
        lo, hi = o.z_marks
        if lo is not None and hi is not None and lo > hi:
            lo, hi = hi, lo
        z0 = min(0 if lo is None else lo, key)
        z1 = max(vol.depth - 1 if hi is None else hi, key)
        return z0, z1, ("box" if lo is not None and hi is not None else "stop")

    def _prompt(self, o: AppObject) -> ClassPrompt:
        """The object as the runtime's class prompt: its latest box on its slice, z range, clicks."""
        box = None
        if o.key_z is not None:
            z0, z1, _ = self._z_range(o)
            x0, y0, x1, y1 = o.boxes[o.key_z]
            box = SliceBox(x0, y0, x1, y1, o.key_z, z0, z1)
        return ClassPrompt(o.label, box, [tuple(p) for p in o.fg], [tuple(p) for p in o.bg])  # type: ignore[misc]

    def _model_volume(self) -> np.ndarray:
        """What the model sees: (D, H, W) uint8 for 3D; a 2D image as (1, H, W[, 3])."""
        vol = self._vol()
        return self._volume_u8() if vol.is_3d else self._slice_u8(0)[None]

    def _commit(self, what: str, new: np.ndarray) -> None:
        """Replace the label map by ``new`` (under the lock), with an undo snapshot of the changed slices."""
        assert self.labels is not None
        if new.dtype.itemsize > self.labels.dtype.itemsize:
            self.labels = self.labels.astype(new.dtype)
        changed = np.flatnonzero((new != self.labels).reshape(new.shape[0], -1).any(axis=1))
        if changed.size:
            self._push_undo(what, int(changed[0]), int(changed[-1]))
            self.labels[changed[0] : changed[-1] + 1] = new[changed[0] : changed[-1] + 1]
        else:
            self._push_undo(what, 0, -1)

    # ---- background jobs ------------------------------------------------------------------
    def _run_now(self, gen: int, compute: Callable[[Progress], np.ndarray], apply: Callable[[np.ndarray], None],
                 result: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """:meth:`_start_job`'s work in the caller's thread (2D): ``compute`` under the engine lock,
        then ``apply`` and ``result()`` under the state lock unless the image changed meanwhile.

        Called without ``_lock`` held; ``gen`` is the generation the caller saw.
        """
        with self._engine_lock:
            new = compute(lambda done, total: None)
        with self._lock:
            if gen != self.generation:
                raise LapsamError("the image changed meanwhile")
            apply(new)
            self.rev += 1
            return result()

    def _start_job(self, what: str, total: int, compute: Callable[[Progress], np.ndarray],
                   apply: Callable[[np.ndarray], None], wait: bool = False) -> Job:
        """Run ``compute`` (model calls) in a thread, then ``apply`` its result under the lock.

        Called with ``_lock`` held and the session idle.
        """
        job = Job(what=what, total=total)
        self.job = job
        gen = self.generation
        self.seg.reset_cancel()

        def run() -> None:
            try:
                with self._engine_lock:
                    def progress(done: int, total: int) -> None:
                        job.done = done

                    result = compute(progress)
                with self._lock:
                    if gen != self.generation:
                        raise LapsamError("the image changed meanwhile")
                    apply(result)
                    self.rev += 1
                    job.done = max(job.done, job.total)
                    job.seconds = time.perf_counter() - job.started
                    job.message = f"{what}: {job.seconds:.1f} s"
                    job.state = "done"
            except Cancelled:
                job.message = f"{what}: cancelled, nothing changed"
                job.state = "cancelled"
            except Exception as exc:  # noqa: BLE001 - reported in the page; the server keeps running
                log.exception("%s failed", what)
                job.message = f"{what} failed: {exc}"
                job.state = "failed"
            finally:
                self.seg.reset_cancel()
                log.info("%s", job.message)

        thread = threading.Thread(target=run, daemon=True, name="lapsam-job")
        thread.start()
        if wait:
            self._lock.release()
            try:
                thread.join()
            finally:
                self._lock.acquire()
        return job

    # ---- 3D propagation ---------------------------------------------------------------
    def propagate(self, labels: list[int] | None = None, wait: bool = False) -> Job:
        """Propagate objects (default: all with a box) through the volume in a background thread.

        Each object is the runtime's class prompt (``Predictor.predict_prompts``): its latest box on
        its slice, swept both ways with the window following each slice's prompt. With both z marks
        it fills that range (a vanished mask is prompted again: ``on_empty="box"``); without them
        it runs until the mask vanishes (``"stop"``). Its clicks then refine the result.
        """
        with self._lock:
            vol = self._vol()
            self._check_idle()
            if not vol.is_3d:
                raise LapsamError("propagation is for 3D images")
            objs = [o for o in self.objects if o.key_z is not None and (labels is None or o.label in labels)]
            if not objs:
                raise LapsamError("draw a box first")
            groups: dict[str, list[AppObject]] = {"box": [], "stop": []}
            for o in sorted(objs, key=lambda o: o.label):
                groups[self._z_range(o)[2]].append(o)
            plan = [(mode, [self._prompt(o) for o in g]) for mode, g in groups.items() if g]
            total = len({z for o in objs for z in range(self._z_range(o)[0], self._z_range(o)[1] + 1)})
            volume = self._model_volume()
            start = self.labels.copy()  # type: ignore[union-attr]
            names = [str(o.label) for o in objs]
            what = f"propagate object{'s' if len(names) > 1 else ''} " + ", ".join(names)

            def compute(progress: Progress) -> np.ndarray:
                cur = start
                for mode, prompts in plan:
                    prev = cur.copy()
                    prev[np.isin(prev, [p.label for p in prompts])] = 0  # these classes are swept again
                    cur = self.seg.segment_prompts(volume, prompts, prev, mode, total, progress)
                return cur

            def apply(new: np.ndarray) -> None:
                self._commit(what, new)
                for o in objs:
                    self._obj(o.label).propagated = True

            return self._start_job(what, total, compute, apply, wait)

    # ---- clicks -------------------------------------------------------------------------
    def add_click(self, z: int, x: float, y: float, positive: bool, label: int | None = None,
                  wait: bool = False) -> Job | dict[str, Any]:
        """A foreground / background click for object ``label`` (default: current; new if none).

        The runtime's rule (``Predictor.predict_prompts`` with the current masks as ``prev_pred``):
        a click the masks already honour changes nothing; otherwise its slice is segmented again
        with the object's box (its own box on its box slice, else the bbox of its mask there or on
        a neighbour slice) and every click of that slice, and in 3D the change propagates until it
        settles. 2D: done at once; 3D: a background job like propagation.
        """
        t = time.perf_counter()
        with self._lock:
            vol = self._vol()
            self._check_idle()
            z = self._check_z(z) if vol.is_3d else 0
            xi, yi = int(np.floor(float(x))), int(np.floor(float(y)))
            if not (0 <= xi < vol.width and 0 <= yi < vol.height):
                raise LapsamError("the click lies outside the image")
            if label is None:
                label = self.current if self.current is not None else self.new_object()
            label = int(label)
            obj = copy.deepcopy(self._obj(label))
            (obj.fg if positive else obj.bg).append([z, yi, xi])
            self._ensure_dtype(label)
            prompt = self._prompt(obj)
            volume = self._model_volume()
            start = self.labels.copy()  # type: ignore[union-attr]
            what = f"{'+' if positive else '-'} click on slice {z} for object {label}"
            mode = self._z_range(obj)[2] if vol.is_3d else "box"

            def compute(progress: Progress) -> np.ndarray:
                return self.seg.segment_prompts(volume, [prompt], start, mode, 0, progress)

            def apply(new: np.ndarray) -> None:
                self._commit(what, new)
                o = self._obj(label)
                o.fg, o.bg = obj.fg, obj.bg
                self.current = label
                ms = (time.perf_counter() - t) * 1000.0
                self.last = {"what": "click", "ms": round(ms, 1), "label": label, "z": z,
                             "pixels": int((self.labels[z] == label).sum())}  # type: ignore[index]

            if vol.is_3d:
                return self._start_job(what, 0, compute, apply, wait)
            gen = self.generation
        return self._run_now(gen, compute, apply, lambda: dict(self.last))

    def cancel(self) -> None:
        with self._lock:
            if self.job is not None and self.job.state == "running":
                self.seg.cancel()

    def wait(self, timeout: float | None = None) -> Job | None:
        """Block until the running job ends (tests and scripts)."""
        end = None if timeout is None else time.monotonic() + timeout
        while self.job is not None and self.job.state == "running":
            if end is not None and time.monotonic() > end:
                break
            time.sleep(0.02)
        return self.job

    # ---- the file's own prompts -------------------------------------------------------
    def run_file_boxes(self, wait: bool = False) -> Job | dict[str, Any]:
        """The prompts stored in a challenge npz, segmented exactly as ``lapsam predict`` does.

        2024 files: their boxes (2D at once, 3D as a job); 2025 files: box dicts, clicks and
        ``prev_pred`` through the runtime's 2025 rule (a job). One object per box / class.
        """
        with self._lock:
            vol = self._vol()
            self._check_idle()
            case = vol.case
            if case is None or case.num_objects == 0:
                raise LapsamError("this file holds no boxes or clicks")
            objects = []
            if case.format == FORMAT_2025 and case.is_3d:
                for p in prompts_from_case(case):
                    o = AppObject(p.label, fg=[list(q) for q in p.fg], bg=[list(q) for q in p.bg])
                    if p.box is not None:
                        b = p.box
                        o.boxes[b.z_mid] = [b.x_min, b.y_min, b.x_max, b.y_max]
                        o.key_z, o.z_marks = b.z_mid, [b.z_min, b.z_max]
                    objects.append(o)
            else:
                for i in range(case.num_boxes):
                    o = AppObject(i + 1)
                    if i not in case.box_errors:
                        b = case.boxes[i]
                        if case.is_3d:
                            z = int(case.box_mid_z[i]) if case.box_mid_z is not None else int((b[2] + b[5]) // 2)
                            o.boxes[z] = [int(b[0]), int(b[1]), int(b[3]), int(b[4])]
                            o.key_z, o.z_marks = z, [int(b[2]), int(b[5])]
                        else:
                            o.boxes[0] = [int(v) for v in b]
                            o.key_z = 0
                    objects.append(o)
            what = f"the file's {'prompts' if case.format == FORMAT_2025 else 'boxes'}"
            self._ensure_dtype(case.num_objects)
            # the model sees the image as stored, whatever window is shown (as lapsam predict)
            run_case = case
            dtype = self.labels.dtype  # type: ignore[union-attr]

            def compute(progress: Progress) -> np.ndarray:
                segs = self.seg.predict_case(run_case, progress)
                return segs.reshape(vol.depth, vol.height, vol.width).astype(dtype)

            def apply(new: np.ndarray) -> None:
                self._commit(what, new)
                for o in objects:
                    o.propagated = case.is_3d and o.key_z is not None
                self.objects = objects
                self.current = 1

            if case.is_3d:
                return self._start_job(what, 0, compute, apply, wait)
            gen = self.generation
        return self._run_now(gen, compute, apply, lambda: {"what": what, "objects": case.num_objects})

    # ---- undo / clear -----------------------------------------------------------------
    def undo(self) -> str:
        with self._lock:
            self._check_idle()
            if not self.history:
                raise LapsamError("nothing to undo")
            h = self.history.pop()
            assert self.labels is not None
            self.labels[h.z0 : h.z0 + h.slab.shape[0]] = h.slab
            self.objects = h.objects
            self.current = h.current
            self.rev += 1
            return h.what

    def clear(self) -> None:
        with self._lock:
            vol = self._vol()
            self._check_idle()
            self._push_undo("clear", 0, vol.depth - 1)
            self.labels[:] = 0  # type: ignore[index]
            self.objects = []
            self.current = None
            self.rev += 1

    # ---- output -----------------------------------------------------------------------
    def slice_png(self, z: int) -> bytes:
        from PIL import Image

        with self._lock:
            z = self._check_z(z)
            img = self._slice_u8(z)
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(img)).save(buf, format="PNG", compress_level=1)
        return buf.getvalue()

    def mask_png(self, z: int) -> bytes:
        """Slice ``z`` of the label map as RGBA: each label in its colour, background transparent."""
        from PIL import Image

        with self._lock:
            z = self._check_z(z)
            lab = self.labels[z].copy()  # type: ignore[index]
        n = int(lab.max(initial=0))
        lut = np.zeros((n + 1, 4), np.uint8)
        for i in range(1, n + 1):
            c = colour(i)
            lut[i] = (int(c[1:3], 16), int(c[3:5], 16), int(c[5:7], 16), 255)
        buf = io.BytesIO()
        Image.fromarray(lut[lab]).save(buf, format="PNG", compress_level=1)
        return buf.getvalue()

    def save(self, fmt: str, z: int | None = None) -> tuple[bytes, str]:
        with self._lock:
            vol = self._vol()
            labels = self.labels.copy()  # type: ignore[union-attr]
        return mask_bytes(vol, labels, fmt, z), mask_filename(vol, fmt, z)

    def state(self) -> dict[str, Any]:
        with self._lock:
            vol = self.volume
            job = None if self.job is None else asdict(self.job)
            return {
                "model": self.seg.model_name,
                "image": None if vol is None else vol.summary(),
                "generation": self.generation,
                "window": None if self.window is None else self.window.as_dict(),
                "windows": [] if vol is None else [w.as_dict() for w in vol.windows()],
                "objects": [o.as_dict() for o in self.objects],
                "current": self.current,
                "rev": self.rev,
                "undo": self.history[-1].what if self.history else None,
                "job": job,
                "last": dict(self.last),
                "message": self.message,
                "clicks": True,
                "max_upload_mb": self.max_upload_mb,
                "cache": {"slices": len(self.seg.engine), "mb": round(self.seg.engine.nbytes / 2**20, 1)},
            }
