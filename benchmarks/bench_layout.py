"""Memory layout of the network's tensors: NCHW (PyTorch's default) against channels-last NHWC.

Two measurements, each alternating the two layouts (A B A B ...) so drift of the machine cancels:
- training steps (forward, focal + Dice loss, backward, AdamW) of the EPFL CPU profile's network
  (U-Net/EfficientNet-B0, decoder 128-64-32-16-16) on batches of 8 real 192x192 EPFL patches;
- `emseg.inference.predict_tiled` on real 768x1024 slices of EPFL testing.tif (the evaluate path).
It also reports how far the two layouts' probabilities differ (rounding only).
Run: .venv/bin/python benchmarks/bench_layout.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import EPFL, save  # noqa: E402

import numpy as np  # noqa: E402
import tifffile  # noqa: E402
import torch  # noqa: E402

from emseg.inference import predict_tiled  # noqa: E402
from emseg.model.losses import segmentation_loss  # noqa: E402
from emseg.model.network import SegmentationNet, channels_last  # noqa: E402

PAIRS, STEPS, WARMUP, BATCH, PATCH, SLICES = 3, 8, 2, 8, 192, 3
SPEC = {"arch": "Unet", "encoder": "efficientnet-b0", "decoder_channels": [128, 64, 32, 16, 16], "bn_momentum": 0.1}


def load(path: Path, n: int) -> np.ndarray:
    with tifffile.TiffFile(path) as tif:
        return np.stack([tif.pages[i].asarray() for i in range(n)])


def train_seconds(nhwc: bool, x: torch.Tensor, y: torch.Tensor) -> float:
    torch.manual_seed(0)
    net = SegmentationNet(SPEC).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    with channels_last(net, nhwc):
        for i in range(WARMUP + STEPS):
            if i == WARMUP:
                t0 = time.perf_counter()
            b = slice((i * BATCH) % len(x), (i * BATCH) % len(x) + BATCH)
            loss = segmentation_loss(net(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return (time.perf_counter() - t0) / STEPS


def main() -> None:
    images = load(EPFL / "training.tif", 12).astype(np.float32)
    labels = (load(EPFL / "training_groundtruth.tif", 12) > 0).astype(np.float32)
    images = (images - images.mean()) / images.std()
    rng = np.random.default_rng(0)
    crops = [(rng.integers(12), rng.integers(images.shape[1] - PATCH), rng.integers(images.shape[2] - PATCH))
             for _ in range(4 * BATCH)]
    x = torch.from_numpy(np.stack([images[z, r:r + PATCH, c:c + PATCH] for z, r, c in crops]))[:, None]
    y = torch.from_numpy(np.stack([labels[z, r:r + PATCH, c:c + PATCH] for z, r, c in crops]))[:, None]

    steps = {"nchw": [], "nhwc": []}
    for _ in range(PAIRS):
        for name in steps:
            steps[name].append(train_seconds(name == "nhwc", x, y))
            print(f"train {name}: {steps[name][-1]:.3f} s/step", flush=True)

    test = load(EPFL / "testing.tif", SLICES).astype(np.float32)
    test = (test - test.mean()) / test.std()
    torch.manual_seed(0)
    net = SegmentationNet(SPEC).eval()
    predict_tiled(net, test[0])  # warm-up
    infer = {"nchw": [], "nhwc": []}
    probs = {}
    for _ in range(PAIRS):
        for name in infer:
            t0 = time.perf_counter()
            probs[name] = [predict_tiled(net, s, channels_last=name == "nhwc") for s in test]
            infer[name].append((time.perf_counter() - t0) / SLICES)
            print(f"predict {name}: {infer[name][-1]:.3f} s/slice", flush=True)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(probs["nchw"], probs["nhwc"]))

    def ratios(d):
        return [round(a / b, 3) for a, b in zip(d["nchw"], d["nhwc"])]

    save("layout", {
        "command": ".venv/bin/python benchmarks/bench_layout.py",
        "setup": f"Unet/efficientnet-b0 decoder {SPEC['decoder_channels']}, train: batch {BATCH} of {PATCH}px EPFL "
                 f"patches, {STEPS} timed steps after {WARMUP}; predict: {SLICES} EPFL test slices 768x1024 "
                 f"(one 1024-px tile each); {PAIRS} alternating pairs, torch threads {torch.get_num_threads()}",
        "train_s_per_step": {k: [round(v, 3) for v in vs] for k, vs in steps.items()},
        "predict_s_per_slice": {k: [round(v, 3) for v in vs] for k, vs in infer.items()},
        "train_speedup_nhwc": ratios(steps), "train_median_speedup": statistics.median(ratios(steps)),
        "predict_speedup_nhwc": ratios(infer), "predict_median_speedup": statistics.median(ratios(infer)),
        "max_abs_probability_difference": diff,
    })


if __name__ == "__main__":
    main()
