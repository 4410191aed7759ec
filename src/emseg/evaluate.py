"""Score a network on a labelled stack: pixel metrics, instance metrics, per-slice IoU, PR curve."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from emseg import IGNORE
from emseg.config import EvaluateParams
from emseg.inference import predict_tiled
from emseg.instances import connected_instances, instance_scores, match_instances, split_instances, true_instances
from emseg.metrics import add_counts, confusion, scores
from emseg.model.network import channels_last

PR_BINS = 100


@dataclass
class Evaluation:
    metrics: dict
    per_slice: list[dict]
    pr_curve: list[dict]
    examples: list[tuple[int, np.ndarray]] = field(default_factory=list)  # (slice, probability)


def _pr_curve(fg_hist: np.ndarray, bg_hist: np.ndarray) -> list[dict]:
    # Pixels with probability >= threshold t are called foreground; cumulative sums from the top.
    tp = np.cumsum(fg_hist[::-1])[::-1]
    fp = np.cumsum(bg_hist[::-1])[::-1]
    total_fg = fg_hist.sum()
    rows = []
    for i in range(1, PR_BINS):
        t = i / PR_BINS
        prec = tp[i] / (tp[i] + fp[i]) if tp[i] + fp[i] else 1.0
        rec = tp[i] / total_fg if total_fg else 1.0
        rows.append({"threshold": round(t, 3), "precision": float(prec), "recall": float(rec)})
    return rows


def _probabilities(net, images, cfg: EvaluateParams, desc: str, progress: bool):
    """Yield each slice's tiled prediction, with a progress bar; the network's layout is switched
    once for the stack (``cfg.inference.channels_last``), not once per slice inside predict_tiled."""
    inf = cfg.inference.model_dump()
    with channels_last(net, cfg.inference.channels_last):
        for i in tqdm(range(len(images)), desc=desc, unit="slice", disable=not progress):
            yield predict_tiled(net, images[i], **inf)


def pixel_iou(net, images, labels, cfg: EvaluateParams, threshold: float = 0.5, desc: str = "score",
              progress: bool = True) -> float:
    """Foreground IoU of a network over these slices (tiled prediction, ``cfg.inference``)."""
    counts: dict = {}
    for i, prob in enumerate(_probabilities(net, images, cfg, desc, progress)):
        counts = add_counts(counts, confusion(prob > threshold, np.asarray(labels[i])))
    return float(scores(counts)["iou"])


def choose_tta(net, images, labels, cfg: EvaluateParams, threshold: float = 0.5,
               progress: bool = True) -> tuple[EvaluateParams, list[dict]]:
    """``cfg`` with flip TTA on when it scores a higher foreground IoU on these (validation) slices than
    the plain prediction, else off (a tie keeps the 4x cheaper plain prediction); and both scores."""
    rows = []
    for tta in (False, True):
        c = cfg.model_copy(update={"inference": cfg.inference.model_copy(update={"tta": tta})})
        rows.append({"tta": tta, "iou": pixel_iou(net, images, labels, c, threshold, f"choose TTA ({tta})", progress)})
    use = rows[1]["iou"] > rows[0]["iou"]
    return cfg.model_copy(update={"inference": cfg.inference.model_copy(update={"tta": use})}), rows


def choose_watershed_h(net, images, labels, cfg: EvaluateParams, threshold: float = 0.5,
                       progress: bool = True) -> tuple[float, list[dict]]:
    """The h of ``cfg.instances.h_choices`` with the best instance F1 on these (validation) slices.

    Each slice is predicted once and split with every candidate; a tie goes to the earlier candidate.
    Without choices the one candidate is ``cfg.instances.h`` (its row is still worth reporting).
    Returns ``cfg.instances.h`` with no rows when the slices hold no labelled object to judge by."""
    ins = cfg.instances
    choices = list(ins.h_choices) or [ins.h]
    counts: list[dict] = [{} for _ in choices]
    for i, prob in enumerate(_probabilities(net, images, cfg, "choose watershed h", progress)):
        lab = np.asarray(labels[i])
        truth, valid = true_instances(lab), lab != IGNORE
        for k, h in enumerate(choices):
            found = split_instances(prob, threshold, ins.min_size, h, ins.smooth)
            counts[k] = add_counts(counts[k], match_instances(truth, found, valid=valid))
    if not any(c.get("tp", 0) + c.get("fn", 0) for c in counts):  # no labelled object to judge by
        return ins.h, []
    rows = [{"h": h, **instance_scores(c)} for h, c in zip(choices, counts)]
    best = max(range(len(rows)), key=lambda k: (rows[k]["instance_f1"], -k))
    return float(rows[best]["h"]), rows


def evaluate_stack(net, images, labels, cfg: EvaluateParams, threshold: float = 0.5, keep: int = 3,
                   progress: bool = True, h: float | None = None) -> Evaluation:
    """Predict every slice (tiled), accumulate pixel counts, instance matches and the PR histogram.

    ``h``: the watershed depth (default ``cfg.instances.h``), e.g. one chosen by ``choose_watershed_h``."""
    ins = cfg.instances
    h = ins.h if h is None else h
    counts: dict = {}
    inst_ws: dict = {}
    inst_cc: dict = {}
    fg_hist = np.zeros(PR_BINS, np.int64)
    bg_hist = np.zeros(PR_BINS, np.int64)
    per_slice = []
    n = len(images)
    keep_idx = set(np.linspace(0, n - 1, keep).round().astype(int).tolist()) if keep else set()
    examples = []
    for i, prob in enumerate(_probabilities(net, images, cfg, "evaluate", progress)):
        lab = np.asarray(labels[i])
        c = confusion(prob > threshold, lab)
        counts = add_counts(counts, c)
        bins = np.minimum((prob * PR_BINS).astype(np.int64), PR_BINS - 1)
        fg_hist += np.bincount(bins[lab == 1], minlength=PR_BINS)
        bg_hist += np.bincount(bins[lab == 0], minlength=PR_BINS)
        valid = lab != IGNORE
        truth = true_instances(lab)
        inst_ws = add_counts(inst_ws, match_instances(truth, split_instances(prob, threshold, ins.min_size, h, ins.smooth), valid=valid))
        inst_cc = add_counts(inst_cc, match_instances(truth, connected_instances(prob > threshold, ins.min_size), valid=valid))
        per_slice.append({"slice": i, "iou": scores(c)["iou"]})
        if i in keep_idx:
            examples.append((i, prob))
    px = scores(counts)
    ws, cc = instance_scores(inst_ws), instance_scores(inst_cc)
    metrics = {**px, **ws, "instance_f1_connected": cc["instance_f1"], "splits_connected": cc["splits"],
               "merges_connected": cc["merges"], "slices": n, "threshold": threshold, "watershed_h": float(h)}
    return Evaluation(metrics, per_slice, _pr_curve(fg_hist, bg_hist), examples)
