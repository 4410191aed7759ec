"""Prediction over 2D slices and 3D stacks: overlapping tiles, smooth blending, optional flip TTA.

Tiles overlap and each tile's probabilities are weighted by a window that falls off towards the
tile's edges (where a convolutional network sees the least context), so the blend shows no seams.
Stacks are processed slice by slice and written as they come, so a stack larger than memory works.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from emseg.data.patches import channels, pad_to_multiple
from emseg.model.network import channels_last as nhwc


def _device(net: torch.nn.Module) -> torch.device:
    return next(net.parameters()).device


@torch.no_grad()
def predict_slice(net: torch.nn.Module, image: np.ndarray) -> np.ndarray:
    """Foreground probability of one normalised 2D slice (H, W), or one with its z neighbours (k, H, W),
    in a single pass (padded to a multiple of 32)."""
    net.eval()
    padded, (h, w) = pad_to_multiple(channels(np.array(image, dtype=np.float32)))
    x = torch.from_numpy(np.ascontiguousarray(padded))[None].to(_device(net))
    return torch.sigmoid(net(x))[0, 0, :h, :w].float().cpu().numpy()


def _ramp(n: int, overlap: int) -> np.ndarray:
    r = np.ones(n, np.float32)
    if overlap > 0:
        t = (np.arange(overlap, dtype=np.float32) + 0.5) / overlap
        edge = 0.5 - 0.5 * np.cos(np.pi * t)
        r[:overlap] = edge
        r[-overlap:] = edge[::-1]
    return np.maximum(r, 1e-3)


def blend_window(tile_h: int, overlap: int, tile_w: int | None = None) -> np.ndarray:
    """Separable weight: 1 in the middle, a cosine ramp down to a small positive value over ``overlap``."""
    return np.outer(_ramp(tile_h, overlap), _ramp(tile_w or tile_h, overlap))


def tile_layout(length: int, tile: int, overlap: int) -> tuple[int, list[int]]:
    """Tile size and start offsets covering ``length`` (a multiple of 32) with at most ``tile`` per tile.

    Uses the fewest tiles that keep at least ``overlap`` between neighbours, then shrinks the tile to the
    smallest multiple of 32 that still covers the side with them and spreads the starts evenly. A
    2048x2048 slice with 1024-px tiles and 128 overlap takes 3x3 tiles of 768 px (1.27x its pixels),
    not 3x3 tiles of 1024 px at a fixed step (2.25x).
    """
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile), got tile {tile}, overlap {overlap}")
    if length <= tile:
        return length, [0]
    n = -(-(length - overlap) // (tile - overlap))
    size = min(tile, -(-(length + (n - 1) * overlap) // (n * 32)) * 32)
    return size, [round(i * (length - size) / (n - 1)) for i in range(n)]


def _flips(x: torch.Tensor) -> Iterator[tuple[torch.Tensor, Callable]]:
    yield x, lambda y: y
    yield torch.flip(x, [-1]), lambda y: torch.flip(y, [-1])
    yield torch.flip(x, [-2]), lambda y: torch.flip(y, [-2])
    yield torch.flip(x, [-2, -1]), lambda y: torch.flip(y, [-2, -1])


@torch.no_grad()
def predict_tiled(net: torch.nn.Module, image: np.ndarray, tile: int = 1024, overlap: int = 128, batch_size: int = 1,
                  tta: bool = False, channels_last: bool = True) -> np.ndarray:
    """Foreground probability (float32, H x W) of one normalised 2D slice (H, W), or one with its z
    neighbours (k, H, W), tile by tile.

    ``channels_last``: run the network in NHWC layout (faster; the network is handed back as it came)."""
    if tile % 32 or overlap < 0 or overlap * 2 >= tile:
        raise ValueError(f"tile must be a multiple of 32 and overlap in [0, tile/2), got {tile}, {overlap}")
    net.eval()
    h, w = np.shape(image)[-2:]
    image, _ = pad_to_multiple(channels(np.array(image, dtype=np.float32)))
    H, W = image.shape[-2:]
    # A side that fits in one tile is predicted in one piece: no extra work for slices smaller than a tile.
    ov = min(overlap, min(tile, H) // 2 - 1, min(tile, W) // 2 - 1) if overlap else 0
    ov = max(ov, 0)
    (th, ys), (tw, xs) = tile_layout(H, tile, ov), tile_layout(W, tile, ov)
    win = blend_window(th, max(min(ov, th // 2 - 1, tw // 2 - 1), 0) if ov else 0, tw)
    acc = np.zeros((H, W), np.float32)
    wsum = np.zeros((H, W), np.float32)
    coords = [(y, x) for y in ys for x in xs]
    device = _device(net)
    with nhwc(net, channels_last):
        for i in range(0, len(coords), batch_size):
            chunk = coords[i:i + batch_size]
            x = torch.from_numpy(np.stack([image[:, y:y + th, x:x + tw] for y, x in chunk])).to(device)
            prob = torch.zeros_like(x[:, :1])
            views = list(_flips(x)) if tta else [(x, lambda y: y)]
            for view, undo in views:
                prob += undo(torch.sigmoid(net(view).float()))
            prob = (prob / len(views))[:, 0].cpu().numpy()
            for (y, xx), p in zip(chunk, prob):
                acc[y:y + th, xx:xx + tw] += p * win
                wsum[y:y + th, xx:xx + tw] += win
    return (acc / wsum)[:h, :w]


Z_WEIGHTS = (0.25, 0.5, 0.25)  # below, the slice itself, above (`evaluate.z_average`)


def z_average(below: np.ndarray, prob: np.ndarray, above: np.ndarray) -> np.ndarray:
    """One slice's probability averaged with its z neighbours' (weights ``Z_WEIGHTS``)."""
    a, b, c = Z_WEIGHTS
    return a * below + b * prob + c * above


def z_averaged(probs: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    """The probabilities of consecutive slices, each averaged with its neighbours in z (``z_average``),
    as they come: one slice is held back until the next arrives. The ends are mirrored (slice -1 is
    slice 1, as the z-context of 2.5D inputs); a single slice comes back as it went in."""
    it = iter(probs)
    prev, cur = None, next(it, None)
    if cur is None:
        return
    for nxt in it:
        yield z_average(nxt if prev is None else prev, cur, nxt)
        prev, cur = cur, nxt
    yield cur if prev is None else z_average(prev, cur, prev)
