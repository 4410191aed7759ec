"""z-averaging (evaluate.z_average, evaluate.choose_z_average): each slice's probability averaged with its
z neighbours' before the threshold. The same average in evaluation (validation slices with their kept
neighbours, test runs of consecutive slices), `emseg predict` and blockwise prediction; on crops of the
real EPFL test stack."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch

from conftest import epfl_test_crop, require_shared
from emseg.config import EvaluateParams, InferenceParams, parse_params
from emseg.data.generate import generate_slice
from emseg.data.io import context_indices, normalise
from emseg.data.prepare import load_split, load_val_context, prepare
from emseg.data.sources import fetch_raw
from emseg.errors import ConfigError
from emseg.evaluate import _probabilities, choose_z_average, pixel_iou
from emseg.inference import predict_tiled, z_averaged
from emseg.metrics import confusion, scores
from emseg.model.network import build_network

N = 14
CFG = EvaluateParams(inference=InferenceParams(tile=256, overlap=32))


@pytest.fixture(scope="module")
def crop(tmp_path_factory):
    """14 slices of 256x320 of EPFL testing.tif as a user's TIFF pair, prepared with and without the
    validation slices' neighbours."""
    require_shared()
    d = tmp_path_factory.mktemp("zavg")
    window = (slice(20, 20 + N), slice(300, 556), slice(400, 720))
    image, labels = epfl_test_crop(window)
    tifffile.imwrite(d / "image.tif", image)
    tifffile.imwrite(d / "labels.tif", labels)
    out = {"dir": d, "stack": image, "truth": labels == 255}
    for k in (1, 3):
        params = parse_params({"data": {"source": "tiff", "tiff": {"image": str(d / "image.tif"),
                                                                   "labels": str(d / "labels.tif")},
                                        "train_slices": 3, "val_slices": 1, "test_slices": 2, "annotations": None},
                               "model": {"decoder_channels": [16, 16, 16, 16, 8], "z_context": k}})
        fetch_raw(params.data, d / f"raw{k}")
        out[f"wide{k}"] = prepare(params.data, d / f"raw{k}", d / f"wide{k}", k, val_neighbours=True)
    out["plain1"] = prepare(params.data, d / "raw1", d / "plain1", 1)
    return out


def _noisy(truth: np.ndarray, seed: int) -> np.ndarray:
    """A probability that knows the truth only through independent noise on every voxel."""
    rng = np.random.default_rng(seed)
    return np.clip(0.2 + 0.6 * truth + rng.normal(0, 0.15, truth.shape), 0, 1).astype(np.float32)


def _iou(probs, truth) -> float:
    counts = confusion(np.asarray(probs) > 0.5, truth.astype(np.uint8))
    return scores(counts)["iou"]


def test_z_averaged_streams_the_weighted_mean_with_mirrored_ends(crop):
    p = _noisy(crop["truth"][:6], 0)
    got = np.stack(list(z_averaged(iter(p))))
    padded = np.concatenate([p[1:2], p, p[-2:-1]])  # slice -1 is slice 1, slice n is slice n-2
    np.testing.assert_allclose(got, 0.25 * padded[:-2] + 0.5 * padded[1:-1] + 0.25 * padded[2:], atol=1e-6)
    assert np.array_equal(next(z_averaged([p[0]])), p[0])  # one slice: nothing to average with
    assert list(z_averaged([])) == []
    pulled = []

    def source():
        for s in p:
            pulled.append(1)
            yield s

    stream = z_averaged(source())
    next(stream)
    assert len(pulled) == 2  # one slice held back, never the stack


