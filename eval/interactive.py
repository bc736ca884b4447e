"""The CVPR 2025 interactive protocol (CVPR25_iter_eval.py): a box, then five correction clicks.

For each 3D case in the 2025 format (:mod:`lapsam.format2025`):

* step 1 runs the case with its box dicts (a case without ``boxes`` skips it: DSC/NSD 0, 0 s);
* steps 2..6 each add one click per class, placed as the organisers place it: the largest
  26-connected component (:func:`scipy.ndimage.label`, a 3x3x3 structure) of the class's error
  (prediction != reference), the voxel at the maximum of that component's Euclidean distance
  transform (computed on its bounding box with a background border, as their padded crop), a
  tie broken by ``RandomState(seed)`` (their ``np.random.seed(42)`` + ``choice``); a false
  negative gives a ``fg`` click, a false positive a ``bg`` click; a class without error gets no
  click. Clicks are ``[z, y, x]``. The input npz is rewritten with ``imgs``, ``spacing``,
  ``boxes``, the accumulated ``clicks``, ``clicks_order`` and ``prev_pred`` (the previous
  step's ``segs``; zeros when that step failed), and the model runs again;
* every step is scored: per class present in the reference (their ``np.unique`` rule), DSC,
  and NSD (tolerance 2, spacing as stored) only when the mean DSC is > 0.2, else 0;
* ``DSC_AUC`` / ``NSD_AUC``: the trapezoid rule with unit spacing over the last five steps
  (the click steps; 0..4), as their ``cumulative_trapezoid(...)[-1]``; ``DSC_Final`` /
  ``NSD_Final``: the last step; the time limit: the sum of the step times <= 90 s x classes.

Runners: :class:`ModelRunner` (``--model``: the runtime in this process; times hold reading
the case, predicting and writing ``segs``, not process start or model loading) and
:class:`DockerRunner` (``--image``: one ``docker container run`` per step, the organisers'
command line through :class:`lapsam.eval.timing.ProtocolRunner`).

Differences from their script, on purpose: the reference is never written into the model's
input; a step whose output is missing scores 0 even when an earlier step's output file is
still in ``outputs/`` (their script would read the stale file); the container's memory limit
is ``--memory`` (their 2025 script uses 32G; the laptop challenge 8G).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from lapsam.case import case_from_arrays, require_cases
from lapsam.errors import CaseError, LapsamError, UsageError
from lapsam.format2025 import read_reference, write_case_2025
from lapsam.safe_npz import load_npz
from lapsam.writers import atomic_savez

from .metrics import NSD_DSC_THRESHOLD, label_dsc, label_nsd
from .tables import atomic_write_text, csv_float, csv_text, markdown_table, text_table

log = logging.getLogger(__name__)

OK, FAILED = "ok", "failed"


@dataclass(frozen=True)
class InteractiveConfig:
    """The protocol's knobs (the defaults are the organisers')."""

    clicks: int = 5  # correction steps after the box step
    seed: int = 42  # tie-break among equal distance-transform maxima
    seconds_per_class: float = 90.0  # time limit of a whole case: this x number of classes
    tolerance: float = 2.0  # NSD tolerance (mm)

    def __post_init__(self) -> None:
        if self.clicks < 1:
            raise ValueError(f"clicks must be >= 1, got {self.clicks}")


# --------------------------------------------------------------------------- clicks and scores

def simulate_click(pred: np.ndarray, ref: np.ndarray, seed: int = 42) -> tuple[str, tuple[int, int, int]] | None:
    """The organisers' correction click for one class: ``("fg" | "bg", (z, y, x))``, or None if no error.

    ``pred`` and ``ref`` are the class's boolean (D, H, W) masks.
    """
    from scipy import ndimage

    error = np.asarray(pred, bool) != np.asarray(ref, bool)
    if not error.any():
        return None
    labels, _ = ndimage.label(error, structure=np.ones((3, 3, 3), bool))
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    k = int(np.argmax(sizes))  # the largest component (the lowest label among equals)
    box = ndimage.find_objects(labels, max_label=k)[k - 1]
    comp = np.pad(labels[box] == k, 1)  # a background border: the volume's edge counts as outside
    edt = ndimage.distance_transform_edt(comp)[1:-1, 1:-1, 1:-1]
    peaks = np.argwhere(edt == edt.max())
    pick = peaks[np.random.RandomState(seed).choice(len(peaks))]
    point = tuple(int(p + s.start) for p, s in zip(pick, box, strict=True))
    return ("fg" if ref[point] else "bg"), point  # type: ignore[return-value]


def score_step(ref: np.ndarray, seg: np.ndarray, spacing: Sequence[float], tolerance: float = 2.0
               ) -> tuple[float, float]:
    """Case DSC and NSD as the 2025 script: classes = labels present in ``ref``; NSD only above DSC 0.2."""
    classes = [int(c) for c in np.unique(ref) if c != 0]
    if not classes:
        return float("nan"), float("nan")
    dsc = float(np.mean([label_dsc(ref == c, seg == c) for c in classes]))
    if not dsc > NSD_DSC_THRESHOLD:
        return dsc, 0.0
    sp = tuple(float(s) for s in spacing)
    return dsc, float(np.mean([label_nsd(ref == c, seg == c, sp, tolerance) for c in classes]))


def auc(values: Sequence[float]) -> float:
    """Area under ``values`` at x = 0, 1, 2, ... by the trapezoid rule (0 for fewer than two)."""
    v = np.asarray(values, np.float64)
    if v.size < 2:
        return 0.0
    return float(np.sum((v[1:] + v[:-1]) / 2.0))


# --------------------------------------------------------------------------- runners

@dataclass
class StepOutput:
    seconds: float
    segs: np.ndarray | None
    error: str | None = None


class StepRunner(Protocol):
    """Runs the model once on one input file."""

    label: str

    def run(self, input_path: Path) -> StepOutput: ...

    def close(self) -> None: ...


def _read_segs(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    arrays = load_npz(path)
    if "segs" not in arrays:
        raise CaseError(path, f"no 'segs' key (keys present: {sorted(arrays)})")
    segs = np.asarray(arrays["segs"])
    if segs.shape != tuple(shape):
        raise CaseError(path, f"'segs' has shape {segs.shape}; the reference has {tuple(shape)}")
    if segs.dtype.kind not in "biu" or (segs.dtype.kind == "i" and segs.size and int(segs.min()) < 0):
        raise CaseError(path, f"'segs' has dtype {segs.dtype} or negative labels; expected labels 0..N")
    return segs


class ModelRunner:
    """The runtime in this process: the model is loaded once for all cases and steps."""

    def __init__(self, predictor: Any, out_dir: Path, label: str):
        self.predictor = predictor
        self.out_dir = Path(out_dir)
        self.label = label
        self.shape: tuple[int, ...] = ()

    def run(self, input_path: Path) -> StepOutput:
        from lapsam.case import load_case
        from lapsam.writers import write_segs

        out = self.out_dir / input_path.name
        t = time.perf_counter()
        try:
            case = load_case(input_path)
            segs = self.predictor.predict(case)
            write_segs(out, segs, case.num_objects)
        except Exception as exc:  # noqa: BLE001 - a failed step scores 0, the protocol goes on
            return StepOutput(time.perf_counter() - t, None, str(exc))
        seconds = time.perf_counter() - t
        try:
            return StepOutput(seconds, _read_segs(out, self.shape))
        except CaseError as exc:
            return StepOutput(seconds, None, exc.problem)

    def close(self) -> None:
        import shutil

        shutil.rmtree(self.out_dir, ignore_errors=True)


class DockerRunner:
    """One ``docker container run`` per step with the organisers' command (``lapsam.eval.timing``)."""

    def __init__(self, image: str, out_dir: Path, memory: str = "32G", timeout: float | None = None,
                 network: str | None = None, keep_work: bool = False):
        from .timing import ProtocolRunner, docker_server_version, resolve_image

        docker_server_version()
        img = resolve_image(image)
        self.runner = ProtocolRunner(img, Path(out_dir), memory=memory, timeout=timeout, network=network)
        self.runner.check_name_free()
        self.label = img.ref
        self.keep_work = keep_work
        self.shape: tuple[int, ...] = ()

    def run(self, input_path: Path) -> StepOutput:
        rec = self.runner.run_case(input_path)
        out = self.runner.results / input_path.name
        if not rec.output_ok or not out.is_file():
            return StepOutput(rec.seconds, None, rec.error or "no output")
        if rec.error:  # as the organisers: an output is used whatever the exit code
            log.warning("%s: %s (its output is used)", input_path.name, rec.error)
        try:
            return StepOutput(rec.seconds, _read_segs(out, self.shape))
        except CaseError as exc:
            return StepOutput(rec.seconds, None, exc.problem)

    def close(self) -> None:
        if not self.keep_work:
            self.runner.cleanup()


