"""Optuna pruning: the same study budget with the median pruner and without, on the same data.

Counts trained epochs (the cost) and the best validation IoU reached (the result) for each.
Run: .venv/bin/python benchmarks/bench_pruning.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from common import ROOT, run_measured, save  # noqa: E402

N_TRIALS, EPOCHS = 8, 4


def study(pruning: bool) -> dict:
    proj = Path(tempfile.mkdtemp(prefix=f"emseg-prune-{pruning}-"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(train_slices=4, val_slices=1)
    params["data"]["generated"].update(slices=6, test_slices=1, height=256, width=320)
    params["model"]["decoder_channels"] = [64, 32, 16, 16, 8]
    params["train"].update(patch_size=96, patches_per_epoch=32)
    params["tune"].update(n_trials=N_TRIALS, epochs_per_trial=EPOCHS, pruning=pruning, lr_min=1e-4, lr_max=3e-2)
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    for stage in ("fetch", "prepare"):
        run_measured(["emseg", stage], proj)
    r = run_measured(["emseg", "tune"], proj)
    best = json.loads((proj / "reports/tune/best_params.json").read_text())
    return {"best_val_iou": round(best["best_val_iou"], 4), "epochs_trained": best["epochs_trained"],
            "complete": best["n_complete"], "pruned": best["n_pruned"], "seconds": round(r["seconds"], 1)}


def main() -> None:
    with_p, without = study(True), study(False)
    save("pruning", {
        "command": ".venv/bin/python benchmarks/bench_pruning.py",
        "setup": f"{N_TRIALS} trials x up to {EPOCHS} epochs, TPE seed 42, MedianPruner from params.yaml "
                 "(tune.prune_after_epochs, tune.prune_startup_trials), generated data 256x320, patch 96, "
                 "32 patches per epoch",
        "with_pruning": with_p, "without_pruning": without,
        "epoch_saving": round(1 - with_p["epochs_trained"] / without["epochs_trained"], 3),
        "best_value_difference": round(with_p["best_val_iou"] - without["best_val_iou"], 4),
        "target": ">= 40% fewer epochs for the same best value",
    })


if __name__ == "__main__":
    main()
