"""Load chosen slices of a labelled stack into memory: normalised, rescaled, labels mapped.

For the further pipelines (active learning, pretraining, learning curves) that hold a few slices in
memory rather than writing a prepared folder. Each stack is z-scored by its own statistics
(per-dataset normalisation) and may be rescaled by a factor, so datasets of different pixel size can
be matched (0.5 halves each side: a 5 nm stack at 0.5 looks like a 10 nm one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import cv2
import numpy as np

from emseg import IGNORE
from emseg.data.io import check_image_dtype, check_pair, inspect_stack, normalise, read_slices
from emseg.data.io import label_mapping, stack_stats
from emseg.errors import DataError


def evenly(n_total: int, k: Optional[int], exclude: Sequence[int] = ()) -> list[int]:
    """k slice indices spread evenly over a stack (all when k is None), avoiding ``exclude``."""
    free = [z for z in range(n_total) if z not in set(exclude)]
    if k is None or k >= len(free):
        return free
    if k == 1:
        return [free[len(free) // 2]]
    return [free[int(round(p))] for p in np.linspace(0, len(free) - 1, k)]


def rescale(image: np.ndarray, labels: np.ndarray | None, scale: float):
    if scale == 1.0:
        return image, labels
    h, w = image.shape
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    image = cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    if labels is not None:
        labels = cv2.resize(labels, size, interpolation=cv2.INTER_NEAREST)
    return image, labels


def load_labelled(image_path: str | Path, labels_path: str | Path, indices: Sequence[int] | None = None, *,
                  scale: float = 1.0, ignore: int | None = None, invert: bool = False,
                  stats: tuple[float, float] | None = None) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """Slices ``indices`` (all when None) as float32 z-scored images and uint8 labels 0/1/IGNORE.

    ``invert`` swaps foreground and background (ISBI 2012 marks cell interior 255, membranes 0).
    Returns (images, labels, (mean, std)); pass ``stats`` to normalise by another stack's statistics.
    """
    img_info, lab_info = inspect_stack(image_path), inspect_stack(labels_path)
    check_image_dtype(img_info)
    check_pair(img_info, lab_info)
    idx = list(range(img_info.shape[0])) if indices is None else [int(z) for z in indices]
    mean, std = stats or stack_stats(img_info)
    images, labels = [], []
    for z, img, lab in zip(idx, read_slices(img_info, idx), read_slices(lab_info, idx)):
        # Per slice: a slice of background only says nothing about whether the stack uses 1 or 255.
        fg = label_mapping(set(np.unique(lab).tolist()), lab_info.path, ignore)
        out = (lab == fg).astype(np.uint8)
        if invert:
            out = 1 - out
        if ignore is not None:
            out[lab == ignore] = IGNORE
        x = normalise(img, mean, std)
        x, out = rescale(x, out, scale)
        images.append(x)
        labels.append(out)
    if not images:
        raise DataError(f"{image_path}: no slices selected")
    return np.stack(images), np.stack(labels), (float(mean), float(std))


def resolve_source(params, setting: str) -> str:
    """auto: epfl when its first mirror is a local folder that exists, generated otherwise."""
    if setting != "auto":
        return setting
    first = params.data.epfl.mirrors[0] if params.data.epfl and params.data.epfl.mirrors else ""
    return "epfl" if first and "://" not in first and Path(first).expanduser().is_dir() else "generated"
