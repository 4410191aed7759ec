"""Stage `active-learning` (pipelines/active_learning): simulate every strategy over several seeds.

Writes reports/active_learning/: curves.csv (every round), by_budget.csv (mean test IoU per strategy
and budget, a DVC plot), summary.json (DVC metrics), summary.md and curves.png. Each round is an
MLflow run, nested in one parent run per strategy (experiment ``<tracking.experiment>-active-learning``).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from emseg import tracking
from emseg.active.loop import ActiveData, simulate
from emseg.config import Params, load_params
from emseg.errors import ConfigError
from emseg.fsutil import staged_files, write_json

REPORT_DIR = "reports/active_learning"


def resolve_source(params: Params, setting: str) -> str:
    """auto: epfl when its first mirror is a local folder that exists, generated otherwise."""
    if setting != "auto":
        return setting
    first = params.data.epfl.mirrors[0] if params.data.epfl and params.data.epfl.mirrors else ""
    return "epfl" if first and "://" not in first and Path(first).expanduser().is_dir() else "generated"


def load_data(params: Params) -> tuple[ActiveData, dict]:
    from emseg.data.generate import generate_stack
    from emseg.data.stacks import evenly, load_labelled, rescale

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


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def summarise(rows: list[dict]) -> dict:
    """Mean and spread per strategy and budget; how many labels each strategy needs to reach random
    sampling's IoU at the largest budget; its margin over random at that budget."""
    strategies = list(dict.fromkeys(r["strategy"] for r in rows))
    budgets = sorted({r["labelled"] for r in rows})
    table = {}
    for s in strategies:
        for b in budgets:
            v = [r["test_iou"] for r in rows if r["strategy"] == s and r["labelled"] == b]
            if v:
                table[(s, b)] = (float(np.mean(v)), float(np.std(v)), len(v))
    top = budgets[-1]
    out = {"budgets": budgets, "largest_budget": top, "strategies": {}}
    ref = table.get(("random", top))
    for s in strategies:
        mean_top, std_top, _ = table[(s, top)]
        entry = {"mean_iou": {str(b): round(table[(s, b)][0], 4) for b in budgets if (s, b) in table},
                 "std_iou": {str(b): round(table[(s, b)][1], 4) for b in budgets if (s, b) in table}}
        if ref:
            reach = [b for b in budgets if (s, b) in table and table[(s, b)][0] >= ref[0]]
            entry["labels_to_reach_random_at_largest"] = reach[0] if reach else None
            entry["label_ratio_vs_random"] = round(reach[0] / top, 3) if reach else None
            entry["margin_over_random_at_largest"] = round(mean_top - ref[0], 4)
            entry["seed_spread_at_largest"] = round(max(std_top, ref[1]), 4)
        out["strategies"][s] = entry
    return out


def _markdown(summary: dict) -> str:
    budgets = summary["budgets"]
    lines = ["| strategy | " + " | ".join(f"{b} patches" for b in budgets) +
             " | labels to reach random@max | margin over random@max (spread) |",
             "|---" * (len(budgets) + 3) + "|"]
    for s, e in summary["strategies"].items():
        cells = [f"{e['mean_iou'][str(b)]:.3f} ± {e['std_iou'][str(b)]:.3f}" for b in budgets]
        reach = e.get("labels_to_reach_random_at_largest")
        reach_s = "not reached" if reach is None else f"{reach} ({e['label_ratio_vs_random']:.2f}x)"
        margin = f"{e.get('margin_over_random_at_largest', 0):+.3f} ({e.get('seed_spread_at_largest', 0):.3f})"
        lines.append(f"| {s} | " + " | ".join(cells) + f" | {reach_s} | {margin} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    from emseg.plots import plot_mean_band

    series: dict = {}
    for r in rows:
        series.setdefault(r["strategy"], {}).setdefault(r["labelled"], []).append(r["test_iou"])
    plot_mean_band(series, path, "labelled patches", "test foreground IoU", title, dashed=("random",))


def run(params_path: str = "params.yaml") -> dict:
    import mlflow

    params = load_params(params_path)
    cfg = params.active
    if not cfg.strategies or not cfg.seeds:
        raise ConfigError(f"{params_path}: active.strategies and active.seeds: at least one of each is required")
    data, desc = load_data(params)
    tracking.configure(params.tracking.model_copy(update={"experiment": f"{params.tracking.experiment}-active-learning"}))
    rows: list[dict] = []
    cache: dict = {}
    from tqdm.auto import tqdm

    bar = tqdm(total=len(cfg.strategies) * len(cfg.seeds) * (cfg.rounds + 1), desc="active learning", unit="round")
    for strategy in cfg.strategies:
        with tracking.start_run(run_name=f"al-{strategy}", tags={"strategy": strategy, "emseg.pipeline": "active_learning"}):
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
                mlflow.log_metric("test_iou_mean", float(np.mean([r["test_iou"] for r in mine if r["labelled"] == b])), step=b)
    bar.close()
    summary = {**summarise(rows), "data": desc}
    with staged_files(REPORT_DIR) as rep:
        _write_csv(rep / "curves.csv", rows)
        wide = []
        for b in summary["budgets"]:
            wide.append({"labelled": b, **{s: e["mean_iou"].get(str(b)) for s, e in summary["strategies"].items()}})
        _write_csv(rep / "by_budget.csv", wide)
        write_json(rep / "summary.json", summary)
        (rep / "summary.md").write_text(_markdown(summary))
        plot(rows, rep / "curves.png", f"{desc['source']}, {len(cfg.seeds)} seeds")
        with tracking.start_run(run_name="al-summary", tags={"emseg.pipeline": "active_learning"}):
            for f in ("curves.png", "curves.csv", "summary.md", "summary.json"):
                mlflow.log_artifact(str(rep / f))
    best = max(summary["strategies"].items(), key=lambda kv: kv[1]["mean_iou"][str(summary["largest_budget"])])
    ns = len(cfg.seeds)
    print(f"active-learning: {len(cfg.strategies)} strategies x {ns} seed{'s' * (ns != 1)} x {cfg.rounds + 1} rounds on "
          f"{desc['source']}; best at {summary['largest_budget']} patches: {best[0]} "
          f"(IoU {best[1]['mean_iou'][str(summary['largest_budget'])]:.3f}) -> {REPORT_DIR}/summary.md")
    return summary
