"""Bad input through the real CLI: one clear line naming the problem, exit 1, no partial output."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from conftest import SMALL_GENERATED, make_project, run_cli, write_params
from emseg.data.generate import generate_slice


@pytest.fixture()
def project(tmp_path):
    return make_project(tmp_path / "proj", git=False)


def _stacks(n=10, h=192, w=192):
    img = np.stack([generate_slice(5, z, h, w)[0] for z in range(n)])
    lab = np.stack([generate_slice(5, z, h, w)[1] for z in range(n)])
    return img, lab


def _tiff_source(project, img_path, lab_path, **data):
    write_params(project, {"data": {"source": "tiff", "train_slices": 2, "val_slices": 1, "test_slices": 2,
                                    "tiff": {"image": str(img_path), "labels": str(lab_path)}, **data}})


def _fails_cleanly(project, expect: str, stages=("fetch", "prepare")):
    """Run the stages in order; the first failing one must print one line containing ``expect``."""
    for stage in stages:
        proc = run_cli(["emseg", stage], project)
        if proc.returncode != 0:
            break
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "%|" not in ln and "it/s" not in ln]
    assert len(lines) == 1, proc.stderr
    assert expect in lines[0], lines[0]
    assert "Traceback" not in proc.stderr
    # Nothing half-written where a stage would take it as valid.
    if stage == "fetch":
        assert not (project / "data" / "raw").exists()
    assert not (project / "data" / "prepared").exists()
    leftovers = [p.name for p in (project / "data").glob(".*")] if (project / "data").exists() else []
    assert leftovers == []
    return lines[0]


def test_missing_file(project, tmp_path):
    _tiff_source(project, tmp_path / "nope.tif", tmp_path / "lab.tif")
    _fails_cleanly(project, "nope.tif: file or folder not found")


def test_unreadable_file(project, tmp_path):
    bad = tmp_path / "random.tif"
    bad.write_bytes(np.random.default_rng(0).bytes(5000))
    _tiff_source(project, bad, bad)
    _fails_cleanly(project, "random.tif: not a readable TIFF file")


def test_truncated_tiff(project, tmp_path):
    img, lab = _stacks()
    tifffile.imwrite(tmp_path / "img.tif", img, compression="zlib")
    data = (tmp_path / "img.tif").read_bytes()
    (tmp_path / "img.tif").write_bytes(data[: len(data) * 2 // 3])
    tifffile.imwrite(tmp_path / "lab.tif", lab)
    _tiff_source(project, tmp_path / "img.tif", tmp_path / "lab.tif")
    line = _fails_cleanly(project, "img.tif")
    assert "TIFF" in line


def test_image_label_shape_mismatch(project, tmp_path):
    img, lab = _stacks()
    tifffile.imwrite(tmp_path / "img.tif", img)
    tifffile.imwrite(tmp_path / "lab.tif", lab[:, :, :40])
    _tiff_source(project, tmp_path / "img.tif", tmp_path / "lab.tif")
    _fails_cleanly(project, "lab.tif: label stack shape (10, 192, 40) differs from image stack")


def test_label_values_outside_the_convention(project, tmp_path):
    img, lab = _stacks()
    lab[1, :3, :3] = 7
    tifffile.imwrite(tmp_path / "img.tif", img)
    tifffile.imwrite(tmp_path / "lab.tif", lab)
    _tiff_source(project, tmp_path / "img.tif", tmp_path / "lab.tif", train_slices=[1, 2], val_slices=[3])
    _fails_cleanly(project, "lab.tif: label values [7] unexpected; expected {0, 255} or {0, 1}")


def test_four_d_array(project, tmp_path):
    img, lab = _stacks()
    tifffile.imwrite(tmp_path / "img4d.tif", np.stack([img, img]))
    tifffile.imwrite(tmp_path / "lab.tif", lab)
    _tiff_source(project, tmp_path / "img4d.tif", tmp_path / "lab.tif")
    _fails_cleanly(project, "img4d.tif: expected a 2D slice or a 3D (z, y, x) grey stack, got 4D")


def test_one_d_array(project, tmp_path):
    tifffile.imwrite(tmp_path / "line.tif", np.arange(64, dtype=np.uint8))
    img, lab = _stacks()
    tifffile.imwrite(tmp_path / "lab.tif", lab)
    _tiff_source(project, tmp_path / "line.tif", tmp_path / "lab.tif")
    _fails_cleanly(project, "line.tif: expected a 2D slice or a 3D (z, y, x) grey stack, got 1D shape (64,)")


def test_empty_stack(project, tmp_path):
    (tmp_path / "empty").mkdir()
    img, lab = _stacks()
    tifffile.imwrite(tmp_path / "lab.tif", lab)
    _tiff_source(project, tmp_path / "empty", tmp_path / "lab.tif")
    _fails_cleanly(project, "empty: folder holds no .tif/.tiff/.png slices")


def test_slice_list_outside_the_stack(project, tmp_path):
    img, lab = _stacks()
    tifffile.imwrite(tmp_path / "img.tif", img)
    tifffile.imwrite(tmp_path / "lab.tif", lab)
    _tiff_source(project, tmp_path / "img.tif", tmp_path / "lab.tif", train_slices=[0, 17])
    _fails_cleanly(project, "data.train_slices: slices [17] are outside the stack (0..9)")


def test_unknown_key_in_params(project):
    write_params(project, {"data": {"trian_slices": 3}})
    _fails_cleanly(project, "params.yaml: data.trian_slices: unknown key", stages=("fetch",))


def test_wrong_type_in_params(project):
    write_params(project, {"data": {"train_slices": "twelve"}})
    line = _fails_cleanly(project, "params.yaml: data.train_slices", stages=("fetch",))
    assert "'twelve'" in line


def test_constant_image(project, tmp_path):
    img, lab = _stacks()
    tifffile.imwrite(tmp_path / "img.tif", np.full_like(img, 90))
    tifffile.imwrite(tmp_path / "lab.tif", lab)
    _tiff_source(project, tmp_path / "img.tif", tmp_path / "lab.tif")
    _fails_cleanly(project, "img.tif: image stack is constant")


def test_all_background_labels(project, tmp_path):
    img, lab = _stacks()
    tifffile.imwrite(tmp_path / "img.tif", img)
    tifffile.imwrite(tmp_path / "lab.tif", np.zeros_like(lab))
    _tiff_source(project, tmp_path / "img.tif", tmp_path / "lab.tif")
    _fails_cleanly(project, "lab.tif: the training slices [0, 3] hold no foreground")


def test_good_run_after_bad_one_replaces_nothing_it_should_not(project):
    """A failed prepare leaves an earlier good output untouched."""
    write_params(project, SMALL_GENERATED)
    run_cli(["emseg", "fetch"], project, check=True)
    run_cli(["emseg", "prepare"], project, check=True)
    before = (project / "data" / "prepared" / "manifest.json").read_bytes()
    write_params(project, {"data": {"train_slices": [0, 99]}})
    proc = run_cli(["emseg", "prepare"], project)
    assert proc.returncode == 1 and "outside the stack" in proc.stderr
    assert (project / "data" / "prepared" / "manifest.json").read_bytes() == before


def test_nan_in_image(project, tmp_path):
    img, lab = _stacks()
    img = img.astype(np.float32)
    img[1, 10:20, 10:20] = np.nan
    tifffile.imwrite(tmp_path / "img.tif", img)
    tifffile.imwrite(tmp_path / "lab.tif", lab)
    _tiff_source(project, tmp_path / "img.tif", tmp_path / "lab.tif")
    _fails_cleanly(project, "img.tif slice 1: image holds NaN or infinite values")


def test_ignore_value_covering_everything(project, tmp_path):
    img, lab = _stacks()
    tifffile.imwrite(tmp_path / "img.tif", img)
    tifffile.imwrite(tmp_path / "lab.tif", np.full_like(lab, 128))
    _tiff_source(project, tmp_path / "img.tif", tmp_path / "lab.tif", ignore_value=128)
    _fails_cleanly(project, "every pixel of the train slices [0, 3] is the ignore value")


@pytest.mark.parametrize("updates, expect", [
    ({"train": {"lr": 0}}, "params.yaml: train.lr: Input should be greater than 0 (got 0)"),
    ({"train": {"lr": -0.001}}, "params.yaml: train.lr: Input should be greater than 0 (got -0.001)"),
    ({"train": {"batch_size": 0}}, "params.yaml: train.batch_size: Input should be greater than 0 (got 0)"),
    ({"tune": {"batch_sizes": [4, -8]}}, "params.yaml: tune.batch_sizes.1: Input should be greater than 0"),
])
def test_non_positive_learning_rate_or_batch_size(project, updates, expect):
    write_params(project, updates)
    _fails_cleanly(project, expect, stages=("fetch",))


@pytest.mark.parametrize("updates, expect", [
    ({"train": {"patch_size": 512}}, "params.yaml: train.patch_size: 512 is larger than the slices (256x320)"),
    ({"model": {"encoder": "efficientnet-b99"}}, "params.yaml: model.encoder: 'efficientnet-b99' is not an encoder"),
])
def test_training_settings_that_cannot_work_stop_train_before_it_writes(project, updates, expect):
    write_params(project, {**SMALL_GENERATED, "train": {"use_tuned": False}})
    run_cli(["emseg", "fetch"], project, check=True)
    run_cli(["emseg", "prepare"], project, check=True)
    write_params(project, updates)
    proc = run_cli(["emseg", "train"], project)
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "%|" not in ln]
    assert len(lines) == 1 and expect in lines[0], proc.stderr
    assert not (project / "models" / "model.pt").exists() and not (project / "reports" / "train").exists()
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
    runs = mlflow.search_runs(search_all_experiments=True)
    assert set(runs["status"] if len(runs) else []) <= {"FAILED"}  # a run it opened ends FAILED, never RUNNING


@pytest.mark.parametrize("updates, key", [
    ({"tracking": {"artifact_root": "../elsewhere/artifacts"}}, "tracking.artifact_root"),
    ({"tracking": {"tracking_uri": "sqlite:///../../mlflow.db"}}, "tracking.tracking_uri"),
    ({"tune": {"storage": "sqlite:///optuna/../../study.db"}}, "tune.storage"),
    ({"data": {"epfl": {"cache_dir": "cache/../../c"}}}, "data.epfl.cache_dir"),
])
def test_written_paths_stay_inside_the_project_unless_absolute(project, tmp_path, updates, key):
    write_params(project, updates)
    line = _fails_cleanly(project, f"params.yaml: {key}: ", stages=("fetch",))
    assert "leads outside the project" in line and "give an absolute path" in line
    assert not (project.parent / "elsewhere").exists() and not (project.parent / "mlflow.db").exists()
    if key == "tracking.artifact_root":  # the same place given as an absolute path is taken as meant
        from emseg.config import load_params

        write_params(project, {"tracking": {"artifact_root": str(tmp_path / "elsewhere")}})
        assert load_params(project / "params.yaml").tracking.artifact_root == str(tmp_path / "elsewhere")
