"""The LightningDataModule: random patches of the labelled slices in, whole slices for validation.

Its data are a prepared folder (the `prepare` stage's train/val splits, with any painted suggestion
crops) or arrays held by the caller (learning curves, active learning, pretraining on several stacks).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
from torch.utils.data import ConcatDataset, DataLoader, DistributedSampler

from emseg import IGNORE
from emseg.config import TrainParams
from emseg.data.augment import Augmenter
from emseg.data.device_patches import DevicePatchSampler, DevicePatchStream, DeviceUnlabelledSampler
from emseg.data.patches import MixedPatches, PatchDataset, SliceDataset, UnlabelledPatches, WithUnlabelled, pad_crops
from emseg.data.prepare import load_split, load_unlabelled
from emseg.errors import ConfigError


class ArraySplits:
    """Training and validation arrays held by the caller (active learning, learning curves).

    ``sources``: several (images, labels) training stacks (pretraining on several datasets): each
    gets an equal share of every epoch's patches, whatever its size (balanced sampling), and
    ``val_sources`` their validation slices. ``unlabelled``: inputs without labels for train.semi."""

    def __init__(self, train_images=None, train_labels=None, val_images=None, val_labels=None, *,
                 sources=None, val_sources=None, unlabelled=None):
        self.sources = list(sources) if sources else [(train_images, train_labels)]
        self.val_sources = list(val_sources) if val_sources else [(val_images, val_labels)]
        self.train, self.val = self.sources[0], self.val_sources[0]
        self.unlabelled = unlabelled


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
        device = self._device() if extra is None else None
        if device is not None:
            sampler = DevicePatchSampler(x, y, cfg.patch_size, cfg.foreground_bias, device, self.seed)
            unlabelled = None
            if cfg.semi.weight > 0:  # the unlabelled slices live on the device too
                unlabelled = DeviceUnlabelledSampler(self._unlabelled_pool(), cfg.patch_size, device,
                                                     self.seed + 7919)
            self.train_set = DevicePatchStream(sampler, cfg.augment, cfg.patches_per_epoch, self.batch_size,
                                               unlabelled)
        elif extra is None:
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
        if cfg.semi.weight > 0 and device is None:  # the device stream carries its unlabelled patches itself
            self._join_unlabelled(aug)

    def _unlabelled_pool(self):
        """The prepared unlabelled slices (train.semi), or one clear error where there are none."""
        pool = self.data.unlabelled if isinstance(self.data, ArraySplits) else load_unlabelled(Path(self.data))
        if pool is None:
            where = "the caller's arrays" if isinstance(self.data, ArraySplits) else str(self.data)
            raise ConfigError(f"params.yaml: train.semi.weight: {self.cfg.semi.weight:g}, but {where} hold no "
                              "unlabelled slices; set data.unlabelled_slices and prepare again (dvc repro)")
        return pool

    def _join_unlabelled(self, aug: Augmenter) -> None:
        """train.semi: every labelled patch gets an unlabelled partner from the prepared unlabelled slices."""
        cfg = self.cfg
        unlabelled = UnlabelledPatches(self._unlabelled_pool(), cfg.patch_size, len(self.train_set), aug,
                                       self.seed + 7919)
        self.train_set = WithUnlabelled(self.train_set, unlabelled)

    def _device(self) -> str | None:
        """Where patches are cut, when on the training device (``train.device_patches``); None: CPU loader."""
        import torch

        gpu = torch.cuda.is_available() and self.cfg.accelerator in ("auto", "gpu", "cuda")
        if self.cfg.device_patches == "off" or (self.cfg.device_patches == "auto" and not gpu):
            return None
        if self._ranks()[1] > 1:  # each rank would draw the same batches: the CPU path splits them by rank
            return None
        return "cuda" if gpu else "cpu"

    def _ranks(self) -> tuple[int, int]:
        """(this process's rank, number of processes): (0, 1) unless training with DDP."""
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self):
        if isinstance(self.train_set, DevicePatchStream):  # ready batches, already on the device
            return DataLoader(self.train_set, batch_size=None, num_workers=0)
        rank, world = self._ranks()
        # DDP: rank r takes patches r, r + world, ...: together the epoch's patches of one process,
        # each step the patches a single process would take with world x the batch size.
        sampler = (DistributedSampler(self.train_set, num_replicas=world, rank=rank, shuffle=False)
                   if world > 1 else None)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=False, sampler=sampler,
                          num_workers=self.cfg.num_workers, drop_last=len(self.train_set) // world > self.batch_size)

    def val_dataloader(self):
        rank, world = self._ranks()
        if len(self.val_set) < world:
            raise ConfigError(f"params.yaml: train.devices: {world} processes need at least {world} validation "
                              f"slices, the data hold {len(self.val_set)} (data.val_slices)")
        # Every validation slice exactly once over the ranks (no padding: a repeated slice would count twice).
        return DataLoader(self.val_set, batch_size=1, num_workers=self.cfg.num_workers,
                          sampler=list(range(rank, len(self.val_set), world)) if world > 1 else None)
