"""Stage `learning-curve` (pipelines/learning_curve): test IoU against labelled slices, per init and option.

For every slice count in ``learning_curve.slice_counts`` (``all``: every slice data.min_gap from the
validation ones), initialisation (scratch, pretrained, ssl), option (plain, z_context, semi) and seed:
draw that many training slices at random (seeded), train, score the test slices. Writes
reports/learning_curve/: points.csv (every run), table.md and table.csv (mean and spread, and each
option against its plain init), curves.png, summary.json (the comparisons of the field reports);
every point is an MLflow run (experiment ``<tracking.experiment>-learning-curve``) tagged with slices,
init, option and seed.
"""

from __future__ import annotations

import tempfile
from contextlib import ExitStack

from emseg import registry, tracking
from emseg.config import load_params, require_2d
from emseg.curves import (learning_curve_markdown, paired_markdown, series, summarise_learning_curve, write_csv,
                          z_average_markdown)
from emseg.fsutil import staged_files, write_json
from emseg.learning_curve import check_counts, load_target, slice_counts, ssl_weights, train_points
from emseg.paths import LEARNING_CURVE_DIR, PARAMS


def run(params_path: str = PARAMS) -> dict:
    import mlflow

    from emseg.plots import plot_mean_band

    # each curve sets its own input; the pretrained model is 2D
    params = require_2d(load_params(params_path), "the learning curves", params_path, why=(
        "the learning curves set 2.5D per curve; set model.z_context: 1 and add z_context to learning_curve.options "
        "(slices per input: learning_curve.z_context)"))
    cfg = params.learning_curve
    source, x, y, val_idx, pool, tx, ty = load_target(params)
    counts = slice_counts(cfg, len(pool))
    check_counts(cfg, counts, len(pool), params.ssl.val_slices)
    tracking.configure(params.tracking.model_copy(
        update={"experiment": f"{params.tracking.experiment}-learning-curve"}))
    ssl_report = None
    with ExitStack() as stack:  # starting weights are made or fetched once, not per run, and removed at the end
        weights = {}
        if "pretrained" in cfg.inits:
            weights["pretrained"] = stack.enter_context(registry.fetched_weights(cfg.pretrained_uri))
        if "ssl" in cfg.inits:
            work = stack.enter_context(tempfile.TemporaryDirectory(prefix="emseg-lc-ssl-"))
            with tracking.start_run(run_name="ssl-pool", tags={"emseg.pipeline": "learning_curve", "init": "ssl"}):
                weights["ssl"], ssl_report = ssl_weights(params, x, pool, work)
                mlflow.log_metrics(ssl_report)
            r = ssl_report
            print(f"learning-curve: ssl pretraining on {r['ssl_slices']} unlabelled slices, {r['ssl_seconds']:.0f} s, "
                  f"masked MSE {r['ssl_val_masked_mse_before']:.3f} -> {r['ssl_val_masked_mse']:.3f} "
                  f"(mean fill {r['ssl_val_masked_mse_mean_fill']:.3f})")
        points = train_points(params, x, y, val_idx, pool, tx, ty, counts, source, weights)
    table, summary = summarise_learning_curve(points)
    summary["data"] = {"source": source, "scale": cfg.scale, "val_slices": val_idx, "test_slices": len(tx),
                       "pool_slices": len(pool), "min_gap": params.data.min_gap}
    summary["options"] = list(cfg.options)
    if ssl_report:
        summary["ssl"] = ssl_report
    with staged_files(LEARNING_CURVE_DIR) as rep:
        write_csv(rep / "points.csv", points)
        write_csv(rep / "table.csv", table)
        paired = summary["options_vs_plain"]
        (rep / "table.md").write_text(learning_curve_markdown(table) + (
            "\nEach option against its plain init, same training slices and seed:\n\n" + paired_markdown(paired)
            if paired else "") + (
            "\nz-averaging of the probabilities, on or off by each point's validation IoU (test IoU as chosen "
            "above); against the plain readout of the same model:\n\n" + z_average_markdown(summary["z_average"])
            if "z_average" in summary else ""))
        plot_mean_band(series(points, "init", "slices"), rep / "curves.png", "labelled training slices",
                       "test foreground IoU", f"{source} at scale {cfg.scale:g}, {len(cfg.seeds)} seeds", log2_x=True)
        write_json(rep / "summary.json", summary)
        with tracking.start_run(run_name="learning-curve-summary", tags={"emseg.pipeline": "learning_curve"}):
            for f in ("curves.png", "table.md", "table.csv", "points.csv"):
                mlflow.log_artifact(str(rep / f))
    cmp = summary.get("pretrained_4_vs_scratch_12")
    extra = (f"; pretrained@4 {cmp['pretrained_4']:.3f} vs scratch@12 {cmp['scratch_12']:.3f}" if cmp else "")
    print(f"learning-curve: {len(points)} runs on {source} ({', '.join(cfg.inits)} x {', '.join(cfg.options)} x "
          f"{counts} slices x {len(cfg.seeds)} seeds){extra} -> {LEARNING_CURVE_DIR}/table.md")
    return summary
