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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lapsam.errors import LapsamError

from .segmenter import Cancelled, Segmenter
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
            cached = self.seg.is_cached(img)
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
            self.current = label
            self.rev += 1
            ms = (time.perf_counter() - t) * 1000.0
            self.last = {"what": "box", "ms": round(ms, 1), "cached": cached, "label": label, "z": z,
                         "pixels": int((self.labels[z] == label).sum())}  # type: ignore[index]
            log.info("box %s on slice %d for object %d: %.0f ms (embedding %s)", b, z, label, ms,
                     "cached" if cached else "computed")
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

    # ---- 3D propagation ---------------------------------------------------------------
    def _plan(self, labels: list[int] | None) -> list[tuple[str, list[AppObject], list[tuple[int, int]]]]:
        vol = self._vol()
        objs = [o for o in self.objects if o.key_z is not None and (labels is None or o.label in labels)]
        if not objs:
            raise LapsamError("draw a box first")
        groups: dict[str, tuple[list[AppObject], list[tuple[int, int]]]] = {"box": ([], []), "stop": ([], [])}
        for o in sorted(objs, key=lambda o: o.label):
            assert o.key_z is not None
            lo, hi = o.z_marks
            if lo is not None and hi is not None and lo > hi:
                lo, hi = hi, lo
            z0 = min(0 if lo is None else lo, o.key_z)
            z1 = max(vol.depth - 1 if hi is None else hi, o.key_z)
            mode = "box" if lo is not None and hi is not None else "stop"
            groups[mode][0].append(o)
            groups[mode][1].append((z0, z1))
        return [(mode, g[0], g[1]) for mode, g in groups.items() if g[0]]

    def propagate(self, labels: list[int] | None = None, wait: bool = False) -> Job:
        """Propagate objects (default: all with a box) through the volume in a background thread.

        An object with both z marks fills that range (a vanished mask is prompted again with the
        box, as ``lapsam predict``); without them propagation runs until the mask vanishes.
        """
        with self._lock:
            vol = self._vol()
            self._check_idle()
            if not vol.is_3d:
                raise LapsamError("propagation is for 3D images")
            plan = self._plan(labels)
            volume = self._volume_u8()
            jobs = []
            for mode, objs, ranges in plan:
                boxes = np.array([[*o.boxes[o.key_z][:2], r[0], *o.boxes[o.key_z][2:], r[1]]  # type: ignore[index]
                                  for o, r in zip(objs, ranges, strict=True)], np.int64)
                mids = np.array([o.key_z for o in objs], np.int64)
                jobs.append((mode, [o.label for o in objs], ranges, boxes, mids))
            total = sum(len({z for r in j[2] for z in range(r[0], r[1] + 1)}) for j in jobs)
            what = "propagate object" + ("s " if sum(len(j[1]) for j in jobs) > 1 else " ") + ", ".join(
                str(lab) for j in jobs for lab in j[1])
            job = Job(what=what, total=total)
            self.job = job
            gen = self.generation
            self.seg.reset_cancel()
        thread = threading.Thread(target=self._run_job, args=(job, gen, volume, jobs), daemon=True,
                                  name="lapsam-propagate")
        thread.start()
        if wait:
            thread.join()
        return job

    def _run_job(self, job: Job, gen: int, volume: np.ndarray, jobs: list) -> None:  # type: ignore[type-arg]
        results = []
        base = 0
        try:
            with self._engine_lock:
                for mode, labs, ranges, boxes, mids in jobs:
                    n = len({z for r in ranges for z in range(r[0], r[1] + 1)})

                    def progress(done: int, total: int, base: int = base) -> None:
                        job.done = base + done

                    seg = self.seg.propagate(volume, boxes, mids, mode, progress)
                    results.append((labs, ranges, seg))
                    base += n
            with self._lock:
                if gen != self.generation:
                    raise LapsamError("the image changed meanwhile")
                z0 = min(r[0] for _, ranges, _ in results for r in ranges)
                z1 = max(r[1] for _, ranges, _ in results for r in ranges)
                self._push_undo(job.what, z0, z1)
                for labs, ranges, seg in results:
                    for i, (lab, (a, b)) in enumerate(zip(labs, ranges, strict=True)):
                        self._ensure_dtype(lab)
                        self._paste(a, seg[a : b + 1], lab, i + 1)
                        self._obj(lab).propagated = True
                self.rev += 1
                job.done = job.total
                job.state = "done"
                job.seconds = time.perf_counter() - job.started
                job.message = f"{job.what}: {job.seconds:.1f} s"
        except Cancelled:
            job.state = "cancelled"
            job.message = f"{job.what}: cancelled, nothing changed"
        except Exception as exc:  # noqa: BLE001 - reported in the page; the server keeps running
            log.exception("propagation failed")
            job.state = "failed"
            job.message = f"{job.what} failed: {exc}"
        finally:
            self.seg.reset_cancel()
            log.info("%s", job.message)

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
    def run_file_boxes(self) -> Job | dict[str, Any]:
        """Objects from the boxes stored in a challenge npz, segmented as ``lapsam predict`` does."""
        with self._lock:
            vol = self._vol()
            self._check_idle()
            case = vol.case
            if case is None or case.num_boxes == 0:
                raise LapsamError("this file holds no boxes")
            self._push_undo("the file's boxes", 0, vol.depth - 1)
            self.labels[:] = 0  # type: ignore[index]
            self.objects = []
            self._ensure_dtype(case.num_boxes)
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
                self.objects.append(o)
            self.current = 1
            self.rev += 1
            if case.is_3d:
                return self.propagate()
            img = self._slice_u8(0)
            valid = case.valid_box_indices
            gen = self.generation
        with self._engine_lock:
            seg = self.seg.segment_slice(img, case.boxes[valid])
        with self._lock:
            if gen != self.generation:
                raise LapsamError("the image changed meanwhile")
            for j, i in enumerate(valid):
                self._paste(0, seg[None], i + 1, j + 1)
            self.rev += 1
        return {"what": "file boxes", "objects": case.num_boxes}

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
                "clicks": False,
                "cache": {"slices": len(self.seg.engine), "mb": round(self.seg.engine.nbytes / 2**20, 1)},
            }
