"""DVC stage `tune`: an Optuna study over learning rate and batch size, each trial an MLflow child run.

The study lives in persistent RDB storage (SQLite by default) and is resumed with
``load_if_exists``: rerunning after an interruption only runs the trials still missing. Its name
carries a hash of the data and of every setting that changes what a trial means, so a study never
mixes trials on different data.
"""

from __future__ import annotations

import csv
import hashlib
import json
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

from emseg.config import load_params
from emseg.errors import EmsegError
from emseg.fsutil import staged_files, write_json
from emseg.stages.prepare import PREPARED_DIR

REPORT_DIR = "reports/tune"
BEST_PARAMS = f"{REPORT_DIR}/best_params.json"


def study_name(params, prepared_dir: str) -> str:
    manifest = (Path(prepared_dir) / "manifest.json").read_bytes()
    spec = json.dumps({"model": params.model.model_dump(),
                       "train": params.train.identity(lr=True, batch_size=True, use_tuned=True, max_epochs=True,
                                                      max_minutes=True, num_workers=True),
                       "tune": params.tune.model_dump(include={"epochs_per_trial", "minutes_per_trial", "lr_min",
                                                               "lr_max", "batch_sizes"}),
                       "seed": params.seed}, sort_keys=True).encode()
    return f"{params.tune.study_name}-{hashlib.sha256(manifest + spec).hexdigest()[:10]}"


def _storage(params):
    import warnings

    from optuna.exceptions import ExperimentalWarning
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    warnings.filterwarnings("ignore", category=ExperimentalWarning)

    from emseg.tracking import absolute_sqlite

    url = absolute_sqlite(params.tune.storage, Path.cwd())
    hb = params.tune.heartbeat_s
    kwargs = {"heartbeat_interval": hb, "grace_period": 2 * hb,
              "heartbeat_stale_trial_callback": RetryHeartbeatStaleTrialCallback(max_retry=2)} if hb else {}
    return RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {},
                      **kwargs)


def fail_trials_without_heartbeat(study, storage, grace_s: float) -> list[int]:
    """Mark failed the RUNNING trials that never recorded a heartbeat and started over ``grace_s`` ago.

    Optuna's stale-trial check only looks at trials with a heartbeat; a worker killed between creating
    a trial and its heartbeat thread's first beat (which comes at once) leaves one RUNNING forever.
    Such a trial, older than the grace period, has no live worker behind it. Returns the trial numbers."""
    import sqlalchemy
    from optuna.trial import TrialState

    cutoff = datetime.now(timezone.utc).replace(tzinfo=None) - timedelta(seconds=grace_s)  # stored as naive UTC
    query = sqlalchemy.text(
        "SELECT t.trial_id, t.number FROM trials t WHERE t.study_id = :sid AND t.state = 'RUNNING' "
        "AND t.datetime_start < :cutoff "
        "AND NOT EXISTS (SELECT 1 FROM trial_heartbeats h WHERE h.trial_id = t.trial_id)")
    with storage.engine.connect() as con:
        rows = con.execute(query, {"sid": study._study_id, "cutoff": cutoff}).all()
    for trial_id, _ in rows:
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
    return [number for _, number in rows]


