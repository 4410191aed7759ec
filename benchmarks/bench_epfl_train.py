"""Train on 12 EPFL slices with a profile, then score foreground IoU on all 82 slices of testing.tif.

Run: .venv/bin/python benchmarks/bench_epfl_train.py [profiles/epfl-cpu.yaml]
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from common import EPFL, ROOT, run_measured, save  # noqa: E402


def merge(dst: dict, src: dict) -> dict:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            merge(dst[k], v)
        else:
            dst[k] = v
    return dst


def main() -> None:
    profile = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "profiles" / "epfl-cpu.yaml").resolve()
    proj = Path(tempfile.mkdtemp(prefix="emseg-bench-epfl-"))
    params = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), yaml.safe_load(profile.read_text()))
    params["data"]["epfl"]["mirrors"] = [str(EPFL)]
    params["data"]["epfl"]["cache_dir"] = str(proj / "cache")
    init = params["train"].get("init") or {}
    if init.get("path") and not Path(init["path"]).is_absolute():  # a project file, e.g. models/pretrained.pt
        init["path"] = str((ROOT / init["path"]).resolve())
        if not Path(init["path"]).is_file():
            sys.exit(f"{init['path']}: not found; the profile starts from it (dvc repro pipelines/pretrain/dvc.yaml)")
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for stage in ("fetch", "prepare"):
        run_measured(["emseg", stage], proj)
    train = run_measured(["emseg", "train"], proj)
    metrics = json.loads((proj / "reports/train/metrics.json").read_text())

    from emseg.config import load_params
    from emseg.data.prepare import load_split
    from emseg.evaluate import evaluate_stack
    from emseg.model.network import load_weights

    net, _ = load_weights(proj / "models" / "model.pt")
    x, y = load_split(proj / "data" / "prepared", "test")
    t0 = time.time()
    p = load_params(proj / "params.yaml")
    ev = evaluate_stack(net, x, y, p.evaluate, p.train.threshold, keep=0)  # emseg evaluate's path: tiled, blended
    test = ev.metrics
    per_slice = [r["iou"] for r in ev.per_slice]
    predict_seconds = time.time() - t0
    extra = {}
    if p.evaluate.inference.tta:  # the profile predicts with flip TTA: also score the plain prediction
        plain = p.evaluate.model_copy(update={"inference": p.evaluate.inference.model_copy(update={"tta": False})})
        t1 = time.time()
        m = evaluate_stack(net, x, y, plain, p.train.threshold, keep=0).metrics
        extra = {"test_foreground_iou_without_tta": round(m["iou"], 4), "test_dice_without_tta": round(m["dice"], 4),
                 "predict_seconds_without_tta": round(time.time() - t1, 1)}
    save(f"epfl_train_{profile.stem}", {
        "command": f".venv/bin/python benchmarks/bench_epfl_train.py {profile.relative_to(ROOT)}",
        "profile": yaml.safe_load(profile.read_text()), "train_wall_seconds": round(train["seconds"], 1),
        "train_peak_rss_mib": round(train["peak_rss_mib"]), "epochs": metrics["epochs"],
        "train_seconds": metrics["train_seconds"], "best_val_iou": round(metrics["best_val_iou"], 4),
        "patches_per_second": metrics["patches_per_second"],
        "test_slices": len(x), "test_foreground_iou": round(test["iou"], 4), "test_dice": round(test["dice"], 4),
        "test_accuracy": round(test["accuracy"], 5), "test_precision": round(test["precision"], 4),
        "test_recall": round(test["recall"], 4), "test_per_slice_iou_min": round(min(per_slice), 4),
        "test_instance_f1_watershed": round(test["instance_f1"], 4),
        "test_instance_f1_connected": round(test["instance_f1_connected"], 4),
        "test_splits": test["splits"], "test_merges": test["merges"],
        "tta": p.evaluate.inference.tta, "predict_seconds": round(predict_seconds, 1), **extra, "work_dir": str(proj),
    })


if __name__ == "__main__":
    main()
