"""Prediction over the 82-slice EPFL testing.tif: tiled + blended against a naive whole-slice loop.

Both read the stack slice by slice and write probabilities; the naive loop predicts each whole slice
in one pass. Two tiled settings: emseg's default (1024-px tiles, 128 overlap: a 768x1024 slice fits
one tile, so this measures the blending machinery's overhead) and forced 512-px tiles with 64 overlap
(6 tiles per slice, 2x the pixels: the cost of real tiling). No instance step: inference alone.
Runs alternate A B A B; whole-process wall time and peak memory are measured for each.
Run: .venv/bin/python benchmarks/bench_predict.py [weights.pt]
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
import sys, numpy as np, tifffile
from emseg.data.io import StackReader, inspect_stack
from emseg.data.io import stack_stats
from emseg.inference import predict_slice, predict_tiled
from emseg.model.network import load_weights, build_network
from emseg.config import ModelParams
mode, weights, src, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
net = load_weights(weights)[0].eval() if weights != "-" else build_network(ModelParams()).eval()
if mode == "naive":  # the layout predict_tiled uses (evaluate.inference.channels_last), so the ratio is tiling's cost
    import torch
    net = net.to(memory_format=torch.channels_last)
info = inspect_stack(src); mean, std = stack_stats(info)
with StackReader(info) as r, tifffile.TiffWriter(sys.argv[5]) as tw:
    for z in range(n):
        x = (r.read(z).astype(np.float32) - mean) / std
        if mode == "naive":
            p = predict_slice(net, x)
        else:
            tile, overlap = (1024, 128) if mode == "tiled_default" else (512, 64)
            p = predict_tiled(net, x, tile=tile, overlap=overlap, batch_size=1)
        tw.write(np.round(p * 255).astype(np.uint8), contiguous=True)
"""


def main() -> None:
    weights = sys.argv[1] if len(sys.argv) > 1 else "-"
    n = int(os.environ.get("EMSEG_BENCH_SLICES", "82"))  # the whole testing.tif by default
    tmp = Path(tempfile.mkdtemp())
    script = tmp / "predict_bench.py"
    script.write_text(SCRIPT)
    rows = {"tiled_default": [], "tiled_512": [], "naive": []}
    for _ in range(2):
        for mode in rows:
            r = run_measured([sys.executable, str(script), mode, weights, str(EPFL / "testing.tif"), str(n),
                              str(tmp / f"{mode}.tif")], tmp)
            rows[mode].append(r)
    mpx = n * 768 * 1024 / 1e6
    res = {}
    for mode, rs in rows.items():
        res[mode] = {"wall_seconds": [round(r["seconds"], 1) for r in rs],
                     "megapixels_per_second": round(mpx / statistics.median(r["seconds"] for r in rs), 3),
                     "peak_rss_mib": round(max(r["peak_rss_mib"] for r in rs))}
    ratio = {m: [round(a["seconds"] / b["seconds"], 3) for a, b in zip(rows[m], rows["naive"])]
             for m in ("tiled_default", "tiled_512")}
    save("predict_throughput", {
        "command": ".venv/bin/python benchmarks/bench_predict.py [weights]",
        "input": f"EPFL testing.tif, {n} slices of 768x1024 ({mpx:.1f} Mpx), model Unet/efficientnet-b0",
        **res, "time_ratio_to_naive": ratio,
        "target": "tiled no slower than 1.3x naive; peak RSS < 1.5 GB",
    })


if __name__ == "__main__":
    main()
