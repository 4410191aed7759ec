"""Cross-dataset pretraining and learning curves, through DVC, on the real stacks in ../shared/data."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
import torch

from conftest import EPFL, ISBI, VNC, epfl_project, mlflow_client, run_cli


TINY_LC = {
    "model": {"decoder_channels": [64, 32, 16, 16, 8]},
    "pretrain": {"sources": [
        {"name": "vnc-mitochondria", "image": str(VNC / "stack1_raw.tif"),
         "labels": str(VNC / "stack1_mitochondria.tif"),
         "scale": 0.25, "val_slices": 1},
        {"name": "isbi-membranes", "image": str(ISBI / "train-volume.tif"), "labels": str(ISBI / "train-labels.tif"),
         "scale": 0.5, "invert": True, "val_slices": 1}],
        "max_epochs": 2, "patches_per_epoch": 8, "patch_size": 64, "batch_size": 4},
    "learning_curve": {"source": "epfl", "scale": 0.25, "slice_counts": [4, "all"], "seeds": [0, 1],
                       "max_epochs": 1, "patience": 1, "patches_per_epoch": 8, "patch_size": 64, "batch_size": 4,
                       "test_slices": 2},
}


@pytest.mark.slow
def test_pretrain_then_learning_curve_through_dvc(tmp_path, shared):
    proj = epfl_project(tmp_path, TINY_LC)
    # The learning-curve pipeline pulls in the pretrain stage it depends on.
    proc = run_cli(["dvc", "repro", "pipelines/learning_curve/dvc.yaml"], proj, check=True)
    assert "pretrain: 2 epochs on vnc-mitochondria+isbi-membranes" in proc.stdout
    assert "learning-curve: 8 runs on epfl" in proc.stdout
    client = mlflow_client(proj)
    mv = client.get_model_version_by_alias("emseg-pretrained", "pretrained")
    pre = json.loads((proj / "reports/pretrain/metrics.json").read_text())
    assert pre["registered"]["version"] == int(mv.version)
    assert [s["name"] for s in pre["sources"]] == ["vnc-mitochondria", "isbi-membranes"]
    # Per-dataset scale: VNC 1024 px at 0.25 and ISBI 512 px at 0.5 both give 256 px slices.
    assert [s["shape"] for s in pre["sources"]] == [[256, 256], [256, 256]]
    # ISBI inverted: membranes (the thin dark lines, ~22 % of pixels) become the foreground.
    assert 0.1 < pre["sources"][1]["foreground"] < 0.35
    assert (proj / "models/pretrained.pt").exists()

    rows = list(csv.DictReader(open(proj / "reports/learning_curve/points.csv")))
    assert len(rows) == 2 * 2 * 2
    # all = 165 training slices minus the 2 validation ones (0, 164) and their neighbours within data.min_gap 2
    assert {int(r["slices"]) for r in rows} == {4, 161}
    assert {r["init"] for r in rows} == {"scratch", "pretrained"}
    # Each point says how long it trained and what stopped it (here the 1-epoch cap, on purpose).
    assert {(r["epochs"], r["stopped_by"]) for r in rows} == {("1", "epoch cap")}
    summary = json.loads((proj / "reports/learning_curve/summary.json").read_text())
    assert summary["counts"] == [4, 161] and len(summary["table"]) == 4
    assert "| pretrained | 4 |" in (proj / "reports/learning_curve/table.md").read_text()
    assert (proj / "reports/learning_curve/curves.png").stat().st_size > 10_000
    exp = client.get_experiment_by_name("emseg-learning-curve")
    runs = [r for r in client.search_runs([exp.experiment_id], max_results=200) if "labelled_slices" in r.data.tags]
    assert len(runs) == 8 and all("test_iou" in r.data.metrics for r in runs)
    assert {(r.data.tags["init"], r.data.tags["labelled_slices"], r.data.tags["seed"]) for r in runs} == {
        (i, n, s) for i in ("scratch", "pretrained") for n in ("4", "161") for s in ("0", "1")}
    assert "up to date" in run_cli(["dvc", "status", "pipelines/learning_curve/dvc.yaml"], proj, check=True).stdout
    # z-averaging (params.yaml: learning_curve.choose_z_average) chosen on each point's validation slices:
    # the point's test IoU is the chosen readout of the one prediction; the plain one is kept beside it.
    for r in rows:
        on = float(r["val_iou_z_average"]) > float(r["val_iou_plain"])
        assert r["z_average"] == str(on)
        assert r["test_iou"] == (r["test_iou_z_average"] if on else r["test_iou_plain"])
    z = summary["z_average"]["pretrained"]["4"]
    assert z["n"] == 2 and z["chosen_on"] == sum(r["z_average"] == "True" for r in rows
                                                  if r["init"] == "pretrained" and r["slices"] == "4")
    assert "z-averaging of the probabilities" in (proj / "reports/learning_curve/table.md").read_text()
    assert all("test_iou_plain" in r.data.metrics and "z_average" in r.data.params for r in runs)


OPTIONS_LC = {
    "model": {"decoder_channels": [64, 32, 16, 16, 8]},
    "ssl": {"max_epochs": 2, "patches_per_epoch": 16, "batch_size": 4},
    "learning_curve": {"source": "epfl", "scale": 0.25, "slice_counts": [2], "seeds": [0],
                       "inits": ["scratch", "ssl"], "options": ["plain", "z_context", "semi"], "z_context": 3,
                       "semi": {"weight": 1.0, "rampup_epochs": 0}, "unlabelled_slices": 6,
                       "max_epochs": 1, "patience": 1, "patches_per_epoch": 8, "patch_size": 64, "batch_size": 4,
                       "test_slices": 3},
}


@pytest.mark.slow
def test_learning_curve_options_ssl_init_z_context_and_semi_on_epfl(tmp_path, shared):
    """Every init (scratch, ssl pretrained on the pool without labels) with every option (plain, 2.5D,
    semi), on the same training slices, each paired with its plain init in the summary."""
    proj = epfl_project(tmp_path, OPTIONS_LC)
    proc = run_cli(["emseg", "learning-curve"], proj, check=True)
    assert "learning-curve: 6 runs on epfl (scratch, ssl x plain, z_context, semi x [2] slices" in proc.stdout
    rows = list(csv.DictReader(open(proj / "reports/learning_curve/points.csv")))
    names = ["scratch", "scratch+z_context", "scratch+semi", "ssl", "ssl+z_context", "ssl+semi"]
    assert [r["init"] for r in rows] == names
    summary = json.loads((proj / "reports/learning_curve/summary.json").read_text())
    # The ssl init was pretrained, without labels, on the pool: its restoration error fell.
    ssl = summary["ssl"]
    assert ssl["ssl_epochs"] == 2 and ssl["ssl_val_masked_mse"] < ssl["ssl_val_masked_mse_before"]
    assert ssl["ssl_slices"] == 161 - 2  # the pool less its 2 slices for the ssl validation loss
    paired = summary["options_vs_plain"]
    assert set(paired) == {"scratch+z_context", "scratch+semi", "ssl+z_context", "ssl+semi"}
    assert paired["ssl+semi"]["against"] == "ssl" and paired["ssl+semi"]["by_slices"]["2"]["n"] == 1
    d = paired["scratch+z_context"]["by_slices"]["2"]["mean_diff"]
    by = {r["init"]: float(r["test_iou"]) for r in rows}
    assert d == pytest.approx(by["scratch+z_context"] - by["scratch"], abs=2e-4)
    assert "Each option against its plain init" in (proj / "reports/learning_curve/table.md").read_text()
    client = mlflow_client(proj)
    exp = client.get_experiment_by_name("emseg-learning-curve")
    runs = {r.data.tags["init"] + ("" if r.data.tags["option"] == "plain" else "+" + r.data.tags["option"]): r
            for r in client.search_runs([exp.experiment_id], max_results=50) if "option" in r.data.tags}
    assert sorted(runs) == sorted(names)
    # 2.5D runs took 3 slices per input; only semi runs had unlabelled slices and a consistency loss.
    assert {n: runs[n].data.params["z_context"] for n in names} == {
        n: "3" if "z_context" in n else "1" for n in names}
    assert {n: runs[n].data.params["unlabelled_slices"] for n in names} == {
        n: "6" if "semi" in n else "0" for n in names}
    assert {n for n in names if "train_consistency" in runs[n].data.metrics} == {"scratch+semi", "ssl+semi"}
    assert all(runs[n].data.params["train_slices"] == runs["scratch"].data.params["train_slices"] for n in names)
    # The ssl weights start every ssl run whole: each tensor of the network, the first convolution of the
    # 2.5D one widened from them.
    for n in ("ssl", "ssl+z_context", "ssl+semi"):
        loaded = re.search(r"\((\d+) of (\d+) tensors\)", runs[n].data.params["init_loaded"])
        assert loaded and loaded[1] == loaded[2], runs[n].data.params["init_loaded"]
    assert runs["scratch"].data.params["init_loaded"].startswith("scratch")


def test_learning_curve_targets_hold_neighbours_reflected_at_the_ends(shared):
    """The test slices come with their z neighbours' inputs (each index reflected at the stack's ends,
    as prediction does): the middle window's middle slice is the slice itself, as loaded on its own; no
    training slice lies within data.min_gap of validation."""
    from emseg.config import parse_params
    from emseg.data.stacks import evenly, load_labelled
    from emseg.learning_curve import load_target, neighbour_windows, with_neighbours

    stack = np.arange(5, dtype=np.float32)[:, None, None] * np.ones((1, 2, 2), np.float32)
    assert with_neighbours(stack, [0, 2, 4], 3)[:, :, 0, 0].tolist() == [[1, 0, 1], [1, 2, 3], [3, 4, 3]]
    # Slice 0's neighbour -1 is slice 1, in its own window in stack order (not the wider window reversed).
    assert neighbour_windows(stack, [0, 4], 3)[:, :, :, 0, 0].tolist() == [
        [[0, 1, 2], [1, 0, 1], [0, 1, 2]], [[2, 3, 4], [3, 4, 3], [2, 3, 4]]]
    params = parse_params({"data": {"epfl": {"mirrors": [str(EPFL)]}},
                           "learning_curve": {"source": "epfl", "scale": 0.25, "test_slices": 3,
                                              "options": ["plain", "z_context"], "z_context": 3}})
    source, x, y, val_idx, pool, tx, ty = load_target(params)
    zs = evenly(82, 3)
    assert source == "epfl" and tx.shape == (3, 3, 3, 192, 256) and ty.shape == (3, 192, 256)
    img, lab = EPFL / "testing.tif", EPFL / "testing_groundtruth.tif"
    alone, labels, _ = load_labelled(img, lab, zs, scale=0.25)
    np.testing.assert_array_equal(tx[:, 1, 1], alone)
    np.testing.assert_array_equal(ty, labels)
    above, _, _ = load_labelled(img, lab, [1, zs[1] - 1, zs[2] - 1], scale=0.25)
    below, _, _ = load_labelled(img, lab, [1, zs[1] + 1, zs[2] - 1], scale=0.25)  # 0 and 81: reflected
    for j, want in ((0, above), (2, below)):
        np.testing.assert_array_equal(tx[:, 1, j], want)  # the slice's own window
        np.testing.assert_array_equal(tx[:, j, 1], want)  # the middle of its neighbour's window
    assert val_idx == [0, 164] and pool == list(range(2, 163))
    # Without the option, windows of single slices, (n, 3, 1, H, W): the same middle slices.
    plain = load_target(parse_params({"data": {"epfl": {"mirrors": [str(EPFL)]}}, "learning_curve": {
        "source": "epfl", "scale": 0.25, "test_slices": 3}}))[5]
    assert plain.shape == (3, 3, 1, 192, 256)
    np.testing.assert_array_equal(plain[:, 1, 0], alone)
    np.testing.assert_array_equal(plain[:, 0, 0], above)


@pytest.mark.parametrize("k", [1, 3])
def test_learning_curve_scores_plain_and_z_averaged_as_evaluate_does(shared, k):
    """The learning curves' one prediction of each test slice and its neighbours, read plain and
    z-averaged, gives evaluate's foreground IoU for z-averaging off and on; the two differ."""
    from emseg.config import EvaluateParams, InferenceParams, parse_params
    from emseg.evaluate import pixel_iou
    from emseg.learning_curve import iou_plain_and_averaged, load_target
    from emseg.model.network import build_network

    params = parse_params({"data": {"epfl": {"mirrors": [str(EPFL)]}},
                           "model": {"decoder_channels": [16, 16, 16, 16, 8], "z_context": k},
                           "learning_curve": {"source": "epfl", "scale": 0.25, "test_slices": 3,
                                              "options": ["plain", "z_context"], "z_context": 3}})
    tx, ty = load_target(params)[5:]
    torch.manual_seed(0)
    net = build_network(params.model).eval()
    plain, averaged = iou_plain_and_averaged(net, tx, ty, k)
    cfg = EvaluateParams(inference=InferenceParams(tile=1024, overlap=64))
    assert plain == pytest.approx(pixel_iou(net, tx, ty, cfg, progress=False), abs=1e-6)
    assert averaged == pytest.approx(pixel_iou(net, tx, ty, cfg.model_copy(update={"z_average": True}),
                                               progress=False), abs=1e-6)
    assert averaged != plain  # (an untrained network is nearly flat in z: the readouts differ a little)
    assert iou_plain_and_averaged(net, tx, ty, k, average=False) == (plain, None)


