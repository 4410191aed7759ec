"""Learning curves: test IoU against the number of labelled slices, per initialisation and option.

For every initialisation (scratch, pretrained, ssl), option (plain, z_context, semi), slice count and
seed: draw that many training slices at random (seeded) from the pool (every slice data.min_gap from
the validation slices), train (one MLflow run each, tagged with slices, init, option and seed), score
the test slices. The `learning-curve` stage writes the reports.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from emseg import tracking
from emseg.config import derive
from emseg.errors import ConfigError


def load_target(params):
    from emseg.data.generate import generate_stack
    from emseg.data.io import context_indices
    from emseg.data.stacks import evenly, load_labelled, rescale, resolve_source
    from emseg.data.volumes import eligible_slices

    cfg = params.learning_curve
    k = context_k(cfg)
    source = resolve_source(params, cfg.source)
    if source == "epfl":
        import tifffile

        from emseg.data.sources import EPFL_FILES, ensure_epfl_file

        f = {role: ensure_epfl_file(name, params.data.epfl) for role, name in EPFL_FILES.items()}
        x, y, _ = load_labelled(f["train_image"], f["train_labels"], None, scale=cfg.scale)
        n_test = len(tifffile.TiffFile(f["test_image"]).pages)
        zs = evenly(n_test, cfg.test_slices)
        # with their z neighbours' inputs (read once each; a stack's own statistics normalise every slice alike)
        need = sorted({j for z in zs for c in context_indices(z, n_test, 3) for j in context_indices(c, n_test, k)})
        cx, cy, _ = load_labelled(f["test_image"], f["test_labels"], need, scale=cfg.scale)
        row = {z: i for i, z in enumerate(need)}
        tx = neighbour_windows(cx, zs, k, lambda j: row[j], n_test)
        ty = cy[[row[z] for z in zs]]
    else:
        g = params.data.generated
        img, lab = generate_stack(g.seed, g.slices + g.test_slices, g.height, g.width)
        img = img.astype(np.float32)
        img = (img - img[:g.slices].mean()) / img[:g.slices].std()
        pairs = [rescale(a, (b > 0).astype(np.uint8), cfg.scale) for a, b in zip(img, lab)]
        xs, ys = np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
        x, y, tx, ty = xs[:g.slices], ys[:g.slices], xs[g.slices:], ys[g.slices:]
        tx = neighbour_windows(tx, range(len(tx)), k)
    val_idx = evenly(len(x), cfg.val_slices)
    pool = eligible_slices(len(x), val_idx, params.data.min_gap)
    if source != "epfl":  # the generated test slices follow the training ones in one stack: keep the gap there too
        pool = [z for z in pool if z < len(x) - params.data.min_gap]
    return source, x, y, val_idx, pool, tx, ty


def with_neighbours(stack, zs, k: int) -> np.ndarray:
    """Slices ``zs`` of an in-memory ``stack`` (n, H, W) with their z neighbours, (len(zs), k, H, W); the
    stack's ends reflected (io.context_indices). k 1: (len(zs), 1, H, W)."""
    from emseg.data.io import context_indices

    return np.stack([stack[context_indices(int(z), len(stack), k)] for z in zs])


def neighbour_windows(stack, zs, k: int, row=None, n: int | None = None) -> np.ndarray:
    """Slices ``zs`` of a stack with the inputs of their z neighbours, (len(zs), 3, k, H, W): for each,
    the windows of k slices centred on z - 1, z and z + 1 (each index reflected at the stack's ends,
    io.context_indices, as prediction does), so that a slice can be scored plain (the middle window) or
    z-averaged. ``stack``: the whole stack (n, H, W) in memory, or with ``row`` (stack index -> row of
    ``stack``) and ``n`` (the stack's length) the rows it needs."""
    from emseg.data.io import context_indices

    n = len(stack) if n is None else n
    row = row or (lambda j: j)
    return np.stack([[stack[[row(j) for j in context_indices(c, n, k)]] for c in context_indices(int(z), n, 3)]
                     for z in zs])


def iou_plain_and_averaged(net, windows, labels, k: int, average: bool = True,
                           tile: int = 1024) -> tuple[float, float | None]:
    """Foreground IoU (threshold 0.5) of a network with ``k`` slices per input over slices held with
    their neighbours' inputs (:func:`neighbour_windows`): of the plain probabilities and, with
    ``average``, of the z-averaged ones (evaluate.z_average), from one prediction of every window."""
    from emseg.evaluate import neighbour_input
    from emseg.inference import predict_tiled, z_average
    from emseg.metrics import add_counts, confusion, scores

    plain: dict = {}
    averaged: dict = {}
    for i in range(len(windows)):
        lab = np.asarray(labels[i])
        probs = [predict_tiled(net, neighbour_input(windows, i, j, k), tile=tile, overlap=64)
                 for j in (range(3) if average else [1])]
        centre = probs[1] if average else probs[0]
        plain = add_counts(plain, confusion(centre > 0.5, lab))
        if average:
            averaged = add_counts(averaged, confusion(z_average(*probs) > 0.5, lab))
    return float(scores(plain)["iou"]), (float(scores(averaged)["iou"]) if average else None)


