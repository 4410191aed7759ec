"""Tiled prediction of slices larger than one tile, against one whole-slice pass (honest-yardstick issue).

Input: 2048x2048 mosaics, each cut from six EPFL testing.tif slices laid out 2 wide and 3 high, so every
mosaic is larger than emseg's default 1024-px tile. Two modes, in fresh processes, alternating A B A B:
- whole: the network over each whole 2048x2048 mosaic in one pass (`predict_slice`; NHWC, as tiled);
- tiled: `predict_tiled` with emseg's defaults (tile 1024, overlap 128, cosine blend), i.e. 3x3 tiles.
No instance step: inference alone. Whole-process wall time and peak memory per run.
EMSEG_BENCH_BASELINE_SRC=/path/to/older/src adds a third mode, "tiled_baseline": the same tiled call
run by that older emseg source (e.g. a git worktree of an earlier commit), in the same alternation.
Run: .venv/bin/python benchmarks/bench_predict.py [weights.pt]   (EMSEG_BENCH_MOSAICS, EMSEG_BENCH_PAIRS)
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import EPFL, run_measured, save  # noqa: E402

SCRIPT = r"""
import sys, numpy as np, tifffile, torch
from emseg.inference import predict_slice, predict_tiled
from emseg.model.network import load_weights, build_network
from emseg.config import ModelParams
mode, weights, src, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
net = load_weights(weights)[0].eval() if weights != "-" else build_network(ModelParams()).eval()
if mode == "whole":  # the layout predict_tiled uses, so the ratio is the cost of tiling alone
    net = net.to(memory_format=torch.channels_last)
stack = tifffile.imread(src)  # 82 x 768 x 1024 uint8: 64 MB
mean, std = float(stack[::8].mean()), float(stack[::8].std())
with tifffile.TiffWriter(sys.argv[5]) as tw:
    for m in range(n):
        tiles = [np.asarray(stack[(6 * m + k) % len(stack)], np.float32) for k in range(6)]
        mosaic = np.block([[tiles[0], tiles[1]], [tiles[2], tiles[3]], [tiles[4], tiles[5]]])[:2048, :2048]
        x = (mosaic - mean) / std
        p = predict_slice(net, x) if mode == "whole" else predict_tiled(net, x, tile=1024, overlap=128)
        tw.write(np.round(p * 255).astype(np.uint8), contiguous=True)
"""


def main() -> None:
    weights = sys.argv[1] if len(sys.argv) > 1 else "-"
    n = int(os.environ.get("EMSEG_BENCH_MOSAICS", "12"))
    pairs = int(os.environ.get("EMSEG_BENCH_PAIRS", "3"))
    tmp = Path(tempfile.mkdtemp())
    script = tmp / "predict_bench.py"
    script.write_text(SCRIPT)
    baseline = os.environ.get("EMSEG_BENCH_BASELINE_SRC")
    rows: dict[str, list[dict]] = {"tiled": [], "whole": [], **({"tiled_baseline": []} if baseline else {})}
    for _ in range(pairs):
        for mode in rows:
            env = {"PYTHONPATH": str(Path(baseline).resolve())} if mode == "tiled_baseline" else None
            rows[mode].append(run_measured([sys.executable, str(script), mode.replace("_baseline", ""), weights,
                                            str(EPFL / "testing.tif"), str(n), str(tmp / f"{mode}.tif")], tmp, env))
    mpx = n * 2048 * 2048 / 1e6
    res = {mode: {"wall_seconds": [round(r["seconds"], 1) for r in rs],
                  "megapixels_per_second": round(mpx / statistics.median(r["seconds"] for r in rs), 3),
                  "peak_rss_mib": round(max(r["peak_rss_mib"] for r in rs))} for mode, rs in rows.items()}
    ratios = [round(a["seconds"] / b["seconds"], 3) for a, b in zip(rows["tiled"], rows["whole"])]
    if baseline:
        res["baseline_src"] = baseline
        res["time_ratio_baseline_to_whole"] = [round(a["seconds"] / b["seconds"], 3)
                                               for a, b in zip(rows["tiled_baseline"], rows["whole"])]
    save("predict_tiling", {
        "command": ".venv/bin/python benchmarks/bench_predict.py [weights]",
        "input": f"{n} mosaics of 2048x2048 from EPFL testing.tif ({mpx:.1f} Mpx), model "
                 f"{'untrained default Unet/efficientnet-b0' if weights == '-' else weights}",
        "pairs": pairs, **res, "time_ratio_tiled_to_whole": ratios,
        "ratio_median": statistics.median(ratios),
        "target": "tiled (default 1024-px tiles, 128 overlap) <= 1.3x one whole-slice pass",
    })


if __name__ == "__main__":
    main()
