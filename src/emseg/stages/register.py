"""DVC stage `register`: register the trained model; `champion` moves only if the test IoU beats it."""

from __future__ import annotations

import json
from pathlib import Path

from emseg import tracking
from emseg.config import load_params
from emseg.fsutil import write_json
from emseg.registry import register_if_better
from emseg.stages.evaluate import REPORT_DIR as EVAL_REPORTS
from emseg.stages.train import REPORT_DIR as TRAIN_REPORTS

OUT = "reports/register/registration.json"


def run(params_path: str = "params.yaml") -> dict:
    params = load_params(params_path)
    run_info = json.loads((Path(TRAIN_REPORTS) / "run.json").read_text())
    metrics = json.loads((Path(EVAL_REPORTS) / "metrics.json").read_text())
    test_iou = float(metrics["iou"])
    tracking.configure(params.tracking)
    # The watershed depth evaluate used goes with the version, so `emseg predict` splits as evaluated.
    tags = {"watershed_h": f"{float(metrics['watershed_h']):g}"} if "watershed_h" in metrics else {}
    result = register_if_better(run_info["model_uri"], params.tracking.registered_model, test_iou, run_info["run_id"],
                                tags=tags)
    write_json(OUT, result)
    before = result["champion_test_iou_before"]
    print(f"register: {result['name']} version {result['version']} (test IoU {test_iou:.4f}) is challenger; "
          f"champion: {result['decision']} (previous champion IoU {'none' if before is None else f'{before:.4f}'})")
    return result
