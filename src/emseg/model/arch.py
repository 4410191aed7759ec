"""The network's architecture on its own: torch and segmentation-models-pytorch, nothing of emseg.

emseg builds every network from this file (``emseg.model.network.SegmentationNet`` adds clear errors
and the extras training needs), and `emseg export` ships the same file in bioimage.io packages as the
architecture of their PyTorch state-dict weights: tools that run those packages (bioimageio.core,
ilastik, deepImageJ) import it as a stand-alone module, so it must never import emseg.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

# smp 0.5+ decoders take the feature list; older ones took *features. Decided once, not per forward.
DECODER_TAKES_LIST = tuple(int(v) for v in smp.__version__.split(".")[:2]) >= (0, 5)


def in_channels(spec: dict[str, Any]) -> int:
    """Input channels of a network built from ``spec``: the slice and its z neighbours (``z_context``;
    1 for a plain 2D network and for every weights file written before 2.5D existed)."""
    return int(spec.get("z_context", 1))


class EmsegNetwork(nn.Module):
    """An smp network plus the spec it was built from; ``forward`` returns logits (N, 1, H, W) for a
    z-scored image (N, z_context, H, W). ``spec["input_scale"]`` below 1: the image is resampled
    to that scale, segmented, and the logits resampled back."""

    def __init__(self, spec: dict[str, Any]):
        super().__init__()
        self.spec = dict(spec)
        kwargs = dict(encoder_name=spec["encoder"], encoder_weights=None, in_channels=in_channels(spec), classes=1)
        if spec["arch"] in ("Unet", "UnetPlusPlus", "MAnet"):
            kwargs["decoder_channels"] = list(spec["decoder_channels"])
        self.net = getattr(smp, spec["arch"])(**kwargs)
        self.dropout = nn.Dropout2d(spec.get("dropout", 0.0))
        if spec.get("bn_momentum") is not None:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.momentum = spec["bn_momentum"]

    def _scaled_size(self, h, w) -> tuple[int, int]:
        # Resample to the nearest sizes that are multiples of 32 (the encoder halves the size 5 times):
        # integer arithmetic only, so torch.export and tracing keep height and width dynamic.
        num, den = Fraction(float(self.spec.get("input_scale", 1.0))).limit_denominator(64).as_integer_ratio()
        return (h * num + den * 16) // (den * 32) * 32, (w * num + den * 16) // (den * 32) * 32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(self.spec.get("input_scale", 1.0)) == 1.0:
            return self._logits(x)
        h, w = x.shape[-2:]
        small = F.interpolate(x, size=self._scaled_size(h, w), mode="bilinear", antialias=True, align_corners=False)
        return F.interpolate(self._logits(small), size=(h, w), mode="bilinear", align_corners=False)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.net.encoder(x)
        dec = self.net.decoder(feats) if DECODER_TAKES_LIST else self.net.decoder(*feats)
        return self.net.segmentation_head(self.dropout(dec))


class EmsegProbabilities(EmsegNetwork):
    """The same network ending in a sigmoid: foreground probability (N, 1, H, W). Its state dict is
    the network's, key for key (what bioimage.io packages carry)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(super().forward(x))
