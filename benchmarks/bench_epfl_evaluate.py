"""Evaluate a trained model on the EPFL test stack with `emseg evaluate`'s code path (tiled, blended):
pixel metrics and instance F1 at IoU 0.5 before (connected components) and after watershed splitting.

Run: .venv/bin/python benchmarks/bench_epfl_evaluate.py WORK_DIR   (a bench_epfl_train.py work dir)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import save  # noqa: E402

from emseg.config import load_params  # noqa: E402
from emseg.data.prepare import load_split  # noqa: E402
from emseg.evaluate import evaluate_stack  # noqa: E402
from emseg.model.network import load_weights  # noqa: E402


def main() -> None:
    work = Path(sys.argv[1])
    params = load_params(work / "params.yaml")
    net, _ = load_weights(work / "models" / "model.pt")
    x, y = load_split(work / "data" / "prepared", "test")
    t0 = time.time()
    ev = evaluate_stack(net, x, y, params.evaluate, params.train.threshold, keep=0)
    m = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in ev.metrics.items()}
    save("epfl_evaluate", {"command": f".venv/bin/python benchmarks/bench_epfl_evaluate.py {work}",
                           "seconds": round(time.time() - t0, 1), **m})


if __name__ == "__main__":
    main()
