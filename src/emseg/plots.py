"""Figures people would rather look at than read: training curves and prediction overlays."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from emseg import IGNORE  # noqa: E402


def plot_curves(history: list[dict], path: str | Path, title: str = "") -> Path:
    """Loss, pixel accuracy and foreground IoU per epoch, train and validation side by side."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    epochs = [r["epoch"] + 1 for r in history]
    for ax, (name, label) in zip(axes, (("loss", "loss"), ("acc", "pixel accuracy"), ("iou", "foreground IoU"))):
        for split, style in (("train", "-o"), ("val", "-s")):
            ys = [r.get(f"{split}_{name}", np.nan) for r in history]
            ax.plot(epochs, ys, style, ms=3, label=split)
        ax.set_xlabel("epoch")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)


def plot_overlays(images, labels, probs, path: str | Path, threshold: float = 0.5, titles=None) -> Path:
    """Image with ground truth (green) and prediction (magenta) outlines, one column per slice."""
    n = len(images)
    fig, axes = plt.subplots(1, n, figsize=(6 * n, 4.8), squeeze=False)
    for i, ax in enumerate(axes[0]):
        ax.imshow(images[i], cmap="gray")
        lab = np.asarray(labels[i])
        ax.contour(np.where(lab == IGNORE, 0, lab), [0.5], colors="lime", linewidths=0.7)
        ax.contour(np.asarray(probs[i]) > threshold, [0.5], colors="magenta", linewidths=0.7)
        ax.set_title(titles[i] if titles else f"slice {i}: green truth, magenta prediction", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return Path(path)
