"""A training budget in minutes sets the learning-rate schedule: real Lightning fits on generated slices."""

from __future__ import annotations

import pytest
from lightning.pytorch.callbacks import Callback

from conftest import SMALL_GENERATED
from emseg.config import parse_params
from emseg.model.schedule import cosine
from emseg.model.train import fit

LR = 3e-3
LOW = LR * 0.05  # the schedule's floor (train.encoder_lr_factor 1)


class LearningRates(Callback):
    """The learning rate each optimiser step was taken with (both parameter groups)."""

    def __init__(self):
        self.steps: list[tuple[float, float]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.steps.append(tuple(g["lr"] for g in optimizer.param_groups))


def _fit(prepared, work, **train):
    params = parse_params({**SMALL_GENERATED, "model": {"decoder_channels": [32, 16, 16, 8, 8]},
                           "train": {"patch_size": 64, "batch_size": 4, "early_stopping_patience": 10**6,
                                     **{"patches_per_epoch": 8, **train}}})
    rates = LearningRates()
    res = fit(params, prepared, work, lr=LR, batch_size=4, callbacks=[rates], progress=False, checkpoints=False)
    assert all(a == b for a, b in rates.steps)  # encoder and decoder alike (train.encoder_lr_factor 1)
    return res, [a for a, _ in rates.steps]


def test_minutes_run_out_first_and_the_cosine_still_anneals(small_prepared, tmp_path):
    # 12 s for an epoch cap that would take hours: an epoch-based cosine would still be at its start.
    res, lrs = _fit(small_prepared, tmp_path, max_epochs=100_000, max_minutes=0.2, patches_per_epoch=48)
    assert res.epochs < 100_000 and res.seconds >= 11.5  # stopped by the clock
    assert len(lrs) >= 12
    assert lrs[0] > 0.95 * LR  # starts at the learning rate asked for...
    assert all(b <= a + 1e-12 for a, b in zip(lrs, lrs[1:]))  # ...falls at every step...
    assert lrs[-1] < LOW + 0.05 * (LR - LOW)  # ...and the last step is taken near the floor
    assert lrs[len(lrs) // 2] < 0.9 * LR and lrs[len(lrs) // 2] > LOW + 0.1 * (LR - LOW)  # a curve, not a drop
    assert res.extra["schedule_progress"] > 0.95


def test_steps_run_out_first_and_the_cosine_follows_them(small_prepared, tmp_path):
    # 4 epochs of 2 steps in a 10-minute budget: the planned steps end first, exactly on the cosine.
    res, lrs = _fit(small_prepared, tmp_path, max_epochs=4, max_minutes=10)
    assert res.epochs == 4 and len(lrs) == 8
    for k, lr in enumerate(lrs[1:], start=1):
        assert lr == pytest.approx(cosine(LR, LOW, k / 8), rel=1e-9)
    assert res.extra["schedule_progress"] == 1.0  # every planned step taken


def test_without_a_budget_the_schedule_is_the_epoch_cosine(small_prepared, tmp_path):
    res, lrs = _fit(small_prepared, tmp_path, max_epochs=4)
    assert len(lrs) == 8 and res.extra["schedule_progress"] is None
    assert lrs[0] == lrs[1] == pytest.approx(LR) and lrs[2] == lrs[3] < LR  # stepped once per epoch
    assert lrs[2] == pytest.approx(cosine(LR, LOW, 1 / 4), rel=1e-6)


def test_a_checkpoint_from_before_the_schedule_resumes_with_its_rates():
    from emseg.model.module import SegmentationModule
    from emseg.model.network import model_spec

    module = SegmentationModule(model_spec(parse_params({"model": {"decoder_channels": [32, 16, 16, 8, 8]}}).model),
                                lr=LR, weight_decay=0.0, loss={}, encoder_lr_factor=0.5)
    groups = [{"lr": 1e-4, "params": [0]}, {"lr": 2e-4, "params": [1]}]  # as saved before the schedule
    old = {"optimizer_states": [{"state": {}, "param_groups": groups}]}
    module.on_load_checkpoint(old)
    assert [(g["base_lr"], g["min_lr"]) for g in groups] == [(LR * 0.5, LR * 0.025), (LR, LR * 0.025)]
    assert [g["lr"] for g in groups] == [1e-4, 2e-4]  # where the interrupted run had got to
