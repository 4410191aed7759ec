"""The LightningModule: the training and validation steps, their scores and the optimiser.

Its data come from emseg.data.datamodule (patches in, whole slices for validation)."""

from __future__ import annotations

import copy
import math

import lightning as L
import torch

from emseg.metrics import add_counts, confusion, scores
from emseg.model.losses import consistency_loss, segmentation_loss
from emseg.model.network import SegmentationNet
from emseg.model.schedule import BudgetCosine


class SegmentationModule(L.LightningModule):
    def __init__(self, spec: dict, lr: float, weight_decay: float, loss: dict, threshold: float = 0.5,
                 encoder_lr_factor: float = 1.0, semi: dict | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.net = SegmentationNet(spec)
        self.logit_threshold = math.log(threshold / (1 - threshold)) if 0 < threshold < 1 else 0.0
        self._counts = {"train": {}, "val": {}}
        self.semi = semi if semi and semi.get("weight", 0) > 0 else None
        self.teacher: SegmentationNet | None = None

    def start_teacher(self) -> None:
        """Mean teacher (train.semi): a copy of the network as initialised, then its moving average.
        Call once the network holds its starting weights; it is saved in checkpoints beside it."""
        if self.semi is not None:
            self.teacher = copy.deepcopy(self.net).requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _step(self, batch, stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = segmentation_loss(logits.float(), y, **self.hparams.loss)
        with torch.no_grad():
            self._counts[stage] = add_counts(self._counts[stage], confusion(logits > self.logit_threshold, y))
        self.log(f"{stage}_loss", loss, on_step=False, on_epoch=True, prog_bar=stage == "val", batch_size=len(x),
                 sync_dist=True)
        return loss

    def training_step(self, batch, batch_idx):
        if len(batch) == 2:
            return self._step(batch, "train")
        x, y, unlabelled = batch  # train.semi: as many unlabelled patches as labelled ones
        loss = self._step((x, y), "train")
        weight = self.consistency_weight()
        if weight > 0:
            consistency = self.consistency(unlabelled)
            self.log("train_consistency", consistency, on_step=False, on_epoch=True, batch_size=len(unlabelled))
            loss = loss + weight * consistency
        return loss

    def consistency_weight(self) -> float:
        """train.semi.weight, reached along a sigmoid ramp over the first rampup_epochs (Laine and Aila)."""
        ramp = self.semi["rampup_epochs"]
        if not ramp:
            return float(self.semi["weight"])
        t = min(1.0, (self.current_epoch + 1) / ramp)
        return float(self.semi["weight"] * math.exp(-5 * (1 - t) ** 2))

    def consistency(self, unlabelled: torch.Tensor) -> torch.Tensor:
        """The student on a perturbed copy (contrast, brightness, noise) against the teacher on the patch
        itself; the supervised loss never sees these pixels, and they never see a label."""
        with torch.no_grad():
            # Deterministic (eval: no dropped connections), but BatchNorm on this batch's statistics: the
            # running ones are the student's, not the average's (Lightning sets train mode every epoch).
            self.teacher.eval()
            for m in self.teacher.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.train()
            target = self.teacher(unlabelled)
        n = len(unlabelled)
        gain = 1 + (torch.rand(n, 1, 1, 1, device=unlabelled.device) - 0.5) * 0.4
        shift = (torch.rand(n, 1, 1, 1, device=unlabelled.device) - 0.5) * 0.4
        perturbed = unlabelled * gain + shift + self.semi["noise"] * torch.randn_like(unlabelled)
        return consistency_loss(self(perturbed).float(), target.float(), self.semi["confidence"])

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.teacher is None:
            return
        # The usual correction early on: the teacher follows closely while the average has few steps.
        decay = min(self.semi["ema"], 1 - 1 / (self.global_step + 1))
        with torch.no_grad():
            for t, s in zip(self.teacher.parameters(), self.net.parameters()):
                t.lerp_(s.detach(), 1 - decay)

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def log_epoch_scores(self, stage: str) -> None:
        """Log IoU and accuracy from the counts gathered this epoch, then reset them (idempotent).
        Under DDP the counts of all ranks are summed first: the IoU of the whole split, not a mean of
        per-rank IoUs (which would weigh a rank's few slices like another's many)."""
        counts = self._counts[stage]
        if self._trainer is not None and self.trainer.world_size > 1:
            keys = ("tp", "fp", "fn", "tn")
            local = torch.tensor([float(counts.get(k, 0)) for k in keys], dtype=torch.float64, device=self.device)
            total = self.trainer.strategy.reduce(local, reduce_op="sum")
            counts = dict(zip(keys, (int(v) for v in total.tolist()))) if float(total.sum()) > 0 else {}
        if counts:
            s = scores(counts)  # the same value on every rank: nothing left to synchronise
            self.log(f"{stage}_iou", s["iou"], prog_bar=stage == "val")
            self.log(f"{stage}_acc", s["accuracy"])
        self._counts[stage] = {}

    def on_train_epoch_start(self) -> None:
        self._counts["train"] = {}
        dm = self.trainer.datamodule
        if dm is not None and hasattr(dm, "train_set"):
            dm.train_set.set_epoch(self.current_epoch)  # fresh patches every epoch, reproducibly

    def on_train_epoch_end(self) -> None:
        self.log_epoch_scores("train")

    def on_validation_epoch_start(self) -> None:
        self._counts["val"] = {}

    def on_validation_epoch_end(self) -> None:
        self.log_epoch_scores("val")

    def group_lrs(self) -> list[tuple[float, float]]:
        """(starting, lowest) learning rate of the encoder's parameter group and of the rest's."""
        lr, factor = self.hparams.lr, self.hparams.get("encoder_lr_factor", 1.0)
        low = lr * 0.05 * min(factor, 1.0)
        return [(lr * factor, low), (lr, low)]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # A last.ckpt written before the schedule kept its rates in the optimiser's groups: add them.
        for state in checkpoint.get("optimizer_states", []):
            for group, (base, low) in zip(state.get("param_groups", []), self.group_lrs()):
                group.setdefault("base_lr", base)
                group.setdefault("min_lr", low)

    def configure_optimizers(self):
        lr = self.hparams.lr
        encoder = list(self.net.net.encoder.parameters())
        ids = {id(p) for p in encoder}
        rest = [p for p in self.net.parameters() if id(p) not in ids]  # not the mean teacher's
        # Fine-tuning: a pretrained encoder may learn more slowly than the decoder (factor < 1).
        (enc_lr, low), (rest_lr, _) = self.group_lrs()
        groups = [{"params": encoder, "lr": enc_lr, "base_lr": enc_lr, "min_lr": low},
                  {"params": rest, "lr": rest_lr, "base_lr": rest_lr, "min_lr": low}]
        opt = torch.optim.AdamW(groups, lr=lr, weight_decay=self.hparams.weight_decay)
        if any(isinstance(cb, BudgetCosine) for cb in self.trainer.callbacks):  # it sets the rate every step
            return {"optimizer": opt}
        max_epochs = (self.trainer.max_epochs
                      if self.trainer and self.trainer.max_epochs and self.trainer.max_epochs > 0 else 50)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max_epochs, eta_min=low)
        return {"optimizer": opt, "lr_scheduler": sched}