def test_fine_tuning_keeps_the_encoder_frozen_for_the_first_epochs(tmp_path):
    from emseg.config import Params
    from emseg.data.datamodule import ArraySplits
    from emseg.model.network import SegmentationNet
    from emseg.model.train import fit

    g = np.random.default_rng(0)
    x = g.standard_normal((2, 64, 64)).astype(np.float32)
    y = (x > 0.5).astype(np.uint8)
    params = Params.model_validate({"model": {"encoder": "resnet18", "decoder_channels": [32, 16, 8, 8, 8]},
                                    "train": {"patch_size": 32, "patches_per_epoch": 8, "batch_size": 4,
                                              "max_epochs": 1,
                                              "freeze_encoder_epochs": 1, "augment": {"elastic": 0}}})
    start = SegmentationNet(params.model.model_dump())
    res = fit(params, ArraySplits(x, y, x[:1], y[:1]), tmp_path, lr=0.01, batch_size=4, progress=False,
              checkpoints=False, start_from=start)
    enc0 = {k: v for k, v in start.state_dict().items()
            if ".encoder." in k and "running" not in k and "num_batches" not in k}
    enc1 = {k: v for k, v in res.net.state_dict().items() if k in enc0}
    assert all(torch.equal(enc0[k], enc1[k]) for k in enc0)  # frozen: not one encoder weight moved
    dec0 = start.state_dict()["net.segmentation_head.0.weight"]
    assert not torch.equal(dec0, res.net.state_dict()["net.segmentation_head.0.weight"])  # the decoder learned
    # Without freezing the encoder moves too.
    free = params.model_copy(update={"train": params.train.model_copy(update={"freeze_encoder_epochs": 0})})
    res2 = fit(free, ArraySplits(x, y, x[:1], y[:1]), tmp_path / "b", lr=0.01, batch_size=4, progress=False,
               checkpoints=False, start_from=start)
    assert not all(torch.equal(enc0[k], res2.net.state_dict()[k]) for k in enc0)


