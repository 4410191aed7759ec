"""Network factory and transfer-learning initialisation.

``build_network`` makes a segmentation-models-pytorch network with one input channel per slice it sees
(1, or ``model.z_context`` for 2.5D) and one output channel (logits). It never downloads anything:
ImageNet weights come only from a local file.
``SegmentationNet`` is what gets saved: it remembers how it was built, so a weights file
(``save_weights``) can be loaded back safely (``torch.load(weights_only=True)``) without pickled code.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

from emseg.config import InitParams, ModelParams
from emseg.model.arch import DECODER_TAKES_LIST, EmsegNetwork, in_channels
from emseg.errors import ConfigError, EmsegError


class SegmentationNet(EmsegNetwork):
    """An smp network plus the spec it was built from (emseg.model.arch); ``forward`` returns logits
    (N, 1, H, W). Adds clear errors for specs it cannot build, and what training and active learning use."""

    def __init__(self, spec: dict[str, Any], source: str = "params.yaml: model"):
        """``source`` names where ``spec`` came from in errors: params.yaml, or a weights file."""
        try:
            arch = spec["arch"]
            getattr(smp, arch)
            spec["encoder"], in_channels(spec)
            if arch in ("Unet", "UnetPlusPlus", "MAnet"):
                list(spec["decoder_channels"])
        except (KeyError, AttributeError, TypeError) as exc:
            raise ConfigError(f"{source}: not a network spec emseg can build (missing or unknown {exc})") from None
        try:
            super().__init__(spec)
        except (KeyError, ValueError):
            raise ConfigError(f"{source}.encoder: {spec['encoder']!r} is not an encoder smp knows "
                              "(segmentation_models_pytorch.encoders.get_encoder_names() lists them)") from None

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.net.encoder(x)

    @torch.no_grad()
    def mc_logits(self, x: torch.Tensor, passes: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Monte Carlo dropout: ``passes`` logits (T, N, 1, H, W) with dropout on, and the bottleneck
        features (N, C, h, w). Encoder and decoder run once; only the dropout and the head are
        sampled, which is where the dropout sits, so this equals T full passes at a fraction of the cost."""
        h, w = x.shape[-2:]
        scaled = float(self.spec.get("input_scale", 1.0)) != 1.0
        if scaled:
            x = F.interpolate(x, size=self._scaled_size(h, w), mode="bilinear", antialias=True, align_corners=False)
        feats = self.net.encoder(x)
        dec = self.net.decoder(feats) if DECODER_TAKES_LIST else self.net.decoder(*feats)
        was = self.dropout.training
        self.dropout.train(passes > 1)
        out = []
        for _ in range(passes):
            logit = self.net.segmentation_head(self.dropout(dec))
            if scaled:
                logit = F.interpolate(logit, size=(h, w), mode="bilinear", align_corners=False)
            out.append(logit)
        self.dropout.train(was)
        return torch.stack(out), feats[-1]


class ProbabilityModel(nn.Module):
    """Served flavour: normalised image (N, z_context, H, W) float32 -> foreground probability."""

    def __init__(self, net: SegmentationNet):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(x))


def is_channels_last(net: nn.Module) -> bool:
    """Whether the network's convolution weights are stored channels-last (NHWC)."""
    return any(p.dim() == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last)
               for p in net.parameters())


