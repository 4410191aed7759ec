"""The main pipeline end to end with the real DVC, MLflow and Optuna (tiny sizes, CPU)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time

import mlflow
import optuna
import pytest
from mlflow import MlflowClient

from conftest import SMALL_GENERATED, make_project, run_cli, write_params

TINY = {
    **SMALL_GENERATED,
    "model": {"decoder_channels": [64, 32, 16, 16, 8]},
    "train": {"patch_size": 96, "patches_per_epoch": 16, "batch_size": 8, "max_epochs": 2},
    "tune": {"n_trials": 2, "epochs_per_trial": 1, "batch_sizes": [4, 8], "heartbeat_s": 2},
}


@pytest.fixture(scope="module")
def repro_project(tmp_path_factory):
    proj = make_project(tmp_path_factory.mktemp("e2e") / "proj")
    write_params(proj, TINY)
    proc = run_cli(["dvc", "repro"], proj, check=True)
    return proj, proc


def _client(proj):
    mlflow.set_tracking_uri(f"sqlite:///{proj / 'mlruns' / 'mlflow.db'}")
    return MlflowClient()


@pytest.mark.slow
def test_dvc_repro_runs_prepare_tune_train_and_tracks_everything(repro_project):
    proj, proc = repro_project
    out = proc.stdout
    assert "train:" in out and "best val IoU" in out and "tune: best val IoU" in out
    best = json.loads((proj / "reports/tune/best_params.json").read_text())
    assert best["n_complete"] + best["n_pruned"] == 2 and best["batch_size"] in (4, 8)
    metrics = json.loads((proj / "reports/train/metrics.json").read_text())
    assert metrics["lr"] == pytest.approx(best["lr"]) and metrics["batch_size"] == best["batch_size"]
    assert (proj / "models/model.pt").stat().st_size > 1e6
    hist = (proj / "reports/train/history.csv").read_text().splitlines()
    assert hist[0] == "epoch,train_loss,val_loss,train_acc,val_acc,train_iou,val_iou" and len(hist) == 1 + metrics["epochs"]
    assert "up to date" in run_cli(["dvc", "status"], proj, check=True).stdout.lower()

    client = _client(proj)
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
