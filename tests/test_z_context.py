"""2.5D input (model.z_context): each slice goes into the network with its neighbours, the same way in
prepare, training, evaluation and `emseg predict`. On a crop of the real EPFL test stack."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch

from conftest import EPFL, epfl_test_crop, require_shared, run_cli
from emseg.config import InitParams, parse_params
from emseg.data.io import context_indices, inspect_stack, normalise, stack_stats
from emseg.data.patches import with_context
from emseg.data.prepare import load_split, prepare
from emseg.data.sources import fetch_raw
from emseg.errors import ConfigError
from emseg.inference import predict_tiled
from emseg.model.network import build_network, initialise, save_weights
from emseg.predict import predict_to_folder

N = 14  # slices of the crop: training, validation and a test block at the end, min_gap apart
SMALL_NET = {"decoder_channels": [64, 32, 16, 16, 8]}


def _raw_params(crop: dict, k: int) -> dict:
    return {"data": {"source": "tiff", "tiff": {"image": str(crop["image"]), "labels": str(crop["labels"])},
                     "train_slices": 3, "val_slices": 1, "test_slices": 2, "annotations": None},
            "model": {**SMALL_NET, "z_context": k},
            "train": {"patch_size": 96, "patches_per_epoch": 64, "batch_size": 8, "max_epochs": 8, "lr": 0.003,
                      "early_stopping_patience": 8}}


@pytest.fixture(scope="module")
def crop(tmp_path_factory):
    """14 slices of 256x320 from EPFL testing.tif with their labels, prepared with 3 and with 1 slice per input."""
    require_shared()
    d = tmp_path_factory.mktemp("zctx")
    window = (slice(20, 20 + N), slice(300, 556), slice(400, 720))
    image, labels = epfl_test_crop(window)
    out = {"dir": d, "image": d / "image.tif", "labels": d / "labels.tif", "stack": image, "truth": labels == 255}
    tifffile.imwrite(out["image"], image)
    tifffile.imwrite(out["labels"], labels)
    for k in (3, 1):
        params = parse_params(_raw_params(out, k))
        fetch_raw(params.data, d / f"raw{k}")
        out[f"manifest{k}"] = prepare(params.data, d / f"raw{k}", d / f"prep{k}", k)
        out[f"params{k}"] = params
    return out


def test_context_stack_yields_any_slices_with_their_neighbours(crop):
    from emseg.data.io import context_stack

    info = inspect_stack(crop["image"])
    mean, std = stack_stats(info)
    norm = np.stack([normalise(s, mean, std) for s in crop["stack"]])
    zs = [9, 0, 5, 5, 13, 12]  # out of order, repeated, both ends
    got = list(context_stack(info, 3, mean, std, zs))
    for z, g in zip(zs, got, strict=True):
        np.testing.assert_array_equal(g, norm[context_indices(z, N, 3)])
    assert np.array_equal(next(iter(context_stack(info, 1, mean, std, [4]))), norm[4])


def test_context_indices_mirror_the_ends_of_the_stack():
    assert context_indices(5, 10, 3) == [4, 5, 6]
    assert context_indices(0, 10, 3) == [1, 0, 1]
    assert context_indices(9, 10, 5) == [7, 8, 9, 8, 7]
    assert context_indices(0, 2, 5) == [0, 1, 0, 1, 0]
    assert context_indices(0, 1, 3) == [0, 0, 0]
    assert context_indices(4, 10, 1) == [4]


def test_z_context_settings_are_checked():
    with pytest.raises(ConfigError, match="model.z_context: 2 is even"):
        parse_params({"model": {"z_context": 2}})
    # +-2 neighbours would let a training input see a validation slice 2 away.
    with pytest.raises(ConfigError, match="data.min_gap: 2 is within the reach of model.z_context 5"):
        parse_params({"model": {"z_context": 5}})
    assert parse_params({"model": {"z_context": 5}, "data": {"min_gap": 3}}).model.z_context == 5


def test_prepare_keeps_each_labelled_slices_neighbours(crop):
    m = crop["manifest3"]
    assert m["z_context"] == 3
    mean, std = m["normalisation"]["train"]["mean"], m["normalisation"]["train"]["std"]
    for split in ("train", "val", "test"):
        x, y = load_split(crop["dir"] / "prep3", split)
        zs = m["splits"][split]["slices"]
        assert x.shape == (len(zs), 3, 256, 320) and y.shape == (len(zs), 256, 320)
        for i, z in enumerate(zs):
            for c, zc in enumerate(context_indices(z, N, 3)):
                np.testing.assert_allclose(x[i, c], normalise(crop["stack"][zc], mean, std), atol=1e-5)
            assert np.array_equal(y[i] == 1, crop["truth"][z])  # labels: the centre slice only
        # The 2D preparation is the centre of the 2.5D one.
        x1, _ = load_split(crop["dir"] / "prep1", split)
        assert np.array_equal(np.asarray(with_context(x, 1)), np.asarray(x1))
    assert m["splits"]["test"]["slices"] == [12, 13]  # the last slice's upper neighbour is mirrored
    x, _ = load_split(crop["dir"] / "prep3", "test")
    assert np.array_equal(x[1, 0], x[1, 2])


def _first_conv(net):
    return next(p for p in net.parameters() if p.dim() == 4 and p.shape[1] == net.spec.get("z_context", 1))


def test_2d_weights_start_a_25d_network_and_predict_feeds_the_right_neighbours(crop, tmp_path):
    torch.manual_seed(0)
    net2d = build_network(crop["params1"].model).eval()
    with torch.no_grad():  # a steep head, so that predictions spread over [0, 1] and differences show
        for p in net2d.net.segmentation_head.parameters():
            p.mul_(40)
    save_weights(net2d, tmp_path / "2d.pt")
    net3 = build_network(crop["params3"].model)
    initialise(net3, InitParams(mode="checkpoint", path=str(tmp_path / "2d.pt")))
    net3.eval()
    x, _ = load_split(crop["dir"] / "prep3", "test")
    # 2D weights in the centre channel, zeros for the neighbours: the 2.5D network starts as the 2D one.
    np.testing.assert_allclose(predict_tiled(net3, x[0]), predict_tiled(net2d, x[0, 1]), atol=1e-4)

    with torch.no_grad():  # now let it look only at the slice below: channel 0 of (z - 1, z, z + 1)
        w = _first_conv(net3)
        w[:, 0], w[:, 1] = w[:, 1].clone(), 0
    out = predict_to_folder(net3, crop["image"], tmp_path / "pred", progress=False)
    assert out["shape"] == [N, 256, 320]
    got = tifffile.imread(tmp_path / "pred" / "probabilities.tif").astype(np.float32) / 255
    mean, std = stack_stats(inspect_stack(crop["image"]))
    norm = [normalise(s, mean, std) for s in crop["stack"]]
    below = np.stack([predict_tiled(net2d, norm[context_indices(z, N, 3)[0]]) for z in range(N)])
    above = np.stack([predict_tiled(net2d, norm[context_indices(z, N, 3)[2]]) for z in range(N)])
    assert below.std() > 0.2  # the comparison below means something
    assert np.abs(got - below).max() <= 1 / 255 + 1e-3
    assert np.abs(got - above).mean() > 10 * np.abs(got - below).mean()  # the other neighbour would not do


def test_a_25d_network_trains_and_predicts_from_its_file_as_evaluation_does(crop, tmp_path):
    from emseg.model.train import fit

    res = fit(crop["params3"], crop["dir"] / "prep3", tmp_path / "work", lr=0.003, batch_size=8, progress=False)
    assert res.net.spec["z_context"] == 3
    fg = float(np.mean(crop["truth"]))
    # Calling every pixel foreground scores IoU = the foreground fraction; training must do far better.
    assert res.best_score > max(0.4, 3 * fg), (res.best_score, fg)
    save_weights(res.net, tmp_path / "m.pt")
    proc = run_cli(["emseg", "predict", "--model", str(tmp_path / "m.pt"), str(crop["image"]), str(tmp_path / "p")],
                   tmp_path)
    assert proc.returncode == 0, proc.stderr
    got = tifffile.imread(tmp_path / "p" / "probabilities.tif").astype(np.float32) / 255
    x, _ = load_split(crop["dir"] / "prep3", "test")
    for i, z in enumerate(crop["manifest3"]["splits"]["test"]["slices"]):
        assert np.abs(got[z] - predict_tiled(res.net.eval(), x[i])).max() <= 1 / 255 + 1e-3


def test_a_25d_model_is_served_by_mlflow_with_its_k_channels(crop, tmp_path):
    """MLflow's pyfunc flavour of a 2.5D network takes (N, 3, H, W) and predicts what emseg does on a real
    EPFL window; a single-slice input is refused by the signature instead of being misread."""
    import mlflow

    from emseg.tracking import log_model

    torch.manual_seed(0)
    net = build_network(crop["params3"].model).eval()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    exp = mlflow.create_experiment("zctx-serving", artifact_location=str(tmp_path / "artifacts"))
    with mlflow.start_run(experiment_id=exp):
        info = log_model(net)
    assert [s.shape for s in info.signature.inputs.inputs] == [(-1, 3, -1, -1)]
    x, _ = load_split(crop["dir"] / "prep3", "test")
    window = np.ascontiguousarray(x[0][:, :128, :160], dtype=np.float32)
    served = mlflow.pyfunc.load_model(info.model_uri)
    got = np.asarray(served.predict(window[None]))
    assert got.shape == (1, 1, 128, 160)
    own = predict_tiled(net, window)
    np.testing.assert_allclose(got[0, 0], own, atol=1e-4)
    # The neighbours matter to this network: the same slice without them predicts something else.
    flat = np.asarray(served.predict(np.repeat(window[1:2], 3, axis=0)[None]))
    assert np.abs(flat[0, 0] - own).max() > 1e-3
    with pytest.raises(Exception, match="(?i)shape"):
        served.predict(window[None, 1:2])


def test_a_25d_model_exports_to_bioimageio_with_its_neighbours_as_channels(crop, tmp_path):
    """The bioimage.io package of a 2.5D network takes the slice and its neighbours as 3 channels, and
    bioimageio.core predicts from them what emseg does (a real EPFL tile)."""
    from bioimageio.core import create_prediction_pipeline
    from bioimageio.core.digest_spec import create_sample_for_model
    from bioimageio.spec import load_description
    from bioimageio.spec.model import v0_5

    from emseg.export import export

    torch.manual_seed(0)
    net = build_network(crop["params3"].model).eval()
    out = export(net, "zctx.pt", {}, tmp_path / "pkg", crop["image"], z=6)
    descr = load_description(out / "rdf.yaml", perform_io_checks=True)
    assert isinstance(descr, v0_5.ModelDescr), descr.validation_summary.format()
    channel = next(a for a in descr.inputs[0].axes if a.type == "channel")
    assert [str(c) for c in channel.channel_names] == ["z-1", "z0", "z+1"]
    packaged = np.load(out / "test_input.npy")
    # Slices 5, 6, 7 of the crop, the centre 256 x 256 of each (the crop is 256 x 320).
    assert np.array_equal(packaged[0], crop["stack"][5:8, :, 32:288].astype(np.float32))
    exact = packaged[0].astype(np.float64)
    own = predict_tiled(net, normalise(packaged[0], float(exact.mean()), float(exact.std())))
    pipeline = create_prediction_pipeline(descr, weight_format="torchscript", devices=["cpu"])
    try:
        sample = create_sample_for_model(descr, inputs={"raw": packaged}, sample_id=0)
        got = pipeline.predict_sample_without_blocking(sample).members["foreground"].data.to_numpy()
    finally:
        pipeline.unload()
    np.testing.assert_allclose(got[0, 0], own, atol=1e-4)


def test_suggest_scores_a_25d_model_with_the_neighbours_and_its_painted_crops_feed_one(crop, tmp_path):
    """`emseg suggest` feeds a 2.5D network each slice with its neighbours (a network that looks only
    at the slice below scores each slice as the 2D one scores the slice below), writes each crop's
    neighbours beside it, and `prepare` turns the painted crops into 2.5D training inputs."""
    import json

    from emseg.active.pool import score_pool
    from emseg.active.strategies import grid_candidates
    from emseg.data.datamodule import EMDataModule
    from emseg.data.patches import MixedPatches
    from emseg.errors import DataError

    torch.manual_seed(0)
    net2d = build_network(crop["params1"].model).eval()
    with torch.no_grad():
        for p in net2d.net.segmentation_head.parameters():
            p.mul_(40)
    save_weights(net2d, tmp_path / "2d.pt")
    net3 = build_network(crop["params3"].model)
    initialise(net3, InitParams(mode="checkpoint", path=str(tmp_path / "2d.pt")))
    with torch.no_grad():
        w = _first_conv(net3)
        w[:, 0], w[:, 1] = w[:, 1].clone(), 0
    net3.eval()
    mean, std = stack_stats(inspect_stack(crop["image"]))
    norm = np.stack([normalise(s, mean, std) for s in crop["stack"]])
    ctx = np.stack([norm[context_indices(z, N, 3)] for z in range(N)])
    cands = grid_candidates(N, 256, 320, 64, 32)
    got = score_pool(net3, ctx, cands, progress=False).scores["entropy"]
    below = score_pool(net2d, ctx[:, 0], cands, progress=False).scores["entropy"]
    itself = score_pool(net2d, ctx[:, 1], cands, progress=False).scores["entropy"]
    np.testing.assert_allclose(got, below, rtol=1e-3, atol=1e-2)
    assert np.abs(got - itself).mean() > 10 * np.abs(got - below).mean()

    # Another stack of the same tissue (slices of training.tif), suggested on with the 2.5D model file.
    with tifffile.TiffFile(EPFL / "training.tif") as tf:
        other = tf.asarray(key=range(60, 70))[:, 300:556, 400:720]
    with tifffile.TiffFile(EPFL / "training_groundtruth.tif") as tf:
        truth = tf.asarray(key=range(60, 70))[:, 300:556, 400:720]
    tifffile.imwrite(tmp_path / "other.tif", other)
    save_weights(net3, tmp_path / "m3.pt")
    folder = tmp_path / "annotations" / "round-1"
    run_cli(["emseg", "suggest", "--model", str(tmp_path / "m3.pt"), str(tmp_path / "other.tif"), str(folder),
             "-k", "2", "--patch-size", "64", "--every", "2"], tmp_path, check=True)
    meta = json.loads((folder / "suggestions.json").read_text())
    assert meta["z_context"] == 3 and meta["context_slices"] == 5 and len(meta["suggestions"]) == 2
    # Its scores are those of the network fed each scored slice with its own neighbours.
    info = inspect_stack(tmp_path / "other.tif")
    om, osd = stack_stats(info)
    onorm = np.stack([normalise(s, om, osd) for s in other])
    octx = np.stack([onorm[context_indices(z, 10, 3)] for z in range(10)])
    ocands = grid_candidates(10, 256, 320, 64, 32)
    expect = score_pool(net3, octx, ocands, progress=False).scores["entropy"]
    where = {tuple(int(v) for v in c): i for i, c in enumerate(ocands.zyx)}
    for r in meta["suggestions"]:
        z, y, x = r["slice"], r["y"], r["x"]
        assert z % 2 == 0 and r["score"] == pytest.approx(expect[where[(z, y, x)]], rel=1e-3, abs=1e-2)
        window = other[context_indices(z, 10, 5), y:y + 64, x:x + 64]
        assert np.array_equal(tifffile.imread(folder / r["context"]), window)
        assert np.array_equal(tifffile.imread(folder / r["image"]), other[z, y:y + 64, x:x + 64])
        painted = np.full((64, 64), 128, np.uint8)
        painted[:, :32] = truth[z, y:y + 64, x:x + 32]  # the left half painted from the ground truth
        tifffile.imwrite(folder / r["labels"], painted)

    params = parse_params({**_raw_params(crop, 3), "data": {**_raw_params(crop, 3)["data"],
                                                          "annotations": str(tmp_path / "annotations")}})
    manifest = prepare(params.data, crop["dir"] / "raw3", tmp_path / "prep", 3)
    assert manifest["annotations"]["patches"] == 2
    xs, ys = load_split(tmp_path / "prep", "annotations")
    assert xs.shape == (2, 3, 64, 64) and ys.shape == (2, 64, 64)
    m, s = meta["normalisation"]["mean"], meta["normalisation"]["std"]
    for i, r in enumerate(meta["suggestions"]):
        z, y, x = r["slice"], r["y"], r["x"]
        for c, j in enumerate(context_indices(z, 10, 3)):  # the painted slice in the middle of its neighbours
            np.testing.assert_allclose(xs[i, c], (other[j, y:y + 64, x:x + 64] - m) / s, rtol=1e-5, atol=1e-5)
        assert np.array_equal(ys[i, :, :32], (truth[z, y:y + 64, x:x + 32] == 255).astype(np.uint8))
        assert (ys[i, :, 32:] == 255).all()  # blank: ignored
    dm = EMDataModule(tmp_path / "prep", params.train, 4, 0)
    dm.setup()
    assert isinstance(dm.train_set, MixedPatches)
    image, label = dm.train_set.parts[1][0]
    assert tuple(image.shape) == (3, 96, 96) and (np.asarray(label) != 255).any()

    # A round written before suggest kept neighbours cannot feed a 2.5D network: one clear error.
    for r in meta["suggestions"]:
        del r["context"]
    (folder / "suggestions.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="01_labels.tif: painted crop without its neighbouring slices"):
        prepare(params.data, crop["dir"] / "raw3", tmp_path / "prep-old", 3)
    assert not (tmp_path / "prep-old").exists()
