"""Prediction over whole slices (padded to the network's stride of 32).

Overlapping, blended tiling over stacks larger than memory is the next step (issue: evaluate and
predict); this whole-slice path is what training uses for validation overlays.
"""

from __future__ import annotations

import numpy as np
import torch

from emseg.data.patches import pad_to_multiple


@torch.no_grad()
def predict_slice(net: torch.nn.Module, image: np.ndarray) -> np.ndarray:
    """Foreground probability (float32, same shape) of one normalised 2D slice."""
    net.eval()
    padded, (h, w) = pad_to_multiple(np.array(image, dtype=np.float32))
    device = next(net.parameters()).device
    x = torch.from_numpy(np.ascontiguousarray(padded))[None, None].to(device)
    return torch.sigmoid(net(x))[0, 0, :h, :w].float().cpu().numpy()
