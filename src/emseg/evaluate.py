"""Score a network on a labelled stack: pixel metrics, instance metrics, per-slice IoU, PR curve."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from emseg import IGNORE
from emseg.config import EvaluateParams
from emseg.data.patches import with_context
from emseg.errors import ConfigError
from emseg.inference import predict_tiled, z_average, z_averaged
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


def _holds_neighbours(images, k: int) -> bool:
    """Whether these are validation inputs that hold each slice's z neighbours' inputs
    (``load_val_context``: (n, 3, H, W) or (n, 3, K, H, W), windows of K slices). For a 2D network
    (n, 3, H, W) may also be a 3-slice split ([z - 1, z, z + 1], mirrored alike): the same thing."""
    return np.ndim(images) == 5 or (np.ndim(images) == 4 and k == 1 and np.shape(images)[1] == 3)


def neighbour_input(images, i: int, j: int, k: int) -> np.ndarray:
    """Network input of neighbour j (0: z - 1, 1: z, 2: z + 1) of slice i, from inputs that hold them:
    the middle k slices of its window (:func:`with_context`)."""
    x = np.asarray(images[i, j])
    if x.ndim == 2:
        return x
    w = with_context(x[None], k)[0]
    return w[0] if k == 1 and w.ndim == 3 else w  # a window of one slice: the slice


def _probabilities(net, images, cfg: EvaluateParams, desc: str, progress: bool,
                   runs: list[tuple[int, int]] | None = None):
    """Yield each slice's tiled prediction, with a progress bar; the network's layout is switched
    once for the stack (``cfg.inference.channels_last``), not once per slice inside predict_tiled.

    With ``cfg.z_average`` each probability is averaged with its z neighbours': from the inputs
    themselves where they hold their neighbours' (the validation inputs of ``load_val_context``: the
    three windows are predicted), else through ``runs`` of consecutive slices (the ends of each run
    mirrored). Inputs that hold neighbours are predicted from their middle window without it."""
    inf = cfg.inference.model_dump()
    k = int(getattr(net, "spec", {}).get("z_context", 1))
    wide = _holds_neighbours(images, k) and (np.ndim(images) == 5 or runs is None)
    if cfg.z_average and not wide and runs is None:
        raise ConfigError(f"evaluate.z_average: these {len(images)} slices are not consecutive and hold no z "
                          "neighbours: score runs of consecutive slices, or the validation inputs that `emseg "
                          "prepare` keeps with their neighbours")
    if not (cfg.z_average and wide):
        # The slices themselves (the middle window of inputs that hold neighbours); a 2D champion on 2.5D data.
        images = with_context(images[:, 1] if wide else images, k)
    if cfg.z_average and not wide and [i for a, b in runs for i in range(a, b)] != list(range(len(images))):
        raise ValueError(f"runs {runs} do not cover the {len(images)} slices once, in order")
    with channels_last(net, cfg.inference.channels_last):
        if cfg.z_average and wide:
            for i in tqdm(range(len(images)), desc=desc, unit="slice", disable=not progress):
                yield z_average(*(predict_tiled(net, neighbour_input(images, i, j, k), **inf) for j in range(3)))
        elif cfg.z_average:
            with tqdm(total=len(images), desc=desc, unit="slice", disable=not progress) as bar:
                for a, b in runs:
                    for prob in z_averaged(predict_tiled(net, images[i], **inf) for i in range(a, b)):
                        bar.update()
                        yield prob
        else:
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


def choose_z_average(net, images, labels, cfg: EvaluateParams, threshold: float = 0.5,
                     progress: bool = True) -> tuple[EvaluateParams, list[dict]]:
    """``cfg`` with z-averaging on when it scores a higher foreground IoU on these (validation) slices
    than the plain probabilities, else off (a tie keeps plain); and both scores. ``images``: inputs with
    one neighbour more on either side than the network takes (``load_val_context``)."""
    rows = [{"z_average": z, "iou": pixel_iou(net, images, labels, cfg.model_copy(update={"z_average": z}),
                                             threshold, f"choose z-averaging ({z})", progress)}
            for z in (False, True)]
    return cfg.model_copy(update={"z_average": rows[1]["iou"] > rows[0]["iou"]}), rows


def choose_switches(net, images, labels, cfg: EvaluateParams, threshold: float = 0.5,
                    progress: bool = True) -> EvaluateParams:
    """``cfg`` with flip TTA (``cfg.choose_tta``), then z-averaging (``cfg.choose_z_average``) switched on
    or off by their foreground IoU on these (validation) slices; each choice printed with its scores."""
    if not len(images):
        return cfg
    for flag, choose, key, name in (("choose_tta", choose_tta, "tta", "flip TTA"),
                                    ("choose_z_average", choose_z_average, "z_average", "z-averaging")):
        if getattr(cfg, flag):
            cfg, rows = choose(net, images, labels, cfg, threshold, progress)
            on = cfg.inference.tta if key == "tta" else cfg.z_average
            print(f"evaluate: {name} on the validation slices: "
                  + ", ".join(f"{'on' if r[key] else 'off'} IoU {r['iou']:.4f}" for r in rows)
                  + f" -> {'on' if on else 'off'}")
    return cfg


def runs_of(indices) -> list[tuple[int, int]]:
    """Runs of consecutive slice indices as (start, stop) positions in the split: the stretches of the
    stack through which objects are followed in 3D."""
    idx = [int(z) for z in indices]
    starts = [0] + [i for i in range(1, len(idx)) if idx[i] != idx[i - 1] + 1]
    return [(a, b) for a, b in zip(starts, starts[1:] + [len(idx)]) if b > a]


def instance_truth(instances, cfg: EvaluateParams) -> tuple[str, str]:
    """(objects, description): how instance scores find the true objects of this split."""
    if instances is not None:
        return "2d", "object labels of the source (2D, per slice)"
    if cfg.instances.truth == "3d":
        return "3d", "3D connected components of the labels through each run of consecutive slices"
    return "2d", "2D connected components of each label slice"


def choose_watershed_h(net, images, labels, cfg: EvaluateParams, threshold: float = 0.5,
                       progress: bool = True, instances=None) -> tuple[float, list[dict]]:
    """The h of ``cfg.instances.h_choices`` with the best instance F1 on these (validation) slices.

    Each slice is predicted once and split with every candidate; a tie goes to the earlier candidate.
    Without choices the one candidate is ``cfg.instances.h`` (its row is still worth reporting).
    Returns ``cfg.instances.h`` with no rows when the slices hold no labelled object to judge by.
    ``instances``: the slices' object labels where the source has them; else each slice's connected
    components (validation slices lie ``data.min_gap`` apart, so each is a run of its own)."""
    ins = cfg.instances
    choices = list(ins.h_choices) or [ins.h]
    counts: list[dict] = [{} for _ in choices]
    for i, prob in enumerate(_probabilities(net, images, cfg, "choose watershed h", progress)):
        lab = np.asarray(labels[i])
        truth = true_instances(lab) if instances is None else np.asarray(instances[i])
        valid = lab != IGNORE
        for k, h in enumerate(choices):
            found = split_instances(prob, threshold, ins.min_size, h, ins.smooth)
            counts[k] = add_counts(counts[k], match_instances(truth, found, valid=valid))
    if not any(c.get("tp", 0) + c.get("fn", 0) for c in counts):  # no labelled object to judge by
        return ins.h, []
    rows = [{"h": h, **instance_scores(c)} for h, c in zip(choices, counts)]
    best = max(range(len(rows)), key=lambda k: (rows[k]["instance_f1"], -k))
    return float(rows[best]["h"]), rows


def evaluate_stack(net, images, labels, cfg: EvaluateParams, threshold: float = 0.5, keep: int = 3,
                   progress: bool = True, h: float | None = None, instances=None,
                   runs: list[tuple[int, int]] | None = None) -> Evaluation:
    """Predict every slice (tiled), accumulate pixel counts, instance matches and the PR histogram.

    ``h``: the watershed depth (default ``cfg.instances.h``), e.g. one chosen by ``choose_watershed_h``.
    ``instances``: object labels of the slices where the source has them (see ``instance_truth``).
    With 3D truth, the predicted masks of each run of consecutive slices (``runs``, default: all slices
    are one run) are split in 3D and matched with the 3D components of its labels; the masks of the
    split are held in memory as booleans (one byte a voxel). With ``cfg.z_average``, probabilities are
    averaged in z within each of ``runs`` (required then, unless the inputs hold their neighbours)."""
    ins = cfg.instances
    h = ins.h if h is None else h
    objects, truth_name = instance_truth(instances, cfg)
    counts: dict = {}
    inst_ws: dict = {}
    inst_cc: dict = {}
    fg_hist = np.zeros(PR_BINS, np.int64)
    bg_hist = np.zeros(PR_BINS, np.int64)
    per_slice = []
    n = len(images)
    keep_idx = set(np.linspace(0, n - 1, keep).round().astype(int).tolist()) if keep else set()
    examples = []
    masks = np.zeros((n, *np.shape(labels[0])), bool) if objects == "3d" and n else None
    for i, prob in enumerate(_probabilities(net, images, cfg, "evaluate", progress, runs)):
        lab = np.asarray(labels[i])
        c = confusion(prob > threshold, lab)
        counts = add_counts(counts, c)
        bins = np.minimum((prob * PR_BINS).astype(np.int64), PR_BINS - 1)
        fg_hist += np.bincount(bins[lab == 1], minlength=PR_BINS)
        bg_hist += np.bincount(bins[lab == 0], minlength=PR_BINS)
        if masks is not None:
            masks[i] = prob > threshold
        else:
            valid = lab != IGNORE
            truth = true_instances(lab) if instances is None else np.asarray(instances[i])
            inst_ws = add_counts(inst_ws, match_instances(
                truth, split_instances(prob, threshold, ins.min_size, h, ins.smooth), valid=valid))
            inst_cc = add_counts(inst_cc, match_instances(
                truth, connected_instances(prob > threshold, ins.min_size), valid=valid))
        per_slice.append({"slice": i, "iou": scores(c)["iou"]})
        if i in keep_idx:
            examples.append((i, prob))
    if masks is not None:
        for a, b in runs or [(0, n)]:
            lab = np.asarray(labels[a:b])
            truth, valid = true_instances(lab), lab != IGNORE
            inst_ws = add_counts(inst_ws, match_instances(
                truth, split_instances(masks[a:b], 0.5, ins.min_size, h, ins.smooth), valid=valid))
            inst_cc = add_counts(inst_cc, match_instances(truth, connected_instances(masks[a:b], ins.min_size),
                                                          valid=valid))
    px = scores(counts)
    ws, cc = instance_scores(inst_ws), instance_scores(inst_cc)
    metrics = {**px, **ws, "instance_f1_connected": cc["instance_f1"], "splits_connected": cc["splits"],
               "merges_connected": cc["merges"], "slices": n, "threshold": threshold, "watershed_h": float(h),
               "instance_truth": truth_name, "instance_objects": objects}
    return Evaluation(metrics, per_slice, _pr_curve(fg_hist, bg_hist), examples)