def test_z_averaging_helps_on_isotropic_em_and_hurts_on_independent_slices(crop):
    """Why it is a choice made on validation: EPFL's 5-nm slices show nearly the same objects, so the
    neighbours' independent errors average out; the generator's slices are drawn independently, so
    their neighbours' objects are in other places."""
    em = crop["truth"][:10]
    gen = np.stack([generate_slice(0, z, 256, 320)[1] == 255 for z in range(10)])
    for truth, better in ((em, True), (gen, False)):
        p = _noisy(truth, 1)
        plain, avg = _iou(p, truth), _iou(np.stack(list(z_averaged(p))), truth)
        assert (avg > plain + 0.02) if better else (avg < plain - 0.05), (better, plain, avg)


def test_prepare_keeps_the_validation_slices_neighbours_only_when_asked(crop):
    d = crop["dir"]
    for k in (1, 3):
        m = crop[f"wide{k}"]
        (z,) = m["splits"]["val"]["slices"]
        wide = load_val_context(d / f"wide{k}")
        x, _ = load_split(d / f"wide{k}", "val")
        assert m["splits"]["val"]["context_images"] == (3 if k == 1 else [3, k])
        assert wide.shape == ((1, 3, 256, 320) if k == 1 else (1, 3, k, 256, 320))
        mean, std = m["normalisation"]["train"]["mean"], m["normalisation"]["train"]["std"]
        for j, c in enumerate((z - 1, z, z + 1)):  # each neighbour's own window, as prediction takes it
            want = normalise(crop["stack"][context_indices(c, N, k)], mean, std)
            np.testing.assert_allclose(wide[0, j], want[0] if k == 1 else want, atol=1e-5)
        assert np.array_equal(wide[:, 1], x)  # the split itself is as it was
    # Without the setting: no file and no manifest key (the data's hash stays as it was).
    assert load_val_context(d / "plain1") is None and "context_images" not in crop["plain1"]["splits"]["val"]
    assert np.array_equal(load_split(d / "plain1", "val")[0], load_split(d / "wide1", "val")[0])
    # The earlier layout of 2.5D neighbours (one window k + 2 wide) is refused, not misread.
    legacy = d / "legacy"
    legacy.mkdir()
    np.save(legacy / "val_context_images.npy", np.zeros((1, 5, 8, 8), np.float32))
    with pytest.raises(ConfigError, match="val_context_images.npy: validation neighbours in an earlier layout"):
        load_val_context(legacy)


@pytest.mark.parametrize("k", [1, 3])
def test_evaluation_averages_validation_and_test_slices_as_the_stack_does(crop, k):
    """A validation slice averaged from its kept neighbours equals the same slice averaged inside the
    consecutive stack; either differs from the plain probability."""
    d = crop["dir"]
    m = crop[f"wide{k}"]
    (z,) = m["splits"]["val"]["slices"]
    mean, std = m["normalisation"]["train"]["mean"], m["normalisation"]["train"]["std"]
    torch.manual_seed(0)
    net = build_network(parse_params({"model": {"decoder_channels": [16, 16, 16, 16, 8],
                                                "z_context": k}}).model).eval()
    norm = np.stack([normalise(s, mean, std) for s in crop["stack"]])
    inputs = np.stack([norm[context_indices(j, N, k)] if k > 1 else norm[j] for j in range(N)])
    on = CFG.model_copy(update={"z_average": True})
    wide = load_val_context(d / f"wide{k}")
    (val_avg,) = list(_probabilities(net, wide, on, "val", False))
    (val_plain,) = list(_probabilities(net, wide, CFG, "val", False))
    whole = list(_probabilities(net, inputs, on, "stack", False, runs=[(0, N)]))
    plain = [predict_tiled(net, inputs[j], **CFG.inference.model_dump()) for j in range(N)]
    np.testing.assert_allclose(val_avg, whole[z], atol=1e-5)
    np.testing.assert_allclose(val_avg, 0.25 * plain[z - 1] + 0.5 * plain[z] + 0.25 * plain[z + 1], atol=1e-5)
    np.testing.assert_allclose(val_plain, plain[z], atol=1e-5)
    assert np.abs(val_avg - val_plain).max() > 1e-3
    # Runs are averaged apart: the last slice of a run does not see the first of the next.
    split = list(_probabilities(net, inputs[:6], on, "runs", False, runs=[(0, 3), (3, 6)]))
    np.testing.assert_allclose(split[2], 0.5 * plain[2] + 0.5 * plain[1], atol=1e-5)
    np.testing.assert_allclose(split[3], 0.5 * plain[3] + 0.5 * plain[4], atol=1e-5)
    with pytest.raises(ValueError, match="do not cover the 6 slices once"):
        list(_probabilities(net, inputs[:6], on, "runs", False, runs=[(0, 3), (4, 6)]))
    # Isolated slices without kept neighbours cannot be averaged: said, not silently skipped.
    x, _ = load_split(d / "plain1", "val")
    with pytest.raises(ConfigError, match="evaluate.z_average: these 1 slices are not consecutive"):
        list(_probabilities(build_network(parse_params({"model": {"decoder_channels": [16, 16, 16, 16, 8]}}).model),
                            x, on, "val", False))


