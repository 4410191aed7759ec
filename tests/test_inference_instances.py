"""Tiled blended prediction and watershed instance splitting, with their metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.draw import disk

from conftest import SMALL_GENERATED
from emseg.config import parse_params
from emseg.data.prepare import load_split, prepare
from emseg.data.sources import fetch_raw
from emseg.data.generate import generate_slice
from emseg.evaluate import choose_watershed_h, evaluate_stack, runs_of
from emseg.inference import blend_window, predict_slice, predict_tiled, tile_layout
from emseg.instances import connected_instances, instance_scores, match_instances, split_instances
from emseg.model.network import channels_last, is_channels_last
from emseg.model.train import fit


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("inf")
    raw = {**SMALL_GENERATED, "data": {**SMALL_GENERATED["data"],
                                       "generated": {"slices": 8, "test_slices": 2, "height": 384, "width": 448}},
           "model": {"decoder_channels": [64, 32, 16, 16, 8]},
           "train": {"patch_size": 128, "patches_per_epoch": 64, "batch_size": 8, "max_epochs": 4, "lr": 0.003}}
    params = parse_params(raw)
    fetch_raw(params.data, d / "raw")
    prepare(params.data, d / "raw", d / "prep")
    res = fit(params, d / "prep", d / "work", lr=0.003, batch_size=8, progress=False)
    x, y = load_split(d / "prep", "test")
    return res.net, np.asarray(x[0]), np.asarray(y[0])


def test_tiled_matches_whole_image_away_from_borders_and_hides_seams(trained):
    net, image, _ = trained
    whole = predict_slice(net, image)
    tiled = predict_tiled(net, image, tile=128, overlap=32, batch_size=4)
    naive = predict_tiled(net, image, tile=128, overlap=0, batch_size=4)  # no ramp: tile edges are hard
    assert tiled.shape == whole.shape == image.shape
    inner = (slice(32, -32), slice(32, -32))
    err_blend = np.abs(tiled - whole)[inner]
    err_naive = np.abs(naive - whole)[inner]
    assert err_blend.mean() < 0.02
    # Along the unblended tiling's edges its tiles disagree with the whole-image prediction far more
    # than the blended ones do.
    edges = np.zeros(image.shape, bool)
    for axis, length in enumerate(image.shape):
        size, starts = tile_layout(length, 128, 0)
        for k in {*starts[1:], *(s + size for s in starts[:-1])}:
            if axis == 0:
                edges[k - 3:k + 3, :] = True
            else:
                edges[:, k - 3:k + 3] = True
    edges[:32], edges[-32:], edges[:, :32], edges[:, -32:] = False, False, False, False
    assert np.abs(naive - whole)[edges].mean() > 2 * np.abs(tiled - whole)[edges].mean()
    # The largest errors of both sit where a tile edge meets the image edge; above the 99th percentile
    # the unblended tiles' seams still show.
    assert np.percentile(err_naive, 99) > np.percentile(err_blend, 99)


@pytest.mark.parametrize("length,tile,overlap", [(2048, 1024, 128), (768, 1024, 128), (1056, 1024, 128),
                                                 (448, 128, 0), (4096, 512, 64), (3008, 1024, 256)])
def test_tile_layout_covers_with_the_fewest_smallest_tiles(length, tile, overlap):
    size, starts = tile_layout(length, tile, overlap)
    assert size <= tile and (size % 32 == 0 or size == length)
    assert starts[0] == 0 and starts[-1] + size == length
    assert all(b - a <= size - overlap for a, b in zip(starts, starts[1:]))  # neighbours overlap enough
    n = len(starts)
    assert n == 1 or n - 1 < (length - overlap) / (tile - overlap) <= n  # no fewer tiles would do
    assert n == 1 or n * (size - 32) - (n - 1) * overlap < length  # a 32-px smaller tile would not cover


def test_tta_and_small_images(trained):
    net, image, _ = trained
    small = image[:70, :90]  # smaller than a tile and not a multiple of 32
    p = predict_tiled(net, small, tile=128, overlap=32, tta=True)
    assert p.shape == (70, 90) and np.isfinite(p).all() and 0 <= p.min() and p.max() <= 1


def test_tta_is_the_mean_of_the_four_flipped_predictions(trained):
    """Each view is predicted on the flipped image and flipped back: the mean of the four plain predictions."""
    net, image, _ = trained
    img = image[:128, :160]  # one tile: no blending, so the comparison is exact up to float error
    tta = predict_tiled(net, img, tile=256, overlap=0, tta=True)
    views = [predict_tiled(net, np.ascontiguousarray(f(img)), tile=256, overlap=0) for f in
             (lambda a: a, np.fliplr, np.flipud, lambda a: np.flipud(np.fliplr(a)))]
    unflipped = [views[0], np.fliplr(views[1]), np.flipud(views[2]), np.fliplr(np.flipud(views[3]))]
    np.testing.assert_allclose(tta, np.mean(unflipped, axis=0), atol=1e-5)
    # Not a no-op: the flipped views of a trained network differ, so TTA differs from the plain prediction.
    assert np.abs(tta - views[0]).max() > 1e-3


def test_channels_last_layout_gives_the_same_probabilities_and_hands_the_network_back(trained):
    net, image, _ = trained
    assert not is_channels_last(net)  # fit() trained in NHWC (train.channels_last) and gave back NCHW
    nchw = predict_tiled(net, image, tile=128, overlap=32, channels_last=False)
    nhwc = predict_tiled(net, image, tile=128, overlap=32, channels_last=True)
    assert not is_channels_last(net)
    assert np.abs(nchw - nhwc).max() < 1e-4
    assert ((nchw > 0.5) != (nhwc > 0.5)).mean() < 1e-4
    with channels_last(net):
        assert is_channels_last(net)
        with channels_last(net):  # nested: the inner block leaves the layout to the outer one
            pass
        assert is_channels_last(net)
    assert not is_channels_last(net)


def test_blend_window_is_positive_and_peaks_in_the_middle():
    w = blend_window(128, 32)
    assert w.min() > 0 and w[64, 64] == 1.0 and w[0, 0] < 0.01


def _touching_pair(shape=(120, 160)):
    mask = np.zeros(shape, bool)
    truth = np.zeros(shape, np.uint32)
    for k, (cy, cx) in enumerate([(60, 50), (60, 86)], start=1):  # two discs of radius 20 that touch
        rr, cc = disk((cy, cx), 20, shape=shape)
        mask[rr, cc] = True
        truth[rr, cc] = k
    rr, cc = disk((30, 135), 10, shape=shape)  # and a separate small one
    mask[rr, cc] = True
    truth[rr, cc] = 3
    return mask, truth


def test_watershed_splits_touching_objects_that_components_merge():
    mask, truth = _touching_pair()
    prob = mask.astype(np.float32) * 0.9
    cc = connected_instances(mask)
    ws = split_instances(prob, 0.5, min_size=20)
    assert cc.max() == 2 and ws.max() == 3 and ws.dtype == np.uint32
    m_cc, m_ws = match_instances(truth, cc), match_instances(truth, ws)
    assert m_cc["merges"] == 1 and m_cc["fn"] >= 1  # the merged pair costs at least one true object
    assert m_ws == {"tp": 3, "fp": 0, "fn": 0, "splits": 0, "merges": 0}
    assert instance_scores(m_ws)["instance_f1"] == 1.0 > instance_scores(m_cc)["instance_f1"]


def test_an_elongated_object_is_not_oversplit_and_splits_are_counted():
    yy, xx = np.mgrid[0:100, 0:200]
    ellipse = ((yy - 50) ** 2 / 15**2 + (xx - 100) ** 2 / 70**2) < 1
    assert split_instances(ellipse.astype(np.float32), 0.5).max() == 1
    thirds = np.where(ellipse, np.digitize(xx, [77, 123]) + 1, 0)  # cut into three pieces, each < half
    m = match_instances(ellipse.astype(np.uint32), thirds)
    assert m == {"tp": 0, "fp": 3, "fn": 1, "splits": 1, "merges": 0}


def test_min_size_drops_specks():
    prob = np.zeros((50, 50), np.float32)
    prob[10:30, 10:30] = 1
    prob[40, 40] = 1
    assert split_instances(prob, min_size=5).max() == 1


def test_region_by_region_h_maxima_equal_the_whole_image_call_on_real_masks():
    """The seeds are skimage's h-maxima exactly, on EPFL masks in 2D and 3D and on noisy masks that touch
    the borders, for every h that evaluate offers."""
    import tifffile
    from scipy import ndimage
    from skimage.morphology import h_maxima

    from conftest import EPFL, require_shared
    from emseg.instances import _h_maxima

    require_shared()
    truth = tifffile.imread(EPFL / "testing_groundtruth.tif", key=range(40, 48))[:, 200:520, 300:700] == 255
    rng = np.random.default_rng(0)
    noisy = ndimage.gaussian_filter(rng.normal(size=(2, 300, 400)), 3) > 0.05
    cases = [truth, *truth[:3], *noisy]
    for mask, smooth in [(m, 1.0) for m in cases] + [(truth[4], 0.0), (noisy[0], 0.0)]:
        f = ndimage.gaussian_filter(ndimage.distance_transform_edt(connected_instances(mask, 30) > 0), smooth)
        for h in (1, 2, 4, 8):  # h above every region's height: no seed either way (skimage's own rule)
            expected = h_maxima(f, h)
            assert np.array_equal(_h_maxima(f, h), expected), (mask.shape, h)
            assert expected.any() or h > f.max(), (mask.shape, h)


class _MaskNet(torch.nn.Module):
    """A 'network' whose logits are +-5 on a 0/1 input mask: probabilities are the mask, nearly."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 1)
        torch.nn.init.constant_(self.conv.weight, 10.0)
        torch.nn.init.constant_(self.conv.bias, -5.0)

    def forward(self, x):
        return self.conv(x)


