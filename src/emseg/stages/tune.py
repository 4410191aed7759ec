"""DVC stage `tune`: an Optuna study over learning rate and batch size (emseg.tuning), each trial an
MLflow child run of one `tune-<study>` run; writes reports/tune/ (best_params.json, trials.csv, plots)."""

from __future__ import annotations

import csv
from pathlib import Path

from emseg.config import load_params
from emseg.errors import EmsegError
from emseg.fsutil import staged_files, write_json
from emseg.paths import BEST_PARAMS, OPTUNA_DIR, PARAMS, PREPARED_DIR, TUNE_DIR


def run(params_path: str = PARAMS, prepared_dir: str = PREPARED_DIR) -> dict:
    from emseg.registry import local_init

    with local_init(load_params(params_path)) as params:  # registry init weights fetched once
        return _run(params, prepared_dir)


def _run(params, prepared_dir: str) -> dict:
    import mlflow

    from emseg import tracking, tuning

    tracking.configure(params.tracking)
    name = tuning.study_name(params, prepared_dir)
    with tracking.start_run(run_name=f"tune-{name}"):
        mlflow.set_tags({"optuna_study": name, "stage": "tune"})
        mlflow.log_params(tracking.flatten({"tune": params.tune.model_dump()}))
        res = tuning.run_study(params, prepared_dir)
        if not res.completed:
            raise EmsegError(f"tune: none of the {len(res.trials)} trials of study {res.name} completed "
                             "(all pruned or failed)")
        best = res.study.best_trial
        n_pruned = len(res.trials) - len(res.completed)
        result = {"lr": best.params["lr"], "batch_size": best.params["batch_size"], "best_val_iou": best.value,
                  "trial": best.number, "n_complete": len(res.completed), "n_pruned": n_pruned,
                  "epochs_trained": sum(len(t.intermediate_values) for t in res.trials), "study": res.name}
        mlflow.set_tag("best_trial", str(best.number))
        mlflow.log_metrics({k: result[k] for k in ("best_val_iou", "n_complete", "n_pruned", "epochs_trained")})
        with staged_files(TUNE_DIR) as rep:
            with open(rep / "trials.csv", "w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(["trial", "state", "lr", "batch_size", "value", "epochs"])
                for t in res.trials:
                    w.writerow([t.number, t.state.name, t.params.get("lr"), t.params.get("batch_size"), t.value,
                                len(t.intermediate_values)])
            for png in tuning.save_plots(res.study, rep):
                mlflow.log_artifact(str(png))
            mlflow.log_artifact(str(rep / "trials.csv"))
            write_json(rep / Path(BEST_PARAMS).name, result)
        # DVC keeps optuna/ between runs; with a shared server (tune.storage) it says where the study is.
        Path(OPTUNA_DIR).mkdir(exist_ok=True)
        write_json(Path(OPTUNA_DIR) / "study.json",
                   {"storage": tracking.shown_url(params.tune.storage), "study": res.name})
    print(f"tune: best val IoU {best.value:.3f} with lr {result['lr']:.2g}, batch {result['batch_size']} "
          f"({len(res.completed)} complete, {n_pruned} pruned, {res.run_now} run now) -> {BEST_PARAMS}")
    return result
