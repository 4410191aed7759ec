"""LightningModule (the training step) and LightningDataModule (patches in, whole slices for validation)."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader

from emseg import IGNORE
from emseg.config import TrainParams
from emseg.data.augment import Augmenter
from emseg.data.patches import MixedPatches, PatchDataset, SliceDataset, pad_crops
from emseg.data.prepare import load_split
from emseg.metrics import add_counts, confusion, scores
from emseg.model.losses import segmentation_loss
from emseg.model.network import SegmentationNet


class SegmentationModule(L.LightningModule):
    def __init__(self, spec: dict, lr: float, weight_decay: float, loss: dict, threshold: float = 0.5,
                 encoder_lr_factor: float = 1.0):
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
        lr, factor = self.hparams.lr, self.hparams.get("encoder_lr_factor", 1.0)
        encoder = list(self.net.net.encoder.parameters())
        ids = {id(p) for p in encoder}
        rest = [p for p in self.parameters() if id(p) not in ids]
        # Fine-tuning: a pretrained encoder may learn more slowly than the decoder (factor < 1).
        groups = [{"params": encoder, "lr": lr * factor}, {"params": rest, "lr": lr}]
        opt = torch.optim.AdamW(groups, lr=lr, weight_decay=self.hparams.weight_decay)
        max_epochs = (self.trainer.max_epochs
                      if self.trainer and self.trainer.max_epochs and self.trainer.max_epochs > 0 else 50)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max_epochs, eta_min=lr * 0.05 * min(factor, 1.0))
        return {"optimizer": opt, "lr_scheduler": sched}


class ArraySplits:
    """Training and validation arrays held by the caller (active learning, learning curves).

    ``sources``: several (images, labels) training stacks (pretraining on several datasets): each
    gets an equal share of every epoch's patches, whatever its size (balanced sampling), and
    ``val_sources`` their validation slices."""

    def __init__(self, train_images=None, train_labels=None, val_images=None, val_labels=None, *,
                 sources=None, val_sources=None):
        self.sources = list(sources) if sources else [(train_images, train_labels)]
        self.val_sources = list(val_sources) if val_sources else [(val_images, val_labels)]
        self.train, self.val = self.sources[0], self.val_sources[0]


class EMDataModule(L.LightningDataModule):
    """``data``: a prepared folder (train/val splits on disk) or an ``ArraySplits``."""

    def __init__(self, data, cfg: TrainParams, batch_size: int, seed: int):
        super().__init__()
        self.data, self.cfg, self.batch_size, self.seed = data, cfg, batch_size, seed

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        extra = None
        if isinstance(self.data, ArraySplits):
            (x, y), (vx, vy) = self.data.train, self.data.val
        else:
            x, y = load_split(Path(self.data), "train")
            vx, vy = load_split(Path(self.data), "val")
            if (Path(self.data) / "annotations_images.npy").exists():
                extra = load_split(Path(self.data), "annotations", mmap=False)
        cfg, aug = self.cfg, Augmenter(self.cfg.augment)
        if isinstance(self.data, ArraySplits) and len(self.data.sources) > 1:
            k = len(self.data.sources)
            share = [cfg.patches_per_epoch // k + (i < cfg.patches_per_epoch % k) for i in range(k)]
            self.train_set = MixedPatches([PatchDataset(sx, sy, cfg.patch_size, n, cfg.foreground_bias, aug,
                                                        self.seed + i)
                                           for i, ((sx, sy), n) in enumerate(zip(self.data.sources, share))])
            self.val_set = ConcatDataset([SliceDataset(a, b) for a, b in self.data.val_sources])
            return
        if extra is None:
            self.train_set = PatchDataset(x, y, cfg.patch_size, cfg.patches_per_epoch, cfg.foreground_bias, aug,
                                          self.seed)
        else:
            # Painted suggestion crops: their share of the patches follows their share of the labelled
            # pixels, kept between a quarter and three quarters (they were chosen for being informative).
            ex, ey = pad_crops(*extra, cfg.patch_size)
            share = (ey != IGNORE).sum() / max(1, (ey != IGNORE).sum() + (np.asarray(y) != IGNORE).sum())
            n_extra = int(round(cfg.patches_per_epoch * min(max(share, 0.25), 0.75)))
            self.train_set = MixedPatches([
                PatchDataset(x, y, cfg.patch_size, cfg.patches_per_epoch - n_extra, cfg.foreground_bias, aug,
                             self.seed),
                PatchDataset(ex, ey, cfg.patch_size, n_extra, cfg.foreground_bias, aug, self.seed + 1)])
        self.val_set = SliceDataset(vx, vy)

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=False, num_workers=self.cfg.num_workers,
                          drop_last=len(self.train_set) > self.batch_size)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=1, num_workers=self.cfg.num_workers)
