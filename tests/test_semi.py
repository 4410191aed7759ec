"""Semi-supervised training (train.semi, mean teacher): unlabelled slices of the same stack join
training through a consistency loss. On a crop of the real EPFL stack (testing.tif, its own volume here)."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch

from conftest import EPFL, require_shared
from emseg.config import parse_params
from emseg.data.io import inspect_stack, normalise, stack_stats
from emseg.data.prepare import load_split, load_unlabelled, prepare
from emseg.data.sources import fetch_raw
from emseg.errors import ConfigError
from emseg.model.losses import consistency_loss, segmentation_loss
from emseg.model.module import SegmentationModule
from emseg.model.network import model_spec

N = 40  # slices of the crop
SEMI = {"weight": 2.0, "ema": 0.9, "rampup_epochs": 0, "noise": 0.1, "confidence": 0.5}


def _params(crop: dict, **semi) -> dict:
    return {"data": {"source": "tiff", "tiff": {"image": str(crop["image"]), "labels": str(crop["labels"])},
                     "train_slices": 3, "val_slices": 2, "test_slices": 6, "annotations": None,
                     "unlabelled_slices": 12},
            "model": {"decoder_channels": [64, 32, 16, 16, 8]},
            "train": {"patch_size": 96, "patches_per_epoch": 64, "batch_size": 8, "max_epochs": 8, "lr": 0.003,
                      "early_stopping_patience": 6, "semi": {**SEMI, **semi}}}


@pytest.fixture(scope="module")
def crop(tmp_path_factory):
    """40 slices of 256x320 from EPFL testing.tif with their labels, prepared with 12 unlabelled slices."""
    require_shared()
    d = tmp_path_factory.mktemp("semi")
    window = (slice(20, 20 + N), slice(300, 556), slice(400, 720))  # 17% foreground
    with tifffile.TiffFile(EPFL / "testing.tif") as tf:
        image = tf.asarray()[window]
    with tifffile.TiffFile(EPFL / "testing_groundtruth.tif") as tf:
        labels = tf.asarray()[window]
    out = {"dir": d, "image": d / "image.tif", "labels": d / "labels.tif", "stack": image}
    tifffile.imwrite(out["image"], image)
    tifffile.imwrite(out["labels"], labels)
    out["params"] = parse_params(_params(out))
    fetch_raw(out["params"].data, d / "raw")
    out["manifest"] = prepare(out["params"].data, d / "raw", d / "prep")
    return out


def test_unlabelled_slices_are_the_stacks_own_images_away_from_held_out_slices(crop):
    m = crop["manifest"]
    zs = m["unlabelled"]["slices"]
    assert len(zs) == 12 and len(set(zs)) == 12
    train, val, test = (m["splits"][s]["slices"] for s in ("train", "val", "test"))
    gap = m["min_gap"]
    assert not set(zs) & set(train)
    assert all(abs(z - h) >= gap for z in zs for h in val + test), (zs, val, test)
    assert max(zs) - min(zs) > N // 2  # spread over the stack, not bunched
    pool = load_unlabelled(crop["dir"] / "prep")
    mean, std = stack_stats(inspect_stack(crop["dir"] / "raw" / "train_image.tif"))
    assert pool.shape == (12, 256, 320)
    for i, z in enumerate(zs):
        np.testing.assert_allclose(pool[i], normalise(crop["stack"][z], mean, std), atol=1e-6)
    # No labels are written for them.
    assert not (crop["dir"] / "prep" / "unlabelled_labels.npy").exists()


def test_semi_settings_are_checked(crop, tmp_path):
    with pytest.raises(ConfigError, match="train.semi.weight: 1 needs unlabelled slices"):
        parse_params({"train": {"semi": {"weight": 1.0}}})
    too_many = parse_params({**_params(crop), "data": {**_params(crop)["data"], "unlabelled_slices": 30}})
    fetch_raw(too_many.data, tmp_path / "raw")
    with pytest.raises(ConfigError, match="data.unlabelled_slices: 30 asked, but only"):
        prepare(too_many.data, tmp_path / "raw", tmp_path / "prep")
    assert not (tmp_path / "prep").exists()  # all or nothing
    # Off by default, and then the run's identity (checkpoint resume, tuning study) is as before.
    assert "semi" not in parse_params({}).train.identity()


def _module(params, semi: bool) -> SegmentationModule:
    torch.manual_seed(0)
    cfg = params.train
    module = SegmentationModule(model_spec(params.model), lr=0.003, weight_decay=0.0, loss=cfg.loss.model_dump(),
                                semi=cfg.semi.model_dump() if semi else None)
    module.start_teacher()
    return module


def _grads(module, loss) -> list[torch.Tensor]:
    module.zero_grad()
    loss.backward()
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in module.net.parameters()]


def test_the_consistency_loss_changes_training_only_through_unlabelled_pixels(crop):
    x, y = load_split(crop["dir"] / "prep", "train")
    pool = load_unlabelled(crop["dir"] / "prep")
    xb = torch.from_numpy(np.ascontiguousarray(x[:2, None, :96, :96]))
    yb = torch.from_numpy(np.ascontiguousarray(y[:2, None, :96, :96]).astype(np.int64))
    ub = torch.from_numpy(np.ascontiguousarray(pool[:2, None, 64:160, 64:160]))
    params = crop["params"]
    semi = _module(params, semi=True)
    plain = _module(params, semi=False)
    assert plain.teacher is None and semi.teacher is not None
    assert not any(p.requires_grad for p in semi.teacher.parameters())
    loss_args = params.train.loss.model_dump()
    # Same starting weights and random stream (EfficientNet drops connections at random in training):
    # the plain step's loss is the semi step's supervised part.
    torch.manual_seed(1)
    plain_loss = float(plain.training_step((xb, yb), 0))
    torch.manual_seed(1)
    assert float(segmentation_loss(semi(xb).float(), yb, **loss_args)) == pytest.approx(plain_loss, rel=1e-6)

    def parts(labels):
        """The semi step's total loss and gradient, and its supervised and consistency parts on their own
        (the same random stream: the supervised pass draws first, then the consistency pass)."""
        torch.manual_seed(1)
        total = semi.training_step((xb, labels, ub), 0)
        g_total = _grads(semi, total)
        torch.manual_seed(1)
        sup = segmentation_loss(semi(xb).float(), labels, **loss_args)
        cons = semi.consistency(ub)
        return float(total), g_total, float(sup), _grads(semi, sup), float(cons), _grads(semi, SEMI["weight"] * cons)

    total, g_total, sup, g_sup, cons, g_cons = parts(yb)
    assert cons > 0  # the perturbed student and the clean teacher disagree
    assert total == pytest.approx(sup + SEMI["weight"] * cons, rel=1e-5)
    for a, b, c in zip(g_total, g_sup, g_cons):
        torch.testing.assert_close(a, b + c, rtol=1e-4, atol=1e-6)
    assert any(float(c.abs().max()) > 0 for c in g_cons)  # the unlabelled pixels do pull
    # Labels never reach the consistency term: other labels change the supervised part only.
    total2, g_total2, sup2, g_sup2, cons2, g_cons2 = parts(1 - yb.clamp(max=1))
    assert sup2 != pytest.approx(sup) and cons2 == pytest.approx(cons, rel=1e-6)
    for a, b in zip(g_cons, g_cons2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # Weight 0: the batch's unlabelled patches are not even looked at.
    off = _module(parse_params(_params(crop, weight=0.0)), semi=True)
    assert off.teacher is None


def test_consistency_loss_masks_unsure_teacher_pixels():
    student = torch.tensor([[[[0.0, 3.0]]]])
    teacher = torch.tensor([[[[0.1, -3.0]]]])  # first pixel: p = 0.52, unsure; second: p = 0.05, sure
    every = consistency_loss(student, teacher, 0.5)
    sure = consistency_loss(student, teacher, 0.9)
    s, t = torch.sigmoid(student), torch.sigmoid(teacher)
    assert float(every) == pytest.approx(float(((s - t) ** 2).mean()))
    assert float(sure) == pytest.approx(float((s[..., 1] - t[..., 1]) ** 2 / 2))


def test_mean_teacher_trains_on_epfl_and_the_teacher_averages_the_student(crop, tmp_path):
    from emseg.model.train import fit

    params = parse_params(_params(crop, weight=1.0, rampup_epochs=2))
    res = fit(params, crop["dir"] / "prep", tmp_path / "work", lr=0.003, batch_size=8, progress=False)
    truth_fg = float(np.mean(tifffile.imread(crop["labels"]) > 0))
    # Calling every pixel foreground scores IoU = the foreground fraction; training must do far better.
    assert res.best_score > max(0.4, 3 * truth_fg), (res.best_score, truth_fg)
    consistency = [r["train_consistency"] for r in res.history]
    assert len(consistency) == len(res.history) and all(c > 0 for c in consistency)
    # The checkpoint holds the teacher beside the network, and it differs from the network (an average).
    state = torch.load(res.best_checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    teacher = {k[len("teacher."):]: v for k, v in state.items() if k.startswith("teacher.")}
    student = {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}
    assert teacher.keys() == student.keys()
    diffs = [float((teacher[k].float() - student[k].float()).abs().max()) for k in student if "weight" in k]
    assert max(diffs) > 0
    # What fit returns is the network alone, loadable like any other.
    assert not any(k.startswith("teacher") for k in res.net.state_dict())


def test_semi_on_device_patches_pairs_each_batch_with_unlabelled_patches_of_the_pool(crop, tmp_path):
    """`train.device_patches: on` with train.semi (here on the CPU, as on a GPU): each training batch is
    (image, label, unlabelled image), cut on the device, and the consistency loss trains on it."""
    from lightning.pytorch.callbacks import Callback

    from emseg.data.device_patches import DevicePatchStream
    from emseg.model.train import fit

    seen = []

    class Batches(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((type(trainer.datamodule.train_set), [tuple(t.shape) for t in batch]))

    raw = _params(crop, weight=1.0, rampup_epochs=0)
    raw["train"].update(device_patches="on", max_epochs=2, patches_per_epoch=16)
    res = fit(parse_params(raw), crop["dir"] / "prep", tmp_path / "work", lr=0.003, batch_size=4, progress=False,
              checkpoints=False, callbacks=[Batches()])
    assert res.epochs == 2 and len(seen) == 2 * 16 // 4
    assert all(kind is DevicePatchStream and shapes == [(4, 1, 96, 96), (4, 1, 96, 96), (4, 1, 96, 96)]
               for kind, shapes in seen)
    assert all(r["train_consistency"] > 0 for r in res.history)
