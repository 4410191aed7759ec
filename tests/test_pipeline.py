"""The main pipeline end to end with the real DVC, MLflow and Optuna (tiny sizes, CPU)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import mlflow
import optuna
import pytest

from conftest import (ROOT, SHARED, TINY, free_port, log_tail, make_project, mlflow_client, run_cli, start_logged,
                      wait_until_answers, write_params)
from test_architecture import _covered, _declared


@pytest.mark.slow
def test_dvc_repro_runs_prepare_tune_train_and_tracks_everything(repro_project):
    proj, proc = repro_project
    out = proc.stdout
    assert "train:" in out and "best val IoU" in out and "tune: best val IoU" in out
    assert "evaluate:" in out and "register:" in out
    best = json.loads((proj / "reports/tune/best_params.json").read_text())
    assert best["n_complete"] + best["n_pruned"] == 2 and best["batch_size"] in (4, 8)
    metrics = json.loads((proj / "reports/train/metrics.json").read_text())
    assert metrics["lr"] == pytest.approx(best["lr"]) and metrics["batch_size"] == best["batch_size"]
    assert (proj / "models/model.pt").stat().st_size > 1e6
    hist = (proj / "reports/train/history.csv").read_text().splitlines()
    assert (hist[0] == "epoch,train_loss,val_loss,train_acc,val_acc,train_iou,val_iou"
            and len(hist) == 1 + metrics["epochs"])
    assert "up to date" in run_cli(["dvc", "status", "dvc.yaml"], proj, check=True).stdout.lower()
    # Paths named once: every declared output exists, and the stages wrote nothing undeclared.
    outs, _ = _declared([ROOT / "dvc.yaml"])
    assert all((proj / o).exists() for o in outs), sorted(o for o in outs if not (proj / o).exists())
    written = [str(f.relative_to(proj)) for d in ("data", "models", "reports") for f in (proj / d).rglob("*")
               if f.is_file() and f.name != ".gitignore"]
    assert len(written) > 20 and not [w for w in written if not _covered(w, outs)]

    client = mlflow_client(proj)
    exp = client.get_experiment_by_name("emseg")
    runs = client.search_runs([exp.experiment_id])
    train = [r for r in runs if r.info.run_name.startswith("train-")]
    tune_parent = [r for r in runs if r.info.run_name.startswith("tune-")]
    trials = [r for r in runs if r.info.run_name.startswith("trial-")]
    assert len(train) == 1 and len(tune_parent) == 1 and len(trials) == 2
    assert all(t.data.tags["mlflow.parentRunId"] == tune_parent[0].info.run_id for t in trials)
    run = train[0]
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["dataset"] == "generated" and tags["labelled_slices"] == "3" and tags["init"] == "scratch"
    assert len(tags["git_commit"]) >= 7 and tags["dvc_data_hash"] != "unknown"
    assert run.data.params["train.patch_size"] == "96" and run.data.params["model.encoder"] == "efficientnet-b0"
    val_iou = client.get_metric_history(run.info.run_id, "val_iou")
    assert [m.step for m in val_iou] == list(range(metrics["epochs"]))
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"curves.png", "val_overlays.png", "history.csv", "weights"} <= arts
    run_json = json.loads((proj / "reports/train/run.json").read_text())
    assert run_json["run_id"] == run.info.run_id
    model = mlflow.pyfunc.load_model(run_json["model_uri"])
    assert model.metadata.signature is not None
    import numpy as np

    pred = model.predict(np.random.default_rng(0).normal(size=(3, 1, 128, 96)).astype(np.float32))
    assert pred.shape == (3, 1, 128, 96) and 0 <= pred.min() and pred.max() <= 1  # any batch and size


@pytest.mark.slow
def test_mlflow_knows_the_data_lineage_of_the_run_and_the_model_version(repro_project):
    """The train run lists its training, validation and testing data as MLflow datasets whose digest is
    the DVC hash of data/prepared; the test scores are linked to the logged model; the registered
    version's description names the data, slices and scores."""
    import yaml

    proj, _ = repro_project
    client = mlflow_client(proj)
    run_json = json.loads((proj / "reports/train/run.json").read_text())
    run = client.get_run(run_json["run_id"])
    lock = yaml.safe_load((proj / "dvc.lock").read_text())
    md5 = next(o["md5"] for o in lock["stages"]["prepare"]["outs"] if o["path"] == "data/prepared")
    manifest = json.loads((proj / "data/prepared/manifest.json").read_text())
    inputs = {next(t.value for t in d.tags if t.key == "mlflow.data.context"): d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"training", "validation", "testing"}, inputs
    for context, split in (("training", "train"), ("validation", "val"), ("testing", "test")):
        d = inputs[context]
        assert d.dataset.digest == md5 and d.dataset.name == f"generated-{split}"
        assert json.loads(d.dataset.source)["uri"].endswith(f"data/prepared/{split}_images.npy")
        tags = {t.key: t.value for t in d.tags}
        assert json.loads(tags["slices"]) == manifest["splits"][split]["slices"]
    model_id = run_json["model_uri"].removeprefix("models:/")
    logged = client.get_logged_model(model_id)
    linked = {m.key: m for m in logged.metrics or []}
    assert linked["test_iou"].value == pytest.approx(json.loads((proj / "reports/evaluate/metrics.json").read_text())
                                                     ["iou"])
    assert linked["test_iou"].dataset_digest == md5 and linked["test_iou"].dataset_name == "generated-test"
    reg = json.loads((proj / "reports/register/registration.json").read_text())
    mv = client.get_model_version("emseg-unet", str(reg["version"]))
    assert mv.description.startswith("Trained on generated (generated), 3 labelled slices "
                                      f"{manifest['splits']['train']['slices']}")
    assert f"Validation IoU {reg['val_iou']:.4f}" in mv.description and md5 in mv.description
    assert f"Decision: {reg['decision']}." in mv.description


