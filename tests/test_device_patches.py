"""Patches cut and augmented on the training device (emseg.data.device_patches), checked on CPU
tensors with real EPFL labels: crops come from where they say, masks move with their images."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch

from conftest import EPFL, require_shared
from emseg import IGNORE
from emseg.config import AugmentParams
from emseg.data.device_patches import DevicePatchSampler, augment_batch

NONE = AugmentParams(flip=0, rotate90=0, elastic=0, brightness_contrast=0, gamma=0, noise=0, blur=0)


@pytest.fixture(scope="module")
def epfl_labels():
    require_shared()
    with tifffile.TiffFile(EPFL / "training_groundtruth.tif") as tf:
        return (tf.asarray()[[10, 60, 110], 200:392, 300:540] == 255).astype(np.uint8)  # 3 x 192 x 240


def _coded(labels: np.ndarray, k: int = 3) -> np.ndarray:
    """Images whose every pixel says where it is: slice * 1e6 + y * 1e3 + x (exact in float32), and the
    same in each of k z-channels."""
    n, h, w = labels.shape
    z, y, x = np.meshgrid(np.arange(n), np.arange(h), np.arange(w), indexing="ij")
    code = (z * 1_000_000 + y * 1000 + x).astype(np.float32)
    return np.repeat(code[:, None], k, axis=1)


def test_each_patch_is_the_crop_it_came_from_and_foreground_bias_holds(epfl_labels):
    sampler = DevicePatchSampler(_coded(epfl_labels), epfl_labels, 64, foreground_bias=1.0, seed=1)
    x, y = sampler.sample(64)
    assert x.shape == (64, 3, 64, 64) and y.shape == (64, 1, 64, 64) and y.dtype == torch.int64
    corners = set()
    for img, lab in zip(x.numpy(), y.numpy()):
        s, rest = divmod(int(img[0, 0, 0]), 1_000_000)
        y0, x0 = divmod(rest, 1000)
        corners.add((s, y0, x0))
        assert np.array_equal(img[0], _coded(epfl_labels, 1)[s, 0, y0:y0 + 64, x0:x0 + 64])
        assert np.array_equal(img[2], img[0])
        assert np.array_equal(lab[0], epfl_labels[s, y0:y0 + 64, x0:x0 + 64])
        assert lab.sum() > 0  # foreground_bias 1: every patch is centred near foreground
    assert len(corners) > 40  # random places, not one crop repeated


def test_partly_labelled_slices_give_patches_with_labels(epfl_labels):
    lab = epfl_labels.copy()
    lab[:, :, 100:] = IGNORE  # only a strip on the left is annotated
    sampler = DevicePatchSampler(_coded(lab), lab, 64, foreground_bias=0.0, seed=2)
    _, y = sampler.sample(64)
    assert all(((p != IGNORE).sum() > 0) for p in y.numpy())


def test_geometric_transforms_move_the_mask_with_the_image(epfl_labels):
    gen = torch.Generator().manual_seed(0)
    sampler = DevicePatchSampler(epfl_labels[:, None].astype(np.float32).repeat(3, 1), epfl_labels, 96,
                                 foreground_bias=0.7, seed=3)
    x, y = sampler.sample(32)
    # Flips and rotations, always: exact.
    fx, fy = augment_batch(x, y, NONE.model_copy(update={"flip": 1.0}), gen)
    assert torch.equal(fx, x.flip(-1).flip(-2)) and torch.equal(fy, y.flip(-1).flip(-2))
    geo = NONE.model_copy(update={"flip": 0.5, "rotate90": 1.0, "elastic": 1.0})
    ax, ay = augment_batch(x, y, geo, gen)
    varied = x.flatten(1).std(1) > 0  # a patch of background only looks the same however it is turned
    assert varied.sum() > 8 and (ax != x).any(dim=(1, 2, 3))[varied].all()  # every such sample was moved
    # The image is the mask as floats: after the warp (bilinear for the image, nearest for the mask)
    # they still agree everywhere but on a thin band along object edges.
    agree = ((ax[:, 1:2] > 0.5) == (ay == 1)).float().mean().item()
    assert agree > 0.99, agree
    assert torch.equal(ax[:, 0], ax[:, 2])  # z-channels move as one


def test_intensity_transforms_touch_the_image_only(epfl_labels):
    gen = torch.Generator().manual_seed(1)
    img = np.stack([np.where(epfl_labels == 1, 1.0, -1.0)] * 3, 1).astype(np.float32)
    sampler = DevicePatchSampler(img, epfl_labels, 64, seed=4)
    x, y = sampler.sample(16)
    cfg = NONE.model_copy(update={"brightness_contrast": 1.0, "gamma": 1.0, "noise": 1.0, "blur": 1.0})
    ax, ay = augment_batch(x, y, cfg, gen)
    assert torch.equal(ay, y)
    assert (ax - x).abs().mean() > 0.05
    assert torch.isfinite(ax).all()


def test_unlabelled_patches_are_crops_of_the_pool_and_augmented_with_their_own_draws(epfl_labels):
    from emseg.data.device_patches import DevicePatchStream, DeviceUnlabelledSampler

    pool = _coded(epfl_labels)  # three "unlabelled" slices whose pixels say where they are
    sampler = DeviceUnlabelledSampler(pool, 64, seed=3)
    u = sampler.sample(64)
    assert u.shape == (64, 3, 64, 64) and u.dtype == torch.float32
    corners = set()
    for img in u.numpy():
        s, rest = divmod(int(img[0, 0, 0]), 1_000_000)
        y0, x0 = divmod(rest, 1000)
        corners.add((s, y0, x0))
        assert np.array_equal(img, pool[s, :, y0:y0 + 64, x0:x0 + 64])
    assert len(corners) > 40 and {c[0] for c in corners} == {0, 1, 2}  # anywhere, on every slice

    flips = AugmentParams(flip=0.5, rotate90=0, elastic=0, brightness_contrast=0, gamma=0, noise=0, blur=0)
    labelled = DevicePatchSampler(_coded(epfl_labels), epfl_labels, 64, seed=4)
    stream = DevicePatchStream(labelled, flips, 32, 8, DeviceUnlabelledSampler(pool, 64, seed=5))
    stream.set_epoch(0)
    batches = list(stream)
    assert len(batches) == 4 and all(len(b) == 3 for b in batches)
    flipped = 0
    for _, _, ub in batches:
        for img in ub.numpy():
            # The crop's top-left pixel holds the smallest code, wherever a flip has moved it.
            s, rest = divmod(int(min(img[0, 0, 0], img[0, 0, -1], img[0, -1, 0], img[0, -1, -1])), 1_000_000)
            y0, x0 = divmod(rest, 1000)
            crop = pool[s, :, y0:y0 + 64, x0:x0 + 64]
            assert any(np.array_equal(img, c) for c in (crop, crop[..., ::-1], crop[:, ::-1], crop[:, ::-1, ::-1]))
            flipped += not np.array_equal(img, crop)
    assert 0 < flipped < 32  # augmented, each patch with its own draw
    stream.set_epoch(0)
    again = list(stream)
    assert all(torch.equal(a[2], b[2]) for a, b in zip(batches, again))  # the epoch's draws repeat


def test_training_draws_its_batches_from_the_device_stream(epfl_labels, tmp_path):
    """`train.device_patches: on` trains from DevicePatchStream batches (here on the CPU) in the real fit."""
    from lightning.pytorch.callbacks import Callback

    from emseg.config import Params
    from emseg.data.datamodule import ArraySplits
    from emseg.data.device_patches import DevicePatchStream
    from emseg.model.train import fit

    with tifffile.TiffFile(EPFL / "training.tif") as tf:
        raw = tf.asarray()[[10, 60, 110], 200:392, 300:540].astype(np.float32)
    x = ((raw - raw.mean()) / raw.std()).astype(np.float32)
    seen = []

    class Batches(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((type(trainer.datamodule.train_set), tuple(batch[0].shape)))

    params = Params.model_validate({"model": {"decoder_channels": [32, 16, 8, 8, 8]},
                                    "train": {"patch_size": 64, "patches_per_epoch": 16, "batch_size": 4,
                                              "max_epochs": 2, "device_patches": "on"}})
    res = fit(params, ArraySplits(x, epfl_labels, x[:1], epfl_labels[:1]), tmp_path, lr=0.01, batch_size=4,
              progress=False, checkpoints=False, callbacks=[Batches()])
    assert res.epochs == 2
    assert seen and all(kind is DevicePatchStream and shape == (4, 1, 64, 64) for kind, shape in seen)
    assert len(seen) == 2 * 16 // 4