# --------------------------------------------------------------------------- one case

@dataclass
class StepResult:
    step: int  # 1 = box, 2.. = clicks
    dsc: float
    nsd: float
    seconds: float
    clicks_added: int = 0
    skipped: bool = False  # step 1 of a case without boxes
    error: str | None = None


@dataclass
class InteractiveResult:
    """One case through the whole protocol."""

    case: str
    num_class: int = 0
    steps: list[StepResult] = field(default_factory=list)
    clicks: list[dict[str, list[list[int]]]] = field(default_factory=list)
    clicks_order: list[list[str]] = field(default_factory=list)
    status: str = OK
    error: str | None = None
    clicks_n: int = 5
    seconds_per_class: float = 90.0

    @property
    def dscs(self) -> list[float]:
        return [s.dsc for s in self.steps]

    @property
    def nsds(self) -> list[float]:
        return [s.nsd for s in self.steps]

    @property
    def dsc_auc(self) -> float:
        return auc(self.dscs[-self.clicks_n:]) if self.steps else float("nan")

    @property
    def nsd_auc(self) -> float:
        return auc(self.nsds[-self.clicks_n:]) if self.steps else float("nan")

    @property
    def dsc_final(self) -> float:
        return self.steps[-1].dsc if self.steps else float("nan")

    @property
    def nsd_final(self) -> float:
        return self.steps[-1].nsd if self.steps else float("nan")

    @property
    def total_seconds(self) -> float:
        return float(sum(s.seconds for s in self.steps))

    @property
    def limit_seconds(self) -> float:
        return self.seconds_per_class * self.num_class

    @property
    def within_limit(self) -> bool:
        return self.total_seconds <= self.limit_seconds