@pytest.mark.slow
def test_evaluate_and_register_promote_like_for_like_and_a_worse_run_does_not_take(repro_project):
    proj, _ = repro_project
    metrics = json.loads((proj / "reports/evaluate/metrics.json").read_text())
    for key in ("iou", "dice", "accuracy", "precision", "recall", "instance_f1", "splits", "merges"):
        assert key in metrics
    assert metrics["slices"] == 2 and 0 < metrics["iou"] <= 1
    # The generator's own objects are the truth of instance scores (touching pairs apart).
    assert metrics["instance_truth"].startswith("object labels") and metrics["instance_objects"] == "2d"
    import numpy as np

    objects = np.load(proj / "data/prepared/test_instances.npy")
    assert np.array_equal(objects > 0, np.load(proj / "data/prepared/test_labels.npy") == 1)  # aligned slices
    per_slice = (proj / "reports/evaluate/per_slice.csv").read_text().splitlines()
    assert per_slice[0] == "slice,iou" and len(per_slice) == 3
    pr = (proj / "reports/evaluate/pr_curve.csv").read_text().splitlines()
    assert pr[0] == "threshold,precision,recall" and len(pr) == 100
    # The watershed depth was chosen on the validation slices among params' h_choices, and its table
    # (one row per candidate) says why: the chosen h has the best validation instance F1.
    import csv

    rows = list(csv.DictReader(open(proj / "reports/evaluate/watershed_h.csv")))
    assert [float(r["h"]) for r in rows] == [1, 2, 4, 6, 8]
    best = max(rows, key=lambda r: float(r["instance_f1"]))
    assert metrics["watershed_h"] == float(best["h"])
    first = json.loads((proj / "reports/register/registration.json").read_text())
    assert first["version"] == 1 and first["promoted"] and first["champion_val_iou_before"] is None
    assert 0 < first["val_iou"] <= 1 and first["val_slices"] == 1 and first["val_data_hash"] != "unknown"
    client = mlflow_client(proj)
    champ = client.get_model_version_by_alias("emseg-unet", "champion")
    assert str(champ.version) == "1" and float(champ.tags["test_iou"]) == pytest.approx(metrics["iou"], abs=1e-6)
    assert float(champ.tags["watershed_h"]) == metrics["watershed_h"]
    # z-averaging (params: evaluate.choose_z_average) was decided on the validation slice with its kept
    # neighbours, and the weights, the metrics and the version say the same.
    from emseg.model.network import load_weights

    out = repro_project[1].stdout
    line = next(ln for ln in out.splitlines() if "evaluate: z-averaging on the validation slices:" in ln)
    off, on = (float(v) for v in re.findall(r"IoU (\d\.\d+)", line))
    assert metrics["z_average"] is (on > off) and line.endswith("on" if on > off else "off")
    assert (proj / "data/prepared/val_context_images.npy").exists()
    assert load_weights(proj / "models/emseg.pt")[1]["postprocess"]["z_average"] is metrics["z_average"]
    assert champ.tags["z_average"] == str(metrics["z_average"]).lower()
    run_id = json.loads((proj / "reports/train/run.json").read_text())["run_id"]
    assert client.get_run(run_id).data.metrics["test_iou"] == pytest.approx(metrics["iou"])
    assert "evaluation" in {a.path for a in client.list_artifacts(run_id)}

    # Like for like across datasets: a run on real EPFL crops. Both it and the generated-data champion
    # are scored on the EPFL run's validation slices, so the EPFL model takes `champion` (under the old
    # test-IoU rule no EPFL model could displace a generated one).
    import tifffile

    epfl = SHARED / "epfl-hippocampus"
    data = proj.parent / "epfl-crops"
    data.mkdir(exist_ok=True)
    tifffile.imwrite(data / "img.tif", tifffile.imread(epfl / "training.tif", key=range(0, 60, 2))[:, 200:456, 300:556])
    tifffile.imwrite(data / "lab.tif",
                     tifffile.imread(epfl / "training_groundtruth.tif", key=range(0, 60, 2))[:, 200:456, 300:556])
    write_params(proj, {"data": {"source": "tiff", "train_slices": 4, "val_slices": 2, "test_slices": 4,
                                 "tiff": {"image": str(data / "img.tif"), "labels": str(data / "lab.tif")}},
                        "train": {"max_epochs": 6, "patches_per_epoch": 48, "patch_size": 128, "lr": 0.003,
                                  "use_tuned": False},
                        "tune": TINY["tune"]})  # tune runs as a stage but is not used: as cheap as it goes
    run_cli(["dvc", "repro"], proj, check=True)
    real = json.loads((proj / "reports/register/registration.json").read_text())
    # A label stack without object labels: its objects are followed through the 4 test slices in 3D.
    real_metrics = json.loads((proj / "reports/evaluate/metrics.json").read_text())
    assert (real_metrics["instance_truth"].startswith("3D connected components")
            and real_metrics["instance_objects"] == "3d")
    assert not (proj / "data/prepared/test_instances.npy").exists()
    assert real["version"] == 2 and real["champion_version_before"] == 1
    assert real["val_iou"] > real["champion_val_iou_before"] and real["promoted"]
    assert real["val_data_hash"] != first["val_data_hash"] and real["val_slices"] == 2  # the EPFL run's data
    assert str(client.get_model_version_by_alias("emseg-unet", "champion").version) == "2"
    tags = client.get_model_version("emseg-unet", "2").tags
    assert float(tags["champion_val_iou_before"]) == pytest.approx(real["champion_val_iou_before"], abs=1e-6)
    assert tags["decision"] == "promoted" and "test_iou" in tags and tags["val_data_hash"] == real["val_data_hash"]

    # A deliberately worse EPFL run: one epoch, almost no learning. It registers, but champion stays.
    write_params(proj, {"train": {"max_epochs": 1, "patches_per_epoch": 8, "lr": 1e-6}})
    out = run_cli(["dvc", "repro"], proj, check=True).stdout
    worse = json.loads((proj / "reports/register/registration.json").read_text())
    assert worse["version"] == 3 and worse["champion_version_before"] == 2
    assert worse["champion_val_iou_before"] == pytest.approx(real["val_iou"], abs=1e-6)  # same data, same model
    assert worse["val_iou"] < worse["champion_val_iou_before"]
    assert not worse["promoted"] and "kept previous champion" in out
    assert str(client.get_model_version_by_alias("emseg-unet", "champion").version) == "2"
    assert str(client.get_model_version_by_alias("emseg-unet", "challenger").version) == "3"
    assert client.get_model_version("emseg-unet", "3").tags["decision"] == "kept previous champion"

    # Promotion by hand.
    run_cli(["emseg", "promote", "emseg-unet", "3", "--alias", "champion"], proj, check=True)
    assert str(client.get_model_version_by_alias("emseg-unet", "champion").version) == "3"
    run_cli(["emseg", "promote", "emseg-unet", "2", "--alias", "champion"], proj, check=True)
    bad = run_cli(["emseg", "promote", "emseg-unet", "9", "--alias", "champion"], proj)
    assert bad.returncode == 1 and "has no version 9" in bad.stderr


