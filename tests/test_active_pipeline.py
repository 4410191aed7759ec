"""Active learning end to end: the simulation pipeline on real EPFL slices, and the labelling loop
(`emseg suggest` -> paint -> `dvc repro`) with a registered model."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import tifffile

from conftest import EPFL, epfl_project, mlflow_client, run_cli
from emseg import IGNORE

TINY_AL = {"active": {"source": "epfl", "downsample": 4, "pool_slices": 3, "val_slices": 1, "test_slices": 2,
                      "patch_size": 64, "initial": 2, "query": 2, "rounds": 1, "seeds": [0], "mc_passes": 3,
                      "label_fraction": 0.5, "epochs_first": 1, "epochs_round": 1, "patches_per_epoch": 8,
                      "batch_size": 4},
           "model": {"decoder_channels": [64, 32, 16, 16, 8]}}


@pytest.mark.slow
def test_active_learning_pipeline_on_epfl_tracks_every_round(tmp_path, shared):
    proj = epfl_project(tmp_path, TINY_AL)
    proc = run_cli(["dvc", "repro", "pipelines/active_learning/dvc.yaml"], proj, check=True)
    assert "active-learning: 7 strategies x 1 seed x 2 rounds on epfl" in proc.stdout
    rep = proj / "reports" / "active_learning"
    rows = list(csv.DictReader(open(rep / "curves.csv")))
    assert len(rows) == 7 * 2
    assert {r["strategy"] for r in rows} == {"random", "entropy", "least_confidence", "bald", "kmeans", "coreset",
                                             "hybrid"}
    for r in rows:
        n = int(r["labelled"])
        assert n == (2 if r["round"] == "0" else 4)
        # label_fraction 0.5: the oracle labels only part of each patch (the rest is IGNORE).
        assert 0 < int(r["labelled_pixels"]) < n * 64 * 64
        assert 0.0 <= float(r["test_iou"]) <= 1.0
    # Round 0 is the same random start for every strategy of a seed.
    assert len({r["test_iou"] for r in rows if r["round"] == "0"}) == 1
    summary = json.loads((rep / "summary.json").read_text())
    assert summary["budgets"] == [2, 4] and summary["data"]["source"] == "epfl"
    assert set(summary["strategies"]["bald"]) >= {"mean_iou", "labels_to_reach_random_at_largest"}
    assert (rep / "curves.png").stat().st_size > 10_000 and "| random |" in (rep / "summary.md").read_text()
    wide = list(csv.DictReader(open(rep / "by_budget.csv")))
    assert [int(r["labelled"]) for r in wide] == [2, 4]
    # MLflow: one parent run per strategy, a nested run per seed and round, tagged for the UI.
    client = mlflow_client(proj)
    exp = client.get_experiment_by_name("emseg-active-learning")
    runs = client.search_runs([exp.experiment_id], max_results=500)
    parents = [r for r in runs if r.data.tags.get("mlflow.runName", "").startswith("al-") and "strategy" in r.data.tags
               and "mlflow.parentRunId" not in r.data.tags]
    assert sorted(r.data.tags["strategy"] for r in parents) == sorted(summary["strategies"])
    for parent in parents:
        kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert len(kids) == 2 and all(k.info.status == "FINISHED" for k in kids)
        assert {k.data.tags["labelled_patches"] for k in kids} == {"2", "4"}
        assert "test_iou" in kids[0].data.metrics
        hist = client.get_metric_history(parent.info.run_id, "test_iou_mean")
        assert [m.step for m in hist] == [2, 4]
    # DVC: the stage is recorded and up to date.
    assert "up to date" in run_cli(["dvc", "status", "pipelines/active_learning/dvc.yaml"], proj, check=True).stdout


@pytest.mark.slow
def test_suggest_then_painted_labels_join_the_next_dvc_repro(repro_project, tmp_path, shared):
    good, _ = repro_project
    proj = tmp_path / "proj"
    shutil.copytree(good, proj, symlinks=True)
    out = proj / "annotations" / "round-1"
    stack = EPFL / "training.tif"
    # -k and --patch-size left out: params.yaml's `active` section decides (query 3 here; patch_size 64
    # on slices the simulation bins by 2 is 128 native pixels).
    import yaml

    raw = yaml.safe_load((proj / "params.yaml").read_text())
    raw["active"] = {**raw.get("active", {}), "query": 3, "patch_size": 64, "downsample": 2}
    (proj / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    proc = run_cli(["emseg", "suggest", str(stack), str(out), "--model", "models:/emseg-unet@champion",
                    "--every", "40"], proj, check=True)
    assert "suggest: 3 patches of 128 px" in proc.stdout
    meta = json.loads((out / "suggestions.json").read_text())
    rows = list(csv.DictReader(open(out / "suggestions.csv")))
    assert len(rows) == 3 and meta["model"].startswith("models:/emseg-unet@champion")
    assert {int(r["slice"]) for r in rows} <= {0, 40, 80, 120, 160}
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    raw = tifffile.imread(stack, key=int(rows[0]["slice"]))
    y, x = int(rows[0]["y"]), int(rows[0]["x"])
    assert np.array_equal(tifffile.imread(out / rows[0]["image"]), raw[y:y + 128, x:x + 128])
    for r in rows:
        assert (tifffile.imread(out / r["labels"]) == 128).all()  # blank templates
        assert (out / r["uncertainty"]).stat().st_size > 0
    assert (out / "overview.png").exists()

    # A person paints the top half of two patches from the ground truth; the third stays untouched.
    truth = tifffile.imread(EPFL / "training_groundtruth.tif")
    for r in rows[:2]:
        z, y, x = int(r["slice"]), int(r["y"]), int(r["x"])
        t = np.full((128, 128), 128, np.uint8)
        t[:64] = truth[z, y:y + 64, x:x + 128]
        tifffile.imwrite(out / r["labels"], t)
    # Asking again into the same folder would throw the painting away: refused, even with --overwrite.
    again = run_cli(["emseg", "suggest", str(stack), str(out), "--model", "models:/emseg-unet@champion",
                     "--overwrite"], proj)
    assert again.returncode == 1 and "holds painted labels" in again.stderr
    assert (tifffile.imread(out / rows[0]["labels"]) != 128).any()

    # DVC sees the painted labels: prepare (and everything after it) is out of date; prepare takes them in.
    status = run_cli(["dvc", "status"], proj, check=True).stdout
    assert "annotations" in status and "prepare" in status
    proc = run_cli(["dvc", "repro", "prepare"], proj, check=True)
    assert "2 painted suggestion(s) from annotations/" in proc.stdout
    prepared = proj / "data" / "prepared"
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert manifest["annotations"]["patches"] == 2
    assert manifest["annotations"]["labelled_pixels"] == 2 * 64 * 128
    labels = np.load(prepared / "annotations_labels.npy")
    assert labels.shape == (2, 128, 128)
    assert (labels[:, 64:] == IGNORE).all() and (labels[:, :64] != IGNORE).all()
    z0, y0, x0 = (int(rows[0][k]) for k in ("slice", "y", "x"))
    assert np.array_equal(labels[0, :64] == 1, truth[z0, y0:y0 + 64, x0:x0 + 128] == 255)
    # The next training draws patches from them, a quarter to three quarters of each epoch.
    from emseg.config import load_params
    from emseg.data.patches import MixedPatches
    from emseg.data.datamodule import EMDataModule

    params = load_params(proj / "params.yaml")
    dm = EMDataModule(prepared, params.train, 4, 0)
    dm.setup()
    assert isinstance(dm.train_set, MixedPatches)
    slices_part, painted_part = dm.train_set.parts
    assert len(painted_part) >= params.train.patches_per_epoch // 4
    assert len(slices_part) + len(painted_part) == params.train.patches_per_epoch
    for i in range(len(painted_part)):
        _, lab = painted_part[i]
        assert (lab != IGNORE).any()  # centred on painted pixels, never on blank ground
    assert "train" in run_cli(["dvc", "status"], proj, check=True).stdout


def test_painted_labels_with_wrong_values_are_refused(tmp_path):
    from emseg.data.annotations import collect
    from emseg.errors import DataError

    folder = tmp_path / "annotations" / "r1"
    folder.mkdir(parents=True)
    tifffile.imwrite(folder / "01_image.tif", np.zeros((32, 32), np.uint8))
    lab = np.full((32, 32), 128, np.uint8)
    lab[:4] = 7
    tifffile.imwrite(folder / "01_labels.tif", lab)
    (folder / "suggestions.json").write_text(json.dumps({
        "blank": 128, "normalisation": {"mean": 0.0, "std": 1.0},
        "suggestions": [{"image": "01_image.tif", "labels": "01_labels.tif", "slice": 0, "y": 0, "x": 0}]}))
    with pytest.raises(DataError, match="01_labels.tif: label values \\[7\\] unexpected"):
        collect(tmp_path / "annotations")
    lab[:4] = 1  # 0/1 labels are fine too
    tifffile.imwrite(folder / "01_labels.tif", lab)
    images, labels, records = collect(tmp_path / "annotations")
    assert len(images) == 1 and (labels[0][:4] == 1).all() and (labels[0][4:] == IGNORE).all()
    assert records[0]["labelled_pixels"] == 4 * 32
