"""DDP that runs (issue 19 item 2): `emseg train` with two CPU processes (gloo) leaves one MLflow run,
one model and one set of reports; its validation IoU is that of the whole validation split (confusion
counts summed over the ranks); and it trains like one process with twice the batch."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from conftest import TINY, make_project, mlflow_client, run_cli, write_params

pytestmark = pytest.mark.slow

DATA = {"data": {"source": "generated", "train_slices": 3, "val_slices": 2,
                 "generated": {"slices": 14, "test_slices": 2, "height": 256, "width": 320}}}


def _train(proj, updates):
    write_params(proj, {"train": {"use_tuned": False, "accelerator": "cpu", "max_epochs": 6,
                                  "patches_per_epoch": 48, "lr": 0.003, **updates}})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = run_cli(["emseg", "train"], proj, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads((proj / "reports/train/metrics.json").read_text())


def _pooled_val_iou(proj) -> tuple[float, list[float]]:
    """The saved model on every validation slice: IoU of the summed counts, and each slice's own IoU."""
    from emseg.data.prepare import load_split
    from emseg.inference import predict_slice
    from emseg.metrics import add_counts, confusion, scores
    from emseg.model.network import load_weights

    net, _ = load_weights(proj / "models/model.pt")
    vx, vy = load_split(proj / "data/prepared", "val")
    counts, per_slice = {}, []
    for x, y in zip(vx, vy):
        c = confusion(predict_slice(net, x) > 0.5, np.asarray(y))
        counts = add_counts(counts, c)
        per_slice.append(scores(c)["iou"])
    return scores(counts)["iou"], per_slice


def test_ddp_on_two_cpu_processes_leaves_one_run_and_matches_one_process(tmp_path):
    proj = make_project(tmp_path / "proj", git=False)
    write_params(proj, {**TINY, **DATA})
    for stage in ("fetch", "prepare"):
        run_cli(["emseg", stage], proj, check=True)

    _, ddp = _train(proj, {"strategy": "ddp", "devices": 2, "batch_size": 4})
    runs = mlflow_client(proj).search_runs(
        [e.experiment_id for e in mlflow_client(proj).search_experiments()], "attributes.run_name LIKE 'train-%'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert sorted(p.name for p in (proj / "models").iterdir()) == ["model.pt"]
    assert {"metrics.json", "history.csv", "curves.png", "val_overlays.png", "run.json"} <= {
        p.name for p in (proj / "reports/train").iterdir()}
    history = (proj / "reports/train/history.csv").read_text().splitlines()
    assert len(history) == 1 + ddp["epochs"]  # one row per epoch: rank 0 alone wrote it

    # Each rank validated one of the two slices; the IoU reported is that of the pair, counted together.
    pooled, per_slice = _pooled_val_iou(proj)
    assert ddp["best_val_iou"] == pytest.approx(pooled, abs=2e-3), (ddp, pooled, per_slice)
    assert ddp["best_val_iou"] > 0.4  # it learnt: 0.10 after its first epoch

    # One process with twice the batch sees the same patches in the same steps (test below) and averages
    # the same gradients. What differs on the CPU: BatchNorm normalises each rank's 4 patches by their
    # own statistics (torch's SyncBatchNorm is GPU-only), EfficientNet's stochastic-depth masks are
    # drawn per process, and the all-reduce sums in another order. Training losses follow each other
    # closely (0.07 apart at most when written); validation IoU after 6 short epochs swings by 0.1 between
    # neighbouring epochs of one run, so the best ones are compared to 0.15 (0.630 and 0.741 when written).
    _, single = _train(proj, {"strategy": "auto", "devices": 1, "batch_size": 8})
    assert single["epochs"] == ddp["epochs"]
    client = mlflow_client(proj)
    ddp_run, single_run = sorted(client.search_runs([runs[0].info.experiment_id]), key=lambda r: r.info.start_time)
    losses = [[m.value for m in sorted(client.get_metric_history(r.info.run_id, "train_loss"), key=lambda m: m.step)]
              for r in (ddp_run, single_run)]
    assert len(losses[0]) == len(losses[1]) == ddp["epochs"]
    assert max(abs(a - b) for a, b in zip(*losses)) < 0.12, losses
    assert losses[0][-1] < losses[0][0] - 0.2 and losses[1][-1] < losses[1][0] - 0.2, losses
    assert single["best_val_iou"] == pytest.approx(ddp["best_val_iou"], abs=0.15), (single, ddp)


class _Rank:
    """What the data module asks of its trainer: this process's rank and the number of processes."""

    def __init__(self, rank: int, world: int):
        self.global_rank, self.world_size = rank, world


def test_the_ranks_take_one_process_batches_between_them_and_each_validation_slice_once():
    from emseg.config import TrainParams
    from emseg.data.datamodule import ArraySplits, EMDataModule
    from emseg.data.generate import generate_stack
    from emseg.errors import ConfigError

    x, y = generate_stack(3, 6, 128, 160)
    splits = ArraySplits(x[:3].astype(np.float32), y[:3], x[3:].astype(np.float32), y[3:])
    cfg = TrainParams(patch_size=64, patches_per_epoch=24)

    def loaders(rank, world, batch):
        dm = EMDataModule(splits, cfg, batch, seed=0)
        dm.trainer = _Rank(rank, world) if world > 1 else None
        dm.setup("fit")
        return dm.train_dataloader(), dm.val_dataloader()

    single_train, single_val = loaders(0, 1, 8)
    ranks = [loaders(r, 2, 4) for r in range(2)]
    steps = list(zip(single_train, *(t for t, _ in ranks)))
    assert len(steps) == 3
    for (xb, yb), (x0, y0), (x1, y1) in steps:
        # The 8 patches of a one-process step are the two ranks' 4 each, interleaved.
        assert np.array_equal(xb[0::2].numpy(), x0.numpy()) and np.array_equal(xb[1::2].numpy(), x1.numpy())
        assert np.array_equal(yb[0::2].numpy(), y0.numpy()) and np.array_equal(yb[1::2].numpy(), y1.numpy())
    seen = [float(v[0].sum()) for _, val in ranks for v in val]
    assert sorted(seen) == sorted(float(v[0].sum()) for v in single_val) and len(seen) == 3  # each slice once
    with pytest.raises(ConfigError, match="4 processes need at least 4 validation slices"):
        loaders(0, 4, 4)[1]
