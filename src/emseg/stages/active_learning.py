"""Stage `active-learning` (pipelines/active_learning): simulate every strategy over several seeds.

Writes reports/active_learning/: curves.csv (every round), by_budget.csv (mean test IoU per strategy
and budget, a DVC plot), summary.json (DVC metrics), summary.md and curves.png. Each round is an
MLflow run, nested in one parent run per strategy (experiment ``<tracking.experiment>-active-learning``).
"""

from __future__ import annotations

import numpy as np

from emseg import tracking
from emseg.active.loop import ActiveData, simulate
from emseg.config import Params, load_params
from emseg.curves import by_budget, series, strategies_markdown, summarise_strategies, write_csv
from emseg.errors import ConfigError
from emseg.fsutil import staged_files, write_json

REPORT_DIR = "reports/active_learning"


def load_data(params: Params) -> tuple[ActiveData, dict]:
    from emseg.data.generate import generate_stack
    from emseg.data.stacks import evenly, load_labelled, rescale, resolve_source

    cfg = params.active
    scale = 1.0 / cfg.downsample
    source = resolve_source(params, cfg.source)
    if source == "epfl":
        from emseg.data.sources import EPFL_FILES, ensure_epfl_file

        f = {role: ensure_epfl_file(name, params.data.epfl) for role, name in EPFL_FILES.items()}
        n = len(__import__("tifffile").TiffFile(f["train_image"]).pages)
        pool_idx = evenly(n, cfg.pool_slices)
        val_idx = evenly(n, cfg.val_slices, exclude=pool_idx)
        px, py, stats = load_labelled(f["train_image"], f["train_labels"], pool_idx, scale=scale)
        vx, vy, _ = load_labelled(f["train_image"], f["train_labels"], val_idx, scale=scale, stats=stats)
        n_test = len(__import__("tifffile").TiffFile(f["test_image"]).pages)
        test_idx = evenly(n_test, cfg.test_slices)
        tx, ty, _ = load_labelled(f["test_image"], f["test_labels"], test_idx, scale=scale)
    else:
        g = params.data.generated
        n_train = cfg.pool_slices + cfg.val_slices
        img, lab = generate_stack(g.seed, n_train + (cfg.test_slices or g.test_slices), g.height, g.width)
        x = img.astype(np.float32)
        x = (x - x[:n_train].mean()) / x[:n_train].std()
        y = (lab > 0).astype(np.uint8)
        pairs = [rescale(a, b, scale) for a, b in zip(x, y)]
        xs, ys = np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
        pool_idx, val_idx = list(range(cfg.pool_slices)), list(range(cfg.pool_slices, n_train))
        test_idx = list(range(n_train, len(xs)))
        px, py, vx, vy, tx, ty = xs[pool_idx], ys[pool_idx], xs[val_idx], ys[val_idx], xs[test_idx], ys[test_idx]
    desc = {"source": source, "downsample": cfg.downsample, "pool_slices": pool_idx, "val_slices": val_idx,
            "test_slices": test_idx, "slice_shape": list(px.shape[1:])}
    return ActiveData(px, py, vx, vy, tx, ty), desc


def run(params_path: str = "params.yaml") -> dict:
    from emseg.registry import local_init

    with local_init(load_params(params_path)) as params:  # registry init weights fetched once
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
    with staged_files(REPORT_DIR) as rep:
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
          f"(IoU {best[1]['mean_iou'][str(summary['largest_budget'])]:.3f}) -> {REPORT_DIR}/summary.md")
    return summary
