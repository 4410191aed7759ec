"""A team's shared servers (issue 19 item 6): Debian's PostgreSQL started here on 127.0.0.1 as the
backend of a real `mlflow server` and of the Optuna study; the pipeline records runs and registry
versions there as it does in its SQLite default, and two `emseg tune` processes started at once share
one study without running a trial too many or counting one twice."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import TINY, free_port, make_project, run_cli, wait_until_answers, write_params

pytestmark = pytest.mark.slow
BIN = Path(os.sys.executable).parent


def _postgres_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    assert found, "Debian's postgresql is missing: run make setup (or: sudo apt-get install -y postgresql)"
    return Path(found[-1]).parent


@pytest.fixture(scope="module")
def servers():
    """PostgreSQL (databases mlflow and optuna) and an `mlflow server` on it, both on 127.0.0.1."""
    bindir = _postgres_bin()
    root = Path(tempfile.mkdtemp(prefix="emseg-pg-"))
    os.chmod(root, 0o755)
    as_postgres = []
    if os.geteuid() == 0:  # initdb refuses root: the cluster belongs to Debian's postgres user
        shutil.chown(root, "postgres", "postgres")
        as_postgres = ["runuser", "-u", "postgres", "--"]
    data, port, web = root / "data", free_port(), free_port()
    mlflow_proc = None
    try:
        subprocess.run([*as_postgres, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
                        "--no-sync"], check=True, capture_output=True)
        subprocess.run([*as_postgres, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-o",
                        f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start"],
                       check=True, capture_output=True)
        for db in ("mlflow", "optuna"):
            subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-q", "-c",
                            f"CREATE DATABASE {db}"], check=True, capture_output=True)
        base = f"postgresql://postgres@127.0.0.1:{port}"
        artifacts = Path(tempfile.mkdtemp(prefix="emseg-mlflow-artifacts-"))
        mlflow_proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--backend-store-uri", f"{base}/mlflow", "--artifacts-destination",
             str(artifacts), "--host", "127.0.0.1", "--port", str(web), "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=open(root / "mlflow.log", "w"), start_new_session=True)
        url = f"http://127.0.0.1:{web}"
        wait_until_answers(f"{url}/health", mlflow_proc, 180, "mlflow server", (root / "mlflow.log").read_text)
        yield {"mlflow": url, "optuna": f"{base}/optuna", "artifacts": artifacts}
    finally:
        if mlflow_proc is not None:
            os.killpg(mlflow_proc.pid, signal.SIGTERM)
            mlflow_proc.wait(timeout=30)
        subprocess.run([*as_postgres, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def project(servers, tmp_path_factory):
    proj = make_project(tmp_path_factory.mktemp("shared") / "proj")
    write_params(proj, {**TINY, "tracking": {"tracking_uri": servers["mlflow"]},
                        "tune": {**TINY["tune"], "storage": servers["optuna"]}})
    return proj


def test_the_pipeline_records_runs_and_versions_on_a_shared_mlflow_server_and_postgres(servers, project):
    from mlflow import MlflowClient
    import optuna

    run_cli(["dvc", "repro"], project, check=True)
    client = MlflowClient(tracking_uri=servers["mlflow"], registry_uri=servers["mlflow"])
    exp = client.get_experiment_by_name("emseg")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    train_id = json.loads((project / "reports/train/run.json").read_text())["run_id"]
    train = client.get_run(train_id)
    assert train.info.status == "FINISHED" and 0 < train.data.metrics["test_iou"] <= 1
    assert sum(name.startswith("trial-") for name in runs) == TINY["tune"]["n_trials"]
    # Artifacts went to the server's store, through the server: nothing under the project's mlruns/.
    names = {a.path for a in client.list_artifacts(train_id)}
    assert {"curves.png", "history.csv"} <= names
    assert any(servers["artifacts"].rglob("curves.png"))
    assert not any((project / "mlruns").rglob("curves.png"))
    champion = client.get_model_version_by_alias("emseg-unet", "champion")
    registration = json.loads((project / "reports/register/registration.json").read_text())
    assert str(champion.version) == str(registration["version"]) == "1" and champion.run_id == train_id
    # The tune stage's study is in PostgreSQL, with the trials it ran.
    study_names = [s.study_name for s in optuna.get_all_study_summaries(servers["optuna"])]
    assert len(study_names) == 1
    study = optuna.load_study(study_name=study_names[0], storage=servers["optuna"])
    finished = [t for t in study.trials if t.state.is_finished() and t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == TINY["tune"]["n_trials"]


def test_two_tune_processes_share_one_study_and_run_exactly_n_trials(servers, project):
    import optuna
    from mlflow import MlflowClient

    n = 4
    write_params(project, {"tune": {"n_trials": n, "study_name": "two-processes", "epochs_per_trial": 2}})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(["emseg", "tune"], cwd=project, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    name = next(s.study_name for s in optuna.get_all_study_summaries(servers["optuna"])
                if s.study_name.startswith("two-processes"))
    trials = optuna.load_study(study_name=name, storage=servers["optuna"]).trials
    counted = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(counted) == n, [(t.number, t.state.name, t.user_attrs) for t in trials]
    assert len({t.number for t in counted}) == n
    # Both processes ran trials of the one study; any trial beyond the budget was refused before it
    # trained (marked surplus), never counted.
    assert len({t.user_attrs["process"] for t in counted}) == 2
    assert all(t.user_attrs.get("surplus") for t in trials if t not in counted)
    # Each counted trial has exactly one MLflow run on the shared server.
    client = MlflowClient(tracking_uri=servers["mlflow"])
    exp = client.get_experiment_by_name("emseg")
    runs = client.search_runs([exp.experiment_id], f"tags.optuna_study = '{name}'")
    tagged = [r.data.tags["optuna_trial"] for r in runs if "optuna_trial" in r.data.tags]
    assert sorted(tagged) == sorted(str(t.number) for t in counted)
    assert sum(r.data.tags.get("stage") == "tune" for r in runs) == 2  # one parent run per process
