"""Pool-based active learning as a simulation: the ground truth plays the annotator (the oracle).

Round 0 labels ``initial`` random patches and trains from ``train.init``; every later round scores
the pool with the current network, queries ``query`` patches with a strategy, reveals their labels
(all of each patch, or only part of it with ``label_fraction`` < 1: the rest stays IGNORE and the
loss skips it), fine-tunes from the previous round's weights and scores the test slices.
Round 0 depends on the seed only, so it is trained once per seed and shared by every strategy.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import Callable

import numpy as np

from emseg import IGNORE
from emseg.active.pool import score_pool
from emseg.active.strategies import Candidates, grid_candidates, select, select_random
from emseg.config import ActiveParams, Params, derive
from emseg.inference import predict_tiled
from emseg.metrics import add_counts, confusion, scores


@dataclass
class ActiveData:
    pool_images: np.ndarray  # (n, H, W) float32, normalised
    pool_labels: np.ndarray  # (n, H, W) uint8 0/1/IGNORE: hidden from strategies, revealed by the oracle
    val_images: np.ndarray
    val_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def crops(stack: np.ndarray, cands: Candidates, idx) -> np.ndarray:
    s = cands.size
    return np.stack([np.asarray(stack[z, y:y + s, x:x + s]) for z, y, x in cands.zyx[list(idx)]])


def reveal(labels: np.ndarray, cands: Candidates, idx, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """The oracle: label crops of the chosen patches. With ``fraction`` < 1 only a random set of
    square blocks (an eighth of the patch wide) covering about that share is labelled; the rest is IGNORE,
    as when a person paints part of a patch and leaves the rest blank."""
    out = crops(labels, cands, idx)
    if fraction >= 1:
        return out
    s = cands.size
    b = max(s // 8, 1)
    nb = -(-s // b)
    for crop in out:
        keep = rng.random((nb, nb)) < fraction
        if not keep.any():
            keep[rng.integers(nb), rng.integers(nb)] = True
        mask = np.kron(keep, np.ones((b, b), bool))[:s, :s]
        crop[~mask] = IGNORE
    return out


def pixel_iou(net, images, labels, tile: int = 1024) -> float:
    """Foreground IoU over a labelled stack (tiled prediction, threshold 0.5)."""
    counts: dict = {}
    for i in range(len(images)):
        counts = add_counts(counts, confusion(predict_tiled(net, images[i], tile=tile, overlap=64) > 0.5,
                                              np.asarray(labels[i])))
    return scores(counts)["iou"]


def round_params(params: Params, cfg: ActiveParams, epochs: int, seed: int) -> Params:
    """The training settings of one round: the project's, with the active-learning budget on top."""
    return derive(params, {"seed": seed, "model": {"dropout": cfg.dropout}, "train": {
        "patch_size": cfg.patch_size, "patches_per_epoch": cfg.patches_per_epoch, "batch_size": cfg.batch_size,
        "lr": cfg.lr, "max_epochs": epochs, "early_stopping_patience": epochs, "use_tuned": False,
        "max_minutes": None, "semi": {"weight": 0.0}}},
        "params.yaml: active (its settings as train.* and model.dropout)")


def _train(params: Params, cfg: ActiveParams, data: ActiveData, cands: Candidates, labelled: list[int],
           revealed: np.ndarray, epochs: int, seed: int, start_from=None):
    from emseg.data.datamodule import ArraySplits
    from emseg.model.train import fit

    p = round_params(params, cfg, epochs, seed)
    splits = ArraySplits(crops(data.pool_images, cands, labelled), revealed, data.val_images, data.val_labels)
    with tempfile.TemporaryDirectory(prefix="emseg-al-") as work:
        res = fit(p, splits, work, lr=cfg.lr, batch_size=cfg.batch_size, progress=False, start_from=start_from)
    return res.net


def simulate(params: Params, cfg: ActiveParams, data: ActiveData, strategy: str, seed: int,
             initial_cache: dict | None = None, on_round: Callable[[dict, object], None] | None = None) -> list[dict]:
    """One strategy, one seed: rows of (round, labelled patches, labelled pixels, test IoU)."""
    n, H, W = data.pool_images.shape
    cands = grid_candidates(n, H, W, cfg.patch_size, cfg.stride or cfg.patch_size // 2)
    rng = np.random.default_rng([seed, 0])
    labelled = select_random(len(cands), cfg.initial, rng, cands, (), cfg.max_overlap, cfg.z_gap)
    revealed = reveal(data.pool_labels, cands, labelled, cfg.label_fraction, np.random.default_rng([seed, 1]))
    cache = initial_cache if initial_cache is not None else {}
    if seed not in cache:
        cache[seed] = _train(params, cfg, data, cands, labelled, revealed, cfg.epochs_first, seed)
    net = cache[seed]
    rows = []
    query_rng = np.random.default_rng([seed, 2])
    for r in range(cfg.rounds + 1):
        if r:
            needs_mc = strategy == "bald" or (strategy == "hybrid" and cfg.hybrid_base == "bald")
            pool = None if strategy == "random" else score_pool(
                net, data.pool_images, cands, cfg.mc_passes if needs_mc else 1, progress=False, keep_maps=False)
            base = cfg.hybrid_base if strategy == "hybrid" else strategy
            picks = select(strategy, cfg.query, cands, rng=query_rng, labelled=labelled,
                           uncertainty=pool.scores.get(base) if pool else None,
                           features=pool.features if pool else None, shortlist_factor=cfg.shortlist_factor,
                           max_overlap=cfg.max_overlap, z_gap=cfg.z_gap)
            new = reveal(data.pool_labels, cands, picks, cfg.label_fraction, np.random.default_rng([seed, 3, r]))
            labelled = labelled + picks
            revealed = np.concatenate([revealed, new])
            net = _train(params, cfg, data, cands, labelled, revealed, cfg.epochs_round, seed, start_from=net)
        row = {"strategy": strategy, "seed": seed, "round": r, "labelled": len(labelled),
               "labelled_pixels": int((revealed != IGNORE).sum()),
               "test_iou": pixel_iou(net, data.test_images, data.test_labels)}
        rows.append(row)
        if on_round:
            on_round(row, cands.zyx[labelled])
    return rows