@pytest.mark.parametrize("k", [1, 3])
def test_validation_slices_at_the_ends_of_the_stack_average_as_prediction_does(crop, k):
    """At an end the neighbour beyond it is mirrored (slice -1 is slice 1) and predicted from its own
    window in stack order, as `emseg predict` does: the validation average at slices 0 and N - 1
    equals the whole stack's there (a wider window sliced at the end would run backwards in z)."""
    d = crop["dir"]
    params = parse_params({"data": {"source": "tiff", "tiff": {"image": str(d / "image.tif"),
                                                               "labels": str(d / "labels.tif")},
                                    "train_slices": 3, "val_slices": [0, N - 1], "test_slices": [6, 7],
                                    "annotations": None},
                           "model": {"decoder_channels": [16, 16, 16, 16, 8], "z_context": k}})
    m = prepare(params.data, d / f"raw{k}", d / f"ends{k}", k, val_neighbours=True)
    assert m["splits"]["val"]["slices"] == [0, N - 1]
    mean, std = m["normalisation"]["train"]["mean"], m["normalisation"]["train"]["std"]
    torch.manual_seed(1)
    net = build_network(params.model).eval()
    norm = np.stack([normalise(s, mean, std) for s in crop["stack"]])
    inputs = np.stack([norm[context_indices(j, N, k)] if k > 1 else norm[j] for j in range(N)])
    on = CFG.model_copy(update={"z_average": True})
    val = list(_probabilities(net, load_val_context(d / f"ends{k}"), on, "val", False))
    whole = list(_probabilities(net, inputs, on, "stack", False, runs=[(0, N)]))
    plain = [predict_tiled(net, inputs[j], **CFG.inference.model_dump()) for j in (0, 1, N - 2, N - 1)]
    np.testing.assert_allclose(val[0], whole[0], atol=1e-5)
    np.testing.assert_allclose(val[1], whole[N - 1], atol=1e-5)
    np.testing.assert_allclose(val[0], 0.5 * plain[0] + 0.5 * plain[1], atol=1e-5)
    np.testing.assert_allclose(val[1], 0.5 * plain[3] + 0.5 * plain[2], atol=1e-5)


def test_the_choice_keeps_whichever_scores_higher_on_the_slices_given(crop):
    d = crop["dir"]
    torch.manual_seed(0)
    net = build_network(parse_params({"model": {"decoder_channels": [16, 16, 16, 16, 8]}}).model).eval()
    wide = load_val_context(d / "wide1")
    _, y = load_split(d / "wide1", "val")
    cfg, rows = choose_z_average(net, wide, y, CFG, progress=False)
    assert [r["z_average"] for r in rows] == [False, True]
    for r in rows:
        assert r["iou"] == pytest.approx(pixel_iou(net, wide, y, CFG.model_copy(update={"z_average": r["z_average"]}),
                                                   progress=False))
    assert cfg.z_average == (rows[1]["iou"] > rows[0]["iou"])
