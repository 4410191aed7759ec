"""Volumes larger than memory: Zarr/HDF5/TIFF inputs, blockwise prediction on Dask, objects in 3D.

Real data: crops of EPFL ``testing.tif`` and its ground truth. Real components: Dask's LocalCluster,
and a ``dask scheduler`` with two ``dask worker`` processes on 127.0.0.1; the OME-Zarr output is read
back with ome-zarr-models (an independent implementation of the NGFF spec).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from conftest import EPFL, free_port, require_shared

BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}


def emseg(cwd: Path, *args: str, check: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.run(["emseg", *args], cwd=cwd, capture_output=True, text=True, env=ENV, timeout=900)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def one_line(proc: subprocess.CompletedProcess, expect: str) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "%|" not in ln]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-3000:]
    assert expect in lines[0], lines[0]
    return lines[0]


# HDF5 in, objects per slice in blocks of whole slices, 8 deep (3 blocks through z): the in-process
# path's objects exactly. (Blocks that cut a slice stitch its objects: test_objects_crossing_blocks...)
BLOCKWISE = ["--model", "net.pt", "crop.h5", "--input-key", "raw/em", "--instances", "2d", "--block", "8", "512",
             "1024"]


def same_objects(a: np.ndarray, b: np.ndarray) -> bool:
    """Two labellings hold the same objects, whatever their numbers."""
    if not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(np.stack([a[a > 0], b[a > 0]]), axis=1)
    return len(pairs[0]) == len(np.unique(pairs[0])) == len(np.unique(pairs[1]))


@pytest.fixture(scope="module")
def vol(tmp_path_factory):
    """A 20 x 512 x 1024 crop of EPFL testing.tif as TIFF, HDF5 (with element_size_um) and Zarr, a small
    real network, and the in-process prediction to compare with."""
    require_shared()
    import h5py
    import torch

    from emseg.config import ModelParams
    from emseg.model.network import build_network, save_weights

    d = tmp_path_factory.mktemp("blockwise")
    image = tifffile.imread(EPFL / "testing.tif", key=range(30, 50))[:, 128:640, :]
    tifffile.imwrite(d / "crop.tif", image)
    with h5py.File(d / "crop.h5", "w") as f:
        f["raw/em"] = image
        f["raw/em"].attrs["element_size_um"] = [0.005, 0.005, 0.005]
    zarr.open_group(str(d / "crop.zarr"), mode="w").create_array("em", data=image, chunks=(4, 256, 256))
    torch.manual_seed(0)  # one network every run
    save_weights(build_network(ModelParams(decoder_channels=[16, 16, 16, 16, 8])), d / "net.pt")
    emseg(d, "predict", "--model", "net.pt", "crop.tif", "inproc", check=True)
    emseg(d, "predict", *BLOCKWISE, "bw", check=True)
    return {"dir": d, "image": image, "prob": tifffile.imread(d / "inproc" / "probabilities.tif"),
            "inst": tifffile.imread(d / "inproc" / "instances.tif")}


def test_containers_read_the_same_voxels_and_their_voxel_size(vol, tmp_path):
    from emseg.data.containers import open_volume

    d = vol["dir"]
    tiff, h5 = open_volume(d / "crop.tif"), open_volume(d / "crop.h5", "raw/em")
    zr = open_volume(d / "crop.zarr", "em")
    region = ([3, 4, 4, 19], slice(100, 300), slice(900, 1024))
    for v in (tiff, h5, zr):
        assert v.shape == (20, 512, 1024)
        assert np.array_equal(v.read(*region), vol["image"][[3, 4, 4, 19], 100:300, 900:1024])
    assert h5.voxel_size == (5.0, 5.0, 5.0) and tiff.voxel_size is None
    # An uncompressed TIFF is memory-mapped; ImageJ metadata gives its voxel size in nm.
    tifffile.imwrite(tmp_path / "ij.tif", vol["image"][:4], imagej=True, resolution=(1 / 0.004, 1 / 0.004),
                     metadata={"spacing": 0.03, "unit": "um"})
    ij = open_volume(tmp_path / "ij.tif")
    assert ij.kind == "tiff-mmap" and np.allclose(ij.voxel_size, (30.0, 4.0, 4.0))
    assert np.array_equal(ij.read([2], slice(0, 5), slice(0, 5))[0], vol["image"][2, :5, :5])


def test_bad_containers_name_the_file_and_key(vol, tmp_path):
    d = vol["dir"]
    one_line(emseg(d, "predict", "--model", "net.pt", "crop.h5", str(tmp_path / "a")),
             "crop.h5: an HDF5 file needs --input-key naming the dataset; it holds raw/em")
    one_line(emseg(d, "predict", "--model", "net.pt", "crop.h5", str(tmp_path / "a"), "--input-key", "raw/x"),
             "no dataset 'raw/x'")
    one_line(emseg(d, "predict", "--model", "net.pt", "crop.zarr", str(tmp_path / "a")),
             "needs --input-key naming an array (it is not an OME-Zarr image); it holds em")
    flat = tmp_path / "flat.zarr"
    zarr.create_array(str(flat), data=vol["image"][0])
    one_line(emseg(d, "predict", "--model", "net.pt", str(flat), str(tmp_path / "a")),
             "is a 2D array (512, 1024); expected a (z, y, x) stack")
    one_line(emseg(d, "predict", "--model", "net.pt", "crop.h5", str(tmp_path / "a"), "--input-key", "raw/em",
                   "--block", "4096", "8192", "8192"), "--block: one block needs about")
    one_line(emseg(d, "predict", "--model", "net.pt", "crop.h5", str(tmp_path / "a"), "--input-key", "raw/em",
                   "--block", "8", "500", "512"), "--block 8 500 512: expected z >= 1 and y, x multiples of 512")
    one_line(emseg(d, "predict", "--model", "net.pt", "crop.tif", str(tmp_path / "a"), "--format", "tiff",
                   "--scheduler", "tcp://127.0.0.1:1"), "--scheduler works with --format ome-zarr")
    port = free_port()  # nothing listens there
    line = one_line(emseg(d, "predict", "--model", "net.pt", "crop.h5", str(tmp_path / "a"), "--input-key",
                          "raw/em", "--scheduler", f"tcp://127.0.0.1:{port}"), "no Dask scheduler answered")
    assert f"--scheduler tcp://127.0.0.1:{port}" in line
    assert list(tmp_path.glob("a*")) == []  # nothing written


def read_output(out: Path) -> dict:
    from ome_zarr_models.v04 import Image
    from ome_zarr_models.v04.image_label import ImageLabel

    root = zarr.open_group(str(out / "prediction.ome.zarr"), mode="r")
    image = Image.from_zarr(root)  # validated against the NGFF 0.4 spec by an independent reader
    labels = ImageLabel.from_zarr(root["labels/instances"])
    return {"root": root, "image": image, "labels": labels, "summary": json.loads((out / "summary.json").read_text()),
            "objects": np.genfromtxt(out / "objects.csv", delimiter=",", names=True)}


def test_blockwise_equals_the_in_process_path_and_writes_valid_ome_zarr(vol):
    """HDF5 in, 3 object blocks (2d objects): probabilities to 1/255, the same objects."""
    d = vol["dir"]
    out = read_output(d / "bw")
    root = out["root"]
    assert np.abs(root["0"][:].astype(int) - vol["prob"]).max() <= 1
    labels = root["labels/instances/0"][:]
    assert same_objects(vol["inst"], labels)
    # The voxel size (HDF5 element_size_um) is in every level's scale; the pyramid halves y and x.
    scales = [ds.coordinateTransformations[0].scale for ds in out["image"].attributes.multiscales[0].datasets]
    assert scales[0] == [5.0, 5.0, 5.0] and scales[1] == [5.0, 10.0, 10.0] and len(scales) == 3
    assert root["1"].shape == (20, 256, 512) and root["labels/instances/2"].shape == (20, 128, 256)
    assert np.array_equal(root["labels/instances/1"][:], labels[:, ::2, ::2])
    # objects.csv: one row per object, voxels adding up to the foreground, volumes in nm^3.
    objects, s = out["objects"], out["summary"]
    assert len(objects) == s["objects"] == len(np.unique(labels)) - 1
    assert objects["voxels"].sum() == (labels > 0).sum()
    assert np.allclose(objects["volume_nm3"], objects["voxels"] * 125.0)
    big = objects[np.argmax(objects["voxels"])]
    zz, yy, xx = np.nonzero(labels == big["id"])
    assert (big["bbox_z0"], big["bbox_y1"], big["centroid_x"]) == (zz.min(), yy.max() + 1, round(xx.mean(), 3))
    assert s["instances_mode"] == "2d" and s["voxel_size_nm"] == [5.0, 5.0, 5.0]
    # The output is itself an input: an OME-Zarr image, at any level, with its voxel size.
    from emseg.data.containers import open_volume

    level1 = open_volume(d / "bw" / "prediction.ome.zarr", level=1)
    assert level1.shape == (20, 256, 512) and level1.voxel_size == (5.0, 10.0, 10.0)
    assert np.array_equal(level1.read([3], slice(0, 9), slice(0, 9))[0], root["1"][3, :9, :9])
    # Default blocks: 2D objects are split inside the prediction blocks (no label pass): the same objects.
    emseg(d, "predict", *BLOCKWISE[:-4], "fused", check=True)
    fused = read_output(d / "fused")
    assert fused["summary"]["task_seconds_per_pass"]["label"] == 0 and fused["summary"]["blocks"]["objects"] == 10
    assert np.array_equal(fused["root"]["0"][:], root["0"][:])
    assert same_objects(vol["inst"], fused["root"]["labels/instances/0"][:])


def test_z_averaging_is_the_same_in_process_and_across_blocks(vol):
    """--z-average on: blocks of 2 slices predict their neighbours too, so the blockwise probabilities
    equal the in-process ones (to 1/255), and both are the plain ones averaged over z (ends mirrored)."""
    from emseg.inference import z_averaged

    d = vol["dir"]
    emseg(d, "predict", "--model", "net.pt", "crop.tif", "inproc_z", "--z-average", "on", check=True)
    emseg(d, "predict", *BLOCKWISE[:-4], "bw_z", "--z-average", "on", check=True)
    inproc = tifffile.imread(d / "inproc_z" / "probabilities.tif").astype(int)
    blocks = read_output(d / "bw_z")
    assert np.abs(blocks["root"]["0"][:].astype(int) - inproc).max() <= 1
    expected = np.stack(list(z_averaged(vol["prob"].astype(np.float32))))
    assert np.abs(inproc - expected).max() <= 2  # the plain ones were rounded to 1/255 before averaging
    assert np.abs(inproc - vol["prob"].astype(int)).max() > 5  # and it is not a no-op
    assert blocks["summary"]["z_average"] is True
    assert json.loads((d / "inproc_z" / "summary.json").read_text())["z_average"] is True


def test_objects_crossing_blocks_get_one_id_and_match_the_true_3d_objects(tmp_path):
    """The EPFL ground truth as the mask: 3D objects stitched over 2 x 2 blocks (z and x) agree with the
    truth's 3D components, and every true object cut by a block face keeps one id."""
    require_shared()
    from emseg import blockwise as bw
    from emseg.data.containers import Volume
    from emseg.instances import connected_instances, match_instances

    truth = tifffile.imread(EPFL / "testing_groundtruth.tif", key=range(20, 36))[:, 200:712, :] == 255
    shape = truth.shape
    job = bw.Job(volume=Volume(tmp_path / "x", "zarr", shape, "|u1", None, (5.0, 5.0, 5.0)), work=str(tmp_path / "w"),
                 predict_grid=bw.Grid(shape, (8, 2048, 2048)), label_grid=bw.Grid(shape, (8, 512, 512), (4, 32, 32)),
                 levels=2, z_context=1, inference={}, threshold=0.5,
                 instances={"min_size": 30, "h": 2.0, "smooth": 1.0}, mode="3d", model_sha256="-")
    bw.prepare_work(job, False)
    zarr.open_array(str(tmp_path / "w/state/mask.zarr"), mode="r+")[:] = truth.astype(np.uint8)
    res = bw.label_objects(job, None, progress=False)
    labels = zarr.open_array(str(tmp_path / "w/prediction.ome.zarr/labels/instances/0"), mode="r")[:]
    true = connected_instances(truth, 30)
    m = match_instances(true, labels)
    assert m["tp"] >= 0.9 * true.max() and m["fp"] <= 2 and m["merges"] == 0, m
    crossing = 0
    for i in range(1, true.max() + 1):
        zz, yy, xx = np.nonzero(true == i)
        if zz.min() < 8 <= zz.max() or xx.min() < 512 <= xx.max():
            crossing += 1
            ids, counts = np.unique(labels[zz, yy, xx], return_counts=True)
            assert counts.max() >= 0.9 * len(zz), (i, dict(zip(ids.tolist(), counts.tolist())))
    assert crossing >= 5 and res["merged_across_blocks"] >= crossing
    # Only the 3 blocks with a lower neighbour (in z or x) ran the stitch pass.
    assert len(list((tmp_path / "w/state/done").glob("stitch-*.json"))) == 3
    # The object table, added up from the blocks' pieces, is the labels' own: every row, every field.
    from scipy import ndimage

    table = res["objects"]
    ids = np.unique(labels)[1:]
    assert np.array_equal(table["id"], ids)
    assert np.array_equal(table["voxels"], np.bincount(labels.ravel())[ids])
    assert np.allclose(table["volume_nm3"], table["voxels"] * 125.0)
    boxes = ndimage.find_objects(labels)
    for f, a in (("z", 0), ("y", 1), ("x", 2)):
        assert table[f"bbox_{f}0"].tolist() == [boxes[i - 1][a].start for i in ids]
        assert table[f"bbox_{f}1"].tolist() == [boxes[i - 1][a].stop for i in ids]
    centres = np.array(ndimage.center_of_mass(labels > 0, labels, ids))
    assert np.abs(np.stack([table[f"centroid_{f}"] for f in "zyx"], 1) - centres).max() < 1e-9


