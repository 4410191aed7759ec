"""Stage `learning-curve` (pipelines/learning_curve): test IoU against labelled slices, scratch vs pretrained.

For every slice count in ``learning_curve.slice_counts`` (``all``: every slice but the validation
ones), initialisation and seed: draw that many training slices at random (seeded), train, score the
test slices. Writes reports/learning_curve/: points.csv (every run), table.md and table.csv (mean and
spread), curves.png, summary.json (the comparisons of the field reports); every point is an MLflow run
(experiment ``<tracking.experiment>-learning-curve``) tagged with slices, init and seed.
"""

from __future__ import annotations

from contextlib import ExitStack

from emseg import registry, tracking
from emseg.config import load_params, require_2d
from emseg.curves import learning_curve_markdown, series, summarise_learning_curve, write_csv
from emseg.fsutil import staged_files, write_json
from emseg.learning_curve import load_target, slice_counts, train_points
from emseg.paths import LEARNING_CURVE_DIR, PARAMS


def run(params_path: str = PARAMS) -> dict:
    import mlflow

    from emseg.plots import plot_mean_band

    params = require_2d(load_params(params_path), "the learning-curve pipeline")
    cfg = params.learning_curve
    source, x, y, val_idx, pool, tx, ty = load_target(params)
    counts = slice_counts(cfg, len(pool))
    tracking.configure(params.tracking.model_copy(
        update={"experiment": f"{params.tracking.experiment}-learning-curve"}))
    with ExitStack() as stack:  # the pretrained weights are fetched once, not per run, and removed at the end
        weights = (stack.enter_context(registry.fetched_weights(cfg.pretrained_uri))
                   if "pretrained" in cfg.inits else None)
        points = train_points(params, x, y, val_idx, pool, tx, ty, counts, source, weights)
    table, summary = summarise_learning_curve(points)
    summary["data"] = {"source": source, "scale": cfg.scale, "val_slices": val_idx, "test_slices": len(tx)}
    with staged_files(LEARNING_CURVE_DIR) as rep:
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
          f"{len(cfg.seeds)} seeds){extra} -> {LEARNING_CURVE_DIR}/table.md")
    return summary
