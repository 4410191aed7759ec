"""OME-Zarr (OME-NGFF 0.4, Zarr v2 layout) images with a label image and a multiscale pyramid.

Layout of ``prediction.ome.zarr``: the image ``0..L-1`` (probability x 255, uint8) and its label image
``labels/instances/0..L-1`` (uint32). Level ``i`` halves y and x ``i`` times (z is kept: serial
sections are anisotropic, and napari needs only y and x to shrink to open a large result at once);
the voxel size, in nanometres, is in every level's ``scale``. Chunks are ``(1, c, c)`` with c = 512 at
level 0, halving with each level, so the blocks of :mod:`emseg.blockwise` (multiples of 512 in y and x)
write whole chunks at every level and never share one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

CHUNK = 512  # level-0 chunk side in y and x; block sides in y and x are multiples of it
MIN_SIDE = 256  # levels are added while the larger of y and x stays at least this long


def n_levels(shape: Sequence[int]) -> int:
    n, side = 1, max(shape[1:])
    while side >> n >= MIN_SIDE and CHUNK >> n >= 32:
        n += 1
    return n


def level_shape(shape: Sequence[int], i: int) -> tuple[int, int, int]:
    z, y, x = shape
    return z, -(-y // 2 ** i), -(-x // 2 ** i)


def _multiscales(name: str, levels: int, voxel: Optional[Sequence[float]]) -> list[dict]:
    unit = {"unit": "nanometer"} if voxel else {}
    vz, vy, vx = voxel or (1.0, 1.0, 1.0)
    return [{"version": "0.4", "name": name, "axes": [{"name": a, "type": "space", **unit} for a in "zyx"],
             "datasets": [{"path": str(i), "coordinateTransformations": [
                 {"type": "scale", "scale": [float(vz), float(vy) * 2 ** i, float(vx) * 2 ** i]}]}
                 for i in range(levels)]}]


def create(path: Path, shape: Sequence[int], voxel: Optional[Sequence[float]], levels: int) -> None:
    """Empty image and label pyramids with their NGFF metadata (chunks are written later, block by block)."""
    import zarr

    keys = {"name": "v2", "separator": "/"}  # NGFF 0.4 wants nested chunk keys
    root = zarr.open_group(str(path), mode="w-", zarr_format=2)
    root.attrs["multiscales"] = _multiscales("probabilities", levels, voxel)
    labels = root.create_group("labels")
    labels.attrs["labels"] = ["instances"]
    inst = labels.create_group("instances")
    inst.attrs["multiscales"] = _multiscales("instances", levels, voxel)
    inst.attrs["image-label"] = {"version": "0.4", "source": {"image": "../../"}}
    for i in range(levels):
        c = CHUNK >> i
        shp = level_shape(shape, i)
        chunks = (1, min(c, shp[1]), min(c, shp[2]))
        root.create_array(str(i), shape=shp, chunks=chunks, dtype="uint8", fill_value=0, chunk_key_encoding=keys)
        inst.create_array(str(i), shape=shp, chunks=chunks, dtype="uint32", fill_value=0, chunk_key_encoding=keys)


def halve_mean(a: np.ndarray) -> np.ndarray:
    """(z, y, x) uint8 -> (z, ceil(y/2), ceil(x/2)): the mean of each 2x2 (edges repeated), rounded."""
    a = np.pad(a, ((0, 0), (0, a.shape[1] % 2), (0, a.shape[2] % 2)), mode="edge").astype(np.float32)
    m = (a[:, ::2, ::2] + a[:, 1::2, ::2] + a[:, ::2, 1::2] + a[:, 1::2, 1::2]) / 4
    return np.round(m).astype(np.uint8)


def write_pyramid(group_path: Path, data: np.ndarray, start: Sequence[int], levels: int, labels: bool) -> None:
    """Write one block (level-0 data at ``start``, y and x starts multiples of 2**(levels-1)) to every level."""
    import zarr

    z0, y0, x0 = start
    for i in range(levels):
        if i:
            data = data[:, ::2, ::2] if labels else halve_mean(data)
        arr = zarr.open_array(str(group_path / str(i)), mode="r+")
        zs, ys, xs = z0, y0 >> i, x0 >> i
        arr[zs:zs + data.shape[0], ys:ys + data.shape[1], xs:xs + data.shape[2]] = data