def _count_done(work: Path) -> int:
    return len(list((work / "state" / "done").glob("predict-*.json"))) if work.exists() else 0


def test_a_killed_prediction_resumes_where_it_stopped(vol):
    d = vol["dir"]
    cmd = ["emseg", "predict", *BLOCKWISE, "resumed"]
    proc = subprocess.Popen(cmd, cwd=d, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    work = d / "resumed.partial"
    deadline = time.time() + 600
    while _count_done(work) < 1 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the client and its local cluster, at once
    proc.wait()
    assert _count_done(work) >= 1 and not (d / "resumed").exists()
    again = emseg(d, *cmd[1:], check=True)
    assert "predict: resuming resumed.partial" in again.stdout
    assert not work.exists()
    a, b = zarr.open_group(str(d / "bw/prediction.ome.zarr")), zarr.open_group(str(d / "resumed/prediction.ome.zarr"))
    assert np.array_equal(a["0"][:], b["0"][:]) and np.array_equal(a["labels/instances/0"][:],
                                                                   b["labels/instances/0"][:])


def test_a_dask_scheduler_with_two_workers_gives_the_local_result_even_when_a_worker_dies(vol):
    d = vol["dir"]
    port = free_port()
    procs = [subprocess.Popen(["dask", "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                              cwd=d, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        for _ in range(2):
            procs.append(subprocess.Popen(["dask", "worker", f"tcp://127.0.0.1:{port}", "--nthreads", "1",
                                           "--no-nanny", "--no-dashboard"], cwd=d, env=ENV,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        from distributed import Client

        with Client(f"tcp://127.0.0.1:{port}", timeout=60) as c:
            c.wait_for_workers(2, timeout=120)
            memory = min(w["memory_limit"] // w["nthreads"] for w in c.scheduler_info()["workers"].values())
        # A block no worker can hold is refused before any work, naming the worker's memory.
        line = one_line(emseg(d, "predict", "--model", "net.pt", "crop.h5", "big", "--input-key", "raw/em",
                              "--block", "4096", "8192", "8192", "--scheduler", f"tcp://127.0.0.1:{port}"),
                        "--block: one block needs")
        assert f"has {memory / 2 ** 30:.1f} GiB per thread (2 of 2 workers too small)" in line
        assert not (d / "big.partial").exists()
        # The same blocks as the local run (blocks that cut a slice stitch objects at the cut, which a whole
        # slice's watershed need not do), so the result must be the local one exactly.
        run = subprocess.Popen(["emseg", "predict", *BLOCKWISE, "dist", "--scheduler", f"tcp://127.0.0.1:{port}"],
                               cwd=d, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 600
        while _count_done(d / "dist.partial") < 1 and time.time() < deadline and run.poll() is None:
            time.sleep(0.1)
        procs[1].kill()  # one worker dies mid-run: its tasks rerun on the other
        out, err = run.communicate(timeout=900)
        assert run.returncode == 0, out[-2000:] + err[-3000:]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    res = read_output(d / "dist")
    local = zarr.open_group(str(d / "bw/prediction.ome.zarr"), mode="r")
    assert np.array_equal(res["root"]["0"][:], local["0"][:])
    assert np.array_equal(res["root"]["labels/instances/0"][:], local["labels/instances/0"][:])
    assert same_objects(vol["inst"], res["root"]["labels/instances/0"][:])
    assert res["summary"]["scheduler"] == f"tcp://127.0.0.1:{port}"