def run_case(case_path: Path, runner: StepRunner, work_dir: Path, gts_dir: Path | None = None,
             config: InteractiveConfig = InteractiveConfig(), progress: Any = None) -> tuple[InteractiveResult, list[np.ndarray]]:
    """The whole protocol on one case; returns its result and the segmentation of every step run."""
    res = InteractiveResult(case_path.name, clicks_n=config.clicks, seconds_per_class=config.seconds_per_class)
    all_segs: list[np.ndarray] = []
    try:
        arrays = load_npz(case_path)
        if "imgs" not in arrays:
            raise CaseError(case_path, f"missing key 'imgs' (keys present: {sorted(arrays)})")
        imgs = np.asarray(arrays["imgs"])
        if imgs.ndim != 3:
            raise CaseError(case_path, f"imgs has shape {imgs.shape}: the interactive protocol is for 3D cases")
        gts = read_reference(case_path, arrays, gts_dir)
        if gts.shape != imgs.shape:
            raise CaseError(case_path, f"reference shape {gts.shape} differs from the image's {imgs.shape}")
        if "boxes" in arrays and arrays["boxes"].dtype != object:
            raise CaseError(case_path, "not a 2025 case: 'boxes' is an array, not box dicts "
                            "(build 2025 cases with `lapsam data to2025`)")
        boxes = None  # no boxes: clicks only
        if "boxes" in arrays:  # the loader's validation of the model's input (box dicts, spacing, image)
            case = case_from_arrays(case_path.name, {k: v for k, v in arrays.items()
                                                     if k in ("imgs", "spacing", "boxes")}, case_path)
            boxes, imgs = case.box_dicts, case.image
        elif imgs.dtype != np.uint8:
            raise CaseError(case_path, f"imgs has dtype {imgs.dtype}; expected uint8")
    except CaseError as exc:
        res.status, res.error = FAILED, exc.problem
        log.error("%s", exc)
        if progress is not None:
            progress.update(config.clicks + 1)
        return res, all_segs
    spacing = np.asarray(arrays["spacing"]) if "spacing" in arrays else None
    sp_metric = tuple(float(s) for s in spacing.ravel()) if spacing is not None and spacing.size == 3 else (1.0, 1.0, 1.0)
    classes = [int(c) for c in np.unique(gts) if c != 0]
    res.num_class = len(classes)
    res.clicks = [{"fg": [], "bg": []} for _ in classes]
    res.clicks_order = [[] for _ in classes]
    runner.shape = gts.shape  # type: ignore[attr-defined]
    current = work_dir / case_path.name
    segs: np.ndarray | None = None
    for step in range(config.clicks + 1):
        if step == 0:
            if "boxes" not in arrays:
                res.steps.append(StepResult(1, 0.0, 0.0, 0.0, skipped=True))  # as the organisers: no box, no run
                if progress is not None:
                    progress.update(1)
                continue
            write_case_2025(current, imgs, spacing, boxes)
            added = 0
        else:
            prev = segs if segs is not None else np.zeros(gts.shape, np.uint8)
            added = 0
            for i, c in enumerate(classes):
                click = simulate_click(prev == c, gts == c, config.seed)
                if click is None:
                    continue
                kind, point = click
                res.clicks[i][kind].append(list(point))
                res.clicks_order[i].append(kind)
                added += 1
            write_case_2025(current, imgs, spacing, boxes, res.clicks, res.clicks_order, prev)
        out = runner.run(current)
        segs = out.segs
        if out.error:
            log.error("%s step %d: %s", case_path.name, step + 1, out.error)
        shown = segs if segs is not None else np.zeros(gts.shape, np.uint8)
        all_segs.append(shown.astype(np.uint8 if len(classes) <= 255 else np.uint16))
        dsc, nsd = score_step(gts, shown, sp_metric, config.tolerance)
        res.steps.append(StepResult(step + 1, dsc, nsd, out.seconds, added, error=out.error))
        if progress is not None:
            progress.update(1)
    if any(s.error for s in res.steps):
        res.error = "; ".join(f"step {s.step}: {s.error}" for s in res.steps if s.error)
    return res, all_segs


