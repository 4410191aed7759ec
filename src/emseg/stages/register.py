"""DVC stage `register`: register the trained model; `champion` moves only if it is beaten like for like.

The challenger (this run's model) and the current champion are both scored on this run's validation
slices, each with the post-processing its weights file carries (threshold, flip TTA, z-averaging;
the inference tiling of params.yaml); `champion` moves when the challenger is better by more than
`register.min_gain`. The test IoU is a tag to read, never the gate: the test split selects nothing.
The self-describing weights `evaluate` wrote (models/emseg.pt) are attached to the training run, so
the registered version carries its post-processing.
"""

from __future__ import annotations

import json
from pathlib import Path

from emseg import registry, tracking
from emseg.config import load_params
from emseg.errors import ConfigError
from emseg.data.io import sha256_of
from emseg.data.prepare import load_val_inputs
from emseg.evaluate import pixel_iou
from emseg.fsutil import write_json
from emseg.model.network import load_weights
from emseg.paths import EVALUATE_METRICS, EVALUATED_MODEL, PARAMS, PREPARED_DIR, REGISTRATION, TRAIN_RUN


def describe(manifest: dict, metrics: dict, val_iou: float, data_hash: str) -> str:
    """A model version's description: the data it was trained and scored on, and its scores."""
    s = manifest["splits"]
    files = manifest["files"]
    origin = files["train_image"].get("origin", "generated")
    test_origin = files.get("test_image", files["train_image"]).get("origin", "generated")
    return (f"Trained on {manifest['source']} ({origin}), {len(s['train']['slices'])} labelled slices "
            f"{s['train']['slices']}; validation slices {s['val']['slices']}; test: {len(s['test']['slices'])} "
            f"slices of {test_origin}. Validation IoU {val_iou:.4f} (what promotion compares), test IoU "
            f"{float(metrics['iou']):.4f}, Dice {float(metrics['dice']):.4f}, instance F1 "
            f"{float(metrics['instance_f1']):.4f}. Data: DVC hash {data_hash} of data/prepared.")


def run(params_path: str = PARAMS, prepared_dir: str = PREPARED_DIR) -> dict:
    import mlflow

    params = load_params(params_path)
    run_info = json.loads(Path(TRAIN_RUN).read_text())
    metrics = json.loads(Path(EVALUATE_METRICS).read_text())
    vx, vy = load_val_inputs(prepared_dir)  # with their z neighbours, where kept: z-averaging needs them

    def score(net, post: dict, who: str) -> float:
        cfg = params.evaluate.model_copy(update={"inference": params.evaluate.inference.model_copy(
            update={"tta": bool(post.get("tta", params.evaluate.inference.tta))}),
            "z_average": bool(post.get("z_average", False))})
        return pixel_iou(net, vx, vy, cfg, float(post.get("threshold", params.train.threshold)),
                         desc=f"register: {who}")

    challenger, blob = load_weights(EVALUATED_MODEL)
    val_iou = score(challenger, registry.postprocess_of(blob, name=EVALUATED_MODEL), "challenger on validation")
    tracking.configure(params.tracking)
    name = params.tracking.registered_model
    champion = registry.champion_version(name)
    champion_iou = not_comparable = None
    if champion is not None:
        with registry.fetched_weights(champion, f"{registry.PREFIX}{name}@{registry.CHAMPION}") as weights:
            champ_net, champ_blob = load_weights(weights)
        champ_post = registry.postprocess_of(champ_blob, dict(champion.tags or {}), f"{name} v{champion.version}")
        try:
            champion_iou = score(champ_net, champ_post, f"champion v{champion.version} on the same slices")
        except ConfigError as exc:  # e.g. a 2.5D champion needs more neighbours than these data hold
            not_comparable = str(exc)
    # The version's weights carry their post-processing. One folder per file content: re-evaluating the
    # same training run (other evaluate settings) never rewrites what an earlier version loads.
    folder = f"weights/{sha256_of(EVALUATED_MODEL)[:16]}"
    with tracking.start_run(run_id=run_info["run_id"]):
        mlflow.log_artifact(EVALUATED_MODEL, artifact_path=folder)
    data_hash = tracking.dvc_data_hash()
    post = registry.postprocess_of(blob, name=EVALUATED_MODEL)
    tags = {"test_iou": f"{float(metrics['iou']):.6f}", "val_data_hash": data_hash,
            registry.WEIGHTS_TAG: f"{folder}/{Path(EVALUATED_MODEL).name}",
            **{k: str(post[k]).lower() for k in ("tta", "z_average") if k in post},
            **({"watershed_h": f"{float(metrics['watershed_h']):g}"} if "watershed_h" in metrics else {})}
    manifest = json.loads((Path(prepared_dir) / "manifest.json").read_text())
    result = registry.register_and_decide(run_info["model_uri"], name, run_info["run_id"], val_iou, champion,
                                          champion_iou, params.register.min_gain, tags=tags,
                                          not_comparable=not_comparable,
                                          description=describe(manifest, metrics, val_iou, data_hash))
    result.update(test_iou=float(metrics["iou"]), val_data_hash=data_hash, val_slices=len(vx))
    write_json(REGISTRATION, result)
    before = "none" if champion_iou is None else f"v{champion.version} {champion_iou:.4f}"
    print(f"register: {name} version {result['version']} is challenger (validation IoU {val_iou:.4f}, test IoU "
          f"{result['test_iou']:.4f}); champion on the same {len(vx)} validation slices: {before} "
          f"-> {result['decision']}")
    return result
