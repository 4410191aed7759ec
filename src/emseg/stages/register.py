"""DVC stage `register`: register the trained model; `champion` moves only if it is beaten like for like.

The challenger (this run's model) and the current champion are both scored on this run's validation
slices, each with its own saved settings (input scale), the inference settings and threshold of
params.yaml; `champion` moves when the challenger is better by more than `register.min_gain`. The
test IoU is a tag to read, never the gate: the test split selects nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

from emseg import tracking
from emseg.config import load_params
from emseg.data.prepare import load_split
from emseg.evaluate import pixel_iou
from emseg.fsutil import write_json
from emseg.model.network import load_weights
from emseg.registry import champion_version, register_and_decide
from emseg.stages.evaluate import REPORT_DIR as EVAL_REPORTS
from emseg.stages.prepare import PREPARED_DIR
from emseg.stages.train import MODEL_DIR
from emseg.stages.train import REPORT_DIR as TRAIN_REPORTS

OUT = "reports/register/registration.json"


def run(params_path: str = "params.yaml", prepared_dir: str = PREPARED_DIR) -> dict:
    params = load_params(params_path)
    run_info = json.loads((Path(TRAIN_REPORTS) / "run.json").read_text())
    metrics = json.loads((Path(EVAL_REPORTS) / "metrics.json").read_text())
    vx, vy = load_split(prepared_dir, "val")

    def score(net, who: str, tta: bool) -> float:
        cfg = params.evaluate.model_copy(update={"inference": params.evaluate.inference.model_copy(update={"tta": tta})})
        return pixel_iou(net, vx, vy, cfg, params.train.threshold, desc=f"register: {who}")

    # Each model is scored with its own post-processing: the TTA evaluate chose for it (or the params').
    own_tta = bool(metrics.get("tta", params.evaluate.inference.tta))
    challenger, _ = load_weights(Path(MODEL_DIR) / "model.pt")
    val_iou = score(challenger, "challenger on validation", own_tta)
    tracking.configure(params.tracking)
    name = params.tracking.registered_model
    champion = champion_version(name)
    champion_iou = None
    if champion is not None:
        weights = tracking.download_version_weights(champion, f"models:/{name}@champion")
        champion_tta = champion.tags.get("tta", str(params.evaluate.inference.tta).lower()) == "true"
        champion_iou = score(load_weights(weights)[0], f"champion v{champion.version} on the same slices", champion_tta)
    data_hash = tracking.dvc_data_hash()
    # The watershed depth evaluate used goes with the version, so `emseg predict` splits as evaluated.
    tags = {"test_iou": f"{float(metrics['iou']):.6f}", "val_data_hash": data_hash, "tta": str(own_tta).lower(),
            **({"watershed_h": f"{float(metrics['watershed_h']):g}"} if "watershed_h" in metrics else {})}
    result = register_and_decide(run_info["model_uri"], name, run_info["run_id"], val_iou, champion, champion_iou,
                                 params.register.min_gain, tags=tags)
    result.update(test_iou=float(metrics["iou"]), val_data_hash=data_hash, val_slices=len(vx))
    write_json(OUT, result)
    before = "none" if champion_iou is None else f"v{champion.version} {champion_iou:.4f}"
    print(f"register: {name} version {result['version']} is challenger (validation IoU {val_iou:.4f}, test IoU "
          f"{result['test_iou']:.4f}); champion on the same {len(vx)} validation slices: {before} -> {result['decision']}")
    return result
