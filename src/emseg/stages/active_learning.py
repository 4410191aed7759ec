"""Stage `active-learning` (pipelines/active_learning): simulate every strategy over several seeds.

Writes reports/active_learning/: curves.csv (every round), by_budget.csv (mean test IoU per strategy
and budget, a DVC plot), summary.json (DVC metrics), summary.md and curves.png. Each round is an
MLflow run, nested in one parent run per strategy (experiment ``<tracking.experiment>-active-learning``).
"""

from __future__ import annotations

import numpy as np

from emseg import tracking
from emseg.active.data import load_data
from emseg.active.loop import simulate
from emseg.config import load_params, require_2d
from emseg.curves import by_budget, series, strategies_markdown, summarise_strategies, write_csv
from emseg.errors import ConfigError
from emseg.fsutil import staged_files, write_json
from emseg.paths import ACTIVE_LEARNING_DIR, PARAMS


def run(params_path: str = PARAMS) -> dict:
    from emseg.registry import local_init

    params = require_2d(load_params(params_path), "the active-learning simulation")
    with local_init(params) as params:  # registry init weights fetched once
        return _run(params, params_path)


def _run(params, params_path: str) -> dict:
    import mlflow

    from emseg.plots import plot_mean_band

    cfg = params.active
    if not cfg.strategies or not cfg.seeds:
        raise ConfigError(f"{params_path}: active.strategies and active.seeds: at least one of each is required")
    data, desc = load_data(params)
    tracking.configure(params.tracking.model_copy(
        update={"experiment": f"{params.tracking.experiment}-active-learning"}))
    rows: list[dict] = []
    cache: dict = {}
    from tqdm.auto import tqdm

    bar = tqdm(total=len(cfg.strategies) * len(cfg.seeds) * (cfg.rounds + 1), desc="active learning", unit="round")
    for strategy in cfg.strategies:
        with tracking.start_run(run_name=f"al-{strategy}",
                                tags={"strategy": strategy, "emseg.pipeline": "active_learning"}):
            mlflow.log_params({**tracking.flatten(cfg.model_dump(), "active."), "model.encoder": params.model.encoder,
                               "data.source": desc["source"]})

            def on_round(row, coords, strategy=strategy):
                with tracking.start_run(run_name=f"{strategy}-seed{row['seed']}-n{row['labelled']}", nested=True,
                                        tags={"strategy": strategy, "seed": str(row["seed"]),
                                              "labelled_patches": str(row["labelled"]), "round": str(row["round"])}):
                    mlflow.log_params({"strategy": strategy, "seed": row["seed"], "round": row["round"],
                                       "labelled_patches": row["labelled"]})
                    mlflow.log_metrics({"test_iou": row["test_iou"], "labelled_pixels": row["labelled_pixels"]})
                    mlflow.log_text("slice,y,x\n" + "\n".join(",".join(map(str, c)) for c in coords.tolist()),
                                    "labelled_patches.csv")
                mlflow.log_metric(f"test_iou_seed{row['seed']}", row["test_iou"], step=row["labelled"])
                bar.update()
                bar.set_postfix_str(f"{strategy} seed {row['seed']} n={row['labelled']} IoU {row['test_iou']:.3f}")

            for seed in cfg.seeds:
                rows += simulate(params, cfg, data, strategy, seed, cache, on_round)
            mine = [r for r in rows if r["strategy"] == strategy]
            for b in sorted({r["labelled"] for r in mine}):
                mlflow.log_metric("test_iou_mean", float(np.mean([r["test_iou"] for r in mine if r["labelled"] == b])),
                                  step=b)
    bar.close()
    summary = {**summarise_strategies(rows), "data": desc}
    with staged_files(ACTIVE_LEARNING_DIR) as rep:
        write_csv(rep / "curves.csv", rows)
        write_csv(rep / "by_budget.csv", by_budget(summary))
        write_json(rep / "summary.json", summary)
        (rep / "summary.md").write_text(strategies_markdown(summary))
        plot_mean_band(series(rows, "strategy", "labelled"), rep / "curves.png", "labelled patches",
                       "test foreground IoU", f"{desc['source']}, {len(cfg.seeds)} seeds", dashed=("random",))
        with tracking.start_run(run_name="al-summary", tags={"emseg.pipeline": "active_learning"}):
            for f in ("curves.png", "curves.csv", "summary.md", "summary.json"):
                mlflow.log_artifact(str(rep / f))
    best = max(summary["strategies"].items(), key=lambda kv: kv[1]["mean_iou"][str(summary["largest_budget"])])
    ns = len(cfg.seeds)
    print(f"active-learning: {len(cfg.strategies)} strategies x {ns} seed{'s' * (ns != 1)} x {cfg.rounds + 1} "
          "rounds on "
          f"{desc['source']}; best at {summary['largest_budget']} patches: {best[0]} "
          f"(IoU {best[1]['mean_iou'][str(summary['largest_budget'])]:.3f}) -> {ACTIVE_LEARNING_DIR}/summary.md")
    return summary
