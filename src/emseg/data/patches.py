"""Patch sampling from large labelled slices, and whole-slice validation items.

Each epoch draws fresh random patches; with ``foreground_bias`` b, a share b of them is centred on a
random annotated foreground pixel, the rest anywhere. Few labelled slices thus give many different
training examples without cutting the slices into a fixed grid.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from emseg import IGNORE
from emseg.errors import ConfigError


def pad_to_multiple(x: np.ndarray, multiple: int = 32, value: float = 0.0) -> tuple[np.ndarray, tuple[int, int]]:
    """Pad the last two axes up to a multiple (reflect for images, ``value`` for labels)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if not ph and not pw:
        return x, (h, w)
    pad = [(0, 0)] * (x.ndim - 2) + [(0, ph), (0, pw)]
    if x.dtype == np.uint8:
        return np.pad(x, pad, constant_values=int(value)), (h, w)
    return np.pad(x, pad, mode="reflect"), (h, w)


def channels(image: np.ndarray) -> np.ndarray:
    """One network input (C, H, W) from a slice (H, W) or a slice with its z neighbours (k, H, W)."""
    return image[None] if image.ndim == 2 else image


def centre(image: np.ndarray) -> np.ndarray:
    """The labelled slice of an input: the slice itself (H, W), or the middle of (k, H, W)."""
    image = np.asarray(image)
    return image if image.ndim == 2 else image[image.shape[0] // 2]


def check_patch_fits(patch_size: int, h: int, w: int) -> None:
    """Training patches are cut from whole slices of h x w: a larger patch cannot be."""
    if patch_size > h or patch_size > w:
        raise ConfigError(f"params.yaml: train.patch_size: {patch_size} is larger than the slices ({h}x{w})")


def slices_per_input(images) -> int:
    """How many slices each input of ``images`` holds: 1 for (n, H, W), k for (n, k, H, W)."""
    return 1 if np.ndim(images) == 3 else int(np.shape(images)[1])


def pixel_pools(labels, seed: int) -> tuple[list, list, list[int], list[int]]:
    """Where patches of each labelled slice may be centred: (foreground pixel coordinates per slice,
    annotated pixel coordinates per slice or None where every pixel is labelled, slices with
    foreground, slices with anything labelled), each pool subsampled to 20000 (n, 2) rows: enough to
    centre patches, small in memory. Partly labelled slices (IGNORE pixels) keep annotated
    coordinates so that their "anywhere" patches are never wasted on unlabelled ground."""
    fg, annotated = [], []
    for i in range(len(labels)):
        lab = np.asarray(labels[i])
        rng = np.random.default_rng([seed, i])
        ys, xs = np.nonzero(lab == 1)
        keep = rng.permutation(len(ys))[:20000]
        fg.append(np.column_stack([ys[keep], xs[keep]]))
        ignored = lab == IGNORE
        if ignored.any():
            ys, xs = np.nonzero(~ignored)
            keep = rng.permutation(len(ys))[:20000]
            annotated.append(np.column_stack([ys[keep], xs[keep]]))
        else:
            annotated.append(None)  # fully labelled: anywhere will do
    has_fg = [i for i in range(len(fg)) if len(fg[i])]
    usable = [i for i in range(len(fg)) if annotated[i] is None or len(annotated[i])]
    if not usable:
        raise ConfigError("training data: every training pixel is marked ignore; nothing to learn from")
    return fg, annotated, has_fg, usable


def with_context(images, k: int, where: str = "the prepared inputs"):
    """Inputs for a network that takes ``k`` slices (model.z_context) from prepared ``images`` that hold
    K per slice ((n, H, W): K = 1; (n, K, H, W)): the middle k of the K, a view. A network that needs
    more neighbours than the data hold cannot be fed from them."""
    held = slices_per_input(images)
    if k == held:
        return images
    if k > held:
        raise ConfigError(f"{where}: hold {held} slice(s) per input; a network with model.z_context {k} needs "
                          f"{k}: prepare the data with model.z_context >= {k}")
    lo = held // 2 - k // 2
    return images[:, held // 2] if k == 1 else images[:, lo:lo + k]


class PatchDataset(Dataset):
    """Random patches from images (n, H, W), or (n, k, H, W) with z neighbours, and labels (n, H, W) of
    the centre slices; deterministic given (seed, epoch, index)."""

    def __init__(self, images, labels, patch_size, length, foreground_bias=0.5, augment=None, seed=0):
        h, w = images.shape[-2:]
        check_patch_fits(patch_size, h, w)
        self.images, self.labels = images, labels
        self.patch, self.length, self.bias = patch_size, length, foreground_bias
        self.augment, self.seed, self.epoch = augment, seed, 0
        self.fg, self.annotated, self.has_fg, self.usable = pixel_pools(labels, seed)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, idx: int):
        rng = np.random.default_rng([self.seed, self.epoch, idx])
        h, w = self.images.shape[-2:]
        p = self.patch
        if self.has_fg and rng.random() < self.bias:
            i = int(rng.choice(self.has_fg))
            cy, cx = self.fg[i][rng.integers(len(self.fg[i]))]
            y0 = int(np.clip(cy - p // 2 + rng.integers(-p // 4, p // 4 + 1), 0, h - p))
            x0 = int(np.clip(cx - p // 2 + rng.integers(-p // 4, p // 4 + 1), 0, w - p))
        else:
            i = int(self.usable[rng.integers(len(self.usable))])
            ann = self.annotated[i]
            if ann is None:
                y0, x0 = int(rng.integers(h - p + 1)), int(rng.integers(w - p + 1))
            else:
                cy, cx = ann[rng.integers(len(ann))]
                y0 = int(np.clip(cy - p // 2 + rng.integers(-p // 4, p // 4 + 1), 0, h - p))
                x0 = int(np.clip(cx - p // 2 + rng.integers(-p // 4, p // 4 + 1), 0, w - p))
        image = np.array(self.images[i, ..., y0:y0 + p, x0:x0 + p], dtype=np.float32)
        label = np.array(self.labels[i, y0:y0 + p, x0:x0 + p], dtype=np.uint8)
        if self.augment is not None:
            image, label = self.augment(image, label, rng)
        return torch.from_numpy(channels(image)), torch.from_numpy(label.astype(np.int64))[None]


class UnlabelledPatches(Dataset):
    """Random patches of unlabelled inputs (n, H, W) or (n, k, H, W), augmented like the labelled ones
    (train.semi); deterministic given (seed, epoch, index)."""

    def __init__(self, images, patch_size, length, augment=None, seed=0):
        h, w = images.shape[-2:]
        check_patch_fits(patch_size, h, w)
        self.images, self.patch, self.length, self.augment, self.seed, self.epoch = (
            images, patch_size, length, augment, seed, 0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, idx: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, self.epoch, idx])
        h, w = self.images.shape[-2:]
        p = self.patch
        i, y0, x0 = int(rng.integers(len(self.images))), int(rng.integers(h - p + 1)), int(rng.integers(w - p + 1))
        image = np.array(self.images[i, ..., y0:y0 + p, x0:x0 + p], dtype=np.float32)
        if self.augment is not None:
            image, _ = self.augment(image, np.zeros((p, p), np.uint8), rng)
        return torch.from_numpy(channels(image))


class WithUnlabelled(Dataset):
    """Labelled patches, each paired with an unlabelled one: batches of (image, label, unlabelled image)."""

    def __init__(self, labelled: Dataset, unlabelled: UnlabelledPatches):
        self.labelled, self.unlabelled = labelled, unlabelled

    def set_epoch(self, epoch: int) -> None:
        self.labelled.set_epoch(epoch)
        self.unlabelled.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.labelled)

    def __getitem__(self, idx: int):
        return (*self.labelled[idx], self.unlabelled[idx % len(self.unlabelled)])


class SliceDataset(Dataset):
    """Whole slices, padded to a multiple of 32 (padding labelled IGNORE so it never counts)."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        image, _ = pad_to_multiple(np.array(self.images[i], dtype=np.float32))
        label, _ = pad_to_multiple(np.asarray(self.labels[i], dtype=np.uint8), value=IGNORE)
        return (torch.from_numpy(np.ascontiguousarray(channels(image))),
                torch.from_numpy(label.astype(np.int64))[None])


class MixedPatches(Dataset):
    """Patches from several PatchDatasets (labelled slices and annotated suggestion crops) in one epoch."""

    def __init__(self, parts: list[PatchDataset]):
        self.parts = [p for p in parts if len(p)]
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])

    def set_epoch(self, epoch: int) -> None:
        for p in self.parts:
            p.set_epoch(epoch)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, idx: int):
        k = int(np.searchsorted(self.offsets, idx, side="right") - 1)
        return self.parts[k][idx - int(self.offsets[k])]


def pad_crops(images: np.ndarray, labels: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad crops smaller than ``size`` (reflect for images, IGNORE for labels) so patches fit."""
    h, w = images.shape[-2:]
    ph, pw = max(size - h, 0), max(size - w, 0)
    if not ph and not pw:
        return images, labels
    pad = ((0, 0), (0, ph), (0, pw))
    return (np.pad(images, ((0, 0),) * (images.ndim - 2) + pad[1:], mode="reflect"),
            np.pad(labels, pad, constant_values=IGNORE))
