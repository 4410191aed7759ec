"""Stage `ssl` (pipelines/ssl): self-supervised pretraining on the unlabelled slices, registered as @ssl.

The network restores masked, noisy patches (emseg.model.ssl) of the project's own training stack,
every slice of it that lies at least ``data.min_gap`` from a validation or test slice (the slices
selection and reporting are measured on are never seen, nor their neighbours), plus the further
stacks in ``ssl.stacks``. No label is read. The project's stack is normalised exactly as `prepare`
normalised it, so fine-tuning sees the same intensities. The result is registered as
``ssl.registered_model`` with alias ``ssl.alias``; fine-tune from it with
``train.init: {mode: registry, uri: models:/emseg-ssl@ssl}``.
"""

from __future__ import annotations

import csv
from pathlib import Path

from emseg import registry, tracking
from emseg.config import load_params
from emseg.errors import ConfigError
from emseg.fsutil import staged_files, write_json
from emseg.paths import PARAMS, PREPARED_DIR, RAW_DIR, SSL_DIR, SSL_MODEL


def run(params_path: str = PARAMS) -> dict:
    import mlflow

    from emseg.data.volumes import ssl_volumes
    from emseg.model.network import save_weights
    from emseg.model.ssl import KEYS, fit_restoration
    from emseg.plots import plot_restoration

    params = load_params(params_path)
    cfg = params.ssl
    for key, (lo, hi) in (("holes", cfg.holes), ("hole_size", cfg.hole_size)):
        if lo > hi:
            raise ConfigError(f"{params_path}: ssl.{key}: {[lo, hi]}: the first value is the smallest, the second "
                              "the largest")
    volumes, val_volume, stacks = ssl_volumes(params, Path(PREPARED_DIR), Path(RAW_DIR), params_path)
    tracking.configure(params.tracking.model_copy(update={"experiment": f"{params.tracking.experiment}-ssl"}))
    names = "+".join(s["name"] for s in stacks)
    with tracking.start_run(run_name=f"ssl-{names}") as run:
        mlflow.log_params(tracking.flatten({"model": params.model.model_dump(), "ssl": cfg.model_dump()}))
        mlflow.set_tags({"git_commit": tracking.git_commit(), "dataset": names, "emseg.pipeline": "ssl"})
        res = fit_restoration(params, volumes, val_volume, on_epoch=lambda row: mlflow.log_metrics(
            {k: row[k] for k in KEYS if k in row}, step=row["epoch"]))
        last = res.history[-1]
        summary = {"epochs": len(res.history), "train_seconds": round(res.seconds, 1),
                   "val_loss_before": round(res.before["val_loss"], 5), "val_loss": round(last["val_loss"], 5),
                   "val_masked_mse_before": round(res.before["val_masked_mse"], 5),
                   "val_masked_mse": round(last["val_masked_mse"], 5),
                   # the yardstick: each blanked block filled with the mean of its patch's visible pixels
                   "val_masked_mse_mean_fill": round(res.mean_fill, 5),
                   "stacks": stacks, "run_id": run.info.run_id}
        mlflow.log_metrics({"train_seconds": res.seconds, "val_masked_mse_before": summary["val_masked_mse_before"],
                            "val_masked_mse_mean_fill": res.mean_fill})
        with staged_files(SSL_DIR) as rep:
            with open(rep / "history.csv", "w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=["epoch", *KEYS])
                w.writeheader()
                w.writerows(res.history)
            plot_restoration(res.history, res.example, rep / "curves.png",
                             title=f"self-supervised restoration on {names}")
            mlflow.log_artifact(str(rep / "curves.png"))
            info = tracking.log_model(res.net)
            version = registry.register_as(info.model_uri, cfg.registered_model, cfg.alias, tags={
                "emseg.kind": "ssl: encoder and decoder for train.init; untrained head, not a segmenter",
                "val_masked_mse": f"{summary['val_masked_mse']:.5f}", "stacks": names})
            summary["registered"] = {"name": cfg.registered_model, "version": version, "alias": cfg.alias}
            write_json(rep / "metrics.json", summary)
        with staged_files(Path(SSL_MODEL).parent) as out:
            save_weights(res.net, out / Path(SSL_MODEL).name, {"run_id": run.info.run_id})
    print(f"ssl: {len(res.history)} epochs on {names} in {res.seconds / 60:.1f} min, validation masked MSE "
          f"{summary['val_masked_mse_before']:.3f} -> {summary['val_masked_mse']:.3f} (mean fill "
          f"{res.mean_fill:.3f}); registered {cfg.registered_model} version {version} as @{cfg.alias}")
    return summary
