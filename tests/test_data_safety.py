"""Never lose or mangle a user's data: every case of the data-safety issue, through the real `emseg` CLI.

Each test runs `emseg` as a user would (a subprocess, in a folder of the user's own files) and checks
what is left on disk afterwards: the inputs byte for byte, nothing temporary, nothing outside the
output. A refusal is exactly one line on stderr and exit status 1.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from conftest import EPFL, SMALL_GENERATED, make_project, run_cli, write_params


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A small real network (EfficientNet-b0 encoder, narrow decoder): untrained, enough for file handling."""
    from emseg.config import ModelParams
    from emseg.model.network import build_network, save_weights

    path = tmp_path_factory.mktemp("weights") / "model.pt"
    save_weights(build_network(ModelParams(decoder_channels=[16, 16, 16, 16, 8])), path)
    return path


def epfl_slices(n: int, size: int = 96) -> np.ndarray:
    """n real EM crops (uint8) from the EPFL test stack."""
    return tifffile.imread(EPFL / "testing.tif", key=range(n))[:, 200:200 + size, 300:300 + size]


def tree(root: Path) -> dict[str, str]:
    """Every file and folder under root (links not followed) -> a hash of its bytes ('dir' for folders)."""
    out = {}
    for here, dirs, files in os.walk(root, followlinks=False):
        for d in dirs:
            out[str(Path(here, d).relative_to(root))] = "dir"
        for f in files:
            p = Path(here, f)
            out[str(p.relative_to(root))] = ("link:" + os.readlink(p)) if p.is_symlink() else \
                hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def one_line(proc: subprocess.CompletedProcess, expect: str) -> str:
    """The command refused: exit 1, exactly one line on stderr (besides progress bars), no traceback."""
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "%|" not in ln and "it/s]" not in ln]
    assert len(lines) == 1, proc.stderr
    assert expect in lines[0], lines[0]
    return lines[0]


