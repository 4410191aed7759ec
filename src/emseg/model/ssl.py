"""Self-supervised pretraining: the U-Net restores masked, noisy patches of unlabelled EM.

The method is masked-image restoration for a whole encoder-decoder network (in the line of Models
Genesis, Zhou et al. 2019, and SimMIM, Xie et al. 2022, adapted to a convolutional U-Net): a patch is
augmented as for training, then blocks of it are blanked to the stack mean and noise is added over
it; the network's one output channel predicts the clean centre slice. The loss is the mean squared
error on the blanked pixels plus ``visible_weight`` times that on the others (denoising). Encoder and
decoder both learn, which suits a U-Net better than contrastive objectives, which train an encoder
for whole-image embeddings and need large batches. The blanking is albumentations' CoarseDropout,
whose ``fill_mask`` marks the blanked pixels; the rest is a few lines of torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
import albumentations as A
import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import Dataset

from emseg.data.augment import Augmenter
from emseg.data.io import context_indices
from emseg.data.patches import check_patch_fits
from emseg.data.volumes import Volume
from emseg.model.network import SegmentationNet


class Corruption:
    """Blank ``holes`` blocks (each side a ``hole_size`` share of the patch) to 0, the stack mean in
    z-score units, on every slice of the input at once; then add Gaussian noise of sd ``noise``."""

    def __init__(self, patch_size: int, holes, hole_size, noise: float):
        lo, hi = (max(1, round(f * patch_size)) for f in hole_size)
        self.dropout = A.CoarseDropout(num_holes_range=tuple(holes), hole_height_range=(lo, hi),
                                       hole_width_range=(lo, hi), fill=0.0, fill_mask=1, p=1.0)
        self.noise = noise

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(k, p, p) clean input -> (corrupted input, (p, p) uint8 mask of the blanked pixels)."""
        self.dropout.set_random_seed(int(rng.integers(2**31)))
        out = self.dropout(image=np.ascontiguousarray(np.moveaxis(image, 0, -1)),
                           mask=np.zeros(image.shape[-2:], np.uint8))
        corrupted = np.moveaxis(out["image"], -1, 0).reshape(image.shape)
        if self.noise:
            corrupted = corrupted + rng.normal(0, self.noise, corrupted.shape).astype(np.float32)
        return np.ascontiguousarray(corrupted, dtype=np.float32), out["mask"]


class RestorationPatches(Dataset):
    """Patches for restoration: (corrupted input (k, p, p), clean centre slice (1, p, p), mask (1, p, p)).
    Every stack gets the same share of each epoch, whatever its size; deterministic given
    (seed, epoch, index)."""

    def __init__(self, volumes: list[Volume], k: int, patch_size: int, length: int, corruption: Corruption,
                 augment: Augmenter | None = None, seed: int = 0):
        for v in volumes:
            check_patch_fits(patch_size, *v.data.shape[1:])
        self.volumes, self.k, self.patch, self.length = volumes, k, patch_size, length
        self.corruption, self.augment, self.seed, self.epoch = corruption, augment, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, idx: int):
        rng = np.random.default_rng([self.seed, self.epoch, idx])
        v = self.volumes[idx % len(self.volumes)]
        z = v.centres[int(rng.integers(len(v.centres)))]
        h, w = v.data.shape[1:]
        p = self.patch
        y0, x0 = int(rng.integers(h - p + 1)), int(rng.integers(w - p + 1))
        rows = [v.rows[j] for j in context_indices(z, v.n, self.k)]
        clean = v.data[rows, y0:y0 + p, x0:x0 + p].astype(np.float32)
        if self.augment is not None:
            clean, _ = self.augment(clean if self.k > 1 else clean[0], np.zeros((p, p), np.uint8), rng)
            clean = clean.reshape(self.k, p, p)
        corrupted, mask = self.corruption(clean, rng)
        centre = clean[self.k // 2:self.k // 2 + 1]
        return torch.from_numpy(corrupted), torch.from_numpy(np.ascontiguousarray(centre)), \
            torch.from_numpy(mask[None].astype(np.float32))


def restoration_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                     visible_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, mean squared error on the blanked pixels alone)."""
    err = (pred.float() - target) ** 2
    masked = (err * mask).sum() / mask.sum().clamp_min(1)
    visible = (err * (1 - mask)).sum() / (1 - mask).sum().clamp_min(1)
    return masked + visible_weight * visible, masked


class RestorationModule(L.LightningModule):
    def __init__(self, spec: dict, lr: float, weight_decay: float, visible_weight: float):
        super().__init__()
        self.save_hyperparameters()
        self.net = SegmentationNet(spec)

    def _step(self, batch, stage: str) -> torch.Tensor:
        x, target, mask = batch
        loss, masked = restoration_loss(self.net(x), target, mask, self.hparams.visible_weight)
        self.log(f"{stage}_loss", loss, on_step=False, on_epoch=True, prog_bar=stage == "val", batch_size=len(x))
        self.log(f"{stage}_masked_mse", masked, on_step=False, on_epoch=True, batch_size=len(x))
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def on_train_epoch_start(self) -> None:
        self.trainer.datamodule.train_set.set_epoch(self.current_epoch)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.net.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        max_epochs = self.trainer.max_epochs if self.trainer and self.trainer.max_epochs else 40
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max_epochs, eta_min=self.hparams.lr * 0.05)
        return {"optimizer": opt, "lr_scheduler": sched}


class RestorationData(L.LightningDataModule):
    def __init__(self, train_set: RestorationPatches, val_set: RestorationPatches, batch_size: int):
        super().__init__()
        self.train_set, self.val_set, self.batch_size = train_set, val_set, batch_size

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.train_set, batch_size=self.batch_size, shuffle=False)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(self.val_set, batch_size=self.batch_size, shuffle=False)


KEYS = ("train_loss", "val_loss", "train_masked_mse", "val_masked_mse")


class LossHistory(Callback):
    """Per-epoch losses, handed to ``on_epoch`` (MLflow) as they come."""

    def __init__(self, on_epoch=None):
        self.rows: list[dict] = []
        self.on_epoch = on_epoch

    def on_train_epoch_end(self, trainer, pl_module):
        m = trainer.callback_metrics
        row = {"epoch": trainer.current_epoch, **{k: float(m[k]) for k in KEYS if k in m}}
        self.rows.append(row)
        if self.on_epoch:
            self.on_epoch(row)


def reset_head(net: SegmentationNet, seed: int) -> None:
    """A fresh segmentation head: the restoration head predicts intensities, not foreground, and
    fine-tuning learns its own; encoder and decoder keep what they learnt."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.net.segmentation_head.modules():
            if isinstance(m, torch.nn.Conv2d):
                bound = 1 / math.sqrt(m.in_channels * m.kernel_size[0] * m.kernel_size[1])
                m.weight.copy_(torch.empty_like(m.weight).uniform_(-bound, bound, generator=gen))
                if m.bias is not None:
                    m.bias.zero_()