def context_k(cfg) -> int:
    """Slices per input the target is loaded with: the z_context option's, else 1."""
    return cfg.z_context if "z_context" in cfg.options else 1


def slice_counts(cfg, n_pool: int) -> list[int]:
    counts = []
    for c in cfg.slice_counts:
        n = n_pool if c == "all" else int(c)
        if n > n_pool:
            raise ConfigError(f"params.yaml: learning_curve.slice_counts: {n} is more than the {n_pool} training "
                              "slices left after validation")
        counts.append(n)
    return sorted(set(counts))


def arm(init: str, option: str) -> str:
    """The name of one curve: the init, with the option after a + unless it is plain."""
    return init if option == "plain" else f"{init}+{option}"


def check_counts(cfg, counts: list[int], n_pool: int, ssl_val: int) -> None:
    """Refuse, before any training, what would fail after hours of it."""
    if "semi" in cfg.options and max(counts) >= n_pool:
        raise ConfigError(f"params.yaml: learning_curve.options: semi needs unlabelled slices, but slice count "
                          f"{max(counts)} labels all {n_pool} slices of the pool; drop it (or 'all') from "
                          "learning_curve.slice_counts, or semi from the options")
    if "ssl" in cfg.inits and n_pool <= ssl_val + 1:
        raise ConfigError(f"params.yaml: learning_curve.inits: ssl: the pool holds {n_pool} slices, too few to keep "
                          f"ssl.val_slices {ssl_val} for its validation loss and train on the rest")


def ssl_weights(params, x, pool, work: str) -> tuple[str, dict]:
    """init ssl: a network of params.model pretrained without labels (masked restoration, params.ssl) on
    the pool's slices, its own validation loss on ssl.val_slices of them; saved under ``work``. Returns
    the weights' path and what to report (seconds, losses)."""
    from emseg.data.stacks import evenly
    from emseg.data.volumes import Volume
    from emseg.model.network import save_weights
    from emseg.model.ssl import fit_restoration

    params = derive(params, {"model": {"z_context": 1}, "ssl": {"patch_size": params.learning_curve.patch_size}},
                    "params.yaml: learning_curve (init ssl, the ssl settings with its patch size)")
    val_z = [pool[i] for i in evenly(len(pool), params.ssl.val_slices)]
    train_z = [z for z in pool if z not in val_z]

    def volume(name, zs):
        return Volume(name, np.asarray(x[zs], np.float16), {z: i for i, z in enumerate(zs)}, len(x), list(zs))

    res = fit_restoration(params, [volume("pool", train_z)], volume("pool-val", val_z), progress=False)
    path = str(Path(work) / "ssl.pt")
    save_weights(res.net, path)
    last = res.history[-1]
    return path, {"ssl_seconds": round(res.seconds, 1), "ssl_epochs": len(res.history),
                  "ssl_val_masked_mse_before": round(res.before["val_masked_mse"], 5),
                  "ssl_val_masked_mse": round(last["val_masked_mse"], 5),
                  "ssl_val_masked_mse_mean_fill": round(res.mean_fill, 5), "ssl_slices": len(train_z)}


