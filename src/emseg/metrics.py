"""Pixel metrics: one implementation, used by training, tuning and evaluation.

Works on numpy arrays and torch tensors alike. ``target`` holds 0/1 with ``IGNORE`` for pixels the
annotator left blank; those pixels count nowhere. Scores come from summed confusion counts, so a
dataset's IoU is the foreground Jaccard over all its pixels (the EPFL convention), not a mean of
per-slice IoUs.
"""

from __future__ import annotations

from emseg import IGNORE


def confusion(pred, target) -> dict[str, int]:
    """Counts of true/false positives/negatives; ``pred`` boolean, ``target`` 0/1/IGNORE."""
    valid = target != IGNORE
    fg = (target == 1) & valid
    bg = (target == 0) & valid
    return {"tp": int((pred & fg).sum()), "fp": int((pred & bg).sum()),
            "fn": int((~pred & fg).sum()), "tn": int((~pred & bg).sum())}


def add_counts(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: a.get(k, 0) + b[k] for k in b}


def scores(c: dict[str, int]) -> dict[str, float]:
    tp, fp, fn, tn = c["tp"], c["fp"], c["fn"], c["tn"]
    total = tp + fp + fn + tn

    def ratio(num, den, empty):
        return num / den if den else empty

    # An image with no foreground and no predicted foreground is a perfect IoU, not undefined.
    return {"iou": ratio(tp, tp + fp + fn, 1.0), "dice": ratio(2 * tp, 2 * tp + fp + fn, 1.0),
            "accuracy": ratio(tp + tn, total, 1.0), "precision": ratio(tp, tp + fp, 1.0),
            "recall": ratio(tp, tp + fn, 1.0)}