# --------------------------------------------------------------------------- folder, outputs

@dataclass
class InteractiveRun:
    results: list[InteractiveResult]
    config: InteractiveConfig
    runner: str
    cases_dir: str
    gts_dir: str | None


def evaluate_interactive(cases_dir: str | Path, runner: StepRunner, out_dir: str | Path, gts_dir: str | Path | None = None,
                         config: InteractiveConfig = InteractiveConfig(), progress: bool = True) -> InteractiveRun:
    """The protocol on every case of ``cases_dir``; writes ``out_dir/segs/<case>.npz`` (segs, all_segs)."""
    from tqdm import tqdm

    files = require_cases(cases_dir)
    if gts_dir is not None and not Path(gts_dir).is_dir():
        raise UsageError(f"reference folder {gts_dir} does not exist")
    out = Path(out_dir)
    work = out / "work"
    try:
        for d in (out / "segs", work):
            d.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"output folder {out} cannot be created: {exc.strerror or exc}") from None
    results = []
    bar = tqdm(total=len(files) * (config.clicks + 1), desc="interactive", unit="step", disable=not progress)
    try:
        for f in files:
            bar.set_postfix_str(f.name[:40])
            try:
                res, all_segs = run_case(f, runner, work, Path(gts_dir) if gts_dir is not None else None, config, bar)
            except Exception as exc:  # noqa: BLE001 - one case's failure must not stop the others
                log.error("%s: FAILED: %s: %s", f.name, type(exc).__name__, exc)
                res, all_segs = InteractiveResult(f.name, status=FAILED, error=f"{type(exc).__name__}: {exc}",
                                                  clicks_n=config.clicks), []
            if all_segs:
                atomic_savez(out / "segs" / f.name, segs=all_segs[-1], all_segs=np.stack(all_segs))
            (work / f.name).unlink(missing_ok=True)
            results.append(res)
            if res.status == OK:
                log.info("%s: DSC per step %s, %.2f s in all (limit %.0f s)", f.name,
                         " ".join(f"{d:.3f}" for d in res.dscs), res.total_seconds, res.limit_seconds)
    finally:
        bar.close()
        runner.close()
        try:
            work.rmdir()
        except OSError:
            pass
    return InteractiveRun(results, config, runner.label, str(cases_dir), None if gts_dir is None else str(gts_dir))