@pytest.mark.slow
def test_predict_with_the_champion_on_real_stacks(repro_project, tmp_path, shared):
    proj, _ = repro_project
    out = tmp_path / "isbi-pred"
    proc = run_cli(["emseg", "predict", "--model", "models:/emseg-unet@champion",
                    str(shared / "isbi2012" / "train-volume.tif"), str(out)], proj, check=True)
    assert "predict: 30 slices of 512x512" in proc.stdout
    import numpy as np
    import tifffile

    prob = tifffile.imread(out / "probabilities.tif")
    inst = tifffile.imread(out / "instances.tif")
    assert prob.shape == inst.shape == (30, 512, 512)
    assert prob.dtype == np.uint8 and inst.dtype == np.uint32
    summary = json.loads((out / "summary.json").read_text())
    assert summary["objects"] == len(np.unique(inst)) - 1  # labels unique through the stack
    # Split with the watershed depth evaluate chose for this model version (its registry tag).
    chosen = float(mlflow_client(proj).get_model_version_by_alias("emseg-unet", "champion").tags["watershed_h"])
    assert summary["instances"]["h"] == chosen and f"watershed h={chosen:g}" in proc.stdout
    # The OME-Zarr option: the same two stacks, chunked, as an OME-NGFF image with a label image.
    import zarr

    run_cli(["emseg", "predict", "--format", "ome-zarr", "--model", "models:/emseg-unet@champion",
             str(shared / "isbi2012" / "train-volume.tif"), str(tmp_path / "isbi-zarr")], proj, check=True)
    root = zarr.open_group(str(tmp_path / "isbi-zarr" / "prediction.ome.zarr"), mode="r")
    assert root.attrs["multiscales"][0]["datasets"][0]["path"] == "0"
    assert list(root["labels"].attrs["labels"]) == ["instances"]
    assert root["labels/instances"].attrs["image-label"]["source"]["image"] == "../../"
    # Blockwise on Dask: probabilities to 1/255 (one torch thread per worker sums in another order), and
    # with the voxel size unknown, objects per slice: the same objects, numbered in another order.
    assert np.abs(root["0"][:].astype(int) - prob).max() <= 1
    blockwise = root["labels/instances/0"][:]
    assert np.array_equal(blockwise > 0, inst > 0)
    pairs = np.unique(np.stack([inst[inst > 0], blockwise[inst > 0]]), axis=1)
    assert len(pairs[0]) == len(np.unique(pairs[0])) == len(np.unique(pairs[1]))  # one-to-one
    assert json.loads((tmp_path / "isbi-zarr" / "summary.json").read_text())["objects"] == summary["objects"]
    # A folder of 2D slices works too. The weights file evaluate wrote and its registry version carry the
    # same post-processing (chosen on validation), so they predict the same, whatever params.yaml says.
    folder = tmp_path / "slices"
    folder.mkdir()
    for z in range(2):
        tifffile.imwrite(folder / f"s{z}.tif", tifffile.imread(shared / "drosophila-vnc" / "stack1_raw.tif", key=z))
    version = json.loads((proj / "reports/register/registration.json").read_text())["version"]
    other = tmp_path / "other-params.yaml"  # a watershed depth evaluate never offered
    other.write_text((proj / "params.yaml").read_text() + "\n")
    import yaml

    raw = yaml.safe_load(other.read_text())
    raw.setdefault("evaluate", {}).setdefault("instances", {})["h"] = 7.5
    other.write_text(yaml.safe_dump(raw))
    outs = {}
    for name, model in (("file", str(proj / "models" / "emseg.pt")), ("registry", f"models:/emseg-unet/{version}")):
        proc = run_cli(["emseg", "--params", str(other), "predict", "--model", model, str(folder),
                        str(tmp_path / f"vnc-{name}")], proj, check=True)
        assert "as chosen for" in proc.stdout and "h=7.5" not in proc.stdout
        outs[name] = [tifffile.imread(tmp_path / f"vnc-{name}" / f) for f in ("probabilities.tif", "instances.tif")]
    assert outs["file"][1].shape == (2, 1024, 1024)
    assert all(np.array_equal(a, b) for a, b in zip(outs["file"], outs["registry"]))
    picks = {}
    for name, model in (("file", str(proj / "models" / "emseg.pt")), ("registry", f"models:/emseg-unet/{version}")):
        run_cli(["emseg", "suggest", str(folder), str(tmp_path / f"suggest-{name}"), "--model", model, "-k", "3",
                 "--every", "2"],
                proj, check=True)
        rows = (tmp_path / f"suggest-{name}" / "suggestions.csv").read_text().splitlines()
        picks[name] = rows
    assert len(picks["file"]) == 4 and picks["file"] == picks["registry"]  # same patches, same scores
    # The registry version loads the evaluated file logged for it (one folder per file content, so a later
    # evaluation of the same run cannot change it).
    import re

    tag = mlflow_client(proj).get_model_version("emseg-unet", str(version)).tags["weights_artifact"]
    assert re.fullmatch(r"weights/[0-9a-f]{16}/emseg\.pt", tag), tag
    h_file = json.loads((tmp_path / "vnc-file" / "summary.json").read_text())["instances"]["h"]
    assert h_file != 7.5 and h_file == float(mlflow_client(proj).get_model_version("emseg-unet", str(version))
                                             .tags["watershed_h"])

    # MLflow's own serving: `mlflow models serve` of the champion answers a real HTTP request on
    # 127.0.0.1 with a normalised EPFL tile.
    crop = tifffile.imread(shared / "epfl-hippocampus" / "testing.tif", key=0)[:128, :160].astype(np.float32)
    crop = (crop - crop.mean()) / crop.std()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{proj / 'mlruns' / 'mlflow.db'}"}
    with _served("models:/emseg-unet@champion", proj, env) as url:
        served = _ask(url, crop)
    assert served.shape == (1, 1, 128, 160) and 0 <= served.min() and served.max() <= 1
    # Served predictions are emseg's own: the champion's weights through predict_tiled, to 1e-4, and so
    # is the in-process pyfunc model; their IoU against the ground truth agrees to 0.01.
    from emseg.config import TrackingParams
    from emseg.inference import predict_tiled
    from emseg.model.network import SegmentationNet, load_weights
    from emseg.registry import fetched_weights
    from emseg.tracking import configure, log_model

    configure(TrackingParams(), root=proj)
    with fetched_weights("models:/emseg-unet@champion") as weights:
        champion = load_weights(weights)[0]
    own = predict_tiled(champion, crop)
    np.testing.assert_allclose(served[0, 0], own, atol=1e-4)
    pyfunc = np.asarray(mlflow.pyfunc.load_model("models:/emseg-unet@champion").predict(crop[None, None]))
    np.testing.assert_allclose(pyfunc[0, 0], own, atol=1e-4)
    truth = tifffile.imread(shared / "epfl-hippocampus" / "testing_groundtruth.tif", key=0)[:128, :160] > 0
    iou = lambda p: ((p > 0.5) & truth).sum() / max(((p > 0.5) | truth).sum(), 1)  # noqa: E731
    assert abs(iou(served[0, 0]) - iou(own)) <= 0.01 and abs(iou(pyfunc[0, 0]) - iou(own)) <= 0.01
    # A network that works at half resolution (model.input_scale 0.5) resamples inside the served model too.
    half = SegmentationNet({**champion.spec, "input_scale": 0.5})
    half.load_state_dict(champion.state_dict())
    half.eval()
    with mlflow.start_run(run_name="serve-input-scale-0.5"):
        uri = log_model(half).model_uri
    with _served(uri, proj, env) as url:
        served_half = _ask(url, crop)
    own_half = predict_tiled(half, crop)
    assert np.abs(own_half - own).max() > 0.01  # the scale changes the answer, so the check below can fail
    np.testing.assert_allclose(served_half[0, 0], own_half, atol=1e-4)