def test_unfrozen_encoder_trains_in_train_mode_after_the_frozen_epochs(tmp_path):
    """Lightning restores each submodule's mode after validation: the encoder, put in eval mode while frozen,
    must be switched back, or its BatchNorm keeps the source data's statistics for the whole fine-tuning."""
    from lightning.pytorch.callbacks import Callback

    from emseg.config import Params
    from emseg.data.datamodule import ArraySplits
    from emseg.model.train import fit

    class Modes(Callback):
        def __init__(self):
            self.seen = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            enc = pl_module.net.net.encoder
            self.seen.append((trainer.current_epoch, enc.training, next(enc.parameters()).requires_grad))

    g = np.random.default_rng(0)
    x = g.standard_normal((2, 64, 64)).astype(np.float32)
    y = (x > 0.5).astype(np.uint8)
    params = Params.model_validate({"model": {"encoder": "resnet18", "decoder_channels": [32, 16, 8, 8, 8]},
                                    "train": {"patch_size": 32, "patches_per_epoch": 8, "batch_size": 4,
                                              "max_epochs": 3,
                                              "early_stopping_patience": 5, "freeze_encoder_epochs": 1,
                                              "augment": {"elastic": 0}}})
    modes = Modes()
    fit(params, ArraySplits(x, y, x[:1], y[:1]), tmp_path, lr=0.01, batch_size=4, progress=False,
        checkpoints=False, callbacks=[modes])
    by_epoch = {e: (training, grad) for e, training, grad in modes.seen}
    assert by_epoch[0] == (False, False)  # frozen: eval mode, no gradients
    assert by_epoch[1] == (True, True) and by_epoch[2] == (True, True)  # unfrozen after validation: trains


