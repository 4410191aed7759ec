"""Predict a whole stack with a trained model: probability and instance label stacks, written as they come.

Two paths. :func:`predict_to_folder` (``--format tiff``), in one process: ``probabilities.tif`` (uint8,
probability x 255), ``instances.tif`` (uint32, objects per slice, labels unique through the stack) and
``summary.json``, every slice written as soon as it is predicted. :func:`predict_blockwise`
(``--format ome-zarr``), on Dask: any size of TIFF, Zarr or HDF5 volume, block by block into a
multiscale ``prediction.ome.zarr`` with objects in 3D and ``objects.csv``, resumable
(:mod:`emseg.blockwise`). Either output appears only when complete; an existing one is refused unless
``overwrite``, and even then only an earlier emseg output may be replaced
(:func:`emseg.fsutil.claim_output`).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import tifffile

from emseg import ngff
from emseg.config import InferenceParams, InstanceParams
from emseg.data.io import context_stack, inspect_stack, stack_stats
from emseg.fsutil import allocated_memmap, atomic_dir, claim_output, output_error, write_json
from emseg.inference import predict_tiled, z_averaged
from emseg.instances import split_instances
from emseg.model.network import SegmentationNet, channels_last, in_channels, load_weights


def predict_stack_iter(net, slices, progress: bool, total: int, inference: InferenceParams):
    """Yield the probability of each slice as it is predicted, with a progress bar."""
    from tqdm.auto import tqdm

    for sl in tqdm(slices, total=total, desc="predict", unit="slice", disable=not progress):
        yield predict_tiled(net, sl, **inference.model_dump())


def load_model(ref: str) -> tuple[SegmentationNet, str, dict]:
    """A network from a registry URI (models:/NAME@ALIAS, models:/NAME/VERSION) or a local weights file,
    and what came with it: ``{"tags": the registry version's tags ({} for a file), "postprocess": the
    post-processing chosen for these weights on validation ({} for plain training weights)}``, and for a
    registry version its ``description`` and ``run_id``. One
    lookup, so an alias that moves meanwhile cannot pair these weights with another version's tags."""
    from emseg import registry

    if registry.is_uri(ref):
        mv = registry.resolve(ref)
        with registry.fetched_weights(mv, ref) as path:
            net, blob = load_weights(path)
        tags, record = dict(mv.tags), {"description": mv.description, "run_id": mv.run_id}
    else:
        net, blob = load_weights(Path(ref))
        tags, record = {}, {}
    return net.eval(), str(ref), {"tags": tags, "postprocess": registry.postprocess_of(blob, tags, str(ref)),
                                  **record}


def _predicted_slices(net, info, mean: float, std: float, inference, instances, threshold: float, progress: bool,
                      state: dict, z_average: bool = False):
    """Yield (probability x 255 as uint8, uint32 instance labels unique through the stack), slice by slice;
    ``z_average``: each probability averaged with its neighbours' in z (one slice held back)."""
    n = info.shape[0]
    # The layout is switched once for the stack, not once per slice inside predict_tiled.
    # Each slice goes in with as many neighbours as the network was trained with (model.z_context).
    with channels_last(net, inference.channels_last):
        normalised = context_stack(info, in_channels(net.spec), mean, std)
        probs = predict_stack_iter(net, normalised, progress, n, inference)
        for prob in z_averaged(probs) if z_average else probs:
            labels = split_instances(prob, threshold, instances.min_size, instances.h, instances.smooth)
            k = int(labels.max())
            labels = np.where(labels > 0, labels + np.uint32(state["next_label"]), 0).astype(np.uint32)
            state["next_label"] += k
            yield np.round(prob * 255).astype(np.uint8), labels


