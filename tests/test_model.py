"""Losses, augmentation, initialisation modes and eval-mode correctness after a short training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import SMALL_GENERATED
from emseg import IGNORE
from emseg.config import AugmentParams, InitParams, ModelParams, parse_params
from emseg.data.augment import Augmenter
from emseg.data.prepare import load_split
from emseg.errors import EmsegError
from emseg.inference import predict_slice
from emseg.metrics import confusion, scores
from emseg.model.losses import dice_loss, focal_loss
from emseg.model.network import build_network, initialise, save_weights
from emseg.model.train import fit

SMALL_MODEL = ModelParams(decoder_channels=[64, 32, 16, 16, 8])


def test_losses_ignore_unlabelled_pixels():
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 32, 32)
    target = (torch.rand(2, 1, 32, 32) > 0.7).long()
    target[:, :, :, 16:] = IGNORE
    other = logits.clone()
    other[:, :, :, 16:] = torch.randn(2, 1, 32, 16) * 10  # whatever happens where nobody labelled
    for loss in (focal_loss, dice_loss):
        assert torch.allclose(loss(logits, target), loss(other, target))
        # ...but the labelled half counts: changing it changes the loss.
        changed = logits.clone()
        changed[:, :, :, :16] += 3
        assert not torch.allclose(loss(logits, target), loss(changed, target))
    # Equals the loss computed on the labelled half alone.
    assert torch.allclose(focal_loss(logits, target), focal_loss(logits[..., :16], target[..., :16]), atol=1e-6)
    assert torch.allclose(dice_loss(logits, target), dice_loss(logits[..., :16], target[..., :16]), atol=1e-6)


def test_focal_loss_down_weights_easy_pixels():
    t = torch.ones(1, 1, 4, 4, dtype=torch.long)
    easy, hard = torch.full((1, 1, 4, 4), 4.0), torch.full((1, 1, 4, 4), -1.0)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    assert focal_loss(easy, t) / bce(easy, t.float()) < focal_loss(hard, t) / bce(hard, t.float())


def test_augmentation_keeps_image_and_mask_aligned():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:128, 0:128]
    mask = (((yy - 40) ** 2 / 400 + (xx - 70) ** 2 / 900) < 1).astype(np.uint8)
    mask[:, 100:] = IGNORE
    image = np.where(mask == 1, 2.0, -1.0).astype(np.float32) + np.where(mask == IGNORE, 5.0, 0.0).astype(np.float32)
    geometric = Augmenter(AugmentParams(flip=0.5, rotate90=0.5, elastic=1.0, brightness_contrast=0, gamma=0,
                                        noise=0, blur=0))
    moved = 0
    for _ in range(20):
        img, m = geometric(image.copy(), mask.copy(), rng)
        assert set(np.unique(m)) <= {0, 1, IGNORE}  # nearest-neighbour: no blended label values
        fg_img, ign_img = (img > 0.5) & (img < 3.5), img > 3.5
        agree = ((fg_img == (m == 1)) & (ign_img == (m == IGNORE))).mean()
        assert agree > 0.97
        moved += not np.array_equal(m, mask)
    assert moved >= 15
    # Intensity transforms leave the mask alone.
    intensity = Augmenter(AugmentParams(flip=0, rotate90=0, elastic=0, brightness_contrast=1, gamma=1, noise=1, blur=1))
    img, m = intensity(image.copy(), mask.copy(), rng)
    assert np.array_equal(m, mask) and not np.allclose(img, image)


def _params(**train):
    return parse_params({**SMALL_GENERATED, "model": SMALL_MODEL.model_dump(),
                         "train": {"patch_size": 96, "patches_per_epoch": 32, "batch_size": 8, **train}})


def _first_weight(net):
    return next(net.parameters()).detach().clone()


def test_init_scratch_and_checkpoint(tmp_path):
    a = build_network(SMALL_MODEL)
    save_weights(a, tmp_path / "w.pt")
    b = build_network(SMALL_MODEL)
    assert initialise(b, InitParams(mode="scratch")) == "scratch"
    assert not torch.equal(_first_weight(a), _first_weight(b))
    desc = initialise(b, InitParams(mode="checkpoint", path=str(tmp_path / "w.pt")))
    assert desc.startswith("checkpoint:")
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(pa, pb)
    with pytest.raises(EmsegError, match="nope.pt: weights file not found"):
        initialise(b, InitParams(mode="checkpoint", path=str(tmp_path / "nope.pt")))


def test_init_imagenet_from_local_file_and_clear_error_without_one(tmp_path):
    import segmentation_models_pytorch as smp

    # An RGB ImageNet-style encoder state dict, as smp's encoders save them.
    rgb = smp.Unet("efficientnet-b0", encoder_weights=None, in_channels=3).encoder.state_dict()
    torch.save(rgb, tmp_path / "efficientnet-b0-imagenet.pth")
    net = build_network(SMALL_MODEL)
    desc = initialise(net, InitParams(mode="imagenet", path=str(tmp_path / "efficientnet-b0-imagenet.pth")))
    assert desc.startswith("imagenet:")
    first = [k for k in rgb if rgb[k].ndim == 4][0]
    got = net.state_dict()["net.encoder." + first]
    assert torch.allclose(got, rgb[first].sum(dim=1, keepdim=True))  # RGB filters folded into one channel
    with pytest.raises(EmsegError, match="ImageNet encoder weights not found"):
        initialise(net, InitParams(mode="imagenet", path=str(tmp_path / "missing.pth")))


def test_unknown_encoder_is_a_clear_error():
    with pytest.raises(EmsegError, match="model.encoder: 'efficientnet-b99' is not an encoder"):
        build_network(ModelParams(encoder="efficientnet-b99"))


def test_short_training_predicts_right_in_eval_mode_and_repeats(small_prepared, tmp_path):
    params = _params(max_epochs=5, lr=3e-3, patch_size=128, patches_per_epoch=64)
    res = fit(params, small_prepared, tmp_path / "a", lr=3e-3, batch_size=8, progress=False)
    vx, vy = load_split(small_prepared, "val")
    prob = predict_slice(res.net, vx[0])  # eval mode
    s = scores(confusion(prob > 0.5, np.asarray(vy[0])))
    assert res.net.training is False
    assert s["iou"] > 0.3, s  # not collapsed to background
    assert abs(s["iou"] - res.best_score) < 0.1  # the checkpointed score is what eval mode gives
    assert [r["epoch"] for r in res.history] == list(range(res.epochs))
    assert all({"train_loss", "val_loss", "train_iou", "val_iou", "train_acc", "val_acc"} <= set(r)
               for r in res.history)
    again = fit(params, small_prepared, tmp_path / "b", lr=3e-3, batch_size=8, progress=False)
    assert again.history[0]["train_loss"] == pytest.approx(res.history[0]["train_loss"], rel=1e-4)


def test_input_scale_runs_the_network_at_lower_resolution_and_exports(tmp_path):
    import torch.nn.functional as F

    torch.manual_seed(0)
    half = build_network(SMALL_MODEL.model_copy(update={"input_scale": 0.5})).eval()
    full = build_network(SMALL_MODEL).eval()
    full.load_state_dict(half.state_dict())
    x = torch.randn(1, 1, 256, 320)
    with torch.no_grad():
        y = half(x)
        # Same as: resample to half size, run the unscaled network, resample the logits back.
        small = F.interpolate(x, size=(128, 160), mode="bilinear", antialias=True, align_corners=False)
        expected = F.interpolate(full(small), size=(256, 320), mode="bilinear", align_corners=False)
        assert y.shape == x.shape and torch.allclose(y, expected, atol=1e-5)
        assert not torch.allclose(y, full(x), atol=1e-3)  # and not the full-resolution network
        assert half(torch.randn(1, 1, 100, 130)).shape == (1, 1, 100, 130)  # any size comes back whole
    # Saved and reloaded, the scale travels with the weights (evaluate, predict and serving apply it).
    save_weights(half, tmp_path / "half.pt")
    from emseg.model.network import load_weights

    again, _ = load_weights(tmp_path / "half.pt")
    assert again.spec["input_scale"] == 0.5
    with torch.no_grad():
        assert torch.allclose(again.eval()(x), y, atol=1e-6)
    # torch.export (MLflow's pt2 flavour, Dim.AUTO like MLflow) keeps batch, height and width dynamic.
    from emseg.model.network import ProbabilityModel
    from emseg.tracking import export_example

    served = ProbabilityModel(half).eval()
    auto = torch.export.Dim.AUTO
    program = torch.export.export(served, (torch.from_numpy(export_example(half)),),
                                  dynamic_shapes=({0: auto, 2: auto, 3: auto},))
    z = torch.randn(3, 1, 192, 256)
    with torch.no_grad():
        assert torch.allclose(program.module()(z), served(z), atol=1e-5)
    # A patch that leaves the network too few pixels is refused up front, naming both keys.
    with pytest.raises(EmsegError, match="train.patch_size: 32 px at model.input_scale 0.5 leaves 16 px"):
        parse_params({"model": {"input_scale": 0.5}, "train": {"patch_size": 32}})
