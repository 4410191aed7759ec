"""Inference-time options on a trained EPFL model, scored on all 82 slices of testing.tif.

Predicts every test slice once plain and once with flip test-time augmentation, then scores each
with and without averaging the probability over neighbouring slices in z (weights 1/4, 1/2, 1/4).
Run: .venv/bin/python benchmarks/bench_epfl_postproc.py WORKDIR [--tta]   (a bench_epfl_train.py work dir;
--tta adds the flip-averaged pass, 4x the prediction time)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import save  # noqa: E402


def z_smooth(probs: np.ndarray) -> np.ndarray:
    out = probs.copy()
    out[1:-1] = 0.25 * probs[:-2] + 0.5 * probs[1:-1] + 0.25 * probs[2:]
    return out


def main() -> None:
    from tqdm.auto import tqdm

    from emseg.data.prepare import load_split
    from emseg.inference import predict_tiled
    from emseg.metrics import add_counts, confusion, scores
    from emseg.model.network import load_weights

    work = Path(sys.argv[1])
    net, _ = load_weights(work / "models" / "model.pt")
    net.eval()
    x, y = load_split(work / "data" / "prepared", "test")
    res = {}
    for tta in (False, True) if "--tta" in sys.argv else (False,):
        t0 = time.time()
        probs = np.stack([predict_tiled(net, x[i], tile=1024, overlap=128, batch_size=1, tta=tta)
                          for i in tqdm(range(len(x)), desc=f"tta={tta}")])
        secs = time.time() - t0
        for smooth in (False, True):
            p = z_smooth(probs) if smooth else probs
            counts: dict = {}
            for i in range(len(x)):
                counts = add_counts(counts, confusion(p[i] > 0.5, np.asarray(y[i])))
            s = scores(counts)
            res[f"tta={tta},z_smooth={smooth}"] = {"iou": round(s["iou"], 4), "dice": round(s["dice"], 4),
                                                   "precision": round(s["precision"], 4),
                                                   "recall": round(s["recall"], 4), "predict_seconds": round(secs, 1)}
    save("epfl_postproc", {"command": f".venv/bin/python benchmarks/bench_epfl_postproc.py {work}",
                           "model": str(work / "models" / "model.pt"), "test_slices": len(x), **res})


if __name__ == "__main__":
    main()