def _headers(n_steps: int) -> list[str]:
    return (["CaseName", "num_class", "runtime_upperbound", "TotalRunningTime"]
            + [f"RunningTime_{i}" for i in range(1, n_steps + 1)]
            + ["DSC_AUC", "NSD_AUC", "DSC_Final", "NSD_Final"]
            + [f"DSC_{i}" for i in range(1, n_steps + 1)] + [f"NSD_{i}" for i in range(1, n_steps + 1)]
            + ["within_time_limit", "status", "error"])


def csv_rows(run: InteractiveRun) -> tuple[list[str], list[list[str]]]:
    n = run.config.clicks + 1
    rows = []
    for r in run.results:
        steps = r.steps + [None] * (n - len(r.steps))  # type: ignore[list-item]
        row = [r.case, str(r.num_class), csv_float(r.limit_seconds, 2), csv_float(r.total_seconds, 3)]
        row += [csv_float(s.seconds, 3) if s else "" for s in steps]
        row += [csv_float(v) for v in (r.dsc_auc, r.nsd_auc, r.dsc_final, r.nsd_final)]
        row += [csv_float(s.dsc) if s else "" for s in steps] + [csv_float(s.nsd) if s else "" for s in steps]
        row += [str(r.within_limit) if r.status == OK else "", r.status, r.error or ""]
        rows.append(row)
    return _headers(n), rows


def _mean(vals: Sequence[float]) -> float:
    v = [x for x in vals if not math.isnan(x)]
    return float(np.mean(v)) if v else float("nan")


def summary(run: InteractiveRun) -> dict[str, Any]:
    ok = [r for r in run.results if r.status == OK]
    n = run.config.clicks + 1
    return {
        "cases": len(run.results),
        "failed": len(run.results) - len(ok),
        "DSC_AUC": _mean([r.dsc_auc for r in ok]),
        "NSD_AUC": _mean([r.nsd_auc for r in ok]),
        "DSC_Final": _mean([r.dsc_final for r in ok]),
        "NSD_Final": _mean([r.nsd_final for r in ok]),
        "DSC_per_step": [_mean([r.steps[i].dsc for r in ok if len(r.steps) > i]) for i in range(n)],
        "NSD_per_step": [_mean([r.steps[i].nsd for r in ok if len(r.steps) > i]) for i in range(n)],
        "seconds_per_step": [_mean([r.steps[i].seconds for r in ok if len(r.steps) > i and not r.steps[i].skipped])
                             for i in range(n)],
        "over_time_limit": [r.case for r in ok if not r.within_limit],
    }


def _step_names(n: int) -> list[str]:
    return ["box"] + [f"click {i}" for i in range(1, n)]


def render_markdown(run: InteractiveRun, plot_name: str | None) -> str:
    s = summary(run)
    n = run.config.clicks + 1
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "# Interactive evaluation (CVPR 2025 protocol)\n\n",
        f"- cases: `{run.cases_dir}`; references: `{run.gts_dir or 'the gts key of each case'}`\n",
        f"- model: `{run.runner}`\n- box step + {run.config.clicks} click steps, click tie seed {run.config.seed}, "
        f"NSD tolerance {run.config.tolerance:g}; AUC: trapezoid over the {run.config.clicks} click steps\n",
        f"- time limit per case: {run.config.seconds_per_class:g} s x classes, on the sum of the step times\n",
        f"- computed: {when}\n\n## Means\n\n",
        markdown_table(["cases", "failed", "DSC_AUC", "NSD_AUC", "DSC_Final", "NSD_Final", "over time limit"],
                       [[str(s["cases"]), str(s["failed"]), s["DSC_AUC"], s["NSD_AUC"], s["DSC_Final"], s["NSD_Final"],
                         str(len(s["over_time_limit"]))]]),
        "\n### Per step\n\n",
        markdown_table(["step", "DSC", "NSD", "mean s"],
                       [[name, s["DSC_per_step"][i], s["NSD_per_step"][i],
                         "-" if math.isnan(s["seconds_per_step"][i]) else f"{s['seconds_per_step'][i]:.2f}"]
                        for i, name in enumerate(_step_names(n))], align_right=[False, True, True, True]),
    ]
    if plot_name:
        parts.append(f"\n![DSC per step]({plot_name})\n")
    parts += [
        "\n## Cases\n\n",
        markdown_table(["case", "classes", "DSC per step", "DSC_AUC", "NSD_AUC", "DSC_Final", "NSD_Final",
                        "total s", "limit s", "status"],
                       [[r.case, str(r.num_class), " ".join(f"{d:.3f}" for d in r.dscs), r.dsc_auc, r.nsd_auc,
                         r.dsc_final, r.nsd_final, f"{r.total_seconds:.2f}", f"{r.limit_seconds:.0f}",
                         r.status if r.status != OK else ("ok" if r.within_limit else "over time limit")]
                        for r in run.results],
                       align_right=[False, True, False, True, True, True, True, True, True, False]),
    ]
    bad = [r for r in run.results if r.error]
    if bad:
        parts += ["\n## Errors\n\n", markdown_table(["case", "error"], [[r.case, r.error or ""] for r in bad],
                                                    align_right=[False, False])]
    return "".join(parts)


