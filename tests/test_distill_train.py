"""Both training stages on the shared cases (CPU, small), DDP with gloo under torchrun, resume."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from lapsam.distill.config import EncoderConfig, FinetuneConfig, load_config  # noqa: E402

torch.set_num_threads(1)  # the dev machine's 2 cores are shared: one thread per process is fastest


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fp:
        return list(csv.DictReader(fp))


def test_stage1_feature_mse_falls_on_held_out_slices(tmp_path: Path, imgs_dir: Path) -> None:
    from lapsam.distill import encoder_stage
    from lapsam.distill.feature_cache import FeatureCache
    from lapsam.distill.modeling import load_lapsam
    from lapsam.distill.teacher import Teacher
    from lapsam.distill.trainer import build_model

    train = [imgs_dir / f"{n}.npz" for n in ("2DBox_CT_amos_0004_75", "2DBox_CT_amos_0006_90",
                                             "3DBox_CT_TotalSegSmall", "3DBox_MR_Breast1")]
    val = [imgs_dir / f"{n}.npz" for n in ("2DBox_CT_s0114_111", "3DBox_CT_Lesion_000001_02_01_008-023")]
    cfg = load_config(EncoderConfig, "encoder.yaml", [
        f"train.out_dir={tmp_path / 'enc'}", f"data.train={[str(p) for p in train]}", f"data.val={[str(p) for p in val]}",
        "data.slice_stride=4", "data.val_max_slices_per_case=4", "data.num_workers=0",
        "model.backbone=efficientvit_b0", "model.input_size=128", "model.teacher=t", "model.teacher_image_size=256",
        "train.batch_size=4", "train.epochs=6", "train.lr=3e-3", "train.warmup_steps=5", "train.threads=1",
        "train.log_every=1", "cache.enabled=true",
    ])
    calls = []
    orig = Teacher.forward

    def counting(self, images, out_size=None):
        calls.append(images.shape[0])
        return orig(self, images, out_size)

    Teacher.forward = counting
    try:
        summary = encoder_stage.train_encoder(cfg)
    finally:
        Teacher.forward = orig
    from lapsam.distill.data import CaseStore, find_cases, index_slices

    n_train = len(index_slices(CaseStore(find_cases(cfg.data.train)), False, 4))
    store = CaseStore(find_cases(cfg.data.val))
    refs = index_slices(store, False, 1, 4)
    # The teacher ran once per cached slice (training + validation), never during training.
    assert sum(calls) == n_train + len(refs)
    assert summary["step"] == 6 * (n_train // 4)

    # Held-out MSE (against the cached teacher features) before and after training.
    val_cache = FeatureCache(tmp_path / "enc" / "teacher_cache" / "val", len(refs), 128, {}, create=False)
    from lapsam.distill.data import FeatureSliceDataset

    init = build_model(cfg.model, cfg.train.seed).eval()
    ds = FeatureSliceDataset(store, refs, init.preprocessing)
    x = torch.stack([torch.from_numpy(ds[i]["image"]) for i in range(len(ds))])
    tgt = val_cache.get(list(range(len(ds))))

    def mse(model) -> float:
        with torch.no_grad():
            return sum(float(torch.nn.functional.mse_loss(p, t)) for p, t in zip(model.encode(x), tgt, strict=True))

    before, after = mse(init), mse(load_lapsam(tmp_path / "enc" / "last.pt"))
    assert after <= 0.7 * before, (before, after)
    rows = _rows(tmp_path / "enc" / "val_log.csv")
    assert float(rows[-1]["val_mse"]) == pytest.approx(after, rel=0.05)
    assert (tmp_path / "enc" / "best.pt").is_file()


@pytest.mark.slow
def test_stage2_fits_training_cases(tmp_path: Path, imgs_dir: Path) -> None:
    from lapsam.distill.finetune_stage import train_finetune

    cases = [str(imgs_dir / f"{n}.npz") for n in ("3DBox_CT_TotalSegSmall", "3DBox_CT_Lesion_000010_01_01_078-090")]
    cfg = load_config(FinetuneConfig, "finetune.yaml", [
        f"train.out_dir={tmp_path / 'ft'}", f"data.train={cases}", f"data.val={cases}", "data.num_workers=0",
        "model.init_checkpoint=null", "model.backbone=efficientvit_b0", "model.input_size=128",
        "train.batch_size=4", "train.epochs=50", "train.lr=1e-3", "train.warmup_steps=10", "train.threads=1",
        "train.validate_every_epochs=50", "train.log_every=10", "data.samples_per_epoch=16",
        "prompt.objects_per_image=8", "prompt.box_jitter=0.05", "prompt.point_prob=0",
        "loss.focal=0", "loss.bce=1", "augment.enabled=false",
    ])
    summary = train_finetune(cfg)
    val = summary["val"]
    assert val["dsc"] > 0.8, val
    assert set(val) == {"dsc", "dsc_CT"}
    assert (tmp_path / "ft" / "best.pt").is_file() and (tmp_path / "ft" / "last.pt").is_file()
    losses = [float(r["loss"]) for r in _rows(tmp_path / "ft" / "train_log.csv")]
    assert losses[-1] < losses[0]


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
           "-m", "lapsam.cli", "-q", "distill", "finetune", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace",
                          timeout=480)


@pytest.mark.slow
def test_ddp_gloo_identical_ranks_and_exact_resume(tmp_path: Path, imgs_dir: Path, repo_root: Path) -> None:
    case = str(imgs_dir / "2DBox_CT_amos_0006_90.npz")
    common = [f"data.train=[{case}]", "data.val=[]", "data.num_workers=0", "data.samples_per_epoch=8",
              "model.init_checkpoint=null", "model.backbone=efficientvit_b0", "model.input_size=128",
              "train.batch_size=2", "train.epochs=2", "train.threads=1", "train.log_every=1", "train.warmup_steps=1",
              "train.validate_every_epochs=0", "train.save_rank_params=true", "prompt.objects_per_image=2"]
    sets = lambda extra: [a for kv in common + extra for a in ("--set", kv)]  # noqa: E731
    # Run A: 4 steps (2 epochs x 2 steps per rank), keeping a checkpoint after step 3 (mid-epoch).
    a = _torchrun(sets([f"train.out_dir={tmp_path / 'a'}", "train.save_every_steps=3", "train.keep_step_checkpoints=true"]),
                  repo_root)
    assert a.returncode == 0, a.stdout[-3000:] + a.stderr[-3000:]
    p0 = torch.load(tmp_path / "a" / "rank0_params.pt", weights_only=True)
    p1 = torch.load(tmp_path / "a" / "rank1_params.pt", weights_only=True)
    assert p0.keys() == p1.keys()
    for k in p0:
        assert torch.equal(p0[k], p1[k]), k
    init = __import__("lapsam.distill.trainer", fromlist=["build_model"]).build_model(
        load_config(FinetuneConfig, None, ["model.init_checkpoint=null", "model.backbone=efficientvit_b0",
                                           "model.input_size=128"]).model, 0).state_dict()
    assert any(not torch.equal(init[k], p0[k]) for k in p0)  # training changed the weights
    rows_a = _rows(tmp_path / "a" / "train_log.csv")
    assert [int(r["step"]) for r in rows_a] == [1, 2, 3, 4]
    # Run B: resume from A's step-3 checkpoint in a fresh folder: step 4 has A's loss.
    b = _torchrun(sets([f"train.out_dir={tmp_path / 'b'}", f"train.resume={tmp_path / 'a' / 'step_0000003.pt'}"]),
                  repo_root)
    assert b.returncode == 0, b.stdout[-3000:] + b.stderr[-3000:]
    rows_b = _rows(tmp_path / "b" / "train_log.csv")
    assert [int(r["step"]) for r in rows_b] == [4]
    assert float(rows_b[0]["loss"]) == pytest.approx(float(rows_a[-1]["loss"]), rel=1e-5, abs=1e-7)
    q0 = torch.load(tmp_path / "b" / "rank0_params.pt", weights_only=True)
    for k in p0:
        assert torch.allclose(q0[k].float(), p0[k].float(), atol=1e-5), k
    assert np.isfinite(float(rows_b[0]["loss"]))


def test_average_from_step_is_the_mean_of_the_saved_weights_across_a_resume(tmp_path: Path, imgs_dir: Path) -> None:
    from lapsam.distill.finetune_stage import train_finetune

    out = tmp_path / "avg"
    base = [f"train.out_dir={out}", f"data.train=[{imgs_dir / '2DBox_CT_amos_0006_90.npz'}]", "data.val=[]",
            "data.num_workers=0", "data.samples_per_epoch=8", "model.init_checkpoint=null",
            "model.backbone=efficientvit_b0", "model.input_size=128", "train.batch_size=4", "train.epochs=4",
            "train.threads=1", "train.warmup_steps=1", "train.lr=1e-3", "train.validate_every_epochs=0",
            "train.save_every_steps=2", "train.keep_step_checkpoints=true", "train.average_from_step=3",
            "prompt.objects_per_image=2"]
    # 8 steps (2 per epoch); stopped after step 5 (mid-epoch) and resumed from last.pt in the same folder.
    train_finetune(load_config(FinetuneConfig, "finetune.yaml", base + ["train.max_steps=5"]))
    first = torch.load(out / "average.pt", weights_only=True)
    assert first["n_averaged"] == 1  # step 4 only: step 5 (the stop) is no regular save point
    train_finetune(load_config(FinetuneConfig, "finetune.yaml", base))
    avg = torch.load(out / "average.pt", weights_only=True)
    assert avg["step"] == 8 and avg["n_averaged"] == 3 and avg["averaged_from_step"] == 3
    kept = {s: torch.load(out / f"step_{s:07d}.pt", weights_only=True)["model"] for s in (4, 6, 8)}
    assert avg["model"].keys() == kept[8].keys()
    moved = 0
    for k, v in avg["model"].items():
        if not v.is_floating_point():
            continue
        ref = torch.stack([kept[s][k].double() for s in (4, 6, 8)]).mean(0)
        assert torch.allclose(v.double(), ref, rtol=1e-5, atol=1e-6), k
        moved += not torch.allclose(v.double(), kept[8][k].double(), rtol=1e-5, atol=1e-6)
    assert moved > 0  # the average is not just the last weights
    from lapsam.distill.modeling.checkpoint import load_lapsam

    load_lapsam(out / "average.pt")  # what `lapsam export` reads
