"""Patches cut and augmented where the network trains (a GPU), so the CPU loader never sets the pace.

The labelled slices (and their z neighbours), and for ``train.semi`` the unlabelled ones, are copied
to the device once. Each step draws a whole
batch there: crop corners (a share ``foreground_bias`` centred near a labelled foreground pixel, as
:class:`emseg.data.patches.PatchDataset` does), then flips, 90-degree rotations, an elastic warp and
intensity changes applied to the batch at once. Geometric transforms move image and mask together
(the mask by nearest neighbour, so IGNORE survives); intensity transforms touch the image only.

Everything is plain torch, so it runs (and is tested) on CPU tensors too; on the CPU the
worker-based :class:`~emseg.data.patches.PatchDataset` path stays the default.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import IterableDataset

from emseg.config import AugmentParams
from emseg.data.patches import check_patch_fits, pixel_pools


def _as_nchw(images) -> torch.Tensor:
    x = torch.from_numpy(np.array(images, dtype=np.float32))  # a copy: prepared inputs are read-only memmaps
    return x[:, None] if x.ndim == 3 else x


def _windows(y0: torch.Tensor, x0: torch.Tensor, p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column indices, (B, p, 1) and (B, 1, p), of the p x p windows with corners (y0, x0)."""
    ar = torch.arange(p, device=y0.device)
    return (y0[:, None] + ar)[:, :, None], (x0[:, None] + ar)[:, None, :]


