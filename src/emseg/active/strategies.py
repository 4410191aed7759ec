"""Query strategies for pool-based active learning: which unlabelled patches to label next.

Plain numpy in, indices out; no framework. A pool is a list of candidate patches
(``Candidates``: slice, y, x and one square size). Strategies see per-candidate numbers that
``emseg.active.pool`` computes from a network:

- ``uncertainty``: a score per candidate (pixel-wise entropy summed over the patch, least confidence,
  or BALD's mutual information from Monte Carlo dropout);
- ``features``: a vector per candidate (the U-Net bottleneck averaged over the patch).

Every batch selection refuses near-duplicates: a candidate that overlaps an already chosen one in
(y, x) by more than ``max_overlap`` of its area within ``z_gap`` slices (neighbouring EM slices are
almost the same image), or whose features are almost those of a chosen one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STRATEGIES = ("random", "entropy", "least_confidence", "bald", "kmeans", "coreset", "hybrid")
UNCERTAINTY = {"entropy", "least_confidence", "bald"}
NEEDS_FEATURES = {"kmeans", "coreset", "hybrid"}


@dataclass(frozen=True)
class Candidates:
    """Square patches of side ``size``: ``zyx`` is an (m, 3) int array of slice, top, left."""

    zyx: np.ndarray
    size: int

    def __len__(self) -> int:
        return len(self.zyx)


def grid_candidates(n_slices: int, height: int, width: int, size: int, stride: int | None = None,
                    slices=None) -> Candidates:
    """Every patch of a regular grid (the last row and column flush with the border) on each slice."""
    if size > height or size > width:
        raise ValueError(f"patch size {size} is larger than the slices ({height}x{width})")
    stride = stride or size

    def starts(length):
        s = list(range(0, length - size + 1, stride))
        return s if s[-1] == length - size else s + [length - size]

    zs = range(n_slices) if slices is None else slices
    zyx = [(z, y, x) for z in zs for y in starts(height) for x in starts(width)]
    return Candidates(np.asarray(zyx, np.int64).reshape(-1, 3), size)


# ---------------------------------------------------------------------------------------------
# Pixel-wise uncertainty and its patch sums
# ---------------------------------------------------------------------------------------------
def binary_entropy(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), 1e-7, 1 - 1e-7)
    return -(p * np.log(p) + (1 - p) * np.log(1 - p))


def least_confidence(p: np.ndarray) -> np.ndarray:
    p = np.asarray(p, np.float64)
    return 1.0 - np.maximum(p, 1.0 - p)


def bald(samples: np.ndarray) -> np.ndarray:
    """Mutual information between prediction and weights, from T Monte Carlo dropout samples (T, ...):
    entropy of the mean minus the mean entropy. High where the passes disagree, zero where they
    agree, however uncertain each of them is."""
    samples = np.asarray(samples, np.float64)
    return np.maximum(binary_entropy(samples.mean(0)) - binary_entropy(samples).mean(0), 0.0)


def patch_sums(maps: np.ndarray, cands: Candidates) -> np.ndarray:
    """Sum of a per-pixel map (n, H, W) over each candidate patch, through integral images."""
    maps = np.asarray(maps, np.float64)
    ii = np.zeros((maps.shape[0], maps.shape[1] + 1, maps.shape[2] + 1))
    ii[:, 1:, 1:] = maps.cumsum(1).cumsum(2)
    z, y, x = cands.zyx.T
    s = cands.size
    return ii[z, y + s, x + s] - ii[z, y, x + s] - ii[z, y + s, x] + ii[z, y, x]


# ---------------------------------------------------------------------------------------------
# Batch selection
# ---------------------------------------------------------------------------------------------
def _duplicate(cands: Candidates, i: int, chosen: list[int], max_overlap: float, z_gap: int,
               features: np.ndarray | None, min_feature_distance: float) -> bool:
    if not chosen:
        return False
    c = cands.zyx[chosen]
    z, y, x = cands.zyx[i]
    s = cands.size
    oy = np.clip(s - np.abs(c[:, 1] - y), 0, None)
    ox = np.clip(s - np.abs(c[:, 2] - x), 0, None)
    near = (np.abs(c[:, 0] - z) <= z_gap) & (oy * ox > max_overlap * s * s)
    if near.any():
        return True
    if features is not None and min_feature_distance > 0:
        d = np.linalg.norm(features[chosen] - features[i], axis=1)
        return bool((d < min_feature_distance).any())
    return False


def greedy_top(scores: np.ndarray, k: int, cands: Candidates, exclude=(), max_overlap: float = 0.25,
               z_gap: int = 1, features: np.ndarray | None = None, min_feature_distance: float = 0.0) -> list[int]:
    """The k best-scoring candidates, best first, skipping near-duplicates of those already taken
    (and of ``exclude``: the labelled set)."""
    taken = list(exclude)
    picked: list[int] = []
    for i in np.argsort(-np.asarray(scores), kind="stable"):
        i = int(i)
        if i in taken or _duplicate(cands, i, taken, max_overlap, z_gap, features, min_feature_distance):
            continue
        picked.append(i)
        taken.append(i)
        if len(picked) == k:
            break
    return picked


def select_random(n: int, k: int, rng: np.random.Generator, cands: Candidates, exclude=(),
                  max_overlap: float = 0.25, z_gap: int = 1) -> list[int]:
    return greedy_top(rng.random(n), k, cands, exclude, max_overlap, z_gap)


def _standardise(features: np.ndarray) -> np.ndarray:
    # Centre, and one scale for all channels: scaling each channel to unit variance would blow
    # near-constant (uninformative) channels up to the weight of the informative ones.
    f = np.asarray(features, np.float64)
    f = f - f.mean(0)
    return f / (np.sqrt((f ** 2).sum(1).mean()) + 1e-12)


def kmeans(x: np.ndarray, k: int, rng: np.random.Generator, iters: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """k-means with k-means++ seeding: (centres (k, d), assignment (n,))."""
    n = len(x)
    centres = [x[rng.integers(n)]]
    for _ in range(1, k):
        d2 = np.min(((x[:, None] - np.asarray(centres)[None]) ** 2).sum(-1), axis=1)
        probs = d2 / d2.sum() if d2.sum() > 0 else np.full(n, 1 / n)
        centres.append(x[rng.choice(n, p=probs)])
    centres = np.asarray(centres)
    assign = np.zeros(n, np.int64)
    for it in range(iters):
        d2 = ((x[:, None] - centres[None]) ** 2).sum(-1)
        new = d2.argmin(1)
        if it and (new == assign).all():
            break
        assign = new
        for j in range(k):
            if (assign == j).any():
                centres[j] = x[assign == j].mean(0)
    return centres, assign


def select_kmeans(features: np.ndarray, k: int, rng: np.random.Generator, cands: Candidates, exclude=(),
                  max_overlap: float = 0.25, z_gap: int = 1) -> list[int]:
    """Cluster the unlabelled candidates' features into k groups; take the member nearest each centre
    (a representative of every kind of structure in the pool)."""
    free = np.setdiff1d(np.arange(len(features)), np.asarray(list(exclude), np.int64))
    x = _standardise(features)[free]
    centres, assign = kmeans(x, min(k, len(free)), rng)
    # Score: closeness to the own centre; one pick per cluster first, then fill with the next closest.
    dist = np.linalg.norm(x - centres[assign], axis=1)
    picked: list[int] = []
    taken = list(exclude)
    for j in np.argsort(np.bincount(assign, minlength=len(centres)))[::-1]:
        members = np.where(assign == j)[0]
        for m in members[np.argsort(dist[members])]:
            i = int(free[m])
            if not _duplicate(cands, i, taken, max_overlap, z_gap, None, 0):
                picked.append(i)
                taken.append(i)
                break
    if len(picked) < k:
        rest = np.full(len(features), -np.inf)
        rest[free] = -dist
        picked += greedy_top(rest, k - len(picked), cands, taken, max_overlap, z_gap)
    return picked[:k]


def select_coreset(features: np.ndarray, k: int, cands: Candidates, exclude=(), candidates_only=None,
                   max_overlap: float = 0.25, z_gap: int = 1) -> list[int]:
    """Greedy k-centre (core-set): repeatedly take the candidate farthest from everything labelled or
    already taken, so the labelled set covers the feature space. ``candidates_only`` restricts the
    choice (not the distances) to a subset."""
    x = _standardise(features)
    labelled = list(exclude)
    if labelled:
        dmin = np.min(np.linalg.norm(x[:, None] - x[labelled][None], axis=-1), axis=1)
    else:
        dmin = np.linalg.norm(x - x.mean(0), axis=1)  # nothing labelled yet: start from the outskirts
    allowed = np.zeros(len(x), bool)
    allowed[np.arange(len(x)) if candidates_only is None else np.asarray(candidates_only, np.int64)] = True
    allowed[labelled] = False
    picked: list[int] = []
    taken = list(labelled)
    while len(picked) < k and allowed.any():
        score = np.where(allowed, dmin, -np.inf)
        i = int(np.argmax(score))
        allowed[i] = False
        if _duplicate(cands, i, taken, max_overlap, z_gap, None, 0):
            continue
        picked.append(i)
        taken.append(i)
        dmin = np.minimum(dmin, np.linalg.norm(x - x[i], axis=1))
    return picked


def select_hybrid(uncertainty: np.ndarray, features: np.ndarray, k: int, cands: Candidates, exclude=(),
                  shortlist_factor: int = 4, max_overlap: float = 0.25, z_gap: int = 1) -> list[int]:
    """Uncertainty, then diversity: shortlist the ``shortlist_factor * k`` most uncertain candidates
    (near-duplicates already removed), then pick k of them by greedy k-centre on their features."""
    short = greedy_top(uncertainty, shortlist_factor * k, cands, exclude, max_overlap, z_gap)
    return select_coreset(features, k, cands, exclude, candidates_only=short, max_overlap=max_overlap, z_gap=z_gap)


def select(strategy: str, k: int, cands: Candidates, *, rng: np.random.Generator, labelled=(),
           uncertainty: np.ndarray | None = None, features: np.ndarray | None = None,
           shortlist_factor: int = 4, max_overlap: float = 0.25, z_gap: int = 1) -> list[int]:
    """Indices of the k candidates ``strategy`` would have labelled next."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    n = len(cands)
    if strategy == "random":
        return select_random(n, k, rng, cands, labelled, max_overlap, z_gap)
    if strategy in UNCERTAINTY:
        return greedy_top(uncertainty, k, cands, labelled, max_overlap, z_gap)
    if strategy == "kmeans":
        return select_kmeans(features, k, rng, cands, labelled, max_overlap, z_gap)
    if strategy == "coreset":
        return select_coreset(features, k, cands, labelled, max_overlap=max_overlap, z_gap=z_gap)
    return select_hybrid(uncertainty, features, k, cands, labelled, shortlist_factor, max_overlap, z_gap)
