"""Training-loop throughput: our Lightning loop against a plain PyTorch loop, same model, data and batch.

Both train the same U-Net/EfficientNet-B0 on the same patch dataset (generated data, augmentation
on) for the same number of steps; the first steps are warm-up. The Lightning side is emseg's own
`fit` with the settings the `train` stage uses (callbacks, checkpoints, channels-last); the plain
loop runs in the same tensor layout. A and B alternate (A B A B A B) and
the ratio is taken pair by pair, so drift of the machine's speed cancels.
Run: .venv/bin/python benchmarks/bench_train_throughput.py
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import save  # noqa: E402

import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

from emseg.config import parse_params  # noqa: E402
from emseg.data.prepare import prepare  # noqa: E402
from emseg.data.sources import fetch_raw  # noqa: E402
from emseg.model.losses import segmentation_loss  # noqa: E402
from emseg.data.datamodule import EMDataModule  # noqa: E402
from emseg.model.network import SegmentationNet, channels_last, model_spec  # noqa: E402
from emseg.model.train import fit  # noqa: E402

WARMUP, STEPS, BATCH, PATCH, PAIRS = 2, 12, 8, 192, 3


class StepTimer(Callback):
    def __init__(self):
        self.t0 = None
        self.t1 = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == WARMUP:
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == WARMUP + STEPS - 1:
            self.t1 = time.perf_counter()


def lightning_run(params, prep, work: Path) -> float:
    """The real training entry point, `emseg.model.train.fit`, with everything it sets up (callbacks,
    checkpointing, precise BatchNorm, channels-last, the data module); only the steps are timed."""
    timer = StepTimer()
    fit(params, prep, work, lr=1e-3, batch_size=BATCH, max_epochs=1, callbacks=[timer], progress=False)
    return STEPS * BATCH / (timer.t1 - timer.t0)


def plain_run(params, prep) -> float:
    """The same network, data module, loss and optimiser in a bare PyTorch loop, in the same layout."""
    torch.manual_seed(0)
    net = SegmentationNet(model_spec(params.model)).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
    dm = EMDataModule(prep, params.train, BATCH, 0)
    dm.setup()
    t0 = None
    with channels_last(net, params.train.channels_last):
        for i, (x, y) in enumerate(dm.train_dataloader()):
            net.to(x.device)  # batches cut on the GPU (train.device_patches) arrive there; a no-op after the first
            if i == WARMUP:
                t0 = time.perf_counter()
            loss = segmentation_loss(net(x), y, **params.train.loss.model_dump())
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i == WARMUP + STEPS - 1:
                return STEPS * BATCH / (time.perf_counter() - t0)
    raise RuntimeError("not enough batches")


def main() -> None:
    tmp = Path(tempfile.mkdtemp())
    params = parse_params({"train": {"patch_size": PATCH, "patches_per_epoch": (WARMUP + STEPS) * BATCH}})
    fetch_raw(params.data, tmp / "raw")
    prepare(params.data, tmp / "raw", tmp / "prep")
    light, plain = [], []
    for i in range(PAIRS):
        light.append(lightning_run(params, tmp / "prep", tmp / f"work{i}"))
        plain.append(plain_run(params, tmp / "prep"))
    ratios = [a / b for a, b in zip(light, plain)]
    save("train_throughput", {
        "command": ".venv/bin/python benchmarks/bench_train_throughput.py",
        "setup": f"Unet/efficientnet-b0, batch {BATCH}, patch {PATCH}, {STEPS} timed steps after {WARMUP} warm-up, "
                 f"{PAIRS} alternating pairs, torch threads {torch.get_num_threads()}; Lightning: emseg's fit() "
                 f"(its callbacks, channels_last={params.train.channels_last}); plain loop: same layout",
        "lightning_patches_per_s": [round(v, 2) for v in light], "plain_patches_per_s": [round(v, 2) for v in plain],
        "ratio_lightning_to_plain": [round(r, 3) for r in ratios], "median_ratio": round(statistics.median(ratios), 3),
        "target": "median ratio >= 0.90",
    })


if __name__ == "__main__":
    main()