def emseg(cwd: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    return run_cli(["emseg", *args], cwd, **kw)


@pytest.fixture()
def user(tmp_path) -> Path:
    """A user's folder: a stack, notes beside it, nothing else."""
    d = tmp_path / "user"
    (d / "data").mkdir(parents=True)
    tifffile.imwrite(d / "data" / "stack.tif", epfl_slices(4), photometric="minisblack")
    (d / "data" / "notes.md").write_text("my notes\n")
    return d


# 1. --overwrite never deletes an input or a folder emseg did not write ---------------------------------------


@pytest.mark.parametrize("command", ["predict", "suggest"])
@pytest.mark.parametrize("target, expect", [
    ("data", "data: is or contains the input"),  # the input's own folder
    (".", ".: is or contains the input"),  # a parent of it (and the current folder)
    ("data/notes.md", "data/notes.md: is a file, not an emseg output folder"),
    ("data/stack.tif", "data/stack.tif: is or contains the input"),
])
def test_overwrite_never_replaces_the_input_or_a_file(user, weights, command, target, expect):
    before = tree(user)
    extra = ["-k", "1", "--patch-size", "32"] if command == "suggest" else []
    proc = emseg(user, command, "--model", str(weights), "data/stack.tif", target, "--overwrite", *extra)
    one_line(proc, expect)
    assert tree(user) == before  # nothing deleted, replaced or left behind (no .NAME.old-PID, no .tmp)


def test_overwrite_replaces_only_a_folder_emseg_wrote(user, weights):
    (user / "results").mkdir()
    (user / "results" / "figure.svg").write_text("<svg/>")
    before = tree(user)
    proc = emseg(user, "predict", "--model", str(weights), "data/stack.tif", "results", "--overwrite")
    one_line(proc, "results: was not written by emseg (it has no .emseg-output.json)")
    assert tree(user) == before
    # The positive control: an earlier emseg output is replaced, and an empty folder may be used.
    emseg(user, "predict", "--model", str(weights), "data/stack.tif", "pred", check=True)
    first = json.loads((user / "pred" / ".emseg-output.json").read_text())
    assert first["command"] == "predict"
    (user / "pred" / "probabilities.tif").write_bytes(b"stale")
    emseg(user, "predict", "--model", str(weights), "data/stack.tif", "pred", "--overwrite", check=True)
    assert tifffile.imread(user / "pred" / "probabilities.tif").shape == (4, 96, 96)
    (user / "empty").mkdir()
    emseg(user, "predict", "--model", str(weights), "data/stack.tif", "empty", "--overwrite", check=True)
    assert (user / "empty" / "summary.json").is_file()
    assert not [p for p in user.iterdir() if p.name.startswith(".")]


def test_painted_labels_anywhere_below_are_never_replaced(user, weights):
    emseg(user, "suggest", "--model", str(weights), "data/stack.tif", "annotations/round-1", "-k", "2",
          "--patch-size", "32", check=True)
    template = user / "annotations" / "round-1" / "01_labels.tif"
    lab = tifffile.imread(template)
    lab[:4, :4] = 255  # somebody started painting
    tifffile.imwrite(template, lab)
    before = tree(user)
    for target, expect in (("annotations/round-1", "holds painted labels (01_labels.tif)"),
                           ("annotations", "annotations: was not written by emseg")):
        proc = emseg(user, "suggest", "--model", str(weights), "data/stack.tif", target, "--overwrite",
                     "-k", "1", "--patch-size", "32")
        one_line(proc, expect)
        assert tree(user) == before
    # An emseg output folder that holds a painted round below it (moved there by hand) is kept too.
    emseg(user, "predict", "--model", str(weights), "data/stack.tif", "pred", check=True)
    os.rename(user / "annotations" / "round-1", user / "pred" / "round-1")
    proc = emseg(user, "predict", "--model", str(weights), "data/stack.tif", "pred", "--overwrite")
    one_line(proc, "pred: holds painted labels (round-1/01_labels.tif)")
    assert tifffile.imread(user / "pred" / "round-1" / "01_labels.tif")[0, 0] == 255
    # A record that cannot be read is taken as "may be painted": kept, one line.
    emseg(user, "suggest", "--model", str(weights), "data/stack.tif", "round-2", "-k", "1", "--patch-size", "32",
          check=True)
    (user / "round-2" / "suggestions.json").write_text("{not json")
    proc = emseg(user, "suggest", "--model", str(weights), "data/stack.tif", "round-2", "--overwrite",
                 "-k", "1", "--patch-size", "32")
    one_line(proc, "round-2: holds painted labels (01_labels.tif)")


# 2. Interrupted runs leave no temporary output ----------------------------------------------------------------


def _start_predict(cwd: Path, weights: Path, out: str) -> subprocess.Popen:
    # A shell without job control starts background jobs with SIGINT ignored, and Python keeps that
    # (as it should); give the child the default disposition so the test does not depend on how pytest ran.
    return subprocess.Popen(["emseg", "predict", "--model", str(weights), "big.tif", out], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_temporary(parent: Path, proc: subprocess.Popen) -> Path:
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        tmp = [p for p in parent.glob(".pred.tmp-*")] if parent.exists() else []
        if tmp and (list(tmp[0].glob("*.npy")) or list(tmp[0].glob("*.tif"))):
            return tmp[0]
        time.sleep(0.1)
    raise AssertionError(f"predict never started writing ({proc.poll()}): {proc.communicate()}")


@pytest.fixture()
def big_stack(tmp_path) -> Path:
    d = tmp_path / "big"
    d.mkdir()
    tifffile.imwrite(d / "big.tif", tifffile.imread(EPFL / "testing.tif", key=range(6)), photometric="minisblack")
    return d


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signal_during_predict_leaves_no_temporary_output(big_stack, weights, sig):
    before = tree(big_stack)
    proc = _start_predict(big_stack, weights, "out/pred")
    _wait_for_temporary(big_stack / "out", proc)  # the preallocated memory map is there now
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert f"interrupted ({signal.Signals(sig).name})" in err and "Traceback" not in err
    assert tree(big_stack) == before  # no output, no .pred.tmp-*, not even the folder `out` it made


def test_kill_9_leftovers_are_cleaned_by_the_next_run(big_stack, weights):
    proc = _start_predict(big_stack, weights, "out/pred")
    tmp = _wait_for_temporary(big_stack / "out", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert tmp.exists()  # SIGKILL cannot be caught: the next start removes it
    again = _start_predict(big_stack, weights, "out/pred")
    again.communicate(timeout=600)
    assert again.returncode == 0
    assert sorted(os.listdir(big_stack / "out")) == ["pred"]


# 3. Readers ---------------------------------------------------------------------------------------------------


def test_slice_files_are_read_in_natural_order(tmp_path, weights):
    slices = epfl_slices(3)
    folder = tmp_path / "slices"
    folder.mkdir()
    for name, sl in zip(("s1.tif", "s2.tif", "s10.tif"), slices):
        tifffile.imwrite(folder / name, sl)
    # Distinct, known content per position: the prediction of slice z must be that of s{1,2,10}[z].
    emseg(tmp_path, "predict", "--model", str(weights), "slices", "pred", check=True)
    summary = json.loads((tmp_path / "pred" / "summary.json").read_text())
    assert summary["slice_files"] == ["s1.tif", "s2.tif", "s10.tif"]
    tifffile.imwrite(tmp_path / "stack.tif", slices, photometric="minisblack")
    emseg(tmp_path, "predict", "--model", str(weights), "stack.tif", "pred-stack", check=True)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "pred" / "probabilities.tif"),
                                  tifffile.imread(tmp_path / "pred-stack" / "probabilities.tif"))


@pytest.mark.parametrize("case, expect", [
    ("mixed_dtype", "slices: slices differ: a01.tif is uint8 96x96, a02.tif is uint16 96x96; expected one type"),
    ("mixed_shape", "slices: slices differ: a01.tif is uint8 96x96, a02.tif is uint8 96x80"),
    ("huge", "a02.tif: image holds values up to 3e+38, beyond the 1e+30 emseg accepts"),
    ("nan", "a02.tif: image holds NaN or infinite values"),
])
def test_inconsistent_or_unusable_slices_are_refused_before_writing(tmp_path, weights, case, expect):
    folder = tmp_path / "slices"
    folder.mkdir()
    a, b = epfl_slices(2)
    if case == "mixed_dtype":
        b = b.astype(np.uint16) * 257
    elif case == "mixed_shape":
        b = b[:, :80]
    elif case in ("huge", "nan"):
        a, b = a.astype(np.float32), b.astype(np.float32)
        b[5, 5] = 3e38 if case == "huge" else np.nan
    tifffile.imwrite(folder / "a01.tif", a)
    tifffile.imwrite(folder / "a02.tif", b)
    before = tree(tmp_path)
    one_line(emseg(tmp_path, "predict", "--model", str(weights), "slices", "pred"), expect)
    assert tree(tmp_path) == before


def _tiff_project(tmp_path: Path, image: Path, labels: Path, **data) -> Path:
    proj = make_project(tmp_path / "proj", git=False)
    write_params(proj, {"data": {"source": "tiff", "train_slices": 2, "val_slices": 1, "test_slices": 2,
                                 "tiff": {"image": str(image), "labels": str(labels)}, **data}})
    return proj


def test_huge_values_are_refused_by_fetch_before_anything_is_versioned(tmp_path):
    img = tifffile.imread(EPFL / "training.tif", key=range(10))[:, :128, :128].astype(np.float32)
    img[3, 0, 0] = -3e38
    tifffile.imwrite(tmp_path / "img.tif", img)
    tifffile.imwrite(tmp_path / "lab.tif",
                     tifffile.imread(EPFL / "training_groundtruth.tif", key=range(10))[:, :128, :128])
    proj = _tiff_project(tmp_path, tmp_path / "img.tif", tmp_path / "lab.tif")
    one_line(emseg(proj, "fetch"), "img.tif slice 3: image holds values up to 3e+38")
    assert not (proj / "data" / "raw").exists() and not [p for p in (proj / "data").glob(".*")]


@pytest.mark.parametrize("compression", ["lzw", "jpeg", "deflate", "zstd"])
def test_compressed_tiffs_from_fiji_and_microscopes_are_read(tmp_path, compression):
    img = tifffile.imread(EPFL / "training.tif", key=range(10))[:, :192, :192]
    lab = tifffile.imread(EPFL / "training_groundtruth.tif", key=range(10))[:, :192, :192]
    tifffile.imwrite(tmp_path / "img.tif", img, compression=compression, photometric="minisblack")
    tifffile.imwrite(tmp_path / "lab.tif", lab, compression="lzw" if compression == "jpeg" else compression,
                     photometric="minisblack")
    proj = _tiff_project(tmp_path, tmp_path / "img.tif", tmp_path / "lab.tif")
    emseg(proj, "fetch", check=True)
    emseg(proj, "prepare", check=True)
    manifest = json.loads((proj / "data" / "prepared" / "manifest.json").read_text())
    train = np.load(proj / "data" / "prepared" / "train_images.npy")
    norm = manifest["normalisation"]["train"]
    original = (img[manifest["splits"]["train"]["slices"]].astype(np.float64) - norm["mean"]) / norm["std"]
    tol = 0.2 if compression == "jpeg" else 1e-5  # JPEG is lossy; the others give back every value
    assert np.abs(train - original).mean() < tol
    labels = np.load(proj / "data" / "prepared" / "train_labels.npy")
    np.testing.assert_array_equal(labels, lab[manifest["splits"]["train"]["slices"]] // 255)


def test_fetch_copies_only_the_slice_files_it_reads(tmp_path):
    img = tifffile.imread(EPFL / "training.tif", key=range(8))[:, :128, :128]
    lab = tifffile.imread(EPFL / "training_groundtruth.tif", key=range(8))[:, :128, :128]
    for name, stack in (("img", img), ("lab", lab)):
        d = tmp_path / name
        d.mkdir()
        for z, sl in enumerate(stack):
            tifffile.imwrite(d / f"z{z + 1}.tif", sl)
        (d / "README.txt").write_text("stray")
        (d / "old").mkdir()
        tifffile.imwrite(d / "old" / "z99.tif", sl)
        (d / "loop").symlink_to(tmp_path)  # a link back up the tree
        (d / "dir.tif").mkdir()  # a folder that looks like a slice
    proj = _tiff_project(tmp_path, tmp_path / "img", tmp_path / "lab", test_slices=1, train_slices=2, val_slices=1)
    emseg(proj, "fetch", check=True)
    raw = proj / "data" / "raw"
    assert sorted(os.listdir(raw / "train_image")) == [f"z{z}.tif" for z in range(1, 9)]
    source = json.loads((raw / "source.json").read_text())
    assert source["files"]["train_image"]["slice_files"] == [f"z{z}.tif" for z in range(1, 9)]
    emseg(proj, "prepare", check=True)
    manifest = json.loads((proj / "data" / "prepared" / "manifest.json").read_text())
    assert manifest["files"]["train_labels"]["slice_files"] == [f"z{z}.tif" for z in range(1, 9)]


# 4. An ignore value that collides with a label value -----------------------------------------------------------


@pytest.mark.parametrize("value", [0, 1, 255])
def test_an_ignore_value_that_is_a_label_value_is_refused(tmp_path, value):
    proj = make_project(tmp_path / "proj", git=False)
    write_params(proj, {"data": {"ignore_value": value}})
    one_line(emseg(proj, "fetch"), f"params.yaml: data.ignore_value: Value error, {value} is a label value")
    assert not (proj / "data").exists()


# 8, 9. One line instead of a traceback ---------------------------------------------------------------------------


@pytest.mark.parametrize("content, command, expect", [
    (b"", ("prepare",), "data/raw/source.json: not found; run `emseg fetch`"),
    (b"data:\n  source: epfl\n", ("fetch",), "data.epfl.mirrors: at least one mirror is required"),
    ("seed: 3\n".encode("utf-16"), ("fetch",), "params.yaml: is encoded as UTF-16; save it as UTF-8"),
    (b"seed: \xff\xfe3\n", ("fetch",), "params.yaml: not UTF-8 text"),
])
def test_empty_minimal_or_badly_encoded_params(tmp_path, content, command, expect):
    (tmp_path / "params.yaml").write_bytes(content)
    one_line(emseg(tmp_path, *command), expect)
    assert sorted(os.listdir(tmp_path)) == ["params.yaml"]


def test_an_empty_params_file_is_all_defaults(tmp_path, weights):
    (tmp_path / "params.yaml").write_bytes(b"")
    tifffile.imwrite(tmp_path / "s.tif", epfl_slices(2), photometric="minisblack")
    emseg(tmp_path, "predict", "--model", str(weights), "s.tif", "pred", check=True)


def _weights_variant(weights: Path, dst: Path, case: str) -> None:
    import torch

    if case == "empty":
        dst.write_bytes(b"")
        return
    blob = torch.load(weights, weights_only=True)
    if case == "mismatch":
        blob["spec"]["decoder_channels"] = [32, 16, 16, 16, 8]
    elif case == "encoder":
        blob["spec"]["encoder"] = "efficientnet-b99"
    torch.save(blob, dst)


@pytest.mark.parametrize("case, expect", [
    ("empty", "bad.pt: cannot load weights safely"),
    ("mismatch", "bad.pt: its weights do not fit the network its spec describes"),
    ("encoder", "bad.pt: spec.encoder: 'efficientnet-b99' is not an encoder smp knows"),
])
def test_broken_weights_files(user, weights, case, expect):
    _weights_variant(weights, user / "bad.pt", case)
    line = one_line(emseg(user, "predict", "--model", "bad.pt", "data/stack.tif", "pred"), expect)
    assert "params.yaml" not in line and len(line) < 400
    assert not (user / "pred").exists()


@pytest.fixture()
def registry_project(tmp_path) -> Path:
    """A project folder whose real MLflow registry holds one version of model m."""
    from mlflow import MlflowClient

    (tmp_path / "params.yaml").write_text("seed: 1\n")
    (tmp_path / "mlruns").mkdir()
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("m")
    client.create_model_version("m", source=(tmp_path / "nowhere").as_uri())
    return tmp_path


def test_promote_with_an_alias_mlflow_refuses(registry_project):
    one_line(emseg(registry_project, "promote", "m", "1", "--alias", "my champ"), "--alias 'my champ': ")
    emseg(registry_project, "promote", "m", "1", "--alias", "champ", check=True)  # a good alias works


def test_a_damaged_mlflow_store_is_one_line(registry_project, user, weights):
    db = registry_project / "mlruns" / "mlflow.db"
    db.write_bytes(b"this is not a database" * 100)
    before = db.read_bytes()
    one_line(emseg(registry_project, "promote", "m", "1", "--alias", "champ"), "the MLflow store is damaged")
    one_line(emseg(registry_project, "predict", "--model", "models:/m/1", str(user / "data" / "stack.tif"), "out"),
             "the MLflow store is damaged")
    assert db.read_bytes() == before and not (registry_project / "out").exists()


def test_a_registry_model_outside_a_project_creates_no_store(user):
    before = tree(user)
    one_line(emseg(user, "predict", "--model", "models:/emseg-unet@champion", "data/stack.tif", "pred"),
             "mlruns/mlflow.db: no MLflow store here")
    assert tree(user) == before  # no mlruns/mlflow.db appeared


def test_a_params_file_that_is_named_must_exist(user, weights):
    one_line(emseg(user, "--params", "typo.yaml", "predict", "--model", str(weights), "data/stack.tif", "pred"),
             "typo.yaml: params file not found")
    assert not (user / "pred").exists()


def test_a_path_component_over_255_bytes(user, weights):
    long = "p" * 300
    one_line(emseg(user, "predict", "--model", str(weights), "data/stack.tif", long), "name too long")
    one_line(emseg(user, "predict", "--model", str(weights), f"data/{long}.tif", "pred"), "name too long")
    assert sorted(os.listdir(user)) == ["data"]


# 10. Outputs follow the umask -------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_follow_the_umask(tmp_path, weights, umask):
    tifffile.imwrite(tmp_path / "s.tif", epfl_slices(2), photometric="minisblack")
    proj = make_project(tmp_path / "proj", git=False)
    write_params(proj, SMALL_GENERATED)
    old = os.umask(umask)
    try:
        emseg(tmp_path, "predict", "--model", str(weights), "s.tif", "pred", check=True)
        emseg(proj, "fetch", check=True)
        emseg(proj, "prepare", check=True)
    finally:
        os.umask(old)
    for folder in (tmp_path / "pred", proj / "data" / "raw", proj / "data" / "prepared"):
        assert folder.stat().st_mode & 0o777 == 0o777 & ~umask, folder
        for f in folder.iterdir():
            assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f
