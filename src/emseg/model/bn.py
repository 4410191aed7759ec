"""Precise BatchNorm statistics.

BatchNorm running statistics are an exponential average that lags behind weights which change
fast, so right after a short training the eval-mode network sees stale statistics and its
predictions drift (with smp's efficientnet momentum of 0.01 they collapse to background). Before
each validation and at the end of training we recompute the statistics exactly, as a plain average
over a few batches of training patches with the current weights.
"""

from __future__ import annotations

import itertools

import torch
from lightning.pytorch.callbacks import Callback
from torch import nn


@torch.no_grad()
def recalibrate_batchnorm(net: nn.Module, batches, max_batches: int = 8) -> int:
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    was_training = net.training
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: an exact mean over the batches seen
    net.train()
    device = next(net.parameters()).device
    n = 0
    for x, *_ in itertools.islice(batches, max_batches):
        net(x.to(device))
        n += 1
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    net.train(was_training)
    return n


class PreciseBatchNorm(Callback):
    """Recompute BatchNorm statistics on training patches before every validation."""

    def __init__(self, max_batches: int = 6):
        self.max_batches = max_batches

    def on_validation_start(self, trainer, pl_module):
        if trainer.sanity_checking or trainer.datamodule is None:
            return
        loader = trainer.datamodule.train_dataloader()
        # The network only: a mean teacher (train.semi) normalises by each batch's own statistics.
        recalibrate_batchnorm(pl_module.net, iter(loader), self.max_batches)
        if trainer.world_size > 1:
            pool_statistics(pl_module.net, trainer.strategy)
        pl_module.eval()


@torch.no_grad()
def pool_statistics(net: nn.Module, strategy) -> None:
    """DDP: every rank recalibrated on its own share of the patches (as many batches each); pool them
    into the statistics of all those patches, the same on every rank: the mean of the means, and the
    mean of the second moments less the square of that mean."""
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            mean = strategy.reduce(m.running_mean.clone(), reduce_op="mean")
            second = strategy.reduce(m.running_var + m.running_mean ** 2, reduce_op="mean")
            m.running_mean.copy_(mean)
            m.running_var.copy_((second - mean ** 2).clamp_min(0))
