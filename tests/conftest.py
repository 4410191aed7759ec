"""Shared fixtures: the real data beside the clone, a scratch copy of the project for DVC runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED = (ROOT.parent / "shared" / "data").resolve()
EPFL = SHARED / "epfl-hippocampus"
VNC = SHARED / "drosophila-vnc"
ISBI = SHARED / "isbi2012"

# Subprocesses (`emseg`, `dvc`, `mlflow`) must come from the same environment as the tests.
os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
os.environ.setdefault("MPLBACKEND", "Agg")
# Two pytest-xdist workers share the 2 cores: one thread each (and in the `emseg`/`dvc` processes they
# start) instead of two each, which would make both wait on each other's spinning threads.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")


def require_shared() -> Path:
    # Real-data tests fail loudly rather than skip: CI always has ../shared beside the clone.
    assert (EPFL / "training.tif").exists(), f"real EM data not found at {SHARED} (expected ../shared beside the clone)"
    return SHARED


def epfl_test_crop(window: tuple) -> tuple:
    """A crop (z, y, x slices) of EPFL testing.tif and of its ground truth (mitochondria = 255), uint8."""
    import tifffile

    require_shared()
    with tifffile.TiffFile(EPFL / "testing.tif") as tf:
        image = tf.asarray()[window]
    with tifffile.TiffFile(EPFL / "testing_groundtruth.tif") as tf:
        labels = tf.asarray()[window]
    return image, labels


@pytest.fixture(scope="session")
def shared() -> Path:
    return require_shared()


def run_cli(args, cwd, check=False, env=None, timeout=1200) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def start_logged(args, log: Path, **kw) -> subprocess.Popen:
    """Start a long-lived process (a server, a `dvc repro` to kill) with its output in ``log``.

    Never a pipe nobody reads: once a pipe's 64 KiB fill up (request logs, progress bars), the process
    blocks on its next write and a server stops answering, on a slow machine late in a test."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, text=True, **kw)


def log_tail(log: Path, n: int = 3000) -> str:
    return log.read_text(errors="replace")[-n:] if log.exists() else ""


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now (for servers the tests start)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_answers(url: str, proc: subprocess.Popen, seconds: float, what: str, output=lambda: "") -> None:
    """Poll ``url`` until it answers 200; fail the test, with ``output()`` (the server's last words),
    if ``proc`` exits first or ``seconds`` pass."""
    import time
    import urllib.request

    deadline = time.time() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            pytest.fail(f"{what} did not answer {url} within {seconds:g} s:\n{output()[-3000:]}")
        time.sleep(0.5)


def mlflow_client(proj: Path):
    """A client on a project's MLflow store. Both URIs, also set process-wide: an earlier test in this
    process may have pointed MLflow's registry elsewhere."""
    import mlflow
    from mlflow import MlflowClient

    uri = f"sqlite:///{proj / 'mlruns' / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def write_params(project: Path, updates: dict) -> dict:
    """Deep-merge ``updates`` into the project's params.yaml and write it back."""
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())

    def merge(dst, src):
        for k, v in src.items():
            if isinstance(v, dict) and isinstance(dst.get(k), dict):
                merge(dst[k], v)
            else:
                dst[k] = v

    merge(params, updates)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return params


def make_project(dest: Path, git: bool = True) -> Path:
    """A scratch copy of the project (params, pipelines, source) with its own git and DVC repos."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("params.yaml", "dvc.yaml", ".gitignore"):
        shutil.copy(ROOT / name, dest / name)
    shutil.copytree(ROOT / "src", dest / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    if (ROOT / "pipelines").exists():
        shutil.copytree(ROOT / "pipelines", dest / "pipelines", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "annotations", dest / "annotations")
    (dest / "mlruns").mkdir(exist_ok=True)
    if git:
        run_cli(["git", "init", "-q"], dest, check=True)
        run_cli(["dvc", "init", "-q"], dest, check=True)
        run_cli(["dvc", "config", "core.autostage", "true"], dest, check=True)
    return dest


def epfl_project(tmp_path: Path, updates: dict) -> Path:
    """A scratch project whose EPFL mirror is ../shared/data (cached inside tmp_path), with ``updates``."""
    proj = make_project(tmp_path / "proj")
    write_params(proj, {**updates, "data": {"epfl": {"mirrors": [str(EPFL)], "cache_dir": str(tmp_path / "cache")}}})
    return proj


SMALL_GENERATED = {"data": {"source": "generated", "train_slices": 3, "val_slices": 1,
                            "generated": {"slices": 8, "test_slices": 2, "height": 256, "width": 320}}}


@pytest.fixture(scope="module")
def small_prepared(tmp_path_factory):
    """SMALL_GENERATED fetched and prepared: a folder of train/val/test splits for in-process fits."""
    from emseg.config import parse_params
    from emseg.data.prepare import prepare
    from emseg.data.sources import fetch_raw

    d = tmp_path_factory.mktemp("small")
    params = parse_params(SMALL_GENERATED)
    fetch_raw(params.data, d / "raw")
    prepare(params.data, d / "raw", d / "prepared")
    return d / "prepared"


TINY = {
    **SMALL_GENERATED,
    "model": {"decoder_channels": [64, 32, 16, 16, 8]},
    "train": {"patch_size": 96, "patches_per_epoch": 32, "batch_size": 8, "max_epochs": 3},
    "tune": {"n_trials": 2, "epochs_per_trial": 1, "batch_sizes": [4, 8], "heartbeat_s": 2},
}


@pytest.fixture(scope="session")
def repro_project(tmp_path_factory):
    """One tiny `dvc repro` of the whole pipeline, shared by the pipeline and the MLflow UI tests."""
    proj = make_project(tmp_path_factory.mktemp("e2e") / "proj")
    write_params(proj, TINY)
    proc = run_cli(["dvc", "repro"], proj, check=True)
    return proj, proc


def pytest_collection_modifyitems(config, items):
    """`make test` runs `pytest -n 2 --dist loadfile`: each worker takes whole files, so module fixtures
    are built once (and `repro_project` once per worker). test_pipeline.py is the longest file: queued first."""
    items.sort(key=lambda item: item.path.name != "test_pipeline.py")
