"""Volumes of any size for blockwise prediction: TIFF, folders of slices, Zarr (v2/v3, OME-Zarr) and HDF5.

:func:`open_volume` reads only metadata and returns a :class:`Volume`, a small picklable description
(path, container key, multiscale level, shape, dtype, voxel size) that Dask workers reopen on their
side; :meth:`Volume.read` then decodes one (z, y, x) region. Uncompressed TIFFs (also BigTIFF) are
memory-mapped, so a region costs its own bytes; compressed TIFFs and folders decode whole slices.

The voxel size, in nanometres as (z, y, x), comes from OME-Zarr ``coordinateTransformations`` (with
its axes' units), HDF5 ``element_size_um`` (ilastik, Fiji), OME-TIFF ``PhysicalSize*``, or ImageJ TIFF
metadata and resolution tags; ``None`` when the file does not say. Every failure is a
:class:`DataError` naming the file and, for containers, the key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import tifffile

from emseg.data.io import IMAGE_DTYPES, StackReader, inspect_stack
from emseg.errors import DataError

UNIT_NM = {"nanometer": 1.0, "nm": 1.0, "micrometer": 1e3, "micron": 1e3, "um": 1e3, "µm": 1e3, "\\u00B5m": 1e3,
           "millimeter": 1e6, "mm": 1e6, "angstrom": 0.1, "centimeter": 1e7, "cm": 1e7, "meter": 1e9, "m": 1e9}
VOXEL = tuple[float, float, float]


@dataclass(frozen=True)
class Volume:
    path: Path
    kind: str  # "tiff", "tiff-mmap", "folder", "zarr", "hdf5"
    shape: tuple[int, int, int]
    dtype: str
    key: Optional[str] = None  # the array inside a Zarr group or HDF5 file
    voxel_size: Optional[VOXEL] = None  # nm, (z, y, x)

    @property
    def name(self) -> str:
        return f"{self.path}" + (f" (key {self.key})" if self.key else "")

    def read(self, zs: Sequence[int], ys: slice = slice(None), xs: slice = slice(None)) -> np.ndarray:
        """Slices ``zs`` (any order, repeats allowed) cropped to ``ys``, ``xs``, as stored (z, y, x)."""
        zs = [int(z) for z in zs]
        try:
            if self.kind == "zarr":
                import zarr

                arr = zarr.open_array(str(self.path / self.key) if self.key else str(self.path), mode="r")
                lo, hi = min(zs), max(zs) + 1
                out = np.asarray(arr[_lead(arr.ndim) + (slice(lo, hi), ys, xs)])
                return out[[z - lo for z in zs]]
            if self.kind == "hdf5":
                import h5py

                with h5py.File(self.path, "r") as f:
                    ds = f[self.key]
                    lo, hi = min(zs), max(zs) + 1
                    out = np.asarray(ds[_lead(ds.ndim) + (slice(lo, hi), ys, xs)])
                return out[[z - lo for z in zs]]
            if self.kind == "tiff-mmap":
                mm = tifffile.memmap(self.path, mode="r")
                return np.array(mm.reshape(self.shape)[zs][:, ys, xs])
            with StackReader(inspect_stack(self.path)) as reader:
                return np.stack([reader.read(z)[ys, xs] for z in zs])
        except DataError:
            raise
        except (OSError, ValueError, KeyError) as exc:
            raise DataError(f"{self.name}: cannot read slices {zs[0]}..{zs[-1]} ({type(exc).__name__}: {exc})") \
                from None


def _lead(ndim: int) -> tuple:
    return (0,) * (ndim - 3)  # leading singleton axes (t, c) of a 5D OME array


def _zyx(shape: Sequence[int], where: str) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) < 3:
        raise DataError(f"{where}: is a {len(shape)}D array {shape}; expected a (z, y, x) stack")
    if any(s != 1 for s in shape[:-3]):
        raise DataError(f"{where}: has shape {shape}; expected (z, y, x), optionally after axes of length 1 "
                        "(one channel, one time point)")
    if min(shape[-3:]) < 1:
        raise DataError(f"{where}: is empty (shape {shape})")
    return shape[-3:]


def _check_dtype(dtype, where: str) -> str:
    dtype = np.dtype(dtype)
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise DataError(f"{where}: holds {dtype} values; expected grey integers or floats")
    return dtype.str


def _nm(value: float, unit: Optional[str]) -> Optional[float]:
    if unit is None:
        return None
    factor = UNIT_NM.get(str(unit).strip().lower())
    return float(value) * factor if factor else None


def open_volume(path: str | Path, key: Optional[str] = None, level: int = 0) -> Volume:
    """Describe the volume at ``path``: a TIFF, a folder of slices, a Zarr array or group (``key``, or an
    OME-Zarr image's multiscale ``level``), an HDF5 file (``key``: the dataset path)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file or folder not found")
    if _is_hdf5(path):
        return _open_hdf5(path, key)
    if _is_zarr(path):
        return _open_zarr(path, key, level)
    if key:
        raise DataError(f"{path}: --input-key {key!r} is for Zarr and HDF5 containers, not TIFFs or folders")
    info = inspect_stack(path)
    kind = "folder" if info.files else "tiff"
    if kind == "tiff":
        try:
            mm = tifffile.memmap(path, mode="r")
            kind = "tiff-mmap" if mm.size == int(np.prod(info.shape)) else kind
            del mm
        except (ValueError, OSError):
            pass  # compressed or scattered pages: decoded slice by slice
    voxel = _tiff_voxel(path) if kind != "folder" else None
    return Volume(path, kind, info.shape, np.dtype(info.dtype).str, None, voxel)


def _is_zarr(path: Path) -> bool:
    return path.is_dir() and any((path / m).exists() for m in (".zgroup", ".zarray", "zarr.json"))


def is_container(path: str | Path) -> bool:
    """A Zarr store or an HDF5 file (not a TIFF or a folder of slices)."""
    return _is_zarr(Path(path)) or _is_hdf5(Path(path))


def _is_hdf5(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(8) == b"\x89HDF\r\n\x1a\n"


def _open_hdf5(path: Path, key: Optional[str]) -> Volume:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            names: list[str] = []
            f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
            if not key:
                raise DataError(f"{path}: an HDF5 file needs --input-key naming the dataset; it holds "
                                f"{', '.join(names[:8]) or 'no datasets'}")
            if key not in f or not isinstance(f[key], h5py.Dataset):
                raise DataError(f"{path}: no dataset {key!r} (--input-key); it holds {', '.join(names[:8]) or 'none'}")
            ds = f[key]
            where = f"{path} (key {key})"
            shape, dtype = _zyx(ds.shape, where), _check_dtype(ds.dtype, where)
            um = ds.attrs.get("element_size_um")
            voxel = tuple(float(v) * 1e3 for v in np.ravel(um)[-3:]) if um is not None and np.size(um) >= 3 else None
    except DataError:
        raise
    except OSError as exc:
        raise DataError(f"{path}: not a readable HDF5 file ({exc})") from None
    return Volume(path, "hdf5", shape, dtype, key, voxel)


def _multiscales(attrs: dict) -> Optional[list]:
    return attrs.get("multiscales") or (attrs.get("ome") or {}).get("multiscales")


def _open_zarr(path: Path, key: Optional[str], level: int) -> Volume:
    import zarr

    try:
        node = zarr.open(str(path), mode="r")
        if isinstance(node, zarr.Group) and not key:
            ms = _multiscales(dict(node.attrs))
            if not ms:
                arrays = sorted(name for name, _ in node.arrays())
                raise DataError(f"{path}: a Zarr group needs --input-key naming an array (it is not an OME-Zarr "
                                f"image); it holds {', '.join(arrays[:8]) or 'no arrays'}")
            datasets = ms[0]["datasets"]
            if not 0 <= level < len(datasets):
                raise DataError(f"{path}: --level {level} does not exist; the image has levels 0..{len(datasets) - 1}")
            key = datasets[level]["path"]
            voxel = _ngff_voxel(ms[0], datasets[level])
        else:
            voxel = None
        arr = node[key] if key else node
        if not isinstance(arr, zarr.Array):
            raise DataError(f"{path}: {key!r} (--input-key) is a group, not an array")
    except DataError:
        raise
    except KeyError:
        raise DataError(f"{path}: no array {key!r} (--input-key)") from None
    except (OSError, ValueError, TypeError) as exc:
        raise DataError(f"{path}: not a readable Zarr store ({type(exc).__name__}: {exc})") from None
    where = f"{path} (key {key})" if key else str(path)
    return Volume(path, "zarr", _zyx(arr.shape, where), _check_dtype(arr.dtype, where), key, voxel)


def _ngff_voxel(ms: dict, dataset: dict) -> Optional[VOXEL]:
    axes = ms.get("axes") or []
    scale = None
    for t in dataset.get("coordinateTransformations", []):
        if t.get("type") == "scale":
            scale = [float(s) for s in t["scale"]]
    for t in ms.get("coordinateTransformations", []) or []:
        if t.get("type") == "scale" and scale is not None:
            scale = [a * float(b) for a, b in zip(scale, t["scale"])]
    if scale is None or len(axes) < 3:
        return None
    nm = [_nm(s, a.get("unit") if isinstance(a, dict) else None) for s, a in zip(scale[-3:], axes[-3:])]
    return tuple(nm) if all(v is not None for v in nm) else None


def _tiff_voxel(path: Path) -> Optional[VOXEL]:
    """Voxel size from OME-XML, or from ImageJ metadata (z spacing, unit) with the resolution tags."""
    try:
        with tifffile.TiffFile(path) as tf:
            if tf.ome_metadata:
                found = {a: re.search(rf'PhysicalSize{a}="([0-9.eE+-]+)"', tf.ome_metadata) for a in "ZYX"}
                units = {a: re.search(rf'PhysicalSize{a}Unit="([^"]+)"', tf.ome_metadata) for a in "ZYX"}
                if all(found.values()):
                    nm = [_nm(float(found[a].group(1)), units[a].group(1) if units[a] else "µm") for a in "ZYX"]
                    if all(v is not None for v in nm):
                        return tuple(nm)
            ij = tf.imagej_metadata or {}
            page = tf.pages[0]
            xres, yres = page.tags.get("XResolution"), page.tags.get("YResolution")
            if not (ij.get("unit") and ij.get("spacing") and xres and yres):
                return None
            unit = ij["unit"]
            per = [xres.value[0] / xres.value[1], yres.value[0] / yres.value[1]]  # pixels per unit
            nm = [_nm(float(ij["spacing"]), unit), _nm(1 / per[1], unit), _nm(1 / per[0], unit)]
            return tuple(nm) if all(v is not None for v in nm) else None
    except (tifffile.TiffFileError, ValueError, OSError, ZeroDivisionError):
        return None


def describe(volume: Volume) -> str:
    z, y, x = volume.shape
    size = f"voxel {' x '.join(f'{v:g}' for v in volume.voxel_size)} nm" if volume.voxel_size else "voxel size unknown"
    return f"{volume.name}: {z} x {y} x {x} {np.dtype(volume.dtype)} ({volume.kind}, {size})"


def check_grey(volume: Volume) -> None:
    if np.dtype(volume.dtype) not in [np.dtype(d) for d in IMAGE_DTYPES] and not np.issubdtype(
            np.dtype(volume.dtype), np.floating):
        raise DataError(f"{volume.name}: holds {np.dtype(volume.dtype)}; expected uint8, uint16 or float grey values")