def test_watershed_h_is_chosen_by_instance_f1_on_the_given_slices():
    mask, truth = _touching_pair()
    # Semantic labels as an annotator paints touching objects: a 1-px background line between them.
    painted = (truth > 0) & ~((truth == 1) & (np.roll(truth, -1, axis=1) == 2))
    images = np.stack([mask, mask[:, ::-1]]).astype(np.float32)  # the prediction: the discs touch
    labels = np.stack([painted, painted[:, ::-1]]).astype(np.uint8)
    cfg = parse_params({"evaluate": {"instances": {"h": 5.0, "min_size": 20, "h_choices": [30, 2]}}}).evaluate
    h, rows = choose_watershed_h(_MaskNet(), images, labels, cfg, progress=False)
    # h = 30 is deeper than any distance peak: one seed per component, so the touching pair merges.
    assert [r["h"] for r in rows] == [30, 2] and rows[1]["instance_f1"] == 1.0 > rows[0]["instance_f1"]
    assert h == 2 and rows[0]["merges"] == 2 and rows[1]["merges"] == 0
    tie = cfg.model_copy(update={"instances": cfg.instances.model_copy(update={"h_choices": [2.5, 2]})})
    assert choose_watershed_h(_MaskNet(), images, labels, tie, progress=False)[0] == 2.5  # a tie: the first
    # No choices: the set h is the only candidate; no labelled object: the set h, nothing to report.
    plain = cfg.model_copy(update={"instances": cfg.instances.model_copy(update={"h_choices": []})})
    h, rows = choose_watershed_h(_MaskNet(), images, labels, plain, progress=False)
    assert h == 5.0 and [r["h"] for r in rows] == [5.0]
    assert choose_watershed_h(_MaskNet(), images, np.zeros_like(labels), cfg, progress=False) == (5.0, [])


