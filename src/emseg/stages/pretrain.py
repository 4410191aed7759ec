"""Stage `pretrain` (pipelines/pretrain): train on other EM datasets, register the result as `pretrained`.

Each source in ``pretrain.sources`` is z-scored by its own statistics and resampled by its own
``scale`` (to match pixel sizes); every epoch draws the same number of patches from each source
(balanced, however different their sizes). The run is tracked like any training run (experiment
``<tracking.experiment>-pretrain``) and registered as ``pretrain.registered_model`` with the alias
``pretrain.alias``, so fine-tuning starts from
``train.init: {mode: registry, uri: models:/emseg-pretrained@pretrained}``.
"""

from __future__ import annotations

import csv
import tempfile
from pathlib import Path

from emseg import registry, tracking
from emseg.config import derive, load_params, require_2d
from emseg.errors import ConfigError
from emseg.fsutil import staged_files, write_json
from emseg.paths import PARAMS, PRETRAIN_DIR, PRETRAINED_MODEL


def load_sources(params):
    from emseg.data.stacks import evenly, load_labelled
    from emseg.data.io import inspect_stack

    train, val, desc = [], [], []
    for src in params.pretrain.sources:
        for key in ("image", "labels"):
            if not Path(getattr(src, key)).expanduser().exists():
                raise ConfigError(f"params.yaml: pretrain.sources[{src.name}].{key}: {getattr(src, key)} not found")
        n = inspect_stack(src.image).shape[0]
        if src.val_slices >= n:
            raise ConfigError(f"params.yaml: pretrain.sources[{src.name}].val_slices: {src.val_slices} leaves no "
                              f"training slice in a stack of {n}")
        val_idx = evenly(n, src.val_slices)
        train_idx = [z for z in range(n) if z not in val_idx]
        x, y, stats = load_labelled(src.image, src.labels, train_idx, scale=src.scale, ignore=src.ignore_value,
                                    invert=src.invert)
        vx, vy, _ = load_labelled(src.image, src.labels, val_idx, scale=src.scale, ignore=src.ignore_value,
                                  invert=src.invert, stats=stats)
        train.append((x, y))
        val.append((vx, vy))
        desc.append({"name": src.name, "image": src.image, "train_slices": len(train_idx), "val_slices": val_idx,
                     "shape": list(x.shape[1:]), "scale": src.scale, "foreground": round(float((y == 1).mean()), 4)})
    return train, val, desc


def run(params_path: str = PARAMS) -> dict:
    import mlflow

    from emseg.data.datamodule import ArraySplits
    from emseg.model.network import save_weights
    from emseg.model.train import CURVE_KEYS, curve_columns, fit
    from emseg.plots import plot_curves

    params = require_2d(load_params(params_path), "cross-dataset pretraining")
    cfg = params.pretrain
    if not cfg.sources:
        raise ConfigError(f"{params_path}: pretrain.sources: at least one source dataset is required")
    train, val, desc = load_sources(params)
    p = derive(params, {"train": {
        "patch_size": cfg.patch_size, "patches_per_epoch": cfg.patches_per_epoch, "batch_size": cfg.batch_size,
        "lr": cfg.lr, "max_epochs": cfg.max_epochs, "max_minutes": cfg.max_minutes, "use_tuned": False,
        "early_stopping_patience": cfg.max_epochs, "freeze_encoder_epochs": 0, "encoder_lr_factor": 1.0,
        "init": {"mode": "scratch"}, "semi": {"weight": 0.0}}}, f"{params_path}: pretrain (its settings as train.*)")
    tracking.configure(params.tracking.model_copy(update={"experiment": f"{params.tracking.experiment}-pretrain"}))
    names = "+".join(d["name"] for d in desc)
    with tracking.start_run(run_name=f"pretrain-{names}") as run:
        mlflow.log_params(tracking.flatten({"model": p.model.model_dump(), "pretrain": cfg.model_dump()}))
        mlflow.set_tags({"git_commit": tracking.git_commit(), "dataset": names, "init": "scratch",
                         "emseg.pipeline": "pretrain"})

        def log_epoch(row):
            mlflow.log_metrics({k: row[k] for k in CURVE_KEYS if k in row}, step=row["epoch"])

        with tempfile.TemporaryDirectory(prefix="emseg-pretrain-") as work:
            res = fit(p, ArraySplits(sources=train, val_sources=val), work, lr=cfg.lr, batch_size=cfg.batch_size,
                      on_epoch=log_epoch)
        mlflow.log_metrics({"best_val_iou": res.best_score, "train_seconds": res.seconds})
        summary = {"best_val_iou": res.best_score, "epochs": res.epochs, "train_seconds": round(res.seconds, 1),
                   "sources": desc, "run_id": run.info.run_id}
        with staged_files(PRETRAIN_DIR) as rep:
            with open(rep / "history.csv", "w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=curve_columns(res.history))
                w.writeheader()
                w.writerows(res.history)
            plot_curves(res.history, rep / "curves.png", title=f"pretraining on {names}")
            mlflow.log_artifact(str(rep / "curves.png"))
            info = tracking.log_model(res.net)
            version = registry.register_as(info.model_uri, cfg.registered_model, cfg.alias,
                                           tags={"best_val_iou": f"{res.best_score:.6f}", "sources": names})
            summary["registered"] = {"name": cfg.registered_model, "version": version, "alias": cfg.alias}
            write_json(rep / "metrics.json", summary)
        with staged_files(Path(PRETRAINED_MODEL).parent) as out:
            save_weights(res.net, out / Path(PRETRAINED_MODEL).name, {"run_id": run.info.run_id})
    print(f"pretrain: {res.epochs} epochs on {names} in {res.seconds / 60:.1f} min, best val IoU {res.best_score:.3f}; "
          f"registered {cfg.registered_model} version {version} as @{cfg.alias}")
    return summary
