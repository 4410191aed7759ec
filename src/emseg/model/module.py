"""LightningModule (the training step) and LightningDataModule (patches in, whole slices for validation)."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from emseg.config import TrainParams
from emseg.data.augment import Augmenter
from emseg.data.patches import PatchDataset, SliceDataset
from emseg.data.prepare import load_split
from emseg.metrics import add_counts, confusion, scores
from emseg.model.losses import segmentation_loss
from emseg.model.network import SegmentationNet


class SegmentationModule(L.LightningModule):
    def __init__(self, spec: dict, lr: float, weight_decay: float, loss: dict, threshold: float = 0.5):
        super().__init__()
        self.save_hyperparameters()
        self.net = SegmentationNet(spec)
        self.logit_threshold = math.log(threshold / (1 - threshold)) if 0 < threshold < 1 else 0.0
        self._counts = {"train": {}, "val": {}}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _step(self, batch, stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = segmentation_loss(logits.float(), y, **self.hparams.loss)
        with torch.no_grad():
            self._counts[stage] = add_counts(self._counts[stage], confusion(logits > self.logit_threshold, y))
        self.log(f"{stage}_loss", loss, on_step=False, on_epoch=True, prog_bar=stage == "val", batch_size=len(x))
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def log_epoch_scores(self, stage: str) -> None:
        """Log IoU and accuracy from the counts gathered this epoch, then reset them (idempotent)."""
        if self._counts[stage]:
            s = scores(self._counts[stage])
            self.log(f"{stage}_iou", s["iou"], prog_bar=stage == "val", sync_dist=True)
            self.log(f"{stage}_acc", s["accuracy"], sync_dist=True)
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

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        max_epochs = self.trainer.max_epochs if self.trainer and self.trainer.max_epochs and self.trainer.max_epochs > 0 else 50
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max_epochs, eta_min=self.hparams.lr * 0.05)
        return {"optimizer": opt, "lr_scheduler": sched}


class EMDataModule(L.LightningDataModule):
    def __init__(self, prepared_dir: str | Path, cfg: TrainParams, batch_size: int, seed: int):
        super().__init__()
        self.prepared_dir, self.cfg, self.batch_size, self.seed = Path(prepared_dir), cfg, batch_size, seed

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        x, y = load_split(self.prepared_dir, "train")
        vx, vy = load_split(self.prepared_dir, "val")
        self.train_set = PatchDataset(x, y, self.cfg.patch_size, self.cfg.patches_per_epoch, self.cfg.foreground_bias,
                                      Augmenter(self.cfg.augment), self.seed)
        self.val_set = SliceDataset(vx, vy)

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=False, num_workers=self.cfg.num_workers,
                          drop_last=len(self.train_set) > self.batch_size)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=1, num_workers=self.cfg.num_workers)
