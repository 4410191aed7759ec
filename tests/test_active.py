"""Active-learning strategies on small synthetic pools whose right answer is known, and the pool scorer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from emseg.active.pool import score_pool
from emseg.active.strategies import (Candidates, bald, binary_entropy, grid_candidates, least_confidence, patch_sums,
                                     select)
from emseg import IGNORE
from emseg.errors import ConfigError


def far_apart(m: int, size: int = 8) -> Candidates:
    """m candidates, one per slice; with z_gap=0 none is a near-duplicate of another."""
    return Candidates(np.array([[i, 0, 0] for i in range(m)]), size)


def rng():
    return np.random.default_rng(0)


def test_grid_covers_the_slice_flush_with_the_border():
    c = grid_candidates(2, 100, 130, 32, 24)
    assert c.zyx[:, 1].max() == 100 - 32 and c.zyx[:, 2].max() == 130 - 32
    assert set(c.zyx[:, 0]) == {0, 1}
    with pytest.raises(ValueError, match="larger than the slices"):
        grid_candidates(1, 20, 20, 32)


def test_patch_sums_match_direct_sums():
    maps = np.random.default_rng(1).random((2, 40, 50))
    c = grid_candidates(2, 40, 50, 16, 7)
    direct = [maps[z, y:y + 16, x:x + 16].sum() for z, y, x in c.zyx]
    assert np.allclose(patch_sums(maps, c), direct)


def test_random_is_reproducible_distinct_and_skips_the_labelled():
    c = far_apart(20)
    a = select("random", 5, c, rng=np.random.default_rng(3), labelled=[0, 1], z_gap=0)
    b = select("random", 5, c, rng=np.random.default_rng(3), labelled=[0, 1], z_gap=0)
    assert a == b and len(set(a)) == 5 and not {0, 1} & set(a)
    assert a != select("random", 5, c, rng=np.random.default_rng(4), labelled=[0, 1], z_gap=0)


def test_entropy_picks_the_patch_the_model_is_unsure_about():
    probs = np.full((4, 8, 8), 0.02)
    probs[2] = 0.5  # the model cannot decide on patch 2
    probs[1, :4] = 0.97
    c = far_apart(4)
    scores = patch_sums(binary_entropy(probs), c)
    assert select("entropy", 1, c, rng=rng(), z_gap=0, uncertainty=scores) == [2]


def test_least_confidence_prefers_the_lowest_top_class_probability():
    probs = np.stack([np.full((8, 8), p) for p in (0.9, 0.6, 0.99, 0.3)])
    c = far_apart(4)
    scores = patch_sums(least_confidence(probs), c)
    assert select("least_confidence", 2, c, rng=rng(), z_gap=0, uncertainty=scores) == [1, 3]


def test_bald_tells_model_disagreement_from_noise():
    # Patch 0: every dropout pass says 0.5 (aleatoric: noisy data, nothing to learn from a label).
    # Patch 1: the passes disagree, 0.05 or 0.95 (epistemic: a label teaches the model something).
    T = 8
    samples = np.zeros((T, 2, 8, 8))
    samples[:, 0] = 0.5
    samples[:, 1] = np.where(np.arange(T) % 2 == 0, 0.05, 0.95)[:, None, None]
    c = far_apart(2)
    ent = patch_sums(binary_entropy(samples.mean(0)), c)
    assert np.isclose(ent[0], ent[1])  # predictive entropy cannot tell them apart
    mi = patch_sums(bald(samples), c)
    assert mi[0] < 1e-9 < mi[1]
    assert select("bald", 1, c, rng=rng(), z_gap=0, uncertainty=mi) == [1]


def clusters(sizes=(6, 6, 6), dim=5, spread=0.05, seed=0):
    g = np.random.default_rng(seed)
    centres = np.eye(dim)[: len(sizes)] * 10
    feats = np.concatenate([c + spread * g.standard_normal((n, dim)) for c, n in zip(centres, sizes)])
    labels = np.repeat(np.arange(len(sizes)), sizes)
    return feats, labels


def test_kmeans_takes_one_representative_per_cluster():
    feats, group = clusters((10, 4, 6))
    c = far_apart(len(feats))
    picks = select("kmeans", 3, c, rng=rng(), z_gap=0, features=feats)
    assert sorted(group[picks]) == [0, 1, 2]


def test_coreset_goes_where_nothing_is_labelled():
    feats, group = clusters((8, 8, 1))
    c = far_apart(len(feats))
    labelled = [0, 1]  # two from cluster 0
    picks = select("coreset", 2, c, rng=rng(), z_gap=0, labelled=labelled, features=feats)
    # The lone point of cluster 2 and one of cluster 1: the farthest from everything labelled.
    assert sorted(group[picks]) == [1, 2]


def test_hybrid_mixes_uncertainty_with_diversity():
    feats, group = clusters((5, 5, 5))
    unc = np.zeros(len(feats))
    unc[group == 0] = [10, 9.9, 9.8, 9.7, 9.6]  # the most uncertain are all alike
    unc[group == 1] = [5, 4, 3, 2, 1]
    unc[group == 2] = 0.0  # certain: not worth a label however different
    c = far_apart(len(feats))
    picks = select("hybrid", 2, c, rng=rng(), z_gap=0, uncertainty=unc, features=feats, shortlist_factor=3)
    assert sorted(group[picks]) == [0, 1]  # entropy alone would take two of group 0
    assert sorted(group[select("entropy", 2, c, rng=rng(), z_gap=0, uncertainty=unc)]) == [0, 0]


def test_batches_skip_near_duplicates_in_space_and_neighbouring_slices():
    # Three copies of the same uncertain spot: overlapping on slice 0, and the same place on slice 1.
    zyx = np.array([[0, 0, 0], [0, 0, 4], [1, 0, 0], [5, 40, 40], [9, 40, 40]])
    c = Candidates(zyx, 16)
    scores = np.array([10.0, 9.0, 8.0, 1.0, 0.5])
    assert select("entropy", 3, c, rng=rng(), uncertainty=scores) == [0, 3, 4]
    assert select("entropy", 3, c, rng=rng(), uncertainty=scores, z_gap=0, max_overlap=0.9) == [0, 1, 2]
    # ...and the labelled set counts as taken.
    assert select("entropy", 1, c, rng=rng(), uncertainty=scores, labelled=[3]) == [0]


def test_unknown_strategy_is_refused():
    with pytest.raises(ValueError, match="unknown strategy"):
        select("best", 1, far_apart(2), rng=rng())


def tiny_net(dropout: float):
    from emseg.model.network import SegmentationNet

    torch.manual_seed(0)
    return SegmentationNet({"arch": "Unet", "encoder": "resnet18", "decoder_channels": [32, 16, 8, 8, 8],
                            "bn_momentum": 0.1, "dropout": dropout, "input_scale": 1.0}).eval()


def test_score_pool_reads_patch_scores_off_whole_slice_maps():
    net = tiny_net(0.3)
    images = np.random.default_rng(0).standard_normal((2, 64, 96)).astype(np.float32)
    c = grid_candidates(2, 64, 96, 32, 32)
    pool = score_pool(net, images, c, passes=4, progress=False)
    assert pool.probability.shape == (2, 64, 96) and pool.features.shape[0] == len(c)
    for k in ("entropy", "least_confidence", "bald"):
        assert np.allclose(pool.scores[k], patch_sums(pool.maps[k], c), rtol=1e-4)
    assert pool.scores["bald"].max() > 0  # dropout passes disagree somewhere
    # Same numbers without keeping the maps (the large-stack path).
    torch.manual_seed(1)
    lean = score_pool(net, images, c, passes=1, progress=False, keep_maps=False)
    torch.manual_seed(1)
    full = score_pool(net, images, c, passes=1, progress=False)
    assert np.allclose(lean.scores["entropy"], full.scores["entropy"]) and lean.maps["entropy"].size == 0


def test_mc_dropout_samples_match_full_passes_with_dropout_off():
    net = tiny_net(0.3)
    x = torch.randn(1, 1, 64, 64)
    logits, bottleneck = net.mc_logits(x, 1)
    assert torch.allclose(logits[0], net(x), atol=1e-5)
    assert bottleneck.shape[-2:] == (2, 2)


def test_bald_needs_a_model_with_dropout():
    with pytest.raises(ConfigError, match="model.dropout"):
        score_pool(tiny_net(0.0), np.zeros((1, 64, 64), np.float32), grid_candidates(1, 64, 64, 32), passes=4,
                   progress=False)


def test_the_oracle_reveals_whole_patches_or_a_part_of_each():
    from emseg.active.loop import reveal

    labels = np.random.default_rng(0).integers(0, 2, (2, 64, 64)).astype(np.uint8)
    c = grid_candidates(2, 64, 64, 32)
    full = reveal(labels, c, [0, 5], 1.0, np.random.default_rng(0))
    assert np.array_equal(full[1], labels[1, :32, 32:])
    part = reveal(labels, c, [0, 5], 0.4, np.random.default_rng(0))
    share = (part != IGNORE).mean()
    assert 0.1 < share < 0.8
    kept = part != IGNORE
    assert np.array_equal(part[kept], full[kept])
