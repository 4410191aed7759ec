"""Stage `learning-curve` (pipelines/learning_curve): test IoU against labelled slices, scratch vs pretrained.

For every slice count in ``learning_curve.slice_counts`` (``all``: every slice but the validation
ones), initialisation and seed: draw that many training slices at random (seeded), train, score the
test slices. Writes reports/learning_curve/: points.csv (every run), table.md and table.csv (mean and
spread), curves.png, summary.json (the comparisons of the field reports); every point is an MLflow run
(experiment ``<tracking.experiment>-learning-curve``) tagged with slices, init and seed.
"""

from __future__ import annotations

import tempfile
from contextlib import ExitStack

import numpy as np

from emseg import registry, tracking
from emseg.config import derive, load_params
from emseg.curves import learning_curve_markdown, series, summarise_learning_curve, write_csv
from emseg.errors import ConfigError
from emseg.fsutil import staged_files, write_json

REPORT_DIR = "reports/learning_curve"


def load_target(params):
    from emseg.data.generate import generate_stack
    from emseg.data.stacks import evenly, load_labelled, rescale, resolve_source

    cfg = params.learning_curve
    source = resolve_source(params, cfg.source)
    if source == "epfl":
        import tifffile

        from emseg.data.sources import EPFL_FILES, ensure_epfl_file

        f = {role: ensure_epfl_file(name, params.data.epfl) for role, name in EPFL_FILES.items()}
        x, y, _ = load_labelled(f["train_image"], f["train_labels"], None, scale=cfg.scale)
        n_test = len(tifffile.TiffFile(f["test_image"]).pages)
        tx, ty, _ = load_labelled(f["test_image"], f["test_labels"], evenly(n_test, cfg.test_slices), scale=cfg.scale)
    else:
        g = params.data.generated
        img, lab = generate_stack(g.seed, g.slices + g.test_slices, g.height, g.width)
        img = img.astype(np.float32)
        img = (img - img[:g.slices].mean()) / img[:g.slices].std()
        pairs = [rescale(a, (b > 0).astype(np.uint8), cfg.scale) for a, b in zip(img, lab)]
        xs, ys = np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
        x, y, tx, ty = xs[:g.slices], ys[:g.slices], xs[g.slices:], ys[g.slices:]
    val_idx = evenly(len(x), cfg.val_slices)
    pool = [z for z in range(len(x)) if z not in val_idx]
    return source, x, y, val_idx, pool, tx, ty


def _counts(cfg, n_pool: int) -> list[int]:
    counts = []
    for c in cfg.slice_counts:
        n = n_pool if c == "all" else int(c)
        if n > n_pool:
            raise ConfigError(f"params.yaml: learning_curve.slice_counts: {n} is more than the {n_pool} training "
                              "slices left after validation")
        counts.append(n)
    return sorted(set(counts))


def _points(params, x, y, val_idx, pool, tx, ty, counts, source, weights) -> list[dict]:
    import mlflow
    from tqdm.auto import tqdm

    from emseg.active.loop import pixel_iou
    from emseg.model.module import ArraySplits
    from emseg.model.train import fit

    cfg = params.learning_curve
    points = []
    bar = tqdm(total=len(counts) * len(cfg.inits) * len(cfg.seeds), desc="learning curve", unit="run")
    for init in cfg.inits:
        for n in counts:
            for seed in cfg.seeds:
                chosen = sorted(np.random.default_rng([seed, n]).choice(pool, n, replace=False).tolist())
                init_p = ({"mode": "checkpoint", "path": str(weights)} if init == "pretrained"
                          else {"mode": "scratch"})
                p = derive(params, {"seed": seed, "train": {
                    "patch_size": cfg.patch_size, "patches_per_epoch": cfg.patches_per_epoch,
                    "batch_size": cfg.batch_size, "lr": cfg.lr, "max_epochs": cfg.epochs, "use_tuned": False,
                    "early_stopping_patience": cfg.epochs, "max_minutes": None, "init": init_p,
                    "freeze_encoder_epochs": cfg.freeze_encoder_epochs if init == "pretrained" else 0,
                    "encoder_lr_factor": cfg.encoder_lr_factor if init == "pretrained" else 1.0}},
                    "params.yaml: learning_curve (its settings as train.*)")
                with tracking.start_run(run_name=f"{init}-{n}sl-seed{seed}",
                                        tags={"labelled_slices": str(n), "init": init, "seed": str(seed),
                                              "dataset": source, "emseg.pipeline": "learning_curve"}):
                    mlflow.log_params({"labelled_slices": n, "init": init, "seed": seed, "epochs": cfg.epochs,
                                       "lr": cfg.lr, "scale": cfg.scale, "train_slices": str(chosen)[:500]})
                    with tempfile.TemporaryDirectory(prefix="emseg-lc-") as work:
                        res = fit(p, ArraySplits(x[chosen], y[chosen], x[val_idx], y[val_idx]), work, lr=cfg.lr,
                                  batch_size=cfg.batch_size, progress=False)
                    iou = pixel_iou(res.net, tx, ty)
                    mlflow.log_metrics({"test_iou": iou, "best_val_iou": res.best_score, "train_seconds": res.seconds})
                points.append({"init": init, "slices": n, "seed": seed, "test_iou": round(iou, 4),
                               "best_val_iou": round(res.best_score, 4), "train_seconds": round(res.seconds, 1)})
                bar.update()
                bar.set_postfix_str(f"{init} {n} slices seed {seed}: IoU {iou:.3f}")
    bar.close()
    return points


def run(params_path: str = "params.yaml") -> dict:
    import mlflow

    from emseg.plots import plot_mean_band

    params = load_params(params_path)
    cfg = params.learning_curve
    source, x, y, val_idx, pool, tx, ty = load_target(params)
    counts = _counts(cfg, len(pool))
    tracking.configure(params.tracking.model_copy(
        update={"experiment": f"{params.tracking.experiment}-learning-curve"}))
    with ExitStack() as stack:  # the pretrained weights are fetched once, not per run, and removed at the end
        weights = (stack.enter_context(registry.fetched_weights(cfg.pretrained_uri))
                   if "pretrained" in cfg.inits else None)
        points = _points(params, x, y, val_idx, pool, tx, ty, counts, source, weights)
    table, summary = summarise_learning_curve(points)
    summary["data"] = {"source": source, "scale": cfg.scale, "val_slices": val_idx, "test_slices": len(tx)}
    with staged_files(REPORT_DIR) as rep:
        write_csv(rep / "points.csv", points)
        write_csv(rep / "table.csv", table)
        (rep / "table.md").write_text(learning_curve_markdown(table))
        plot_mean_band(series(points, "init", "slices"), rep / "curves.png", "labelled training slices",
                       "test foreground IoU", f"{source} at scale {cfg.scale:g}, {len(cfg.seeds)} seeds", log2_x=True)
        write_json(rep / "summary.json", summary)
        with tracking.start_run(run_name="learning-curve-summary", tags={"emseg.pipeline": "learning_curve"}):
            for f in ("curves.png", "table.md", "table.csv", "points.csv"):
                mlflow.log_artifact(str(rep / f))
    cmp = summary.get("pretrained_4_vs_scratch_12")
    extra = (f"; pretrained@4 {cmp['pretrained_4']:.3f} vs scratch@12 {cmp['scratch_12']:.3f}" if cmp else "")
    print(f"learning-curve: {len(points)} runs on {source} ({', '.join(cfg.inits)} x {counts} slices x "
          f"{len(cfg.seeds)} seeds){extra} -> {REPORT_DIR}/table.md")
    return summary
