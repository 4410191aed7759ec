"""z-averaging of probabilities, switched on or off on the validation slices, over several trained models.

For each bench_epfl_train.py work dir: the model's validation slices are predicted together with
their z neighbours in training.tif (normalised as `prepare` normalised the stack); averaging the
probability over neighbouring slices (weights 1/4, 1/2, 1/4) is kept when it raises the validation
IoU, else dropped (a tie keeps plain). The 82 test slices are then predicted once (flip TTA as the
model's `evaluate` chose it on validation) and scored plain, averaged, and with the validation choice.
The ends of the test run are mirrored (slice -1 is slice 1).
Reported: per model and, over the models, the paired difference chosen - plain (mean, sample sd, n).

Run: .venv/bin/python benchmarks/bench_epfl_zsmooth.py WORKDIR [WORKDIR ...]
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import save  # noqa: E402


def z_average(probs: np.ndarray) -> np.ndarray:
    """(n, H, W) probabilities of consecutive slices averaged with weights 1/4, 1/2, 1/4; ends mirrored."""
    if len(probs) < 2:
        return probs.copy()
    padded = np.concatenate([probs[1:2], probs, probs[-2:-1]])
    return 0.25 * padded[:-2] + 0.5 * padded[1:-1] + 0.25 * padded[2:]


def pixel_scores(probs, labels) -> dict:
    from emseg.metrics import add_counts, confusion, scores

    counts: dict = {}
    per = []
    for p, y in zip(probs, labels):
        c = confusion(p > 0.5, np.asarray(y))
        per.append(scores(c)["iou"])
        counts = add_counts(counts, c)
    s = scores(counts)
    return {"iou": round(s["iou"], 4), "precision": round(s["precision"], 4), "recall": round(s["recall"], 4),
            "per_slice_iou_min": round(min(per), 4)}


def one_model(work: Path) -> dict:
    from tqdm.auto import tqdm

    from emseg.data.io import context_stack, inspect_stack
    from emseg.data.prepare import load_split
    from emseg.inference import predict_tiled
    from emseg.model.network import load_weights

    net, blob = load_weights(work / "models" / "emseg.pt")
    net.eval()
    tta = bool(blob["postprocess"]["tta"])
    prepared = work / "data" / "prepared"
    manifest = json.loads((prepared / "manifest.json").read_text())
    val = manifest["splits"]["val"]["slices"]
    norm = manifest["normalisation"]["train"]
    info = inspect_stack(work / "data" / "raw" / manifest["files"]["train_image"]["name"])
    _, vy = load_split(prepared, "val")
    vplain, vavg = [], []
    for window in tqdm(context_stack(info, 3, norm["mean"], norm["std"], zs=val), total=len(val), desc="val"):
        p = np.stack([predict_tiled(net, window[c], tta=tta) for c in range(3)])  # z-1, z, z+1
        vplain.append(p[1])
        vavg.append(0.25 * p[0] + 0.5 * p[1] + 0.25 * p[2])
    val_plain, val_avg = pixel_scores(vplain, vy), pixel_scores(vavg, vy)
    use = val_avg["iou"] > val_plain["iou"]
    x, y = load_split(prepared, "test")
    t0 = time.time()
    probs = np.stack([predict_tiled(net, x[i], tta=tta) for i in tqdm(range(len(x)), desc="test")])
    secs = time.time() - t0
    test_plain, test_avg = pixel_scores(probs, y), pixel_scores(z_average(probs), y)
    return {"work_dir": str(work), "tta": tta, "val_slices": val, "val_plain": val_plain, "val_z_average": val_avg,
            "chosen": "z_average" if use else "plain", "test_plain": test_plain, "test_z_average": test_avg,
            "test_chosen": test_avg if use else test_plain, "test_predict_seconds": round(secs, 1)}


def spread(values: list[float]) -> dict:
    return {"mean": round(statistics.fmean(values), 4),
            "sd": round(statistics.stdev(values), 4) if len(values) > 1 else None, "n": len(values)}


def main() -> None:
    works = [Path(a) for a in sys.argv[1:]]
    if not works:
        raise SystemExit(__doc__)
    rows = [one_model(w) for w in works]
    out = {"command": "python benchmarks/bench_epfl_zsmooth.py " + " ".join(map(str, works)), "models": rows,
           "test_iou_plain": spread([r["test_plain"]["iou"] for r in rows]),
           "test_iou_z_average": spread([r["test_z_average"]["iou"] for r in rows]),
           "test_iou_chosen": spread([r["test_chosen"]["iou"] for r in rows]),
           "paired_chosen_minus_plain": spread([r["test_chosen"]["iou"] - r["test_plain"]["iou"] for r in rows]),
           "paired_z_average_minus_plain": spread([r["test_z_average"]["iou"] - r["test_plain"]["iou"] for r in rows]),
           "val_paired_z_average_minus_plain": spread([r["val_z_average"]["iou"] - r["val_plain"]["iou"]
                                                       for r in rows])}
    save("epfl_zsmooth", out)


if __name__ == "__main__":
    main()
