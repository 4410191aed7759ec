"""DVC stage `evaluate`: choose post-processing for models/model.pt on the validation slices, score the
test split once, write reports/evaluate/ and models/emseg.pt (weights + post-processing), log to the run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from emseg import registry, tracking
from emseg.config import load_params
from emseg.data.prepare import load_instances, load_split, load_val_inputs
from emseg.data.patches import centre
from emseg.evaluate import choose_switches, choose_watershed_h, evaluate_stack, runs_of
from emseg.fsutil import atomic_file, staged_files, write_json
from emseg.model.network import load_weights, save_weights
from emseg.plots import plot_overlays
from emseg.paths import EVALUATE_DIR, EVALUATE_METRICS, EVALUATED_MODEL, PARAMS, PREPARED_DIR, TRAIN_RUN, TRAINED_MODEL


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def postprocess(cfg, threshold: float, h: float, val_images) -> dict:
    """What turns these weights' output into a segmentation, as chosen on the validation slices."""
    ins = cfg.instances
    return {"threshold": float(threshold), "tta": bool(cfg.inference.tta), "z_average": bool(cfg.z_average),
            "instances": {"min_size": ins.min_size, "h": float(h), "smooth": ins.smooth},
            "normalisation": "each stack z-scored by its own mean and standard deviation",
            "chosen_on": f"{len(val_images)} validation slices (h among {list(ins.h_choices)}"
                         f"{', TTA on or off' if cfg.choose_tta else ''}"
                         f"{', z-averaging on or off' if cfg.choose_z_average else ''})"}


def run(params_path: str = PARAMS, prepared_dir: str = PREPARED_DIR) -> dict:
    import mlflow

    params = load_params(params_path)
    net, blob = load_weights(TRAINED_MODEL)
    # The watershed depth is chosen on the validation slices (h_choices), never on the test slices.
    cfg = params.evaluate
    vx, vy = load_val_inputs(prepared_dir, cfg.z_average or cfg.choose_z_average)
    cfg = choose_switches(net, vx, vy, cfg, params.train.threshold)
    h, h_rows = choose_watershed_h(net, vx, vy, cfg, params.train.threshold,
                                   instances=load_instances(prepared_dir, "val"))
    if h_rows:
        print("evaluate: watershed on the validation slices: "
              + ", ".join(f"h={r['h']:g} instance F1 {r['instance_f1']:.3f}" for r in h_rows) + f" -> h={h:g}")
    else:
        h_rows = [{"h": h, "instance_f1": None}]  # no labelled object in the validation slices: h as set
    images, labels = load_split(prepared_dir, "test")
    manifest = json.loads((Path(prepared_dir) / "manifest.json").read_text())
    test_slices = manifest["splits"]["test"]["slices"]
    ev = evaluate_stack(net, images, labels, cfg, params.train.threshold, keep=cfg.overlays, h=h,
                        instances=load_instances(prepared_dir, "test"), runs=runs_of(test_slices))
    m = {**ev.metrics, "tta": cfg.inference.tta, "z_average": cfg.z_average}
    post = postprocess(cfg, params.train.threshold, h, vx)
    with atomic_file(EVALUATED_MODEL, "wb") as fh:
        save_weights(net, fh, {"run_id": blob.get("run_id"), "postprocess": post})
    with staged_files(EVALUATE_DIR) as rep:
        write_json(rep / Path(EVALUATE_METRICS).name, m)
        _write_csv(rep / "per_slice.csv", ev.per_slice)
        _write_csv(rep / "pr_curve.csv", ev.pr_curve)
        _write_csv(rep / "watershed_h.csv", h_rows)
        if ev.examples:
            plot_overlays([centre(images[i]) for i, _ in ev.examples], [labels[i] for i, _ in ev.examples],
                          [p for _, p in ev.examples], rep / "overlays.png", params.train.threshold,
                          titles=[f"test slice {i}: green truth, magenta prediction" for i, _ in ev.examples])
        run_info = json.loads(Path(TRAIN_RUN).read_text())
        run_id = run_info["run_id"]
        tracking.configure(params.tracking)
        with tracking.start_run(run_id=run_id):
            # Lineage: the test split as the run's "testing" dataset, and the scores linked to the logged
            # model and to that dataset (the model's page lists them).
            test_ds = tracking.log_data_inputs(manifest, ("test",), prepared_dir)["test"]
            mlflow.log_metrics({f"test_{k}": float(v) for k, v in m.items()
                                if k not in ("slices", "threshold") and isinstance(v, (int, float))
                                and not isinstance(v, bool)},
                               model_id=registry.logged_model_id(run_info.get("model_uri")), dataset=test_ds)
            mlflow.set_tags({"evaluate_tta": str(cfg.inference.tta).lower(),
                             "evaluate_z_average": str(cfg.z_average).lower(), "instance_truth": m["instance_truth"]})
            for f in ("metrics.json", "per_slice.csv", "pr_curve.csv", "watershed_h.csv", "overlays.png"):
                if (rep / f).exists():
                    mlflow.log_artifact(str(rep / f), artifact_path="evaluation")
    print(f"evaluate: {m['slices']} test slices, foreground IoU {m['iou']:.3f}, Dice {m['dice']:.3f}, "
          f"instance F1 {m['instance_f1']:.3f} (watershed h={h:g}; "
          f"connected components {m['instance_f1_connected']:.3f}), "
          f"{m['splits']} splits, {m['merges']} merges; true objects: {m['instance_truth']} "
          f"-> {EVALUATE_METRICS}; "
          f"logged to run {run_id}; weights with their post-processing -> {EVALUATED_MODEL}")
    return m