@contextmanager
def channels_last(net: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Run ``net`` with channels-last (NHWC) weights, then give it back in the layout it came in.

    EfficientNet's depthwise convolutions are memory bound; in NHWC a training step takes 1.2x less
    time and inference 1.5x less on this CPU (benchmarks/bench_layout.py). The layout changes no
    value beyond rounding, and saved or exported weights stay in the usual layout."""
    if not enabled or is_channels_last(net):
        yield net
        return
    net.to(memory_format=torch.channels_last)
    try:
        yield net
    finally:
        net.to(memory_format=torch.contiguous_format)


def model_spec(cfg: ModelParams) -> dict[str, Any]:
    """What a weights file records to rebuild the network; a plain 2D network's spec stays as it was
    before 2.5D existed (no ``z_context``), so its files and their hashes do not change."""
    return cfg.model_dump(exclude={"z_context"} if cfg.z_context == 1 else set())


def build_network(cfg: ModelParams) -> SegmentationNet:
    return SegmentationNet(model_spec(cfg))


def save_weights(net: SegmentationNet, path: str | Path, extra: dict | None = None) -> None:
    torch.save({"spec": net.spec, "state_dict": net.state_dict(), **(extra or {})}, path)


def load_weights(path: str | Path) -> tuple[SegmentationNet, dict]:
    """Rebuild a network from a weights file written by ``save_weights`` (safe: weights only)."""
    blob = _safe_load(path)
    if not isinstance(blob, dict) or "spec" not in blob or "state_dict" not in blob:
        raise EmsegError(f"{path}: not an emseg weights file (expected keys 'spec' and 'state_dict')")
    if not isinstance(blob["spec"], dict) or not isinstance(blob["state_dict"], dict):
        raise EmsegError(f"{path}: not an emseg weights file ('spec' and 'state_dict' must be mappings)")
    net = SegmentationNet(blob["spec"], source=f"{path}: spec")
    own = net.state_dict()
    sd = blob["state_dict"]
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [k for k in own if k in sd and getattr(sd[k], "shape", None) != own[k].shape]
    if missing or unexpected or wrong:
        first = (missing or unexpected or wrong)[0]
        raise EmsegError(f"{path}: its weights do not fit the network its spec describes ({len(missing)} missing, "
                         f"{len(unexpected)} unexpected, {len(wrong)} of another shape, e.g. {first!r})")
    net.load_state_dict(sd)
    return net, blob


def _safe_load(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise EmsegError(f"{path}: weights file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        detail = (str(exc).splitlines() or ["empty or truncated file"])[0]
        raise EmsegError(f"{path}: cannot load weights safely ({type(exc).__name__}: {detail})") from None


def _state_dict_from(blob: Any, path: str | Path) -> dict[str, torch.Tensor]:
    """Accept an emseg weights file, a Lightning checkpoint or a bare state dict."""
    if isinstance(blob, dict) and "state_dict" in blob:
        sd = blob["state_dict"]
        # A Lightning checkpoint prefixes our module's attribute name: "net.net.encoder..." -> "net.encoder...".
        if any(k.startswith("net.net.") for k in sd):
            sd = {k[4:]: v for k, v in sd.items() if k.startswith("net.")}
        return sd
    if isinstance(blob, dict) and all(isinstance(v, torch.Tensor) for v in blob.values()):
        return blob
    raise EmsegError(f"{path}: holds no state dict")


def _load_matching(net: SegmentationNet, sd: dict[str, torch.Tensor], source: str, prefix: str = "") -> str:
    own = net.state_dict()
    matched = {}
    for k, v in sd.items():
        key = prefix + k
        if key in own and own[key].shape == v.shape:
            matched[key] = v
        elif key in own and own[key].ndim == 4 and v.ndim == 4 and own[key].shape[1] == in_channels(net.spec) and \
                own[key].shape[0] == v.shape[0] and own[key].shape[2:] == v.shape[2:]:
            # First convolution of another width: summed to one grey channel (RGB, as smp does) and put
            # on the centre slice, the neighbours' weights zero: a 2D network starts a 2.5D one as the
            # same network. (RGB weights into a 3-slice network match in shape above and load as they
            # are, one colour per slice; a 2.5D checkpoint of another width is summed the same way.)
            width = own[key].shape[1]
            first = torch.zeros_like(own[key])
            first[:, width // 2:width // 2 + 1] = v.sum(dim=1, keepdim=True)
            matched[key] = first
    if not matched:
        raise EmsegError(f"{source}: no weights match this network ({net.spec['arch']} / {net.spec['encoder']})")
    own.update(matched)
    net.load_state_dict(own)
    return f"{len(matched)} of {len(own)} tensors"  # fewer: another decoder, say, and only the encoder loads


def initialise(net: SegmentationNet, init: InitParams) -> str:
    """Load starting weights into ``net`` as ``init`` says; return a short description for tags."""
    if init.mode == "scratch":
        return "scratch"
    if init.mode == "checkpoint":
        if not init.path:
            raise ConfigError("params.yaml: train.init.path: required when train.init.mode is 'checkpoint'")
        n = _load_matching(net, _state_dict_from(_safe_load(init.path), init.path), init.path)
        return f"checkpoint:{init.path} ({n})"
    if init.mode == "imagenet":
        if not init.path:
            raise ConfigError(
                "params.yaml: train.init.path: ImageNet mode needs a local encoder weights file "
                "(there is no internet here; copy the encoder's .pth from a connected machine)")
        if not Path(init.path).expanduser().is_file():
            raise EmsegError(f"{init.path}: ImageNet encoder weights not found (no download is attempted: "
                             "copy the file there from a connected machine)")
        blob = _safe_load(Path(init.path).expanduser())
        n = _load_matching(net, _state_dict_from(blob, init.path), init.path, prefix="net.encoder.")
        return f"imagenet:{Path(init.path).name} ({n})"
    if init.mode == "registry":
        if not init.uri:
            raise ConfigError("params.yaml: train.init.uri: required (models:/NAME@ALIAS) when train.init.mode is "
                              "'registry'")
        if not init.path:  # emseg.registry.local_init fetches the version's weights to a local file first
            raise EmsegError(f"train.init.uri {init.uri}: the registry version's weights were not fetched to a local "
                             "file (start training through emseg train, tune or the pipelines)")
        n = _load_matching(net, _state_dict_from(_safe_load(init.path), init.uri), init.uri)
        return f"registry:{init.uri} ({n})"
    raise ConfigError(f"params.yaml: train.init.mode: unknown mode {init.mode!r}")
