"""MLflow runs: store location, run tags that trace a run to code and data, logging a run's model.
The registry (`models:/`) is `emseg.registry`'s alone."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml

from emseg.config import TrackingParams
from emseg.errors import EmsegError
from emseg.paths import PREPARED_DIR


def absolute_sqlite(uri: str, root: Path) -> str:
    """A relative sqlite:/// URL made absolute against ``root`` (its folder created); other URLs as given."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        path = (root / uri[len(prefix):]).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return prefix + str(path)
    return uri


SQLITE_HEADER = b"SQLite format 3\x00"


def _sqlite_path(uri: str, root: Path) -> Path | None:
    prefix = "sqlite:///"
    return (root / uri[len(prefix):]).resolve() if uri.startswith(prefix) else None


def check_store(cfg: TrackingParams, root: str | Path = ".") -> None:
    """A SQLite store that exists must be one: a damaged file is one line, not a database traceback."""
    path = _sqlite_path(cfg.tracking_uri, Path(root))
    if path is None or not path.exists():
        return
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(SQLITE_HEADER))
    except OSError as exc:
        raise EmsegError(f"{path}: cannot read the MLflow store ({exc.strerror})") from None
    if head != SQLITE_HEADER and (head or path.stat().st_size):
        raise EmsegError(f"{path}: the MLflow store is damaged (not an SQLite database); restore it from a backup "
                         f"or move it away to start a new one")


def require_store(cfg: TrackingParams, root: str | Path = ".") -> None:
    """For commands that only read the registry: the store must already exist (none is created here)."""
    path = _sqlite_path(cfg.tracking_uri, Path(root))
    if path is not None and not path.is_file():
        raise EmsegError(f"{path}: no MLflow store here; run the command in the project folder (or give "
                         f"--params with its tracking settings), or pass a weights file instead of models:/...")
    check_store(cfg, root)


def configure(cfg: TrackingParams, root: str | Path = ".") -> str:
    """Point MLflow at the project's store; create the experiment with artifacts under mlruns/."""
    import mlflow

    check_store(cfg, root)
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    import logging

    for name in ("mlflow.store.db.utils", "alembic.runtime.migration"):  # "creating tables" chatter
        logging.getLogger(name).setLevel(logging.WARNING)
    root = Path(root).resolve()
    uri = absolute_sqlite(cfg.tracking_uri, root)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if mlflow.get_experiment_by_name(cfg.experiment) is None:
        from mlflow.exceptions import MlflowException

        try:
            if uri.startswith(("http://", "https://")):  # a shared `mlflow server`: artifacts go where it keeps them
                mlflow.create_experiment(cfg.experiment)
            else:
                artifacts = (root / cfg.artifact_root).resolve()
                artifacts.mkdir(parents=True, exist_ok=True)
                mlflow.create_experiment(cfg.experiment, artifact_location=artifacts.as_uri())
        except MlflowException as exc:  # another process sharing the store created it meanwhile
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
    exp = mlflow.set_experiment(cfg.experiment)
    if exp.tags.get("mlflow.experimentKind") != "custom_model_development":
        # Otherwise the MLflow 3 UI opens the experiment on its GenAI trace pages, not on the runs.
        mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, "mlflow.experimentKind", "custom_model_development")
    fail_orphaned_runs(exp.experiment_id)
    return uri


PROCESS_TAG = "emseg.process"


def process_id(pid: int | None = None) -> str:
    """host:pid:start-time of a process; the start time tells a reused pid from the original one."""
    import socket

    import psutil

    proc = psutil.Process(pid or os.getpid())
    return f"{socket.gethostname()}:{proc.pid}:{proc.create_time():.2f}"


def process_alive(tag: str) -> bool | None:
    """True/False for a process of this host; None when the run was started on another host."""
    import socket

    import psutil

    try:
        host, pid, started = tag.rsplit(":", 2)
        pid = int(pid)
    except ValueError:
        return None
    if host != socket.gethostname():
        return None
    try:
        return f"{psutil.Process(pid).create_time():.2f}" == started
    except psutil.Error:
        return False


def fail_orphaned_runs(experiment_id: str) -> list[str]:
    """Mark FAILED the RUNNING runs whose process on this host is gone (killed with SIGKILL, power cut).

    MLflow ends a run as FAILED itself when Python unwinds (an exception, Ctrl-C); a process that
    dies without unwinding leaves it RUNNING for ever. Every stage calls this on start.
    """
    from mlflow import MlflowClient

    client = MlflowClient()
    failed = []
    for run in client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000):
        tag = run.data.tags.get(PROCESS_TAG)
        if tag and process_alive(tag) is False:
            client.set_tag(run.info.run_id, "emseg.failure", f"process {tag} died without ending the run")
            client.set_terminated(run.info.run_id, status="FAILED")
            failed.append(run.info.run_id)
    if failed:
        print(f"mlflow: marked {len(failed)} run(s) of dead processes as FAILED: {', '.join(failed)}")
    return failed