def _plots(study, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna

    written = []
    figures = (("optimization_history.png", optuna.visualization.matplotlib.plot_optimization_history, (7, 4)),
               ("param_importances.png", optuna.visualization.matplotlib.plot_param_importances, (7, 3)))
    for name, plot, size in figures:
        try:
            ax = plot(study)
        except (RuntimeError, ValueError, ZeroDivisionError):
            continue  # importances need at least two finished trials with different values
        ax.figure.set_size_inches(*size)
        ax.figure.tight_layout()
        ax.figure.savefig(out / name, dpi=90)
        plt.close(ax.figure)
        written.append(out / name)
    return written


def run(params_path: str = "params.yaml", prepared_dir: str = PREPARED_DIR) -> dict:
    from emseg.registry import local_init

    with local_init(load_params(params_path)) as params:  # registry init weights fetched once
        return _run(params, params_path, prepared_dir)


def _run(params, params_path: str, prepared_dir: str = PREPARED_DIR) -> dict:
    import mlflow
    import optuna
    from optuna.trial import TrialState
    from optuna_integration import PyTorchLightningPruningCallback

    from emseg import tracking
    from emseg.model.train import CURVE_KEYS, fit

    cfg = params.tune
    tracking.configure(params.tracking)
    # ERROR: a failing trial is reported once, as emseg's one-line error, not also as Optuna's traceback.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=cfg.prune_startup_trials,
                                          n_warmup_steps=cfg.prune_after_epochs - 1)
              if cfg.pruning else optuna.pruners.NopPruner())
    name = study_name(params, prepared_dir)
    storage = _storage(params)
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize",
                                sampler=optuna.samplers.TPESampler(seed=params.seed), pruner=pruner,
                                load_if_exists=True)
    if storage.heartbeat_interval:
        dead = fail_trials_without_heartbeat(study, storage, storage.grace_period)
        if dead:
            print(f"tune: trial(s) {', '.join(map(str, dead))} of an interrupted run never sent a heartbeat: "
                  "marked failed")
    done = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    missing = max(cfg.n_trials - len(done), 0)

    with tracking.start_run(run_name=f"tune-{name}"):
        mlflow.set_tags({"optuna_study": name, "stage": "tune"})
        mlflow.log_params(tracking.flatten({"tune": cfg.model_dump()}))

        def objective(trial):
            lr = trial.suggest_float("lr", cfg.lr_min, cfg.lr_max, log=True)
            bs = trial.suggest_categorical("batch_size", cfg.batch_sizes)
            with tracking.start_run(run_name=f"trial-{trial.number}", nested=True):
                mlflow.set_tags({"optuna_study": name, "optuna_trial": str(trial.number)})
                mlflow.log_params({"lr": lr, "batch_size": bs})
                work = tempfile.mkdtemp(prefix="emseg-trial-")
                try:
                    res = fit(params, prepared_dir, work, lr=lr, batch_size=bs, max_epochs=cfg.epochs_per_trial,
                              max_minutes=cfg.minutes_per_trial, checkpoints=False, progress=False,
                              callbacks=[PyTorchLightningPruningCallback(trial, monitor="val_iou")],
                              on_epoch=lambda r: mlflow.log_metrics({k: r[k] for k in CURVE_KEYS if k in r},
                                                                    step=r["epoch"]))
                except optuna.TrialPruned:
                    mlflow.set_tag("optuna_state", "PRUNED")
                    raise
                trial.set_user_attr("epochs", res.epochs)
                mlflow.log_metric("best_val_iou", res.best_score)
                mlflow.set_tag("optuna_state", "COMPLETE")
                return res.best_score

        if missing:
            study.optimize(objective, n_trials=missing,
                           timeout=cfg.timeout_minutes * 60 if cfg.timeout_minutes else None,
                           catch=(), show_progress_bar=True)
        trials = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        completed = [t for t in trials if t.state == TrialState.COMPLETE]
        if not completed:
            raise EmsegError(f"tune: none of the {len(trials)} trials of study {name} completed (all pruned or failed)")
        best = study.best_trial
        result = {"lr": best.params["lr"], "batch_size": best.params["batch_size"], "best_val_iou": best.value,
                  "trial": best.number, "n_complete": len(completed), "n_pruned": len(trials) - len(completed),
                  "epochs_trained": sum(len(t.intermediate_values) for t in trials), "study": name}
        mlflow.log_metrics({"best_val_iou": best.value, "n_complete": len(completed),
                            "n_pruned": len(trials) - len(completed), "epochs_trained": result["epochs_trained"]})
        with staged_files(REPORT_DIR) as rep:
            with open(rep / "trials.csv", "w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(["trial", "state", "lr", "batch_size", "value", "epochs"])
                for t in trials:
                    w.writerow([t.number, t.state.name, t.params.get("lr"), t.params.get("batch_size"), t.value,
                                len(t.intermediate_values)])
            for png in _plots(study, rep):
                mlflow.log_artifact(str(png))
            mlflow.log_artifact(str(rep / "trials.csv"))
            write_json(rep / "best_params.json", result)
        mlflow.set_tag("best_trial", str(best.number))
    print(f"tune: best val IoU {best.value:.3f} with lr {result['lr']:.2g}, batch {result['batch_size']} "
          f"({len(completed)} complete, {result['n_pruned']} pruned, {missing} run now) -> {BEST_PARAMS}")
    return result