def mean_fill_mse(patches) -> float:
    """Masked MSE of the plainest restoration: every blanked pixel set to the mean of the visible
    (noisy) pixels of its patch. What the network must beat to have learnt anything of EM."""
    err = n = 0.0
    for i in range(len(patches)):
        x, target, mask = patches[i]
        visible = x[x.shape[0] // 2][mask[0] == 0]
        fill = float(visible.mean()) if visible.numel() else 0.0
        err += float((((target[0] - fill) ** 2) * mask[0]).sum())
        n += float(mask.sum())
    return err / max(n, 1.0)


@dataclass
class RestorationResult:
    net: SegmentationNet  # head reset: ready for train.init
    history: list[dict]
    before: dict  # validation losses of the network as initialised
    seconds: float
    example: tuple  # one validation patch: (input centre slice, restored, clean), for the plot
    mean_fill: float  # validation masked MSE of the mean-fill restoration


def fit_restoration(params, volumes: list[Volume], val_volume: Volume, on_epoch=None,
                    progress: bool = True) -> RestorationResult:
    """Train a network of ``params.model`` to restore masked patches (``params.ssl``) of ``volumes``."""
    import tempfile
    import time

    from emseg.errors import DataError
    from emseg.model.network import channels_last, model_spec
    from emseg.model.train import quiet

    cfg, k, seed = params.ssl, params.model.z_context, params.seed
    quiet()
    L.seed_everything(seed, workers=True, verbose=False)
    corruption = Corruption(cfg.patch_size, cfg.holes, cfg.hole_size, cfg.noise)
    train_set = RestorationPatches(volumes, k, cfg.patch_size, cfg.patches_per_epoch, corruption,
                                   Augmenter(params.train.augment), seed=seed)
    val_set = RestorationPatches([val_volume], k, cfg.patch_size, max(cfg.batch_size, 32), corruption, None,
                                 seed=seed + 1)
    data = RestorationData(train_set, val_set, cfg.batch_size)
    module = RestorationModule(model_spec(params.model), lr=cfg.lr, weight_decay=params.train.weight_decay,
                               visible_weight=cfg.visible_weight)
    history = LossHistory(on_epoch)
    gpu = torch.cuda.is_available() and params.train.accelerator in ("auto", "gpu", "cuda")
    with tempfile.TemporaryDirectory(prefix="emseg-ssl-") as work:
        trainer = L.Trainer(
            max_epochs=cfg.max_epochs, max_time={"seconds": int(cfg.max_minutes * 60)} if cfg.max_minutes else None,
            accelerator=params.train.accelerator, devices=1,
            precision=params.train.precision or ("16-mixed" if gpu else "32-true"), callbacks=[history],
            logger=False, enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
            enable_progress_bar=progress, default_root_dir=work, log_every_n_steps=1)
        before = trainer.validate(module, datamodule=data, verbose=False)[0]  # the same patches, untrained
        t0 = time.time()
        with channels_last(module.net, params.train.channels_last):
            trainer.fit(module, datamodule=data)
        seconds = time.time() - t0
    if not history.rows:
        raise DataError("ssl: no epoch finished (is ssl.max_minutes shorter than one epoch?)")
    net = module.net.cpu().eval()
    x, target, _ = val_set[0]
    with torch.no_grad():
        restored = net(x[None])[0, 0].numpy()
    reset_head(net, seed)
    return RestorationResult(net, history.rows, {key: float(v) for key, v in before.items()}, seconds,
                             (x[k // 2].numpy(), restored, target[0].numpy()), mean_fill_mse(val_set))
