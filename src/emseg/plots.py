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
        if name == "loss" and any("train_consistency" in r for r in history):  # train.semi's unlabelled term
            ax.plot(epochs, [r.get("train_consistency", np.nan) for r in history], "--", label="consistency")
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


def save_uncertainty_png(u: np.ndarray, path: str | Path) -> Path:
    """An uncertainty map as an 8-bit picture (bright: unsure), scaled to its own maximum."""
    u = np.asarray(u, np.float32)
    top = float(u.max()) or 1.0
    plt.imsave(path, u / top, cmap="magma", vmin=0, vmax=1)
    return Path(path)


def plot_suggestions(slices: dict, rows: list[dict], path: str | Path, max_slices: int = 6) -> Path:
    """The suggested patches as numbered boxes on their slices."""
    from matplotlib.patches import Rectangle

    zs = list(slices)[:max_slices]
    fig, axes = plt.subplots(1, len(zs), figsize=(5 * len(zs), 4.2), squeeze=False)
    for ax, z in zip(axes[0], zs):
        ax.imshow(slices[z], cmap="gray")
        for r in rows:
            if r["slice"] == z:
                ax.add_patch(Rectangle((r["x"], r["y"]), r["width"], r["height"], fill=False, ec="yellow", lw=1.5))
                ax.text(r["x"] + 4, r["y"] + 4, str(r["rank"]), color="yellow", va="top", fontsize=11, weight="bold")
        ax.set_title(f"slice {z}", fontsize=9)
        ax.axis("off")
    fig.suptitle("label next: numbered by rank")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return Path(path)


def plot_mean_band(series: dict, path: str | Path, xlabel: str, ylabel: str, title: str, log2_x: bool = False,
                   dashed=()) -> Path:
    """One line per series: ``series[name] = {x: [values over seeds]}``; line = mean, band = min..max."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ticks = set()
    for name, by_x in series.items():
        xs = sorted(by_x)
        ticks |= set(xs)
        ax.plot(xs, [np.mean(by_x[x]) for x in xs], marker="o", label=name,
                ls="--" if name in dashed else "-", lw=2.2 if name in dashed else 1.4)
        ax.fill_between(xs, [min(by_x[x]) for x in xs], [max(by_x[x]) for x in xs], alpha=0.12)
    if log2_x:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(ticks), [str(t) for t in sorted(ticks)])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title + " (line: mean over seeds, band: min-max)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_restoration(history: list[dict], example: tuple, path: str | Path, title: str = "") -> Path:
    """Self-supervised restoration: the losses per epoch, and one validation patch as the network saw
    it (masked, noisy), as it restored it, and as it is."""
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.6), gridspec_kw={"width_ratios": [1.6, 1, 1, 1]})
    epochs = [r["epoch"] + 1 for r in history]
    for key, style in (("train_loss", "-o"), ("val_loss", "-s"), ("val_masked_mse", "--")):
        axes[0].plot(epochs, [r.get(key, np.nan) for r in history], style, ms=3, label=key)
    axes[0].set_xlabel("epoch")
    axes[0].set_title("restoration loss")
    axes[0].grid(alpha=0.3)
    axes[0].legend()
    corrupted, restored, clean = (np.asarray(a, dtype=np.float32) for a in example)
    lo, hi = np.percentile(clean, [1, 99])
    for ax, img, name in zip(axes[1:], (corrupted, restored, clean), ("input (masked, noisy)", "restored", "clean")):
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi)
        ax.set_title(name)
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)
