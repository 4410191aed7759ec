"""Data layer: generator, stack reading, preparation on real EPFL stacks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
from PIL import Image
from scipy import ndimage

from conftest import EPFL
from emseg import IGNORE
from emseg.config import parse_params
from emseg.data.generate import generate_slice
from emseg.data.io import StackReader, inspect_stack, sha256_of
from emseg.data.prepare import choose_splits, load_split, prepare, select_slices, split_distances
from emseg.errors import ConfigError, DataError
from emseg.data.sources import fetch_raw


def test_generator_is_deterministic_and_em_like():
    a_img, a_lab = generate_slice(0, 3, 384, 512)
    b_img, b_lab = generate_slice(0, 3, 384, 512)
    c_img, _ = generate_slice(0, 4, 384, 512)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_lab, b_lab)
    assert not np.array_equal(a_img, c_img)
    assert a_img.dtype == np.uint8 and set(np.unique(a_lab)) == {0, 255}
    fg = a_lab > 0
    assert 0.02 < fg.mean() < 0.15  # EPFL has ~5 % mitochondria
    # Mitochondria are darker than the cytoplasm around them, but no grey-value threshold segments
    # them: membranes, vesicles and noise are as dark (the best threshold's IoU stays low).
    assert a_img[fg].mean() < a_img[~fg].mean() - 15
    best = max(((a_img < t) & fg).sum() / ((a_img < t) | fg).sum() for t in range(40, 200, 2))
    assert best < 0.7
    # Some objects touch: fewer connected components than drawn objects across a few slices.
    n_comp = sum(ndimage.label(generate_slice(0, z, 384, 512)[1] > 0)[1] for z in range(4))
    assert n_comp > 8


def test_select_slices_spreads_evenly_and_checks_lists():
    assert select_slices(3, range(10), "k", 10) == [0, 4, 9] or select_slices(3, range(10), "k", 10) == [0, 5, 9]
    assert select_slices(1, range(10), "k", 10) == [5]
    assert select_slices([1, 7], range(10), "k", 10) == [1, 7]
    assert len(set(select_slices(12, range(165), "k", 165))) == 12
    sel = select_slices(12, range(165), "k", 165)
    assert np.diff(sel).min() >= 13  # spread through the whole stack, not bunched


def test_reads_real_epfl_stack_slice_by_slice():
    info = inspect_stack(EPFL / "training.tif")
    assert info.shape == (165, 768, 1024) and info.dtype == np.uint8
    with StackReader(info) as r:
        s = r.read(100)
    assert np.array_equal(s, tifffile.imread(EPFL / "training.tif", key=100))


def test_folder_of_png_and_tiff_slices_reads_like_a_stack(tmp_path):
    stack = np.stack([generate_slice(1, z, 64, 80)[0] for z in range(3)])
    (tmp_path / "png").mkdir()
    (tmp_path / "tif").mkdir()
    for z, sl in enumerate(stack):
        Image.fromarray(sl).save(tmp_path / "png" / f"s{z:03d}.png")
        tifffile.imwrite(tmp_path / "tif" / f"s{z:03d}.tif", sl.astype(np.uint16) * 100)
    for sub, scale in (("png", 1), ("tif", 100)):
        info = inspect_stack(tmp_path / sub)
        assert info.shape == (3, 64, 80)
        with StackReader(info) as r:
            got = np.stack(list(r))
        assert np.array_equal(got, stack.astype(np.int64) * scale)


def _tiff_params(img, lab, **data):
    return parse_params({"data": {"source": "tiff", "tiff": {"image": str(img), "labels": str(lab)}, **data}}).data


def test_prepare_epfl_with_twelve_slices(tmp_path):
    params = parse_params({"data": {
        "source": "tiff", "train_slices": 12, "val_slices": 3,
        "tiff": {"image": str(EPFL / "training.tif"), "labels": str(EPFL / "training_groundtruth.tif"),
                 "test_image": str(EPFL / "testing.tif"), "test_labels": str(EPFL / "testing_groundtruth.tif")},
    }}).data
    desc = fetch_raw(params, tmp_path / "raw")
    assert desc["files"]["train_image"]["sha256"] == sha256_of(EPFL / "training.tif")
    manifest = prepare(params, tmp_path / "raw", tmp_path / "prepared")
    on_disk = json.loads((tmp_path / "prepared" / "manifest.json").read_text())
    assert on_disk == json.loads(json.dumps(manifest))
    train = manifest["splits"]["train"]
    assert len(train["slices"]) == 12 and train["shape"] == [12, 768, 1024]
    assert not set(train["slices"]) & set(manifest["splits"]["val"]["slices"])
    # Validation slices are a full spacing from every training slice (they were the 5-nm neighbours of
    # training slices before min_gap): 15 slots over 165 slices, about 11 apart.
    gaps = [min(abs(v - t) for t in train["slices"]) for v in manifest["splits"]["val"]["slices"]]
    assert min(gaps) >= 10 and manifest["nearest_other_split"]["val"] == min(gaps)
    assert manifest["splits"]["test"]["shape"] == [82, 768, 1024]
    assert 0.03 < train["foreground_fraction"] < 0.09  # the README says ~5.3 %
    x, y = load_split(tmp_path / "prepared", "train")
    assert x.dtype == np.float32 and y.dtype == np.uint8
    assert set(np.unique(y[0])) <= {0, 1}
    # Each prepared slice is the raw slice, z-scored with the stack's statistics.
    raw = tifffile.imread(EPFL / "training.tif", key=train["slices"][5]).astype(np.float32)
    norm = manifest["normalisation"]["train"]
    assert np.allclose(x[5], (raw - norm["mean"]) / norm["std"], atol=1e-4)
    gt = tifffile.imread(EPFL / "training_groundtruth.tif", key=train["slices"][5])
    assert np.array_equal(y[5], (gt == 255).astype(np.uint8))


def test_ignore_value_becomes_internal_ignore(tmp_path):
    img = np.stack([generate_slice(2, z, 256, 256)[0] for z in range(12)])
    lab = np.stack([generate_slice(2, z, 256, 256)[1] for z in range(12)])
    lab[:, :, 128:] = 128  # right half not annotated
    tifffile.imwrite(tmp_path / "img.tif", img)
    tifffile.imwrite(tmp_path / "lab.tif", lab)
    params = _tiff_params(tmp_path / "img.tif", tmp_path / "lab.tif", train_slices=3, val_slices=1,
                          test_slices=2, ignore_value=128)
    fetch_raw(params, tmp_path / "raw")
    m = prepare(params, tmp_path / "raw", tmp_path / "prep")
    _, y = load_split(tmp_path / "prep", "train")
    assert (y[:, :, 128:] == IGNORE).all() and set(np.unique(y[:, :, :128])) <= {0, 1}
    assert m["splits"]["train"]["labelled_fraction"] == pytest.approx(0.5)
    assert m["splits"]["test"]["slices"] == [10, 11]  # held-out block at the end of the stack
    assert m["min_gap"] == 2 and min(m["nearest_other_split"].values()) >= 2


@pytest.mark.parametrize("n, train, val, test, gap", [
    (165, 12, 3, None, 2), (32, 12, 3, None, 2), (40, 12, 3, 5, 2), (165, [0, 1, 2], 2, None, 3),
    (100, 6, [10, 50], 20, 4), (12, 4, 1, 2, 1),
])
def test_splits_keep_min_gap_and_put_validation_far_from_training(n, train, val, test, gap):
    s = choose_splits(n, train, val, test, gap)
    assert len(s["train"]) == (train if isinstance(train, int) else len(train))
    assert len(s["val"]) == (val if isinstance(val, int) else len(val))
    d = split_distances(s)
    assert min(v for v in d.values() if v is not None) >= gap
    if isinstance(val, int) and isinstance(train, int):
        # Interleaved: each validation slice is as far from training as the even spacing allows.
        spacing = (n - (test or 0) - (gap if test else 0)) / (train + val)
        assert d["val"] >= int(spacing) - 1
    if isinstance(train, list):  # a given training list: validation goes to the far end
        assert min(s["val"]) > 60


@pytest.mark.parametrize("n, train, val, test, gap, expect", [
    (16, 12, 3, None, 2, "data.train_slices + data.val_slices: 15 slice(s) asked, but only 8 fit"),
    (20, [0, 2, 4], [5], None, 2, "data.train_slices / data.val_slices: train slice 4 and val slice 5 are 1 apart"),
    (20, [8, 12], 1, [9], 2, "data.train_slices / data.test_slices: train slice 8 and test slice 9 are 1 apart"),
])
def test_splits_that_cannot_keep_the_gap_are_one_line(n, train, val, test, gap, expect):
    with pytest.raises(ConfigError, match="min_gap") as err:
        choose_splits(n, train, val, test, gap)
    assert expect in str(err.value) and "\n" not in str(err.value)


def _painted_round(folder, stack_path, z):
    """An `emseg suggest` round cut from slice z of stack_path, with one painted template."""
    folder.mkdir(parents=True)
    crop = tifffile.imread(stack_path, key=z)[:64, :64]
    tifffile.imwrite(folder / "01_image.tif", crop)
    lab = np.full((64, 64), 128, np.uint8)
    lab[:8, :8] = 255
    lab[8:16, :8] = 0
    tifffile.imwrite(folder / "01_labels.tif", lab)
    meta = {"blank": 128, "normalisation": {"mean": 100.0, "std": 30.0}, "input": str(stack_path),
            "input_sha256": sha256_of(stack_path),
            "suggestions": [{"rank": 1, "slice": z, "y": 0, "x": 0, "image": "01_image.tif",
                             "labels": "01_labels.tif"}]}
    (folder / "suggestions.json").write_text(json.dumps(meta))


def test_painted_crops_from_validation_or_test_slices_are_refused(tmp_path):
    img = np.stack([generate_slice(3, z, 256, 256)[0] for z in range(20)])
    lab = np.stack([generate_slice(3, z, 256, 256)[1] for z in range(20)])
    tifffile.imwrite(tmp_path / "img.tif", img)
    tifffile.imwrite(tmp_path / "lab.tif", lab)
    params = _tiff_params(tmp_path / "img.tif", tmp_path / "lab.tif", train_slices=4, val_slices=1, test_slices=4,
                          annotations=str(tmp_path / "ann"))
    fetch_raw(params, tmp_path / "raw")
    splits = choose_splits(20, 4, 1, 4, 2)
    val_z, test_z, far = splits["val"][0], splits["test"][0], splits["train"][0]
    for z, split in ((val_z, "validation"), (val_z + 1, "validation"), (test_z, "test")):
        _painted_round(tmp_path / "ann" / f"z{z}", tmp_path / "img.tif", z)
        with pytest.raises(DataError, match=f"painted crop of slice {z} lies .* from {split} slice"):
            prepare(params, tmp_path / "raw", tmp_path / "prep")
        assert not (tmp_path / "prep").exists()
        import shutil

        shutil.rmtree(tmp_path / "ann" / f"z{z}")
    _painted_round(tmp_path / "ann" / "ok", tmp_path / "img.tif", far)  # a training slice: welcome
    m = prepare(params, tmp_path / "raw", tmp_path / "prep")
    assert m["annotations"]["patches"] == 1
