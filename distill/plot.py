"""``lapsam distill plot RUN_DIR``: the training curve of a run as one PNG.

Top: training loss per logged step (thin) and its moving average; bottom: validation DSC per
epoch (the mean over modalities, thick; each modality and held-back set, thin), from the
run's ``train_log.csv`` and ``val_log.csv``.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from lapsam.writers import atomic_write


def _read(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as fp:
        return list(csv.DictReader(fp))


def plot_run(run_dir: str | Path, out: str | Path | None = None, title: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    train = _read(run_dir / "train_log.csv")
    val = _read(run_dir / "val_log.csv")
    if not train and not val:
        raise FileNotFoundError(f"{run_dir}: no train_log.csv or val_log.csv")
    out = Path(out) if out else run_dir / "training_curve.png"
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(7, 7), sharex=True)
    if train:
        steps = np.array([float(r["step"]) for r in train])
        loss = np.array([float(r["loss"]) for r in train])
        a1.plot(steps, loss, lw=0.5, alpha=0.4, color="tab:blue", label="loss")
        k = max(1, min(25, len(loss) // 10))
        if k > 1:
            ma = np.convolve(loss, np.ones(k) / k, mode="valid")
            a1.plot(steps[k - 1:], ma, lw=1.5, color="tab:blue", label=f"moving average ({k} logs)")
        a1.set_ylabel("training loss")
        a1.legend(fontsize=8)
        a1.grid(alpha=0.3)
    if val:
        vs = [float(r["step"]) for r in val]
        keys = [k for k in val[0] if k.startswith("dsc")]
        for key in keys:
            ys = [float(r[key]) if r.get(key) not in (None, "") else np.nan for r in val]
            if key == "dsc":
                a2.plot(vs, ys, lw=2.5, color="black", marker="o", label="mean over modalities")
            elif key.startswith("dsc_set_"):
                a2.plot(vs, ys, lw=1.5, ls="--", marker=".", label="held-back " + key[8:])
            else:
                a2.plot(vs, ys, lw=0.8, alpha=0.7, label=key[4:])
        a2.set_ylabel("validation DSC (tight boxes)")
        a2.set_ylim(0, 1)
        a2.legend(fontsize=7, ncol=3, loc="lower right")
        a2.grid(alpha=0.3)
    a2.set_xlabel("optimiser step")
    fig.suptitle(title or f"training curve: {run_dir.name}", fontsize=10)
    fig.tight_layout()
    with atomic_write(out) as fp:
        fig.savefig(fp, format="png", dpi=100)
    plt.close(fig)
    return out