def start_run(**kwargs):
    """``mlflow.start_run`` that records which process owns the run (see ``fail_orphaned_runs``)."""
    import mlflow

    run = mlflow.start_run(**kwargs)
    mlflow.set_tag(PROCESS_TAG, process_id())
    return run


def shown_url(url: str) -> str:
    """A URL fit to log or write down: its password hidden (postgresql://user:***@host/db)."""
    import re

    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://[^:/@]+):[^/]*@", r"\1:***@", url)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested params as MLflow params (dotted keys); URLs with a password are logged without it."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v if not isinstance(v, list) else json.dumps(v)
            if isinstance(v, str) and "://" in v:
                out[key] = shown_url(v)
    return out


def git_commit(root: str | Path = ".") -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if sha.returncode != 0:
        return "unknown"
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def dvc_data_hash(root: str | Path = ".", out: str = PREPARED_DIR) -> str:
    """The DVC hash of the prepared data, from dvc.lock (what `dvc checkout` restores)."""
    lock = Path(root) / "dvc.lock"
    try:
        stages = yaml.safe_load(lock.read_text()).get("stages", {})
    except (OSError, yaml.YAMLError, AttributeError):
        return "unknown"
    for stage in stages.values():
        for o in stage.get("outs", []) or []:
            if o.get("path") == out:
                return o.get("md5", "unknown")
    return "unknown"


def run_tags(manifest: dict, init: str, root: str | Path = ".") -> dict[str, str]:
    s = manifest["splits"]
    return {"git_commit": git_commit(root), "dvc_data_hash": dvc_data_hash(root), "dataset": manifest["source"],
            "labelled_slices": str(len(s["train"]["slices"])), "init": init,
            "train_slices": json.dumps(s["train"]["slices"])}


# MLflow's dataset contexts (the run page's "Datasets used" shows them beside each dataset).
CONTEXTS = {"train": "training", "val": "validation", "test": "testing"}


def prepared_dataset(manifest: dict, split: str, prepared_dir: str | Path = PREPARED_DIR, root: str | Path = "."):
    """One split of the prepared data as an MLflow dataset: named by source and split, its digest the
    DVC hash of `data/prepared` (what `dvc checkout` restores), its source the split's array file."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    path = (Path(prepared_dir) / f"{split}_images.npy").resolve()
    with warnings.catch_warnings():  # MLflow registers its local-file source twice and says so
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(path.as_uri())
    return MetaDataset(source, name=f"{manifest['source']}-{split}", digest=dvc_data_hash(root)[:36])


def log_data_inputs(manifest: dict, splits: tuple[str, ...], prepared_dir: str | Path = PREPARED_DIR,
                    root: str | Path = ".") -> dict[str, Any]:
    """Log ``splits`` of the prepared data as inputs of the active run (lineage on its MLflow page):
    context training/validation/testing, tags with the split's slices and the raw file it came from."""
    import mlflow

    out = {}
    for split in splits:
        ds = prepared_dataset(manifest, split, prepared_dir, root)
        files = manifest["files"]
        role = "test_image" if split == "test" and "test_image" in files else "train_image"
        mlflow.log_input(ds, context=CONTEXTS[split], tags={
            "split": split, "slices": json.dumps(manifest["splits"][split]["slices"]),
            "raw_file": str(files[role].get("origin", "generated")), "raw_sha256": files[role]["sha256"]})
        out[split] = ds
    return out


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("torch", "segmentation-models-pytorch", "timm", "numpy", "emseg")]


def export_example(net):
    """Input example for torch.export: batch 2 and unequal sides, so every dimension stays dynamic;
    the sides leave the encoder a bottleneck of at least 2x3 after ``model.input_scale`` (torch.export
    specialises size-1 dimensions)."""
    import numpy as np

    scale = float(net.spec.get("input_scale", 1.0))
    side = [int(np.ceil(s / scale / 32) * 32) for s in (64, 96)]
    return np.zeros((2, int(net.spec.get("z_context", 1)), *side), np.float32)


def log_model(net):
    """Log the network (pyfunc + pytorch flavours, signature, input example) and a safe weights file.

    The pytorch flavour is saved as a torch.export "pt2" program: loading it runs no pickled code.
    Batch, height and width are dynamic (height and width multiples of 32).
    """
    import mlflow
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    from emseg.model.network import ProbabilityModel, save_weights

    served = ProbabilityModel(net).eval()
    example = export_example(net)
    # Input channels: the slice and its z neighbours (model.z_context), in stack order.
    spec = TensorSpec(np.dtype(np.float32), (-1, int(net.spec.get("z_context", 1)), -1, -1))
    signature = ModelSignature(inputs=Schema([spec]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1, -1, -1))]))
    info = mlflow.pytorch.log_model(served, name="model", signature=signature, input_example=example,
                                    serialization_format="pt2", pip_requirements=_requirements())
    with tempfile.TemporaryDirectory() as tmp:
        save_weights(net, Path(tmp) / "model.pt")
        mlflow.log_artifact(str(Path(tmp) / "model.pt"), artifact_path="weights")
    return info
