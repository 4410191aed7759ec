"""A new user's first real run: the README's one switch, default params, from a fresh clone.

For each seed: `git clone` this repository (its committed HEAD) into a scratch folder with `../shared`
beside it, then time `dvc exp run -S data.source=epfl -S seed=N` there, the whole pipeline (fetch,
prepare, tune, train, evaluate, register) with nothing else changed but an empty EPFL cache folder
(`data.epfl.cache_dir`, so that the copy from ../shared is made as on a first run). Reported per seed: wall time,
what tuning chose, training epochs and seconds, test foreground IoU on all 82 slices of testing.tif;
over the seeds: mean, sample sd (ddof=1), n. The issue's target: within 0.03 of the best CPU profile
(`bench_epfl_train.py`) in at most 30 minutes.

Run: .venv/bin/python benchmarks/bench_defaults.py [--seeds 42 0 1]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_epfl_train import spread  # noqa: E402
from common import BIN, ROOT, SHARED, run_measured, save  # noqa: E402


def one_seed(seed: int) -> dict:
    base = Path(tempfile.mkdtemp(prefix=f"emseg-bench-defaults-s{seed}-"))
    (base / "shared").symlink_to(SHARED.parent)
    proj = base / "proj"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(proj)], check=True)
    cache = base / "cache"  # a first run: nothing fetched before (the EPFL copy comes from ../shared)
    run = run_measured([f"{BIN}/dvc", "exp", "run", "-S", "data.source=epfl", "-S", f"seed={seed}",
                        "-S", f"data.epfl.cache_dir={cache}"], proj)
    read = lambda p: json.loads((proj / p).read_text())  # noqa: E731
    tune, train, ev = read("reports/tune/best_params.json"), read("reports/train/metrics.json"), \
        read("reports/evaluate/metrics.json")
    row = {"seed": seed, "wall_seconds": round(run["seconds"], 1), "peak_rss_mib": round(run["peak_rss_mib"]),
           "tuned": tune, "epochs": train["epochs"], "train_seconds": train["train_seconds"],
           "schedule_progress": train.get("schedule_progress"), "best_val_iou": round(train["best_val_iou"], 4),
           "test_slices": ev["slices"], **{k: round(float(ev[k]), 4) for k in ("iou", "dice", "instance_f1")},
           "work_dir": str(base)}
    print(json.dumps(row), flush=True)
    shutil.rmtree(cache, ignore_errors=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 0, 1])
    args = ap.parse_args()
    t0 = time.time()
    rows = [one_seed(s) for s in args.seeds]
    save("defaults_epfl", {
        "command": ".venv/bin/python benchmarks/bench_defaults.py --seeds " + " ".join(map(str, args.seeds)),
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
        "seeds": args.seeds, "wall_seconds": round(time.time() - t0),
        "summary": {k: spread([float(r[k]) for r in rows]) for k in ("iou", "dice", "instance_f1", "wall_seconds",
                                                                      "train_seconds", "epochs", "best_val_iou")},
        "per_seed": rows})


if __name__ == "__main__":
    main()
