"""Optuna pruning: the same study budget with the median pruner and without, on the same data.

Counts trained epochs (the cost) and the best validation IoU reached (the result) for each.
Run: .venv/bin/python benchmarks/bench_pruning.py [N_TRIALS EPOCHS_PER_TRIAL]   (default 12 8; session 1 measured 8 4)
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from common import ROOT, run_measured, save  # noqa: E402


def study(pruning: bool, n_trials: int, epochs: int) -> dict:
    proj = Path(tempfile.mkdtemp(prefix=f"emseg-prune-{pruning}-"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(train_slices=4, val_slices=1)
    params["data"]["generated"].update(slices=6, test_slices=1, height=256, width=320)
    params["model"]["decoder_channels"] = [64, 32, 16, 16, 8]
    params["train"].update(patch_size=96, patches_per_epoch=32, max_minutes=None)
    # Trials bounded by their epochs alone, pruned from the first epoch on, as when this was measured.
    params["tune"].update(n_trials=n_trials, epochs_per_trial=epochs, pruning=pruning, lr_min=1e-4, lr_max=3e-2,
                          minutes_per_trial=None, prune_after_epochs=1)
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    for stage in ("fetch", "prepare"):
        run_measured(["emseg", stage], proj)
    r = run_measured(["emseg", "tune"], proj)
    best = json.loads((proj / "reports/tune/best_params.json").read_text())
    return {"best_val_iou": round(best["best_val_iou"], 4), "epochs_trained": best["epochs_trained"],
            "complete": best["n_complete"], "pruned": best["n_pruned"], "seconds": round(r["seconds"], 1)}


def main() -> None:
    n_trials, epochs = (int(a) for a in sys.argv[1:3]) if len(sys.argv) > 2 else (12, 8)
    with_p, without = study(True, n_trials, epochs), study(False, n_trials, epochs)
    save(f"pruning_{n_trials}x{epochs}", {
        "command": f".venv/bin/python benchmarks/bench_pruning.py {n_trials} {epochs}",
        "setup": f"{n_trials} trials x up to {epochs} epochs, TPE seed 42, MedianPruner from params.yaml "
                 "(tune.prune_after_epochs, tune.prune_startup_trials), generated data 256x320, patch 96, "
                 "32 patches per epoch",
        "with_pruning": with_p, "without_pruning": without,
        "epoch_saving": round(1 - with_p["epochs_trained"] / without["epochs_trained"], 3),
        "best_value_difference": round(with_p["best_val_iou"] - without["best_val_iou"], 4),
        "target": ">= 40% fewer epochs for the same best value",
    })


if __name__ == "__main__":
    main()
