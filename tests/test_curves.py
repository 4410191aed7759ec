"""The numbers behind the label-efficiency claims: who reaches random's IoU with how many labels."""

from emseg.curves import (by_budget, learning_curve_markdown, strategies_markdown, summarise_learning_curve,
                          summarise_strategies)


def _rows(strategy, per_budget):
    return [{"strategy": strategy, "seed": s, "labelled": b, "test_iou": v}
            for b, vals in per_budget.items() for s, v in enumerate(vals)]


def test_labels_to_reach_random_margin_and_spread():
    rows = (_rows("random", {4: [0.40, 0.42], 8: [0.50, 0.52], 16: [0.60, 0.64]})
            + _rows("bald", {4: [0.40, 0.42], 8: [0.63, 0.65], 16: [0.70, 0.70]})
            + _rows("kmeans", {4: [0.40, 0.42], 8: [0.45, 0.45], 16: [0.55, 0.57]}))
    s = summarise_strategies(rows)
    assert s["budgets"] == [4, 8, 16] and s["largest_budget"] == 16
    bald, km, rnd = (s["strategies"][k] for k in ("bald", "kmeans", "random"))
    # random@16 has mean 0.62: bald's mean passes it at 8 labels (half), kmeans never does.
    assert bald["labels_to_reach_random_at_largest"] == 8 and bald["label_ratio_vs_random"] == 0.5
    assert km["labels_to_reach_random_at_largest"] is None and km["label_ratio_vs_random"] is None
    assert rnd["labels_to_reach_random_at_largest"] == 16 and rnd["margin_over_random_at_largest"] == 0
    assert abs(bald["margin_over_random_at_largest"] - 0.08) < 1e-9
    # Sample sd (ddof=1): random@16 [0.60, 0.64] -> 0.0283, which beats bald's 0.
    assert abs(bald["seed_spread_at_largest"] - 0.0283) < 1e-9
    assert abs(km["sd_iou"]["16"] - 0.0141) < 1e-9
    md = strategies_markdown(s)
    assert "| bald | 0.410 ± 0.014 | 0.640 ± 0.014 | 0.700 ± 0.000 | 8 (0.50x) | +0.080 (0.028) |" in md
    assert "| kmeans |" in md and "not reached" in md
    assert by_budget(s)[1] == {"labelled": 8, "random": 0.51, "bald": 0.64, "kmeans": 0.45}


def test_one_seed_has_no_spread_and_the_table_says_so():
    s = summarise_strategies(_rows("random", {4: [0.40], 8: [0.50]}) + _rows("bald", {4: [0.45], 8: [0.55]}))
    assert s["strategies"]["bald"]["seed_spread_at_largest"] is None
    assert "| bald | 0.450 ± - | 0.550 ± - | 8 (1.00x) | +0.050 (-) |" in strategies_markdown(s)


def test_learning_curve_comparisons():
    pts = [{"init": i, "slices": n, "seed": s, "test_iou": v}
           for i, vals in (("scratch", {1: [0.2, 0.3], 4: [0.5, 0.5], 12: [0.7, 0.72], 40: [0.8, 0.8]}),
                           ("pretrained", {1: [0.5, 0.5], 4: [0.72, 0.74], 12: [0.8, 0.82], 40: [0.82, 0.84]}))
           for n, v2 in vals.items() for s, v in enumerate(v2)]
    table, out = summarise_learning_curve(pts)
    assert len(table) == 8 and {r["seeds"] for r in table} == {2}
    assert out["pretrained_4_vs_scratch_12"] == {"pretrained_4": 0.73, "scratch_12": 0.71, "met": True}
    assert out["scratch_12_vs_all"] == {"12": 0.71, "40": 0.8}
    # The fewest pretrained slices that reach scratch's mean at each count.
    assert out["pretrained_slices_to_match_scratch"] == {"1": 1, "4": 1, "12": 4, "40": 12}


def test_learning_curve_table_uses_sample_sd_and_says_what_stopped_each_point():
    pts = [{"init": "scratch", "slices": 4, "seed": s, "test_iou": v, "epochs": e, "stopped_by": by}
           for s, (v, e, by) in enumerate([(0.60, 20, "early stopping"), (0.64, 60, "epoch cap"),
                                           (0.68, 31, "early stopping")])]
    pts.append({"init": "scratch", "slices": 12, "seed": 0, "test_iou": 0.7, "epochs": 12,
                "stopped_by": "early stopping"})
    table, _ = summarise_learning_curve(pts)
    four, twelve = table
    assert four["sd_iou"] == 0.04 and four["mean_iou"] == 0.64  # ddof=1: sqrt(0.0032 / 2)
    assert four["mean_epochs"] == 37.0 and four["stopped_by_cap"] == 1
    assert twelve["sd_iou"] is None  # one seed has no spread
    md = learning_curve_markdown(table)
    assert "| scratch | 4 | 0.640 | 0.040 | 0.600 | 0.680 | 3 | 37 | 1 of 3 |" in md
    assert "| scratch | 12 | 0.700 | - | 0.700 | 0.700 | 1 | 12 | 0 of 1 |" in md
