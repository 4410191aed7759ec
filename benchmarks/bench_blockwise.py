"""Blockwise prediction on Dask (issue "Volumes larger than memory").

memory: the same cheap model (EfficientNet-b0 U-Net, narrow decoder, ``model.input_scale`` 0.25, trained
4 minutes on 12 EPFL training slices, see ``model``) on a
1 GiB and a 4 GiB EM-like Zarr volume (1024 x 1024 slices cut from EPFL testing.tif, mirrored through
z: real EM texture, any depth). Peak resident memory of the whole job: the sum over the emseg process
and every process below it (the LocalCluster's workers), sampled every 0.2 s with psutil.

overhead: EPFL testing.tif (82 x 768 x 1024), the same model at ``input_scale`` 0.5, the in-process path
(``--format tiff``) against the blockwise path (``--format ome-zarr``, LocalCluster), alternating A B A B;
voxels per second of the whole command (start-up, statistics, prediction, objects, writing).

Both use objects per slice (``--instances 2d``): the 3D watershed costs ~2 us a voxel on this CPU, which
would make a 4 GiB run take hours on 2 cores; its memory is bounded by the block in the same way.
zaverage: as overhead, each path with ``--z-average off`` and ``on`` (each probability averaged with its
z neighbours'), alternating; the time ratio on / off per pair.

Run: .venv/bin/python benchmarks/bench_blockwise.py memory|overhead|zaverage   (EMSEG_BENCH_PAIRS, default 2;
EMSEG_BENCH_GIB: volume sizes in GiB, default "1 4";
EMSEG_BENCH_MODEL: reuse a network this script trained and kept with EMSEG_BENCH_SAVE_MODEL,
EMSEG_BENCH_TMP: where the volumes go)
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import BIN, EPFL, save  # noqa: E402


def tree_peak(cmd: list[str], cwd: Path) -> dict:
    import psutil

    env = {**os.environ, "PATH": BIN + os.pathsep + os.environ["PATH"]}
    t = time.time()
    log = open(cwd / f"log-{time.time_ns()}.txt", "w+")  # not a pipe: a full pipe would stop the command
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    root, peak, client, workers = psutil.Process(proc.pid), 0, 0, 0
    while proc.poll() is None:
        try:
            own = root.memory_info().rss  # the client, with a LocalCluster's scheduler in it
            below = sum(p.memory_info().rss for p in root.children(recursive=True) if p.is_running())
            peak, client, workers = max(peak, own + below), max(client, own), max(workers, below)
        except psutil.Error:
            pass
        time.sleep(0.2)
    log.seek(0)
    out = log.read()
    log.close()
    if proc.returncode:
        raise SystemExit(f"{cmd} failed:\n{out[-3000:]}")
    return {"seconds": time.time() - t, "peak_rss_mib": peak / 2 ** 20, "client_peak_mib": client / 2 ** 20,
            "workers_peak_mib": workers / 2 ** 20, "tail": out.splitlines()[-1]}


def model(tmp: Path, scale: float, minutes: float) -> Path:
    """The cheap network, trained from scratch for ``minutes`` on 12 slices of EPFL training.tif (so its
    masks, and the objects the instance step splits, look like a real run's, not an untrained net's)."""
    import tifffile

    if os.environ.get("EMSEG_BENCH_MODEL"):  # a network this function trained before
        return Path(os.environ["EMSEG_BENCH_MODEL"])
    from emseg.config import parse_params
    from emseg.data.datamodule import ArraySplits
    from emseg.model.network import save_weights
    from emseg.model.train import fit

    image = tifffile.imread(EPFL / "training.tif").astype(np.float32)
    labels = (tifffile.imread(EPFL / "training_groundtruth.tif") == 255).astype(np.uint8)
    x = (image - image.mean()) / image.std()
    train, val = list(range(0, 165, 14)), [80, 150]
    params = parse_params({"seed": 0, "model": {"decoder_channels": [16, 16, 16, 16, 8], "input_scale": scale},
                           "train": {"init": {"mode": "scratch"}, "max_minutes": minutes, "max_epochs": 200,
                                     "patch_size": 256, "batch_size": 8, "patches_per_epoch": 64, "lr": 0.003,
                                     "early_stopping_patience": 200, "use_tuned": False}})
    res = fit(params, ArraySplits(x[train], labels[train], x[val], labels[val]), tmp / "fit", lr=0.003,
              batch_size=8, max_minutes=minutes, progress=False, checkpoints=False)
    print(f"model: input_scale {scale}, best validation IoU {res.best_score:.3f} after {minutes} min", flush=True)
    path = tmp / f"net{scale}.pt"
    save_weights(res.net, path)
    if os.environ.get("EMSEG_BENCH_SAVE_MODEL"):  # keep it for EMSEG_BENCH_MODEL in a later run
        shutil.copy(path, os.environ["EMSEG_BENCH_SAVE_MODEL"])
    return path


def em_volume(path: Path, depth: int) -> None:
    import tifffile
    import zarr

    src = tifffile.imread(EPFL / "testing.tif")[:, :, :]  # 82 x 768 x 1024
    tile = np.concatenate([src, src[:, :256]], axis=1)  # 82 x 1024 x 1024
    arr = zarr.create_array(str(path), shape=(depth, 1024, 1024), chunks=(16, 512, 512), dtype="uint8")
    period = 2 * len(tile) - 2
    for z0 in range(0, depth, 16):
        idx = [(z % period) if z % period < len(tile) else period - z % period for z in range(z0, min(z0 + 16, depth))]
        arr[z0:z0 + len(idx)] = tile[idx]


TESTING_VOXELS = 82 * 768 * 1024  # EPFL testing.tif


def predict_testing(net: Path, tmp: Path, out: str, extra: list[str]) -> dict:
    """``emseg predict`` of EPFL testing.tif into ``tmp / out``, timed and its memory followed (tree_peak)."""
    return tree_peak(["emseg", "predict", "--model", str(net), str(EPFL / "testing.tif"), str(tmp / out), *extra], tmp)


def main() -> None:
    mode = sys.argv[1]
    tmp = Path(tempfile.mkdtemp(dir=os.environ.get("EMSEG_BENCH_TMP")))
    try:
        if mode == "memory":
            net = model(tmp, 0.25, float(os.environ.get("EMSEG_BENCH_TRAIN_MIN", "4")))
            rows = {}
            for gib in [float(g) for g in os.environ.get("EMSEG_BENCH_GIB", "1 4").split()]:
                em_volume(tmp / f"v{gib}.zarr", int(1024 * gib))
                r = tree_peak(["emseg", "predict", "--model", str(net), str(tmp / f"v{gib}.zarr"), str(tmp / f"o{gib}"),
                               "--instances", "2d", "--voxel-size", "5", "5", "5"], tmp)
                rows[f"{gib}GiB"] = {**r, "voxels": int(1024 ** 3 * gib)}
                shutil.rmtree(tmp / f"o{gib}")
                shutil.rmtree(tmp / f"v{gib}.zarr")
                print(rows[f"{gib}GiB"], flush=True)
            peaks = [r["peak_rss_mib"] for r in rows.values()]
            save("blockwise_memory", {"command": "emseg predict ZARR OUT --instances 2d (LocalCluster defaults)",
                                      "rows": rows, "peak_ratio_largest_to_smallest": round(peaks[-1] / peaks[0], 3)})
        elif mode == "zaverage":
            net = model(tmp, 0.5, float(os.environ.get("EMSEG_BENCH_TRAIN_MIN", "4")))
            pairs = int(os.environ.get("EMSEG_BENCH_PAIRS", "2"))
            arms = {f"{path}_{z}": (extra, z) for path, extra in (
                ("in_process", ["--format", "tiff"]), ("blockwise", ["--format", "ome-zarr", "--instances", "2d"]))
                for z in ("off", "on")}
            rows = {a: [] for a in arms}
            for i in range(pairs):
                for name, (extra, z) in arms.items():
                    r = predict_testing(net, tmp, f"{name}{i}", [*extra, "--z-average", z])
                    rows[name].append({"voxels_per_s": TESTING_VOXELS / r["seconds"], "seconds": r["seconds"],
                                       "peak_rss_mib": r["peak_rss_mib"]})
                    shutil.rmtree(tmp / f"{name}{i}")
                    print(name, r, flush=True)
            ratios = {path: [on["seconds"] / off["seconds"] for off, on in zip(rows[f"{path}_off"], rows[f"{path}_on"])]
                      for path in ("in_process", "blockwise")}
            save("blockwise_z_average", {
                "command": "emseg predict testing.tif OUT --format tiff | ome-zarr --instances 2d, "
                           "--z-average off | on",
                "rows": rows, "seconds_ratio_on_to_off": ratios,
                "mean_ratio": {k: statistics.mean(v) for k, v in ratios.items()}})
        else:
            net = model(tmp, 0.5, float(os.environ.get("EMSEG_BENCH_TRAIN_MIN", "4")))
            pairs = int(os.environ.get("EMSEG_BENCH_PAIRS", "2"))
            rows: dict[str, list] = {"in_process": [], "blockwise": []}
            passes = []
            for i in range(pairs):
                for name, extra in (("in_process", ["--format", "tiff"]),
                                    ("blockwise", ["--format", "ome-zarr", "--instances", "2d"])):
                    r = predict_testing(net, tmp, f"{name}{i}", extra)
                    rows[name].append(TESTING_VOXELS / r["seconds"])
                    if name == "blockwise":  # where the time went, pass by pass
                        r["passes"] = json.loads((tmp / f"{name}{i}" / "summary.json").read_text())["seconds_per_pass"]
                        passes.append(r["passes"])
                    print(name, r, flush=True)
            ratios = [b / a for a, b in zip(rows["in_process"], rows["blockwise"])]
            save("blockwise_overhead", {"command": "emseg predict testing.tif OUT --format tiff | ome-zarr",
                                        "voxels_per_s": rows, "ratios_blockwise_to_in_process": ratios,
                                        "mean_ratio": statistics.mean(ratios), "blockwise_seconds_per_pass": passes})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