def plot_dsc_per_step(run: InteractiveRun, path: Path) -> Path | None:
    """DSC per step, one line per case and the mean."""
    ok = [r for r in run.results if r.status == OK and r.steps]
    if not ok:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = run.config.clicks + 1
    x = np.arange(1, n + 1)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for r in ok:
        ax.plot(x[: len(r.dscs)], r.dscs, marker="o", ms=3, lw=1, alpha=0.6, label=r.case.removesuffix(".npz")[:32])
    mean = summary(run)["DSC_per_step"]
    ax.plot(x, mean, color="black", lw=2.5, marker="s", label="mean")
    ax.set_xticks(x, _step_names(n))
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("DSC")
    ax.set_title("DSC per interaction step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_outputs(run: InteractiveRun, out_dir: str | Path) -> list[Path]:
    """``interactive.csv``, ``interactive.md``, ``dsc_per_step.png`` and ``clicks.json`` in ``out_dir``."""
    out = Path(out_dir)
    headers, rows = csv_rows(run)
    paths = [atomic_write_text(out / "interactive.csv", csv_text(headers, rows))]
    try:
        plot = plot_dsc_per_step(run, out / "dsc_per_step.png")
    except Exception as exc:  # noqa: BLE001 - a plot must not lose the tables
        log.warning("no plot: %s", exc)
        plot = None
    paths.append(atomic_write_text(out / "interactive.md", render_markdown(run, plot.name if plot else None)))
    if plot:
        paths.append(plot)
    clicks = {r.case: {"clicks": r.clicks, "clicks_order": r.clicks_order} for r in run.results}
    paths.append(atomic_write_text(out / "clicks.json", json.dumps(clicks, indent=1)))
    return paths


def print_table(run: InteractiveRun) -> str:
    s = summary(run)
    rows = [[r.case, " ".join(f"{d:.3f}" for d in r.dscs), r.dsc_auc, r.dsc_final, r.nsd_final,
             f"{r.total_seconds:.2f}/{r.limit_seconds:.0f}", r.status] for r in run.results]
    rows.append(["mean", " ".join(f"{d:.3f}" for d in s["DSC_per_step"]), s["DSC_AUC"], s["DSC_Final"], s["NSD_Final"],
                 "", f"{s['failed']} failed"])
    return text_table(["case", "DSC per step", "DSC_AUC", "DSC_Final", "NSD_Final", "s/limit", "status"], rows)


def make_model_runner(model_dir: str | Path, out_dir: Path, backend: str = "openvino", threads: int | None = None,
                      precision: str = "fp32", precision_hint: str | None = None, cache_dir: str | None = None,
                      predictor_config: Any = None) -> ModelRunner:
    from lapsam.runtime.predictor import Predictor

    try:
        pred = Predictor.from_model_dir(model_dir, backend=backend, threads=threads, precision=precision,
                                        cache_dir=cache_dir, precision_hint=precision_hint, config=predictor_config)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise LapsamError(f"--model {model_dir}: {exc}") from None
    outputs = Path(out_dir) / "work" / "outputs"
    outputs.mkdir(parents=True, exist_ok=True)
    return ModelRunner(pred, outputs, str(model_dir))
