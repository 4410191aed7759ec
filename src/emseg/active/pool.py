"""Score a pool of candidate patches with a network: uncertainty maps, patch scores, bottleneck features.

Each pool slice is predicted once as a whole (padded to a multiple of 32). With ``passes`` > 1 the
dropout before the segmentation head stays on and is sampled ``passes`` times (Monte Carlo dropout,
for BALD); the encoder and decoder run once. Patch numbers are read off the slice maps with integral
images, so scoring every patch of a dense grid costs no more than predicting the slices.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from emseg.active.strategies import Candidates, bald, binary_entropy, least_confidence, patch_sums
from emseg.data.patches import pad_to_multiple
from emseg.errors import ConfigError


@dataclass
class PoolScores:
    probability: np.ndarray  # (n, H, W) float32, mean foreground probability
    maps: dict[str, np.ndarray]  # per-pixel entropy / least_confidence / bald, float32 (n, H, W)
    scores: dict[str, np.ndarray]  # per-candidate sums of each map
    features: np.ndarray  # (m, C) mean bottleneck feature per candidate


def _feature_sums(fmap: np.ndarray, cands: Candidates, shape: tuple[int, int]) -> np.ndarray:
    """Mean of the bottleneck feature map (n, C, h, w) over each candidate's footprint at its stride."""
    n, c, fh, fw = fmap.shape
    H, W = shape
    ii = np.zeros((n, c, fh + 1, fw + 1))
    ii[:, :, 1:, 1:] = fmap.astype(np.float64).cumsum(2).cumsum(3)
    z, y, x = cands.zyx.T
    s = cands.size
    y0 = np.floor(y * fh / H).astype(int)
    x0 = np.floor(x * fw / W).astype(int)
    y1 = np.maximum(np.ceil((y + s) * fh / H).astype(int), y0 + 1)
    x1 = np.maximum(np.ceil((x + s) * fw / W).astype(int), x0 + 1)
    tot = ii[z, :, y1, x1] - ii[z, :, y0, x1] - ii[z, :, y1, x0] + ii[z, :, y0, x0]
    return (tot / ((y1 - y0) * (x1 - x0))[:, None]).astype(np.float32)


@torch.no_grad()
def score_pool(net, images, cands: Candidates, passes: int = 1, progress: bool = True,
               keep_maps: bool = True) -> PoolScores:
    """Predict every pool slice and score every candidate patch. ``images``: (n, H, W), or (n, k, H, W)
    for a 2.5D network (each slice with its z neighbours, ``model.z_context``). Without ``keep_maps``
    only the scores and features are kept (memory: a slice at a time, for large stacks)."""
    if passes > 1 and float(net.spec.get("dropout", 0.0)) == 0.0:
        raise ConfigError("BALD needs Monte Carlo dropout: the model was built with model.dropout 0; "
                          "train it with model.dropout > 0 (for example 0.2)")
    net.eval()
    device = next(net.parameters()).device
    shape = np.shape(images)
    n, (H, W) = shape[0], shape[-2:]
    keys = ("entropy", "least_confidence", "bald")
    probs = np.zeros((n, H, W) if keep_maps else (0, H, W), np.float32)
    maps = {k: np.zeros((n, H, W) if keep_maps else (0, H, W), np.float32) for k in keys}
    scores = {k: np.zeros(len(cands)) for k in keys}
    fmaps = []
    for i in tqdm(range(n), desc="score pool", unit="slice", disable=not progress):
        padded, _ = pad_to_multiple(np.array(images[i], dtype=np.float32))
        x = torch.from_numpy(np.ascontiguousarray(padded)).reshape(1, -1, *padded.shape[-2:]).to(device)
        logits, bottleneck = net.mc_logits(x, max(passes, 1))
        samples = torch.sigmoid(logits.float())[:, 0, 0, :H, :W].cpu().numpy()  # (T, H, W)
        mean = samples.mean(0)
        here = {"entropy": binary_entropy(mean), "least_confidence": least_confidence(mean),
                "bald": bald(samples) if passes > 1 else np.zeros_like(mean)}
        on_slice = np.where(cands.zyx[:, 0] == i)[0]
        local = Candidates(np.column_stack([np.zeros(len(on_slice), np.int64), cands.zyx[on_slice, 1:]]), cands.size)
        for k in keys:
            scores[k][on_slice] = patch_sums(here[k][None], local)
            if keep_maps:
                maps[k][i] = here[k]
        if keep_maps:
            probs[i] = mean
        # Bottleneck cells that cover the real (unpadded) slice only.
        fb = bottleneck[0].float().cpu().numpy()
        ph, pw = padded.shape[-2:]
        fh, fw = fb.shape[1:]
        fmaps.append(fb[:, :max(1, round(fh * H / ph)), :max(1, round(fw * W / pw))])
    shapes = {f.shape for f in fmaps}
    if len(shapes) > 1:  # cannot happen for one stack; guard for callers mixing sizes
        raise ValueError(f"pool slices give different bottleneck shapes: {shapes}")
    features = _feature_sums(np.stack(fmaps), cands, (H, W))
    return PoolScores(probs, maps, scores, features)
