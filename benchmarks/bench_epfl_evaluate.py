"""Evaluate a trained model on the EPFL test stack with `emseg evaluate`'s code path (tiled, blended):
pixel metrics and instance F1 at IoU 0.5 before (connected components) and after watershed splitting,
with the watershed depth h as set and as `emseg evaluate` chooses it on the validation slices
(`evaluate.instances.h_choices`, the defaults when the work dir's params predate them).

Run: .venv/bin/python benchmarks/bench_epfl_evaluate.py WORK_DIR [--no-tta]   (a bench_epfl_train.py work dir;
--no-tta: plain prediction even where the profile asks for flip TTA, 4x faster)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import save  # noqa: E402

from emseg.config import InstanceParams, load_params  # noqa: E402
from emseg.data.prepare import load_split  # noqa: E402
from emseg.evaluate import choose_watershed_h, evaluate_stack  # noqa: E402
from emseg.model.network import load_weights  # noqa: E402


def main() -> None:
    work = Path(sys.argv[1])
    params = load_params(work / "params.yaml")
    net, _ = load_weights(work / "models" / "model.pt")
    x, y = load_split(work / "data" / "prepared", "test")
    cfg = params.evaluate
    if "--no-tta" in sys.argv[2:]:
        cfg = cfg.model_copy(update={"inference": cfg.inference.model_copy(update={"tta": False})})
    if not cfg.instances.h_choices:
        cfg = cfg.model_copy(update={"instances": cfg.instances.model_copy(
            update={"h_choices": InstanceParams().h_choices})})
    vx, vy = load_split(work / "data" / "prepared", "val")
    t0 = time.time()
    h, rows = choose_watershed_h(net, vx, vy, cfg, params.train.threshold)
    choose_seconds = time.time() - t0
    result = {"command": " ".join([".venv/bin/python benchmarks/bench_epfl_evaluate.py", str(work), *sys.argv[2:]]),
              "tta": cfg.inference.tta, "validation_slices": len(vx), "choose_h_seconds": round(choose_seconds, 1),
              "validation_h_table": [rounded(r) for r in rows]}

    def score(depth: float) -> dict:
        t0 = time.time()
        m = evaluate_stack(net, x, y, cfg, params.train.threshold, keep=0, h=depth).metrics
        return {"seconds": round(time.time() - t0, 1), **rounded(m)}

    result["h_set"] = score(cfg.instances.h)
    result["h_chosen"] = result["h_set"] if h == cfg.instances.h else score(h)
    save("epfl_evaluate", result)


def rounded(d: dict) -> dict:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()}


if __name__ == "__main__":
    main()