@contextlib.contextmanager
def _served(model_uri: str, cwd, env):
    """`mlflow models serve` of ``model_uri`` on a free port of 127.0.0.1 (this environment), stopped after."""
    port = free_port()
    log = Path(cwd).parent / f"serve-{port}.log"  # beside the project, not in it
    server = start_logged(["mlflow", "models", "serve", "-m", model_uri, "-h", "127.0.0.1", "-p", str(port),
                           "--env-manager", "local", "-w", "1"], log, cwd=cwd, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_answers(f"{url}/ping", server, 120, "mlflow models serve", lambda: log_tail(log))
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def _ask(url: str, tile):
    """POST one normalised tile to a served model's /invocations; its answer as an array."""
    import urllib.request

    import numpy as np

    req = urllib.request.Request(f"{url}/invocations", data=json.dumps({"inputs": tile[None, None].tolist()}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        answer = json.loads(resp.read())
    return np.asarray(answer.get("predictions", answer), dtype=np.float32)


@pytest.mark.slow
def test_export_writes_a_bioimageio_package_that_bioimageio_core_runs_as_emseg_predicts(repro_project, tmp_path):
    """`emseg export` of the champion: bioimageio.spec validates the package, and bioimageio.core, with
    either weight format, turns its test input (a real EPFL tile) into emseg's own prediction to 1e-4."""
    import zipfile

    import numpy as np
    import tifffile
    from bioimageio.core import create_prediction_pipeline
    from bioimageio.core.digest_spec import create_sample_for_model
    from bioimageio.spec import load_description
    from bioimageio.spec.model import v0_5

    from emseg.data.io import normalise
    from emseg.inference import predict_slice
    from emseg.predict import load_model

    proj, _ = repro_project
    out = tmp_path / "champion.zip"
    proc = run_cli(["emseg", "export", "models:/emseg-unet@champion", str(out),
                    "--sample", str(SHARED / "epfl-hippocampus" / "testing.tif"), "--slice", "40"], proj)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = run_cli(["emseg", "export", "models:/emseg-unet@champion", str(out)], proj)  # never replaced silently
    assert again.returncode == 1 and "already exists" in again.stderr
    bad = run_cli(["emseg", "export", "models:/emseg-unet@champion", str(tmp_path / "bad.zip"), "--license", "nope",
                   "--sample", str(SHARED / "epfl-hippocampus" / "testing.tif")], proj)
    assert bad.returncode == 1 and "is not an SPDX licence id" in bad.stderr.strip().splitlines()[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["champion.zip"]  # nothing half-written

    descr = load_description(out, perform_io_checks=True)
    assert isinstance(descr, v0_5.ModelDescr), descr.validation_summary.format()
    assert descr.weights.pytorch_state_dict is not None and descr.weights.torchscript is not None
    assert descr.covers and descr.cite and str(descr.license) == "MIT"
    with zipfile.ZipFile(out) as z:
        readme = z.read("README.md").decode()
        packaged_input = np.load(z.open("test_input.npy"))
        packaged_output = np.load(z.open("test_output.npy"))
    assert "# Validation" in readme and "test_iou" in readme  # what the registry knows of the version
    assert "- z_average: " in readme  # the choice made on validation, which the package does not apply
    # The test input is the real tile: the centre 256 x 256 of slice 40, as read independently here.
    tile = tifffile.imread(SHARED / "epfl-hippocampus" / "testing.tif", key=40)[256:512, 384:640].astype(np.float32)
    assert packaged_input.shape == (1, 1, 256, 256) and np.array_equal(packaged_input[0, 0], tile)

    mlflow_client(proj)  # the project's registry, process-wide
    net, _, _ = load_model("models:/emseg-unet@champion")
    exact = tile.astype(np.float64)  # a one-slice stack: emseg z-scores it by its own statistics
    ours = predict_slice(net, normalise(tile, float(exact.mean()), float(exact.std())))
    assert 0.01 < float(ours.mean()) < 0.99  # a tile with something to get right
    np.testing.assert_allclose(packaged_output[0, 0], ours, atol=1e-4)
    for fmt in ("pytorch_state_dict", "torchscript"):
        pipeline = create_prediction_pipeline(descr, weight_format=fmt, devices=["cpu"])
        try:
            sample = create_sample_for_model(descr, inputs={"raw": packaged_input}, sample_id=fmt)
            theirs = pipeline.predict_sample_without_blocking(sample).members["foreground"].data.to_numpy()
        finally:
            pipeline.unload()
        assert theirs.shape == (1, 1, 256, 256)
        np.testing.assert_allclose(theirs[0, 0], ours, atol=1e-4, err_msg=fmt)


@pytest.mark.slow
def test_init_from_the_registry_loads_the_champion_weights(repro_project):
    import torch

    from emseg.config import ModelParams, TrackingParams, parse_params
    from emseg.errors import EmsegError
    from emseg.model.network import build_network, initialise, load_weights
    from emseg.registry import fetched_weights, local_init, resolve
    from emseg.tracking import configure

    proj, _ = repro_project
    configure(TrackingParams(), root=proj)
    with fetched_weights("models:/emseg-unet@champion") as weights:
        champion, _ = load_weights(weights)
    assert not weights.exists()  # the download is removed after use
    version = resolve("models:/emseg-unet@champion").version
    net = build_network(ModelParams(decoder_channels=[64, 32, 16, 16, 8]))
    params = parse_params({"train": {"init": {"mode": "registry", "uri": "models:/emseg-unet@champion"}}})
    with local_init(params, root=proj) as local:
        # The run is named by the version it starts from, not by the alias (which may move later).
        assert local.train.init.uri == f"models:/emseg-unet/{version}" and Path(local.train.init.path).is_file()
        desc = initialise(net, local.train.init)
        fetched = Path(local.train.init.path)
    assert not fetched.exists() and desc.startswith(f"registry:models:/emseg-unet/{version}")
    for (k, a), b in zip(net.state_dict().items(), champion.state_dict().values()):
        assert torch.equal(a, b), k
    bad = parse_params({"train": {"init": {"mode": "registry", "uri": "models:/emseg-unet@nobody"}}})
    with pytest.raises(EmsegError, match="models:/emseg-unet@nobody: not found in the model registry"):
        with local_init(bad, root=proj):
            pass
    with pytest.raises(EmsegError, match="were not fetched to a local file"):  # the model layer never reaches MLflow
        initialise(net, params.train.init)
    # As `emseg train` meets it: a fresh process, nothing configured yet. The init is looked up in the
    # project's registry (not in MLflow's default store, which would not know it and leave a mlflow.db).
    import sys

    code = ("from emseg.config import derive, load_params\nfrom emseg.registry import local_init\n"
            "p = derive(load_params('params.yaml'), {'train': {'init': {'mode': 'registry', "
            "'uri': 'models:/emseg-unet@champion'}}}, 'x')\n"
            "with local_init(p) as q:\n    print(q.train.init.uri)")
    out = run_cli([sys.executable, "-c", code], proj, check=True).stdout
    assert out.strip().splitlines()[-1] == f"models:/emseg-unet/{version}"
    assert not (proj / "mlflow.db").exists()


@pytest.mark.slow
@pytest.mark.parametrize("case", ["no_model", "no_alias", "four_d", "rgb", "exists"])
def test_predict_bad_input_is_one_line_and_changes_nothing(repro_project, tmp_path, case):
    import numpy as np
    import tifffile

    proj, _ = repro_project
    client = mlflow_client(proj)
    versions_before = len(client.search_model_versions("name='emseg-unet'"))
    stack = tmp_path / "in.tif"
    tifffile.imwrite(stack, np.zeros((2, 64, 64), np.uint8) + np.arange(64, dtype=np.uint8))
    out = tmp_path / "out"
    model = "models:/emseg-unet@champion"
    expect = {"no_model": "models:/nope@champion: not found in the model registry",
              "no_alias": "models:/emseg-unet@gold: not found in the model registry",
              "four_d": "expected a 2D slice or a 3D (z, y, x) grey stack, got 4D",
              "rgb": "expected grey images, got 3 channels",
              "exists": "out: already exists; choose another output or pass --overwrite"}[case]
    if case == "no_model":
        model = "models:/nope@champion"
    elif case == "no_alias":
        model = "models:/emseg-unet@gold"
    elif case == "four_d":
        tifffile.imwrite(stack, np.zeros((2, 2, 64, 64), np.uint8))
    elif case == "rgb":
        tifffile.imwrite(stack, np.zeros((64, 64, 3), np.uint8), photometric="rgb")
    elif case == "exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    proc = run_cli(["emseg", "predict", "--model", model, str(stack), str(out)], proj)
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "%|" not in ln]
    assert len(lines) == 1 and expect in lines[0], proc.stderr
    if case == "exists":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    else:
        assert not out.exists()
    assert not list(tmp_path.glob(".out*"))  # no temporary leftovers
    assert len(client.search_model_versions("name='emseg-unet'")) == versions_before


@pytest.mark.slow
def test_tune_resumes_after_kill_without_counting_a_trial_twice(tmp_path):
    proj = make_project(tmp_path / "proj", git=False)
    write_params(proj, {**TINY, "tune": {**TINY["tune"], "n_trials": 3, "pruning": False}})
    assert run_cli(["emseg", "fetch"], proj).returncode == 0 and run_cli(["emseg", "prepare"], proj).returncode == 0
    db = proj / "optuna" / "study.db"
    proc = subprocess.Popen(["emseg", "tune"], cwd=proj, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    try:
        while time.time() < deadline:  # kill -9 as soon as one trial has finished and the next is running
            if db.exists():
                try:
                    with sqlite3.connect(db) as con:
                        states = [s for (s,) in con.execute("select state from trials")]
                except sqlite3.OperationalError:
                    states = []
                if states.count("COMPLETE") == 1 and "RUNNING" in states:
                    break
            time.sleep(0.3)
        else:
            pytest.fail("tune never reached its second trial")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    time.sleep(5)  # the dead trial's heartbeat goes stale (2 heartbeats of 2 s)
    out = run_cli(["emseg", "tune"], proj, check=True).stdout
    assert "run now" in out
    studies = optuna.get_all_study_summaries(f"sqlite:///{db}")
    study = optuna.load_study(study_name=studies[0].study_name, storage=f"sqlite:///{db}")
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 3  # exactly the budget, none twice
    assert states.count(optuna.trial.TrialState.FAIL) == 1  # the killed trial, marked failed by heartbeat
    best = json.loads((proj / "reports/tune/best_params.json").read_text())
    assert best["n_complete"] == 3


@pytest.mark.slow
def test_the_pruner_stops_a_trial_that_falls_behind_the_median(tmp_path):
    """Two sound trials set the median; a third whose learning rate is too small to learn anything is
    stopped by the MedianPruner after its second epoch, reported as pruned, and trains no further."""
    import csv

    from emseg.config import load_params
    from emseg.tuning import study_name

    proj = make_project(tmp_path / "proj", git=False)
    write_params(proj, {**TINY, "train": {**TINY["train"], "patches_per_epoch": 64},
                        "tune": {**TINY["tune"], "n_trials": 3, "epochs_per_trial": 4, "batch_sizes": [8],
                                 "lr_min": 1e-9, "prune_after_epochs": 2, "prune_startup_trials": 2,
                                 "minutes_per_trial": 10}})  # epochs, never the clock, end a trial here
    assert run_cli(["emseg", "fetch"], proj).returncode == 0 and run_cli(["emseg", "prepare"], proj).returncode == 0
    (proj / "optuna").mkdir(exist_ok=True)
    storage = f"sqlite:///{proj / 'optuna' / 'study.db'}"
    name = study_name(load_params(proj / "params.yaml"), str(proj / "data" / "prepared"))
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
    for lr in (5e-3, 5e-3, 1e-9):  # the order tune will run them in
        study.enqueue_trial({"lr": lr, "batch_size": 8})
    out = run_cli(["emseg", "tune"], proj, check=True).stdout
    rows = list(csv.DictReader(open(proj / "reports/tune/trials.csv")))
    assert [r["state"] for r in rows] == ["COMPLETE", "COMPLETE", "PRUNED"], rows
    assert [int(r["epochs"]) for r in rows] == [4, 4, 2]  # pruned at the first epoch it may be
    best = json.loads((proj / "reports/tune/best_params.json").read_text())
    assert best["n_pruned"] == 1 and best["n_complete"] == 2 and best["trial"] in (0, 1)
    assert "2 complete, 1 pruned" in out