def train_points(params, x, y, val_idx, pool, tx, ty, counts, source, weights) -> list[dict]:
    """``weights``: {init: path of its starting weights} for the inits that are not scratch."""
    import mlflow
    from tqdm.auto import tqdm

    from emseg.data.datamodule import ArraySplits
    from emseg.data.stacks import evenly
    from emseg.model.train import fit

    cfg = params.learning_curve
    # tx: (n, 3, K, H, W), each test slice with its neighbours' inputs; the validation slices alike
    vw = neighbour_windows(x, val_idx, tx.shape[2])
    points = []
    bar = tqdm(total=len(counts) * len(cfg.inits) * len(cfg.options) * len(cfg.seeds), desc="learning curve",
               unit="run")
    for n in counts:  # the fewest slices first: every curve's first point is there early
        for init in cfg.inits:
            for option in cfg.options:
                name = arm(init, option)
                k = cfg.z_context if option == "z_context" else 1
                for seed in cfg.seeds:
                    # the same draw for every init and option: paired comparisons
                    chosen = sorted(np.random.default_rng([seed, n]).choice(pool, n, replace=False).tolist())
                    tuned = init != "scratch"
                    unlabelled = None
                    if option == "semi":
                        rest = [z for z in pool if z not in chosen]
                        unlabelled = x[[rest[i] for i in evenly(len(rest), cfg.unlabelled_slices)]]
                    n_unlabelled = 0 if unlabelled is None else len(unlabelled)
                    p = derive(params, {"seed": seed, "model": {"z_context": k}, "data": {
                        "unlabelled_slices": n_unlabelled}, "train": {
                        "patch_size": cfg.patch_size, "patches_per_epoch": cfg.patches_per_epoch,
                        "batch_size": cfg.batch_size, "lr": cfg.lr, "max_epochs": cfg.max_epochs,
                        "use_tuned": False, "early_stopping_patience": cfg.patience, "max_minutes": None,
                        "init": {"mode": "checkpoint", "path": str(weights[init])} if tuned else {"mode": "scratch"},
                        "semi": cfg.semi.model_dump() if option == "semi" else {"weight": 0.0},
                        "freeze_encoder_epochs": cfg.freeze_encoder_epochs if tuned else 0,
                        "encoder_lr_factor": cfg.encoder_lr_factor if tuned else 1.0}},
                        "params.yaml: learning_curve (its settings as train.*)")
                    if k > 1:
                        xs, vs = with_neighbours(x, chosen, k), with_neighbours(x, val_idx, k)
                    else:
                        xs, vs = x[chosen], x[val_idx]
                    with tracking.start_run(run_name=f"{name}-{n}sl-seed{seed}",
                                            tags={"labelled_slices": str(n), "init": init, "option": option,
                                                  "seed": str(seed), "dataset": source,
                                                  "emseg.pipeline": "learning_curve"}):
                        mlflow.log_params({"labelled_slices": n, "init": init, "option": option, "seed": seed,
                                           "z_context": k, "max_epochs": cfg.max_epochs, "patience": cfg.patience,
                                           "lr": cfg.lr, "scale": cfg.scale, "train_slices": str(chosen)[:500],
                                           "unlabelled_slices": n_unlabelled})
                        with tempfile.TemporaryDirectory(prefix="emseg-lc-") as work:
                            res = fit(p, ArraySplits(xs, y[chosen], vs, y[val_idx], unlabelled=unlabelled), work,
                                      lr=cfg.lr, batch_size=cfg.batch_size, progress=False)
                        mlflow.log_param("init_loaded", res.init[:500])  # e.g. "checkpoint:... (N of M tensors)"
                        # The best validation epoch's weights (fit restores them). z-averaging is chosen on the
                        # validation slices; the test slices are predicted once, read plain and averaged.
                        avg = cfg.choose_z_average
                        val_plain, val_z = iou_plain_and_averaged(res.net, vw, y[val_idx], k, avg)
                        test_plain, test_z = iou_plain_and_averaged(res.net, tx, ty, k, avg)
                        use_z = avg and val_z > val_plain
                        iou = test_z if use_z else test_plain
                        z_cols = {"z_average": use_z, "val_iou_plain": round(val_plain, 4),
                                  "val_iou_z_average": round(val_z, 4), "test_iou_plain": round(test_plain, 4),
                                  "test_iou_z_average": round(test_z, 4)} if avg else {}
                        mlflow.log_params({"z_average": use_z})
                        # 1-based, like ``epochs`` (the count run): best_epoch == epochs means the last one was best
                        best = max(res.history, key=lambda r: r.get("val_iou", 0.0)) if res.history else None
                        best_epoch = best["epoch"] + 1 if best else 0
                        last = res.history[-1] if res.history else {}
                        mlflow.log_metrics({"test_iou": iou, "best_val_iou": res.best_score,
                                            "train_seconds": res.seconds, "epochs": res.epochs,
                                            "best_epoch": best_epoch,
                                            **{c: v for c, v in z_cols.items() if c != "z_average"},
                                            **{c: last[c] for c in ("train_consistency",) if c in last}})
                    points.append({"init": name, "slices": n, "seed": seed, "test_iou": round(iou, 4),
                                   "best_val_iou": round(res.best_score, 4), "epochs": res.epochs,
                                   "best_epoch": best_epoch,
                                   "stopped_by": "epoch cap" if res.epochs >= cfg.max_epochs else "early stopping",
                                   "train_seconds": round(res.seconds, 1), **z_cols})
                    bar.update()
                    bar.set_postfix_str(f"{name} {n} slices seed {seed}: IoU {iou:.3f}")
    bar.close()
    return points
