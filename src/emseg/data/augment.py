"""Augmentation of image and mask together (albumentations), on z-scored float32 patches.

Geometric transforms move the mask with the image (nearest-neighbour for the mask, so the IGNORE
value survives); intensity transforms touch the image only.
"""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np

from emseg.config import AugmentParams


def _gamma(image: np.ndarray, rng: np.random.Generator, low=0.7, high=1.5) -> np.ndarray:
    """Gamma on a z-scored patch: map to [0, 1] by its own range, apply, map back."""
    lo, hi = float(image.min()), float(image.max())
    if hi - lo < 1e-6:
        return image
    g = rng.uniform(low, high)
    return (((image - lo) / (hi - lo)) ** g * (hi - lo) + lo).astype(np.float32)


class Augmenter:
    def __init__(self, cfg: AugmentParams):
        self.cfg = cfg
        t = []
        if cfg.flip:
            t += [A.HorizontalFlip(p=cfg.flip), A.VerticalFlip(p=cfg.flip)]
        if cfg.rotate90:
            t.append(A.RandomRotate90(p=cfg.rotate90))
        if cfg.elastic:
            t.append(A.ElasticTransform(alpha=40, sigma=6, border_mode=cv2.BORDER_REFLECT_101, p=cfg.elastic))
        if cfg.brightness_contrast:
            t.append(A.RandomBrightnessContrast(brightness_limit=0.3, contrast_limit=0.3, brightness_by_max=False,
                                                p=cfg.brightness_contrast))
        if cfg.noise:
            t.append(A.GaussNoise(std_range=(0.05, 0.2), p=cfg.noise))
        if cfg.blur:
            t.append(A.GaussianBlur(sigma_limit=(0.3, 1.2), p=cfg.blur))
        self.transform = A.Compose(t)

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        # Drive albumentations from the caller's generator: the same (seed, epoch, index) gives the same patch.
        self.transform.set_random_seed(int(rng.integers(2**31)))
        stacked = image.ndim == 3  # (k, H, W): a slice with its z neighbours, moved as one (HWC for albumentations)
        out = self.transform(image=np.ascontiguousarray(np.moveaxis(image, 0, -1)) if stacked else image, mask=mask)
        image, mask = out["image"], out["mask"]
        if stacked:
            image = np.moveaxis(image, -1, 0)
        if self.cfg.gamma and rng.random() < self.cfg.gamma:
            image = _gamma(image, rng)
        return np.ascontiguousarray(image, dtype=np.float32), np.ascontiguousarray(mask)