def _crops(x: torch.Tensor, s: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Windows of slices ``s`` of ``x`` (n, C, H, W) as a batch (B, C, p, p)."""
    return x[s[:, None, None], :, rows, cols].permute(0, 3, 1, 2).contiguous()  # gathered as (B, p, p, C)


class DevicePatchSampler:
    """Random (image, label) patches of the labelled slices, drawn on ``device`` a batch at a time.

    ``images``: (n, H, W) or (n, k, H, W); ``labels``: (n, H, W) with 0, 1 and IGNORE."""

    def __init__(self, images, labels, patch_size: int, foreground_bias: float = 0.5, device="cpu", seed: int = 0):
        self.x = _as_nchw(images).to(device)
        self.y = torch.as_tensor(np.asarray(labels, dtype=np.uint8)).to(device)
        h, w = self.x.shape[-2:]
        check_patch_fits(patch_size, h, w)
        self.patch, self.bias, self.device = patch_size, foreground_bias, torch.device(device)
        self.seed = seed
        self.gen = torch.Generator(device=self.device).manual_seed(seed)
        # Per slice: where patches may be centred, the CPU sampler's pools, kept on the device.
        fg, ann, self.has_fg, self.usable = pixel_pools(labels, seed)
        self.fg = [torch.as_tensor(c).to(device) for c in fg]
        self.ann = [None if c is None else torch.as_tensor(c).to(device) for c in ann]

    def _ints(self, high: int, size: int) -> torch.Tensor:
        return torch.randint(high, (size,), generator=self.gen, device=self.device)

    def _near(self, pool: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Corners of patches centred near ``size`` random pixels of ``pool``, jittered by up to p/4."""
        p = self.patch
        h, w = self.x.shape[-2:]
        c = pool[self._ints(len(pool), size)]
        jitter = torch.randint(-(p // 4), p // 4 + 1, (size, 2), generator=self.gen, device=self.device)
        return ((c[:, 0] - p // 2 + jitter[:, 0]).clamp(0, h - p), (c[:, 1] - p // 2 + jitter[:, 1]).clamp(0, w - p))

    def sample(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(images (B, C, p, p) float32, labels (B, 1, p, p) int64) on the device. As the CPU sampler: a
        share ``foreground_bias`` picks a slice with foreground and centres near one of its foreground
        pixels; the rest pick any usable slice and a corner anywhere (near an annotated pixel on a
        partly labelled slice)."""
        p, dev = self.patch, self.device
        h, w = self.x.shape[-2:]
        on_fg = torch.rand(batch, generator=self.gen, device=dev) < self.bias
        if not self.has_fg:
            on_fg[:] = False
        has_fg = torch.as_tensor(self.has_fg or [0], device=dev)
        usable = torch.as_tensor(self.usable, device=dev)
        s = torch.where(on_fg, has_fg[self._ints(len(has_fg), batch)], usable[self._ints(len(usable), batch)])
        y0 = self._ints(h - p + 1, batch)
        x0 = self._ints(w - p + 1, batch)
        for i in torch.unique(s).tolist():
            for near_fg in (True, False):
                sel = (s == i) & (on_fg if near_fg else ~on_fg)
                pool = self.fg[i] if near_fg else self.ann[i]
                if pool is None or not sel.any():
                    continue
                y0[sel], x0[sel] = self._near(pool, int(sel.sum()))
        rows, cols = _windows(y0, x0, p)
        lab = self.y[s[:, None, None], rows, cols]               # (B, p, p)
        return _crops(self.x, s, rows, cols), lab[:, None].long()


class DeviceUnlabelledSampler:
    """Random patches of the unlabelled slices (train.semi), drawn on ``device`` a batch at a time, as
    :class:`emseg.data.patches.UnlabelledPatches` does on the CPU: any slice, any corner.

    ``images``: (n, H, W) or (n, k, H, W)."""

    def __init__(self, images, patch_size: int, device="cpu", seed: int = 0):
        self.x = _as_nchw(images).to(device)
        h, w = self.x.shape[-2:]
        check_patch_fits(patch_size, h, w)
        self.patch, self.device, self.seed = patch_size, torch.device(device), seed
        self.gen = torch.Generator(device=self.device).manual_seed(seed)

    def sample(self, batch: int) -> torch.Tensor:
        """Images (B, C, p, p) float32 on the device."""
        p, dev = self.patch, self.device
        n, h, w = len(self.x), *self.x.shape[-2:]
        s = torch.randint(n, (batch,), generator=self.gen, device=dev)
        y0 = torch.randint(h - p + 1, (batch,), generator=self.gen, device=dev)
        x0 = torch.randint(w - p + 1, (batch,), generator=self.gen, device=dev)
        return _crops(self.x, s, *_windows(y0, x0, p))


def _per_sample(batch: int, p: float, gen: torch.Generator, device) -> torch.Tensor:
    return torch.rand(batch, generator=gen, device=device) < p


def _elastic_grid(batch: int, size: int, max_shift: float, spacing: float, gen, device) -> torch.Tensor:
    """A smooth random displacement (B, size, size, 2) in grid_sample's [-1, 1] coordinates: uniform noise
    on control points about ``spacing`` px apart, upsampled smoothly; at most about ``max_shift`` px."""
    coarse = max(2, int(round(size / spacing)) + 1)
    noise = torch.rand(batch, 2, coarse, coarse, generator=gen, device=device) * 2 - 1
    disp = F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=True) * max_shift
    ar = torch.linspace(-1, 1, size, device=device)
    gy, gx = torch.meshgrid(ar, ar, indexing="ij")
    base = torch.stack([gx, gy], -1)[None]
    return base + disp.permute(0, 2, 3, 1) * (2 / (size - 1))


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each sample with its own sigma (separable, reflect padding)."""
    r = int(np.ceil(3 * float(sigma.max())))
    t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-(t[None] ** 2) / (2 * sigma[:, None] ** 2))
    k = k / k.sum(1, keepdim=True)                              # (B, 2r+1)
    b, c, h, w = x.shape
    flat = x.reshape(1, b * c, h, w)
    kk = k.repeat_interleave(c, 0)
    flat = F.conv2d(F.pad(flat, (r, r, 0, 0), mode="reflect"), kk[:, None, None, :], groups=b * c)
    flat = F.conv2d(F.pad(flat, (0, 0, r, r), mode="reflect"), kk[:, None, :, None], groups=b * c)
    return flat.reshape(b, c, h, w)


def augment_batch(x: torch.Tensor, y: torch.Tensor, cfg: AugmentParams,
                  gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The CPU :class:`~emseg.data.augment.Augmenter`'s transforms, on a device batch.

    ``x``: (B, C, p, p) float images (C: the slice and its z neighbours, moved as one); ``y``: (B, 1, p, p)
    labels. Each sample gets its own draw of every transform."""
    b, dev = len(x), x.device
    if cfg.flip:
        for dim in (-1, -2):
            m = _per_sample(b, cfg.flip, gen, dev)
            x = torch.where(m[:, None, None, None], x.flip(dim), x)
            y = torch.where(m[:, None, None, None], y.flip(dim), y)
    if cfg.rotate90 and x.shape[-1] == x.shape[-2]:
        m = _per_sample(b, cfg.rotate90, gen, dev)
        turns = torch.randint(0, 4, (b,), generator=gen, device=dev)  # as RandomRotate90: 0 to 3 quarter turns
        for t in (1, 2, 3):
            sel = (m & (turns == t))[:, None, None, None]
            x = torch.where(sel, torch.rot90(x, t, (-2, -1)), x)
            y = torch.where(sel, torch.rot90(y, t, (-2, -1)), y)
    if cfg.elastic:
        m = _per_sample(b, cfg.elastic, gen, dev)
        if m.any():
            grid = _elastic_grid(int(m.sum()), x.shape[-1], max_shift=4.0, spacing=24.0, gen=gen, device=dev)
            if x.shape[-1] != x.shape[-2]:
                grid = F.interpolate(grid.permute(0, 3, 1, 2), size=x.shape[-2:], mode="bilinear",
                                     align_corners=True).permute(0, 2, 3, 1)
            x = x.clone()
            y = y.clone()
            x[m] = F.grid_sample(x[m], grid, mode="bilinear", padding_mode="reflection", align_corners=True)
            y[m] = F.grid_sample(y[m].float(), grid, mode="nearest", padding_mode="reflection",
                                 align_corners=True).round().to(y.dtype)
    if cfg.brightness_contrast:
        m = _per_sample(b, cfg.brightness_contrast, gen, dev)[:, None, None, None]
        gain = 1 + (torch.rand(b, 1, 1, 1, generator=gen, device=dev) * 0.6 - 0.3)
        shift = (torch.rand(b, 1, 1, 1, generator=gen, device=dev) * 0.6 - 0.3) * x.mean(dim=(1, 2, 3), keepdim=True)
        x = torch.where(m, x * gain + shift, x)  # albumentations' brightness_by_max=False: shift by the mean
    if cfg.noise:
        m = _per_sample(b, cfg.noise, gen, dev)[:, None, None, None]
        std = 0.05 + torch.rand(b, 1, 1, 1, generator=gen, device=dev) * 0.15
        x = torch.where(m, x + std * torch.randn(x.shape, generator=gen, device=dev), x)
    if cfg.blur:
        m = _per_sample(b, cfg.blur, gen, dev)
        if m.any():
            sigma = 0.3 + torch.rand(int(m.sum()), generator=gen, device=dev) * 0.9
            x = x.clone()
            x[m] = _gaussian_blur(x[m], sigma)
    if cfg.gamma:
        m = _per_sample(b, cfg.gamma, gen, dev)[:, None, None, None]
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        hi = x.amax(dim=(1, 2, 3), keepdim=True)
        g = 0.7 + torch.rand(b, 1, 1, 1, generator=gen, device=dev) * 0.8
        span = (hi - lo).clamp_min(1e-6)
        x = torch.where(m & (hi - lo > 1e-6), ((x - lo) / span).clamp(0, 1) ** g * span + lo, x)
    return x.contiguous(), y.contiguous()


class DevicePatchStream(IterableDataset):
    """One epoch of ready batches on the device: ``length`` patches in batches of ``batch_size``, each
    cut and augmented there; with an ``unlabelled`` sampler (train.semi) each batch also carries as many
    unlabelled patches, augmented the same way: (image, label, unlabelled image), as the CPU loader's
    :class:`~emseg.data.patches.WithUnlabelled` gives. Used with ``DataLoader(batch_size=None, num_workers=0)``."""

    def __init__(self, sampler: DevicePatchSampler, cfg: AugmentParams, length: int, batch_size: int,
                 unlabelled: DeviceUnlabelledSampler | None = None):
        self.sampler, self.cfg, self.length, self.batch_size = sampler, cfg, length, batch_size
        self.unlabelled = unlabelled

    def set_epoch(self, epoch: int) -> None:
        """Each epoch's patches follow from (seed, epoch): a resumed run draws what it would have drawn."""
        self.sampler.gen.manual_seed(self.sampler.seed * 1_000_003 + epoch)
        if self.unlabelled is not None:
            self.unlabelled.gen.manual_seed(self.unlabelled.seed * 1_000_003 + epoch)

    def __len__(self) -> int:
        return max(1, self.length // self.batch_size)

    def __iter__(self):
        for _ in range(len(self)):
            x, y = self.sampler.sample(self.batch_size)
            x, y = augment_batch(x, y, self.cfg, self.sampler.gen)
            if self.unlabelled is None:
                yield x, y
                continue
            u = self.unlabelled.sample(self.batch_size)
            blank = torch.zeros((len(u), 1, *u.shape[-2:]), dtype=torch.uint8, device=u.device)
            yield x, y, augment_batch(u, blank, self.cfg, self.unlabelled.gen)[0]
