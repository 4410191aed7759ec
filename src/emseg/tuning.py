"""The Optuna study behind the `tune` stage: its name, storage, clean-up, trials and plots.

The study lives in persistent RDB storage (SQLite by default) and is resumed with ``load_if_exists``:
rerunning after an interruption only runs the trials still missing. Its name carries a hash of the
data and of every setting that changes what a trial means, so a study never mixes trials on
different data. Each trial trains with `fit` and is an MLflow child run of the caller's run.
"""

from __future__ import annotations

import hashlib
import json
import time
import tempfile
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path


def study_name(params, prepared_dir: str) -> str:
    manifest = (Path(prepared_dir) / "manifest.json").read_bytes()
    spec = json.dumps({"model": params.model.model_dump(),
                       "train": params.train.identity(lr=True, batch_size=True, use_tuned=True, max_epochs=True,
                                                      max_minutes=True, num_workers=True, devices=True,
                                                      strategy=True),  # trials always use one device
                       "tune": params.tune.model_dump(include={"epochs_per_trial", "minutes_per_trial", "lr_min",
                                                               "lr_max", "batch_sizes"}),
                       # a trial's budget (its schedule follows it): tune.minutes_per_trial, else train.max_minutes
                       "trial_minutes": params.tune.minutes_per_trial or params.train.max_minutes,
                       "seed": params.seed}, sort_keys=True).encode()
    return f"{params.tune.study_name}-{hashlib.sha256(manifest + spec).hexdigest()[:10]}"


def open_storage(params):
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


def save_plots(study, out: Path) -> list[Path]:
    """The optimisation history and the parameter importances, always both files (each is a stage output);
    a figure Optuna cannot draw yet says why instead."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna

    written = []
    figures = (("optimization_history.png", optuna.visualization.matplotlib.plot_optimization_history, (7, 4)),
               ("param_importances.png", optuna.visualization.matplotlib.plot_param_importances, (7, 3)))
    for name, plot, size in figures:
        try:
            fig = plot(study).figure
        except (RuntimeError, ValueError, ZeroDivisionError) as exc:  # e.g. importances from < 2 distinct trials
            fig, ax = plt.subplots()
            ax.axis("off")
            ax.text(0.5, 0.5, f"{name[:-4].replace('_', ' ')}: not drawn\n{str(exc)[:160]}", ha="center",
                    va="center", wrap=True)
        fig.set_size_inches(*size)
        fig.tight_layout()
        fig.savefig(out / name, dpi=90)
        plt.close(fig)
        written.append(out / name)
    return written


@dataclass
class StudyResult:
    study: object          # optuna.Study
    name: str
    trials: list           # finished trials: complete or pruned
    completed: list
    run_now: int           # trials run by this call
    dead: list[int]        # trial numbers of an interrupted run marked failed


def _pruner(cfg):
    import optuna

    if not cfg.pruning:
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=cfg.prune_startup_trials,
                                       n_warmup_steps=cfg.prune_after_epochs - 1)


def _objective(params, prepared_dir: str, name: str):
    import mlflow
    import optuna
    from optuna_integration import PyTorchLightningPruningCallback

    from emseg import tracking
    from emseg.model.train import CURVE_KEYS, fit

    cfg = params.tune

    def objective(trial) -> float:
        trial.set_user_attr("process", tracking.process_id())
        if surplus(trial, cfg.n_trials):  # another process sharing the study took the last slot first
            trial.set_user_attr("surplus", True)
            trial.study.stop()
            return float("nan")  # recorded as failed, never counted; no MLflow run was started
        lr = trial.suggest_float("lr", cfg.lr_min, cfg.lr_max, log=True)
        bs = trial.suggest_categorical("batch_size", cfg.batch_sizes)
        with tracking.start_run(run_name=f"trial-{trial.number}", nested=True):
            mlflow.set_tags({"optuna_study": name, "optuna_trial": str(trial.number)})
            mlflow.log_params({"lr": lr, "batch_size": bs})
            try:
                with tempfile.TemporaryDirectory(prefix="emseg-trial-") as work:
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

    return objective


def surplus(trial, n_trials: int) -> bool:
    """Whether ``trial`` is beyond the study's budget of ``n_trials``. Several `emseg tune` processes may
    share one study (a lab's PostgreSQL, or Optuna's journal file): the storage numbers trials one by one,
    so counting the trials that are finished or running with a number up to this one's gives every
    process the same answer, however their steps interleave. A trial whose process on this host is gone
    (killed: the run being resumed) holds no slot."""
    from optuna.trial import TrialState

    live = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
    ahead = [t for t in trial.study.get_trials(deepcopy=False, states=live) if t.number <= trial.number
             and not (t.state == TrialState.RUNNING and _process_gone(t))]
    return len(ahead) > n_trials


def _process_gone(trial) -> bool:
    """Whether the process that runs ``trial`` is known to be dead (on this host; elsewhere: unknown)."""
    from emseg.tracking import process_alive

    return process_alive(trial.user_attrs.get("process", "")) is False


def _wait_for_others(study, storage, poll_s: float = 2.0) -> None:
    """Until no trial of the study is running: another process sharing it is still training one (its
    result belongs in this process's report), or it died and its heartbeat goes stale (then it is failed)."""
    import optuna
    from optuna.trial import TrialState

    while True:
        if storage.heartbeat_interval:
            optuna.storages.fail_stale_trials(study)
        running = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if not _process_gone(t)]
        if not running or not storage.heartbeat_interval:
            return
        time.sleep(poll_s)


def run_study(params, prepared_dir: str) -> StudyResult:
    """Create or resume the study for these data and settings and run the trials still missing."""
    import optuna
    from optuna.trial import TrialState

    cfg = params.tune
    # ERROR: a failing trial is reported once, as emseg's one-line error, not also as Optuna's traceback.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    name = study_name(params, prepared_dir)
    storage = open_storage(params)
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize",
                                sampler=optuna.samplers.TPESampler(seed=params.seed), pruner=_pruner(cfg),
                                load_if_exists=True)
    dead = fail_trials_without_heartbeat(study, storage, storage.grace_period) if storage.heartbeat_interval else []
    if dead:  # said before the new trials run, so the user knows why they are being rerun
        print(f"tune: trial(s) {', '.join(map(str, dead))} of an interrupted run never sent a heartbeat: marked failed")
    from optuna.study import MaxTrialsCallback

    finished = (TrialState.COMPLETE, TrialState.PRUNED)

    def missing() -> int:
        return max(cfg.n_trials - sum(t.state in finished for t in study.trials), 0)

    run_now = todo = missing()
    for _ in range(3):  # a slot other processes held and lost (their trial failed) is run here
        if not todo:
            break
        # Stop once the study holds n_trials finished ones, also those other processes ran meanwhile.
        study.optimize(_objective(params, prepared_dir, name), n_trials=todo,
                       timeout=cfg.timeout_minutes * 60 if cfg.timeout_minutes else None, catch=(),
                       show_progress_bar=True, callbacks=[MaxTrialsCallback(cfg.n_trials, states=finished)])
        _wait_for_others(study, storage)
        todo = missing()
        if cfg.timeout_minutes:
            break
    trials = [t for t in study.trials if t.state in finished]
    return StudyResult(study, name, trials, [t for t in trials if t.state == TrialState.COMPLETE], run_now, dead)
