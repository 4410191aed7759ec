"""The learning-rate schedule under a training budget in minutes (``train.max_minutes``).

Without a budget, the learning rate follows a cosine over ``max_epochs``. With one, a cosine over epochs
anneals only if every planned epoch fits in the minutes: on a slower machine, or a slower hour of the
same one, time runs out first and the run keeps a network trained at a still-high learning rate. Under
a budget the cosine therefore follows whichever runs out first, measured at every step:

    progress p = max(steps done / steps planned, seconds used / seconds allowed)
    lr = lr_min + (lr_base - lr_min) * (1 + cos(pi * p)) / 2

so the last step of a run is taken near ``lr_min`` whatever the machine's speed. Seconds used come from
Lightning's Timer (the one ``Trainer(max_time=...)`` adds, which counts validation too and is kept in
checkpoints), so a resumed run carries on its schedule where it stopped."""

from __future__ import annotations

import math

from lightning.pytorch.callbacks import Callback, Timer


def cosine(base: float, low: float, progress: float) -> float:
    p = min(max(progress, 0.0), 1.0)
    return low + (base - low) * 0.5 * (1.0 + math.cos(math.pi * p))


class BudgetCosine(Callback):
    """Sets each parameter group's ``lr`` from its ``base_lr`` and ``min_lr`` keys before every step."""

    def __init__(self, seconds: float):
        if seconds <= 0:
            raise ValueError(f"a training budget must be positive, got {seconds} s")
        self.seconds = float(seconds)
        self.progress = 0.0  # how far down the cosine training got: 1.0 at its end

    @staticmethod
    def _timer(trainer) -> Timer:
        for cb in trainer.callbacks:
            if isinstance(cb, Timer):
                return cb
        raise RuntimeError("BudgetCosine needs the Timer that Trainer(max_time=...) adds")

    def _progress(self, trainer) -> float:
        planned = trainer.estimated_stepping_batches
        by_steps = trainer.global_step / planned if math.isfinite(planned) and planned > 0 else 0.0
        progress = max(by_steps, self._timer(trainer).time_elapsed() / self.seconds)
        # DDP: every rank must step with the same learning rate; rank 0's clock decides.
        return float(trainer.strategy.broadcast(progress, src=0))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.progress = self._progress(trainer)
        for opt in trainer.optimizers:
            for group in opt.param_groups:
                group["lr"] = cosine(group["base_lr"], group["min_lr"], self.progress)

    def on_train_end(self, trainer, pl_module) -> None:
        # Also when no step ran (a resumed run whose minutes were already spent).
        self.progress = max(self.progress, min(self._progress(trainer), 1.0))