def _write_tiffs(tmp: Path, shape: tuple[int, int, int], pages) -> dict:
    """Probabilities stream straight into their TIFF; instance labels go to a memory map on disk first
    (one compressed TIFF series is written from one iterator), then stream into theirs."""
    n = shape[0]
    tiff = {"compression": "zlib", "photometric": "minisblack"}
    labels_mm = allocated_memmap(tmp / "instances.npy", np.uint32, shape)

    def probability_pages():
        for z, (prob, labels) in enumerate(pages):
            labels_mm[z] = labels
            yield prob

    with tifffile.TiffWriter(tmp / "probabilities.tif") as tw:
        tw.write(probability_pages(), shape=shape, dtype=np.uint8, **tiff)
    labels_mm.flush()
    with tifffile.TiffWriter(tmp / "instances.tif") as tw:
        tw.write((labels_mm[z] for z in range(n)), shape=shape, dtype=np.uint32, **tiff)
    labels_mm = None  # close the map (the closure above shares this name) before its file goes
    (tmp / "instances.npy").unlink()
    return {"probabilities.tif": "uint8, probability x 255", "instances.tif": "uint32 labels"}


def predict_to_folder(net: SegmentationNet, input_path: str | Path, output: str | Path, *, overwrite: bool = False,
                      inference: InferenceParams = InferenceParams(), instances: InstanceParams = InstanceParams(),
                      threshold: float = 0.5, model_ref: str = "", progress: bool = True,
                      z_average: bool = False) -> dict:
    output = Path(output)
    claim_output(output, overwrite, inputs=[input_path])
    info = inspect_stack(input_path)
    mean, std = stack_stats(info)  # the stack is normalised by its own statistics, as in training
    shape = tuple(info.shape)
    state = {"next_label": 0}
    with atomic_dir(output, marker={"command": "predict"}) as tmp:
        pages = _predicted_slices(net, info, mean, std, inference, instances, threshold, progress, state, z_average)
        outputs = _write_tiffs(tmp, shape, pages)
        summary = {"input": str(input_path), "model": model_ref, "shape": list(shape), "objects": state["next_label"],
                   "slice_files": [f.name for f in info.files] or None,
                   "threshold": threshold, "normalisation": {"mean": mean, "std": std},
                   "z_context": in_channels(net.spec), "tta": inference.tta, "z_average": z_average,
                   "instances": instances.model_dump(exclude={"h_choices"}), "outputs": outputs}
        write_json(tmp / "summary.json", summary)
    return summary


DEFAULT_BLOCK_3D, DEFAULT_BLOCK_2D = (16, 512, 512), (4, 2048, 2048)
PREDICT_DEPTH = 2  # slices per prediction block: many small blocks keep every worker busy to the end


def default_instances(voxel) -> str:
    """3D objects where the voxels are near isotropic (z at most twice y and x), else per slice."""
    return "3d" if voxel and voxel[0] <= 2 * max(voxel[1], voxel[2]) else "2d"


