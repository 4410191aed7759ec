"""Cost of a semi-supervised training step (train.semi, mean teacher) against a plain one.

Both run emseg's own `fit()` for the same steps on the same generated data, with the network of
profiles/epfl-cpu.yaml (patch 192, batch 8, decoder [128, 64, 32, 16, 16]); the semi run adds an
unlabelled patch per labelled one, the teacher's forward pass and the student's second pass. A and B
alternate (A B A B A B) and the ratio is taken pair by pair. It sets how many epochs
profiles/epfl-cpu-semi.yaml fits in the same 15 minutes as profiles/epfl-cpu.yaml.
Run: .venv/bin/python benchmarks/bench_semi_step.py
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_train_throughput import BATCH, STEPS, WARMUP, lightning_run  # noqa: E402
from common import save  # noqa: E402

import torch  # noqa: E402

from emseg.config import parse_params  # noqa: E402
from emseg.data.prepare import prepare  # noqa: E402
from emseg.data.sources import fetch_raw  # noqa: E402

PAIRS = 3


def main() -> None:
    tmp = Path(tempfile.mkdtemp())
    base = {"data": {"unlabelled_slices": 6}, "model": {"decoder_channels": [128, 64, 32, 16, 16]},
            "train": {"patch_size": 192, "patches_per_epoch": (WARMUP + STEPS) * BATCH}}
    plain = parse_params(base)
    semi = parse_params({**base, "train": {**base["train"], "semi": {"weight": 1.0, "rampup_epochs": 0}}})
    fetch_raw(plain.data, tmp / "raw")
    prepare(plain.data, tmp / "raw", tmp / "prep")
    a, b = [], []
    for i in range(PAIRS):
        a.append(lightning_run(plain, tmp / "prep", tmp / f"plain{i}"))
        b.append(lightning_run(semi, tmp / "prep", tmp / f"semi{i}"))
    ratios = [x / y for x, y in zip(a, b)]  # plain patches/s over semi patches/s: the semi step's cost
    save("semi_step", {
        "command": ".venv/bin/python benchmarks/bench_semi_step.py",
        "setup": f"emseg fit(), Unet/efficientnet-b0 decoder [128,64,32,16,16], batch {BATCH}, patch 192, {STEPS} "
                 f"timed steps after {WARMUP} warm-up, {PAIRS} alternating pairs, torch threads "
                 f"{torch.get_num_threads()}, generated data, 6 unlabelled slices",
        "plain_labelled_patches_per_s": [round(v, 2) for v in a],
        "semi_labelled_patches_per_s": [round(v, 2) for v in b],
        "semi_step_cost_ratio": [round(r, 3) for r in ratios], "median": round(statistics.median(ratios), 3),
    })


if __name__ == "__main__":
    main()
