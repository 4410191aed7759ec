"""Predict a whole stack with a trained model: probability and instance label stacks, written as they come.

Outputs, in a new folder: ``probabilities.tif`` (uint8, probability x 255), ``instances.tif``
(uint32, 0 = background, labels unique through the stack) and ``summary.json``. With
``fmt="ome-zarr"`` the two stacks go instead to one chunked ``prediction.ome.zarr`` (OME-NGFF 0.4,
Zarr v2 layout, readable by napari, Fiji/MoBIE and ome-zarr-py): the probabilities are the image,
the instances its label image ``labels/instances``; every slice is written as soon as it is
predicted, so neither stack is ever held in memory. The folder appears only when complete; an
existing one is refused unless ``overwrite``, and even then only an earlier
emseg output may be replaced (:func:`emseg.fsutil.claim_output`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile

from emseg.config import InferenceParams, InstanceParams
from emseg.data.io import context_stack, inspect_stack, stack_stats
from emseg.errors import OutputError
from emseg.fsutil import allocated_memmap, atomic_dir, claim_output, write_json
from emseg.inference import predict_tiled
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


FORMATS = ("tiff", "ome-zarr")


def _ngff_multiscales(name: str) -> list[dict]:
    axes = [{"name": a, "type": "space"} for a in "zyx"]
    return [{"version": "0.4", "name": name, "axes": axes,
             "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0, 1.0]}]}]}]


def _write_ome_zarr(path: Path, shape: tuple[int, int, int], pages) -> None:
    """Stream (probability uint8, labels uint32) slice pairs into an OME-NGFF 0.4 image + label image."""
    import zarr

    n, h, w = shape
    chunks = (1, min(h, 1024), min(w, 1024))  # one slice per chunk row: written as predicted
    ngff_keys = {"name": "v2", "separator": "/"}  # NGFF 0.4 wants nested chunk keys
    root = zarr.open_group(str(path), mode="w-", zarr_format=2)
    root.attrs["multiscales"] = _ngff_multiscales("probabilities")
    prob = root.create_array("0", shape=shape, chunks=chunks, dtype="uint8", fill_value=0,
                             chunk_key_encoding=ngff_keys)
    labels = root.create_group("labels")
    labels.attrs["labels"] = ["instances"]
    inst_group = labels.create_group("instances")
    inst_group.attrs["multiscales"] = _ngff_multiscales("instances")
    inst_group.attrs["image-label"] = {"version": "0.4", "source": {"image": "../../"}}
    inst = inst_group.create_array("0", shape=shape, chunks=chunks, dtype="uint32", fill_value=0,
                                   chunk_key_encoding=ngff_keys)
    for z, (p, lab) in enumerate(pages):
        prob[z] = p
        inst[z] = lab


def _predicted_slices(net, info, mean: float, std: float, inference, instances, threshold: float, progress: bool,
                      state: dict):
    """Yield (probability x 255 as uint8, uint32 instance labels unique through the stack), slice by slice."""
    n = info.shape[0]
    # The layout is switched once for the stack, not once per slice inside predict_tiled.
    # Each slice goes in with as many neighbours as the network was trained with (model.z_context).
    with channels_last(net, inference.channels_last):
        normalised = context_stack(info, in_channels(net.spec), mean, std)
        for prob in predict_stack_iter(net, normalised, progress, n, inference):
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
                      threshold: float = 0.5, model_ref: str = "", progress: bool = True, fmt: str = "tiff") -> dict:
    output = Path(output)
    if fmt not in FORMATS:
        raise OutputError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    claim_output(output, overwrite, inputs=[input_path])
    info = inspect_stack(input_path)
    mean, std = stack_stats(info)  # the stack is normalised by its own statistics, as in training
    shape = tuple(info.shape)
    state = {"next_label": 0}
    with atomic_dir(output, marker={"command": "predict"}) as tmp:
        pages = _predicted_slices(net, info, mean, std, inference, instances, threshold, progress, state)
        if fmt == "ome-zarr":
            _write_ome_zarr(tmp / "prediction.ome.zarr", shape, pages)
            outputs = {"prediction.ome.zarr": "OME-NGFF 0.4: image 0 = probability x 255 (uint8), "
                                              "labels/instances/0 = uint32 instance labels"}
        else:
            outputs = _write_tiffs(tmp, shape, pages)
        summary = {"input": str(input_path), "model": model_ref, "shape": list(shape), "objects": state["next_label"],
                   "slice_files": [f.name for f in info.files] or None,
                   "threshold": threshold, "normalisation": {"mean": mean, "std": std},
                   "z_context": in_channels(net.spec),
                   "instances": instances.model_dump(exclude={"h_choices"}), "outputs": outputs}
        write_json(tmp / "summary.json", summary)
    return summary