def predict_blockwise(net: SegmentationNet, input_path: str | Path, output: str | Path, *, overwrite: bool = False,
                      inference: InferenceParams = InferenceParams(), instances: InstanceParams = InstanceParams(),
                      threshold: float = 0.5, model_ref: str = "", progress: bool = True, input_key=None,
                      level: int = 0, voxel_size=None, mode: str | None = None, block=None,
                      scheduler: str | None = None, workers: int | None = None, z_average: bool = False) -> dict:
    """Predict a volume of any size block by block on Dask into ``output/prediction.ome.zarr`` with
    ``objects.csv`` and ``summary.json`` (see :mod:`emseg.blockwise`); resumes an unfinished run."""
    import shutil

    from emseg import blockwise as bw
    from emseg.cluster import dask_client
    from emseg.data.containers import check_grey, open_volume
    from emseg.fsutil import MARKER, follow_umask

    output = Path(output)
    claim_output(output, overwrite, inputs=[input_path])
    volume = open_volume(input_path, input_key, level)
    check_grey(volume)
    if voxel_size:
        volume = replace(volume, voxel_size=tuple(float(v) for v in voxel_size))
    mode = mode or default_instances(volume.voxel_size)
    side = 4 * ngff.CHUNK
    # 2D objects of slices up to 2048 px are split where they are predicted, in the same blocks of whole
    # slices (no mask written and read back, nothing to stitch); else in blocks of their own.
    fused = block is None and mode == "2d" and max(volume.shape[1:]) <= side
    block = (PREDICT_DEPTH, side, side) if fused else block or (DEFAULT_BLOCK_3D if mode == "3d" else DEFAULT_BLOCK_2D)
    shape = volume.shape
    # Absolute paths: the workers of a cluster open them from their own working folders.
    volume = replace(volume, path=Path(volume.path).absolute())
    job = bw.Job(volume=volume, work=str(output.absolute().with_name(output.name + ".partial")),
                 predict_grid=bw.Grid(shape, (PREDICT_DEPTH, side, side)),
                 label_grid=bw.Grid(shape, bw.parse_block(block, "--block"), (4 if mode == "3d" else 0, 32, 32)),
                 levels=ngff.n_levels(shape), z_context=in_channels(net.spec), inference=inference.model_dump(),
                 threshold=float(threshold), instances=instances.model_dump(include={"min_size", "h", "smooth"}),
                 mode=mode, model_sha256="", fused=fused, z_average=z_average)
    blob, sha = bw.weights_blob(net)
    job = replace(job, model_sha256=sha)
    with dask_client(scheduler, bw.estimate_bytes(job), workers) as client:
        job = replace(job, threads=client.threads)
        done = bw.prepare_work(job, overwrite)
        if done:
            print(f"predict: resuming {output.name}.partial: {done} block steps already done")
        try:
            result = bw.execute(job, client, blob, progress)
        except KeyboardInterrupt:
            print(f"predict: stopped; the finished blocks are kept in {job.work}; run the same command again to "
                  "continue", flush=True)
            raise
        except OSError as exc:  # a full disk or a lost mount, here or on a worker: the finished blocks stay
            err = output_error(output, exc)
            raise type(err)(f"{err}; the finished blocks are kept in {job.work}: free space and run the same "
                            "command again to continue") from None
    work = Path(job.work)
    bw.write_objects_csv(work / "objects.csv", result["objects"])
    summary = {"input": str(input_path), "input_key": volume.key, "model": model_ref, "shape": list(shape),
               "voxel_size_nm": list(volume.voxel_size) if volume.voxel_size else None,
               "objects": len(result["objects"]), "instances_mode": mode, "threshold": threshold,
               "normalisation": {"mean": result["mean"], "std": result["std"]}, "z_context": job.z_context,
               "tta": inference.tta, "z_average": z_average,
               "blocks": {"predict": len(job.predict_grid.blocks()), "objects": len(job.label_grid.blocks()),
                          "block": list(job.label_grid.block), "halo": list(job.label_grid.halo),
                          "matches_across_blocks": result["merged_across_blocks"]},
               "scheduler": scheduler or "local",
               "seconds_per_pass": {k: round(v, 2) for k, v in result["seconds"].items()},
               "task_seconds_per_pass": {k: round(v, 2) for k, v in result["busy"].items()},
               "instances": instances.model_dump(exclude={"h_choices"}),
               "outputs": {"prediction.ome.zarr": f"OME-NGFF 0.4, {job.levels} levels: image = probability x 255 "
                                                  "(uint8), labels/instances = uint32 objects",
                           "objects.csv": "one row per object: voxels, volume, bounding box, centroid (voxels)"}}
    write_json(work / "summary.json", summary)
    write_json(work / MARKER, {"written_by": "emseg", "command": "predict"})
    shutil.rmtree(work / "state")
    (work / "job.json").unlink()
    follow_umask(work, directory=True)
    if output.exists():
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        os.replace(output, old)
        os.replace(work, output)
        shutil.rmtree(old)
    else:
        os.replace(work, output)
    return summary

