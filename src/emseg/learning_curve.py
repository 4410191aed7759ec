"""Learning curves: test IoU against the number of labelled slices, from scratch and pretrained.

For every slice count, initialisation and seed: draw that many training slices at random (seeded)
from the pool left after the validation slices, train (one MLflow run each, tagged with slices,
init and seed), score the test slices. The `learning-curve` stage writes the reports.
"""

from __future__ import annotations

import tempfile

import numpy as np

from emseg import tracking
from emseg.config import derive
from emseg.errors import ConfigError


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


def slice_counts(cfg, n_pool: int) -> list[int]:
    counts = []
    for c in cfg.slice_counts:
        n = n_pool if c == "all" else int(c)
        if n > n_pool:
            raise ConfigError(f"params.yaml: learning_curve.slice_counts: {n} is more than the {n_pool} training "
                              "slices left after validation")
        counts.append(n)
    return sorted(set(counts))


def train_points(params, x, y, val_idx, pool, tx, ty, counts, source, weights) -> list[dict]:
    import mlflow
    from tqdm.auto import tqdm

    from emseg.active.loop import pixel_iou
    from emseg.data.datamodule import ArraySplits
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
                    "batch_size": cfg.batch_size, "lr": cfg.lr, "max_epochs": cfg.max_epochs, "use_tuned": False,
                    "early_stopping_patience": cfg.patience, "max_minutes": None, "init": init_p,
                    "semi": {"weight": 0.0},
                    "freeze_encoder_epochs": cfg.freeze_encoder_epochs if init == "pretrained" else 0,
                    "encoder_lr_factor": cfg.encoder_lr_factor if init == "pretrained" else 1.0}},
                    "params.yaml: learning_curve (its settings as train.*)")
                with tracking.start_run(run_name=f"{init}-{n}sl-seed{seed}",
                                        tags={"labelled_slices": str(n), "init": init, "seed": str(seed),
                                              "dataset": source, "emseg.pipeline": "learning_curve"}):
                    mlflow.log_params({"labelled_slices": n, "init": init, "seed": seed, "max_epochs": cfg.max_epochs,
                                       "patience": cfg.patience, "lr": cfg.lr, "scale": cfg.scale,
                                       "train_slices": str(chosen)[:500]})
                    with tempfile.TemporaryDirectory(prefix="emseg-lc-") as work:
                        res = fit(p, ArraySplits(x[chosen], y[chosen], x[val_idx], y[val_idx]), work, lr=cfg.lr,
                                  batch_size=cfg.batch_size, progress=False)
                    iou = pixel_iou(res.net, tx, ty)  # the best validation epoch's weights (fit restores them)
                    # 1-based, like ``epochs`` (the count run): best_epoch == epochs means the last one was best
                    best = max(res.history, key=lambda r: r.get("val_iou", 0.0)) if res.history else None
                    best_epoch = best["epoch"] + 1 if best else 0
                    mlflow.log_metrics({"test_iou": iou, "best_val_iou": res.best_score, "train_seconds": res.seconds,
                                        "epochs": res.epochs, "best_epoch": best_epoch})
                points.append({"init": init, "slices": n, "seed": seed, "test_iou": round(iou, 4),
                               "best_val_iou": round(res.best_score, 4), "epochs": res.epochs,
                               "best_epoch": best_epoch,
                               "stopped_by": "epoch cap" if res.epochs >= cfg.max_epochs else "early stopping",
                               "train_seconds": round(res.seconds, 1)})
                bar.update()
                bar.set_postfix_str(f"{init} {n} slices seed {seed}: IoU {iou:.3f}")
    bar.close()
    return points
