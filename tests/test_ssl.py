"""Self-supervised pretraining (pipelines/ssl): the U-Net restores masked patches of the project's own
unlabelled slices, is registered as @ssl, and fine-tuning starts from it through train.init.

On a crop of the real EPFL stack (training.tif), run for real through DVC and MLflow's registry."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import torch

from conftest import EPFL, make_project, mlflow_client, require_shared, run_cli, write_params
from emseg.model.ssl import Corruption, RestorationPatches, Volume, restoration_loss

SSL = {"patch_size": 96, "patches_per_epoch": 48, "batch_size": 8, "max_epochs": 6, "max_minutes": 10,
       "val_slices": 2, "lr": 0.003}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project on 36 slices of 256x320 of EPFL training.tif (tiff source, test block in the same
    stack), after `dvc repro pipelines/ssl/dvc.yaml`."""
    require_shared()
    d = tmp_path_factory.mktemp("ssl")
    window = (slice(0, 36), slice(300, 556), slice(400, 720))
    for name, out in (("training.tif", "image.tif"), ("training_groundtruth.tif", "labels.tif")):
        with tifffile.TiffFile(EPFL / name) as tf:
            tifffile.imwrite(d / out, tf.asarray()[window])
    proj = make_project(d / "proj")
    write_params(proj, {"data": {"source": "tiff", "tiff": {"image": str(d / "image.tif"),
                                                            "labels": str(d / "labels.tif")},
                                 "train_slices": 3, "val_slices": 2, "test_slices": 6, "annotations": None},
                        "model": {"decoder_channels": [64, 32, 16, 16, 8]},
                        "train": {"patch_size": 96, "patches_per_epoch": 32, "batch_size": 8, "max_epochs": 1,
                                  "use_tuned": False},
                        "ssl": SSL})
    proc = run_cli(["dvc", "repro", "pipelines/ssl/dvc.yaml"], proj, check=True)
    return proj, proc


def test_ssl_learns_to_restore_real_em_from_slices_away_from_validation_and_test(project):
    proj, proc = project
    m = json.loads((proj / "reports/ssl/metrics.json").read_text())
    manifest = json.loads((proj / "data/prepared/manifest.json").read_text())
    held = manifest["splits"]["val"]["slices"] + manifest["splits"]["test"]["slices"]
    own = m["stacks"][0]
    gap = manifest["min_gap"]
    used = own["slices"] + own["val_slices"]
    # Every slice at least min_gap from validation and test is used (training slices too), none nearer.
    assert sorted(used) == [z for z in range(36) if all(abs(z - h) >= gap for h in held)]
    assert own["held_out"] == sorted(held) and set(manifest["splits"]["train"]["slices"]) <= set(used)
    # Restoration was learnt: the blanked pixels of the validation patches come back better than the
    # untrained network gave them, and better than the patch's own visible mean (what a no-op offers).
    assert m["epochs"] == SSL["max_epochs"]
    assert m["val_masked_mse"] < 0.8 * m["val_masked_mse_before"], m
    assert m["val_masked_mse"] < 0.85 * m["val_masked_mse_mean_fill"], m
    assert "registered emseg-ssl version 1 as @ssl" in proc.stdout
    assert (proj / "reports/ssl/curves.png").stat().st_size > 10_000
    client = mlflow_client(proj)
    mv = client.get_model_version_by_alias("emseg-ssl", "ssl")
    assert mv.tags["emseg.kind"].startswith("ssl") and mv.run_id == m["run_id"]


def test_fine_tuning_starts_from_the_ssl_model_through_train_init(project):
    """train.init {mode: registry, uri: models:/emseg-ssl@ssl}: the registry version's weights, fetched as
    `emseg train` fetches them, are the network's starting point, and they are not a fresh network's."""
    from emseg import registry
    from emseg.config import load_params
    from emseg.model.network import build_network, initialise, load_weights

    proj, _ = project
    write_params(proj, {"train": {"init": {"mode": "registry", "uri": "models:/emseg-ssl@ssl"}}})
    params = load_params(proj / "params.yaml")
    with registry.local_init(params, root=proj) as p:
        net = build_network(p.model)
        desc = initialise(net, p.train.init)
    assert desc.startswith("registry:models:/emseg-ssl/1 ("), desc
    ssl, _ = load_weights(proj / "models/ssl.pt")
    assert all(torch.equal(v, ssl.state_dict()[k]) for k, v in net.state_dict().items())
    fresh = build_network(p.model).state_dict()
    encoder = [k for k in fresh if k.startswith("net.encoder.") and fresh[k].is_floating_point()
               and "running" not in k and "num_batches" not in k]
    assert sum(not torch.equal(ssl.state_dict()[k], fresh[k]) for k in encoder) > 0.9 * len(encoder)


def test_restoration_patches_blank_blocks_on_every_slice_and_target_the_clean_centre():
    rng = np.random.default_rng(0)
    data = rng.normal(size=(7, 64, 80)).astype(np.float16)
    vol = Volume("v", data, {z: z for z in range(7)}, 7, [0, 3, 6])
    patches = RestorationPatches([vol], 3, 32, 8, Corruption(32, (4, 6), (0.1, 0.25), noise=0.0), None, seed=1)
    x, target, mask = patches[5]
    assert x.shape == (3, 32, 32) and target.shape == mask.shape == (1, 32, 32)
    blanked = mask[0] == 1
    assert 0.02 < float(blanked.float().mean()) < 0.6
    assert torch.all(x[:, blanked] == 0)  # the same blocks blanked on the slice and its neighbours
    # Outside the blocks the input is the clean patch; the target is its centre slice, blanked nowhere.
    assert torch.equal(x[1][~blanked], target[0][~blanked])
    assert float(target[0][blanked].abs().mean()) > 0.3
    again = patches[5]
    assert all(torch.equal(a, b) for a, b in zip((x, target, mask), again))  # deterministic per index
    # The loss is the blanked pixels' error (+ a share of the visible ones'): a perfect copy of the
    # input scores the blanked error alone.
    loss, masked = restoration_loss(x[1:2][None], target[None], mask[None], visible_weight=0.1)
    assert torch.isclose(loss, masked) and float(masked) > 0.3
