"""The stacks an active-learning simulation runs on: an unlabelled pool, validation and test slices.

EPFL hippocampus (training stack: pool and validation slices; test stack: test slices) or the
generated data, binned by ``active.downsample`` and normalised with the pool's statistics.
"""

from __future__ import annotations

import numpy as np

from emseg.active.loop import ActiveData
from emseg.config import Params


def load_data(params: Params) -> tuple[ActiveData, dict]:
    from emseg.data.generate import generate_stack
    from emseg.data.stacks import evenly, load_labelled, rescale, resolve_source

    cfg = params.active
    scale = 1.0 / cfg.downsample
    source = resolve_source(params, cfg.source)
    if source == "epfl":
        from emseg.data.sources import EPFL_FILES, ensure_epfl_file

        f = {role: ensure_epfl_file(name, params.data.epfl) for role, name in EPFL_FILES.items()}
        n = len(__import__("tifffile").TiffFile(f["train_image"]).pages)
        pool_idx = evenly(n, cfg.pool_slices)
        val_idx = evenly(n, cfg.val_slices, exclude=pool_idx)
        px, py, stats = load_labelled(f["train_image"], f["train_labels"], pool_idx, scale=scale)
        vx, vy, _ = load_labelled(f["train_image"], f["train_labels"], val_idx, scale=scale, stats=stats)
        n_test = len(__import__("tifffile").TiffFile(f["test_image"]).pages)
        test_idx = evenly(n_test, cfg.test_slices)
        tx, ty, _ = load_labelled(f["test_image"], f["test_labels"], test_idx, scale=scale)
    else:
        g = params.data.generated
        n_train = cfg.pool_slices + cfg.val_slices
        img, lab = generate_stack(g.seed, n_train + (cfg.test_slices or g.test_slices), g.height, g.width)
        x = img.astype(np.float32)
        x = (x - x[:n_train].mean()) / x[:n_train].std()
        y = (lab > 0).astype(np.uint8)
        pairs = [rescale(a, b, scale) for a, b in zip(x, y)]
        xs, ys = np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
        pool_idx, val_idx = list(range(cfg.pool_slices)), list(range(cfg.pool_slices, n_train))
        test_idx = list(range(n_train, len(xs)))
        px, py, vx, vy, tx, ty = xs[pool_idx], ys[pool_idx], xs[val_idx], ys[val_idx], xs[test_idx], ys[test_idx]
    desc = {"source": source, "downsample": cfg.downsample, "pool_slices": pool_idx, "val_slices": val_idx,
            "test_slices": test_idx, "slice_shape": list(px.shape[1:])}
    return ActiveData(px, py, vx, vy, tx, ty), desc