def test_the_generator_writes_its_objects_with_touching_pairs_apart():
    objects_total = components_total = 0
    for z in range(4):
        img, mask, objects = generate_slice(0, z, 384, 448, instances=True)
        plain = generate_slice(0, z, 384, 448)
        assert np.array_equal(img, plain[0]) and np.array_equal(mask, plain[1])  # the same slice
        assert objects.dtype == np.uint16 and np.array_equal(objects > 0, mask > 0)
        objects_total += len(np.unique(objects)) - 1
        components_total += int(connected_instances(mask > 0).max())
    assert objects_total >= components_total + 3  # touching pairs: one component, two objects


def test_a_correct_split_of_touching_objects_scores_as_correct_with_the_generators_objects():
    """A perfect semantic prediction of generated slices, split by the watershed: against the
    generator's objects the split scores better than the unsplit components; against connected
    components of the mask (the old truth) the same correct split was counted as errors."""
    slices = [generate_slice(3, z, 384, 448, instances=True) for z in range(3)]
    images = np.stack([m > 0 for _, m, _ in slices]).astype(np.float32)
    labels = np.stack([m > 0 for _, m, _ in slices]).astype(np.uint8)
    objects = np.stack([o for _, _, o in slices])
    cfg = parse_params({"evaluate": {"instances": {"h": 2.0, "truth": "2d"}}}).evaluate
    true = evaluate_stack(_MaskNet(), images, labels, cfg, keep=0, progress=False, instances=objects).metrics
    old = evaluate_stack(_MaskNet(), images, labels, cfg, keep=0, progress=False).metrics
    assert true["instance_truth"].startswith("object labels") and old["instance_truth"].startswith("2D connected")
    assert true["instance_f1"] >= 0.9 and true["instance_f1"] > true["instance_f1_connected"]
    assert old["instance_f1_connected"] == 1.0 > old["instance_f1"]  # the old truth punished correct splits
    assert true["iou"] == old["iou"] > 0.99  # pixel scores do not depend on the truth of objects