@pytest.mark.parametrize("updates, says", [
    ({"model": {"z_context": 3}}, "model.z_context: 3: the learning curves set 2.5D per curve"),
    ({"learning_curve": {"z_context": 4}}, "learning_curve.z_context: 4 is even"),
    ({"learning_curve": {"options": ["plain", "z_context"], "z_context": 5}},
     "data.min_gap: 2 is within the reach of learning_curve.z_context 5"),
    ({"learning_curve": {"options": ["plain", "mixup"]}}, "learning_curve.options"),
    ({"learning_curve": {"options": ["semi"]}}, "each option is measured against plain; list plain too"),
    ({"learning_curve": {"inits": ["scratch", "scratch"]}}, "learning_curve.inits: ['scratch', 'scratch']"),
    ({"learning_curve": {"source": "epfl", "options": ["plain", "semi"], "slice_counts": [1, "all"]}},
     "semi needs unlabelled slices, but slice count 161 labels all 161 slices of the pool"),
])
def test_learning_curve_refuses_bad_options_in_one_line_before_any_work(tmp_path, updates, says):
    proj = epfl_project(tmp_path, updates)
    proc = run_cli(["emseg", "learning-curve"], proj)
    assert proc.returncode != 0 and says in proc.stderr
    assert not (proj / "reports/learning_curve").exists() and "Traceback" not in proc.stderr
