"""DVC stage `train`: fit the network on data/prepared, track the run in MLflow, write models/ and reports/train/."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

from emseg.config import load_params
from emseg.data.prepare import load_split
from emseg.data.patches import centre
from emseg.fsutil import staged_files, write_json
from emseg.inference import predict_slice
from emseg.model.network import save_weights
from emseg.model.train import CURVE_KEYS, curve_columns, ddp_worker, fit
from emseg.plots import plot_curves, plot_overlays
from emseg import tracking
from emseg.paths import BEST_PARAMS, CHECKPOINT_ROOT, PARAMS, PREPARED_DIR, TRAIN_DIR, TRAIN_RUN, TRAINED_MODEL


def checkpoint_dir(params, prepared_dir: str, lr: float, batch_size: int) -> Path:
    """Where a run keeps its Lightning checkpoints: one folder per data + settings, so an interrupted
    run is resumed only by the same run, never by one with other data or params."""
    manifest = (Path(prepared_dir) / "manifest.json").read_bytes()
    spec = json.dumps({"model": params.model.model_dump(), "train": params.train.identity(), "seed": params.seed,
                       "lr": lr, "batch_size": batch_size}, sort_keys=True).encode()
    return Path(CHECKPOINT_ROOT) / f"train-{hashlib.sha256(manifest + spec).hexdigest()[:12]}"


def effective_hparams(params, best_params_path: str = BEST_PARAMS) -> tuple[float, int, str]:
    """lr and batch size: from the tune stage when train.use_tuned is set and it has run, else params."""
    path = Path(best_params_path)
    if params.train.use_tuned and path.exists():
        best = json.loads(path.read_text())
        return float(best["lr"]), int(best["batch_size"]), "tuned"
    return params.train.lr, params.train.batch_size, "params"


def run(params_path: str = PARAMS, prepared_dir: str = PREPARED_DIR) -> dict:
    from emseg.registry import local_init

    with local_init(load_params(params_path)) as params:  # registry init weights fetched once
        if ddp_worker():  # its share of the steps and validation slices; rank 0 alone logs and writes
            lr, batch_size, _ = effective_hparams(params)
            fit(params, prepared_dir, checkpoint_dir(params, prepared_dir, lr, batch_size), lr=lr,
                batch_size=batch_size, resume=True, progress=False, distributed=True)
            return {}
        return _run(params, params_path, prepared_dir)


def _run(params, params_path: str, prepared_dir: str = PREPARED_DIR) -> dict:
    import mlflow

    manifest = json.loads((Path(prepared_dir) / "manifest.json").read_text())
    lr, batch_size, origin = effective_hparams(params)
    tracking.configure(params.tracking)
    work = checkpoint_dir(params, prepared_dir, lr, batch_size)
    with tracking.start_run(run_name=f"train-{manifest['source']}-"
                                     f"{len(manifest['splits']['train']['slices'])}sl") as run:
        mlflow.log_params(tracking.flatten(params.model_dump(exclude={"tune"})))
        mlflow.log_params({"effective.lr": lr, "effective.batch_size": batch_size, "effective.origin": origin})
        tracking.log_data_inputs(manifest, ("train", "val"), prepared_dir)  # lineage

        def log_epoch(row):
            mlflow.log_metrics({k: row[k] for k in CURVE_KEYS if k in row}, step=row["epoch"])

        result = fit(params, prepared_dir, work, lr=lr, batch_size=batch_size, on_epoch=log_epoch, resume=True,
                     distributed=True)
        mlflow.set_tags(tracking.run_tags(manifest, result.init))
        if result.extra.get("resumed_from_epoch") is not None:
            mlflow.set_tag("resumed_from_epoch", str(result.extra["resumed_from_epoch"]))
        patches_per_s = result.epochs * params.train.patches_per_epoch / max(result.seconds, 1e-9)
        summary = {"best_val_iou": result.best_score, "epochs": result.epochs,
                   "train_seconds": round(result.seconds, 1),
                   "patches_per_second": round(patches_per_s, 2), "lr": lr, "batch_size": batch_size}
        if result.extra.get("schedule_progress") is not None:  # 1.0: the cosine ran out within train.max_minutes
            summary["schedule_progress"] = result.extra["schedule_progress"]
        mlflow.log_metrics({"best_val_iou": result.best_score, "train_seconds": result.seconds,
                            "patches_per_second": patches_per_s})
        with staged_files(TRAIN_DIR) as rep:
            with open(rep / "history.csv", "w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=curve_columns(result.history))
                w.writeheader()
                w.writerows(result.history)
            plot_curves(result.history, rep / "curves.png",
                        title=f"{manifest['source']}, {len(manifest['splits']['train']['slices'])} labelled slices")
            vx, vy = load_split(prepared_dir, "val")
            k = min(2, len(vx))
            probs = [predict_slice(result.net, vx[i]) for i in range(k)]
            plot_overlays([centre(vx[i]) for i in range(k)], [vy[i] for i in range(k)], probs, rep / "val_overlays.png",
                          params.train.threshold)
            mlflow.log_artifact(str(rep / "curves.png"))
            mlflow.log_artifact(str(rep / "val_overlays.png"))
            mlflow.log_artifact(str(rep / "history.csv"))
            info = tracking.log_model(result.net)
            write_json(rep / "metrics.json", summary)
            write_json(rep / Path(TRAIN_RUN).name, {"run_id": run.info.run_id, "model_uri": info.model_uri})
        with staged_files(Path(TRAINED_MODEL).parent) as out:
            save_weights(result.net, out / Path(TRAINED_MODEL).name, {"run_id": run.info.run_id})
    shutil.rmtree(work, ignore_errors=True)
    print(f"train: {result.epochs} epochs in {result.seconds / 60:.1f} min, best val IoU {result.best_score:.3f} "
          f"(lr {lr:.2g}, batch {batch_size}, {origin}); MLflow run {run.info.run_id}")
    return summary