def test_true_objects_are_followed_through_the_stack_in_3d():
    """Two columns joined by a bridge in the first slice are one object in 3D. A prediction that
    misses the bridge is right in 5 of 6 slices one by one, but cuts the 3D object in two."""
    vol = np.zeros((6, 64, 72), np.uint8)
    for z in range(6):
        vol[z][disk((24, 16), 7)] = 1
        vol[z][disk((24, 56), 7)] = 1
    vol[0, 20:29, 16:57] = 1
    pred = vol.copy()
    pred[0, 20:29, 25:48] = 0
    cfg3, cfg2 = (parse_params({"evaluate": {"instances": {"truth": t, "h_choices": []}}}).evaluate
                  for t in ("3d", "2d"))
    perfect = evaluate_stack(_MaskNet(), vol.astype(np.float32), vol, cfg3, keep=0, progress=False).metrics
    assert perfect["instance_truth"].startswith("3D") and perfect["instance_f1_connected"] == 1.0
    cut3 = evaluate_stack(_MaskNet(), pred.astype(np.float32), vol, cfg3, keep=0, progress=False).metrics
    cut2 = evaluate_stack(_MaskNet(), pred.astype(np.float32), vol, cfg2, keep=0, progress=False).metrics
    assert cut3["instance_f1_connected"] == 0.0  # two halves, neither overlaps the whole by IoU > 0.5
    assert cut2["instance_f1_connected"] == pytest.approx(20 / 23)  # 10 matched, 2 extra, 1 missed
    # Runs of consecutive slices are followed separately: the first slice alone, then the other five.
    assert runs_of([0, 2, 3, 4, 5, 6]) == [(0, 1), (1, 6)] and runs_of([]) == []
    apart = evaluate_stack(_MaskNet(), vol.astype(np.float32), vol, cfg3, keep=0, progress=False,
                           runs=runs_of([0, 2, 3, 4, 5, 6])).metrics
    assert apart["instance_f1_connected"] == 1.0
