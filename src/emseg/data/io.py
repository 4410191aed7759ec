"""Stack I/O: read (z, y, x) grey stacks one slice at a time.

A stack is a multi-page TIFF file or a folder of 2D TIFF/PNG slices, taken in natural order
(``s2`` before ``s10``, as a person numbers them), from that folder alone: subfolders, other files
and links to folders are not read. Only headers are read to learn the shape (every slice file's,
so a folder mixing types or sizes is refused before anything is written), and slices are decoded
one at a time, so a gigavoxel stack never needs more than one slice in memory. Compressed TIFFs
(LZW, JPEG, Deflate, ZSTD: what Fiji and microscopes write) decode through imagecodecs. Every failure
becomes a :class:`DataError` naming the file.
"""

from __future__ import annotations

import hashlib
import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import tifffile
from tqdm.auto import tqdm

from emseg.errors import DataError

SLICE_SUFFIXES = (".tif", ".tiff", ".png")
IMAGE_DTYPES = (np.uint8, np.uint16)


@dataclass(frozen=True)
class StackInfo:
    path: Path
    shape: tuple[int, int, int]  # (z, y, x)
    dtype: np.dtype
    files: tuple[Path, ...] = ()  # the slice files, for a folder of slices
    by_page: bool = False  # a TIFF written as one series per page: slice z is page z


def natural_key(name: str) -> tuple:
    """Sort key in which digit runs compare as numbers: s1, s2, s10 (not s1, s10, s2)."""
    return tuple((0, int(part), part) if part.isdigit() else (1, 0, part.lower())
                 for part in re.split(r"(\d+)", name) if part)


def slice_files(folder: Path) -> tuple[Path, ...]:
    """The slice files of a folder stack in natural order: regular files (or links to files) only."""
    return tuple(sorted((p for p in folder.iterdir() if p.suffix.lower() in SLICE_SUFFIXES and p.is_file()),
                        key=lambda p: natural_key(p.name)))


def _header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a 2D slice file from its header alone."""
    try:
        if path.suffix.lower() == ".png":
            from PIL import Image

            with Image.open(path) as im:
                w, h = im.size
                modes = {"L": np.uint8, "1": np.bool_, "I;16": np.uint16, "I;16B": np.uint16, "I": np.int32,
                         "F": np.float32}
                if im.mode not in modes:
                    return (h, w, len(im.getbands())), np.dtype(np.uint8)
                return (h, w), np.dtype(modes[im.mode])
        with tifffile.TiffFile(path) as tf:
            if not tf.series:
                raise DataError(f"{path}: TIFF file holds no images")
            return tuple(tf.series[0].shape), np.dtype(tf.series[0].dtype)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except Exception as exc:  # corrupt files raise many different types
        raise DataError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from None


def read_2d_file(path: Path) -> np.ndarray:
    """One 2D image file (TIFF or PNG) as an array; any failure is a DataError naming the file."""
    try:
        if path.suffix.lower() == ".png":
            from PIL import Image

            with Image.open(path) as im:
                return np.asarray(im)
        return tifffile.imread(path)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except Exception as exc:  # corrupt files raise many different types
        raise DataError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from None


def _check_dims(path: Path, shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(shape) == 2:
        shape = (1, *shape)
    if len(shape) != 3:
        raise DataError(
            f"{path}: expected a 2D slice or a 3D (z, y, x) grey stack, got {len(shape)}D shape {tuple(shape)}"
        )
    if min(shape) == 0:
        raise DataError(f"{path}: the stack is empty (shape {tuple(shape)})")
    return tuple(int(s) for s in shape)  # type: ignore[return-value]


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage().splitlines()[0])


@contextmanager
def _tifffile_warnings():
    """tifffile logs (rather than raises) on truncated or corrupt files; collect those messages."""
    log = logging.getLogger("tifffile")
    handler, propagate = _Collect(), log.propagate
    log.addHandler(handler)
    log.propagate = False
    try:
        yield handler.messages
    finally:
        log.removeHandler(handler)
        log.propagate = propagate


def inspect_stack(path: str | Path) -> StackInfo:
    """Read only headers; validate dimensionality; raise DataError naming the file on any problem."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file or folder not found")
    if path.is_dir():
        try:
            files = slice_files(path)
        except OSError as exc:
            raise DataError(f"{path}: cannot list the folder ({exc.strerror})") from None
        if not files:
            raise DataError(f"{path}: folder holds no .tif/.tiff/.png slices")
        headers = [_header(f) for f in files]
        shape, dtype = headers[0]
        if len(shape) != 2:
            raise DataError(f"{files[0]}: expected a 2D grey slice, got shape {shape} (colour or multi-channel?)")
        for f, (s, d) in zip(files, headers):
            if s != shape or d != dtype:
                raise DataError(f"{path}: slices differ: {files[0].name} is {dtype} {shape[0]}x{shape[1]}, {f.name} is "
                                f"{d} {'x'.join(map(str, s))}; expected one type and size for the whole stack")
        return StackInfo(path, _check_dims(path, (len(files), *shape)), dtype, files)
    try:
        with _tifffile_warnings() as warnings, tifffile.TiffFile(path) as tf:
            if not tf.series:
                raise DataError(f"{path}: TIFF file holds no images")
            series = tf.series[0]
            shape, dtype = tuple(series.shape), np.dtype(series.dtype)
            n_pages = len(tf.pages)
            if "S" in series.axes:
                raise DataError(f"{path}: expected grey images, got {shape[series.axes.index('S')]} channels "
                                f"(axes {series.axes}, shape {shape})")
            by_page = len(tf.series) > 1 and len(shape) == 2
            if by_page:
                if any(s.shape != series.shape or s.dtype != series.dtype for s in tf.series):
                    raise DataError(f"{path}: TIFF pages differ in shape or type; expected one grey stack")
                shape = (n_pages, *shape)
        if warnings:
            raise DataError(f"{path}: corrupt or truncated TIFF ({warnings[0]})")
        if len(shape) == 3 and n_pages not in (1, shape[0]) and not by_page:
            raise DataError(f"{path}: corrupt or truncated TIFF ({n_pages} pages for {shape[0]} slices)")
    except DataError:
        raise
    except (tifffile.TiffFileError, ValueError, OSError, EOFError, IndexError, KeyError) as exc:
        raise DataError(f"{path}: not a readable TIFF file ({type(exc).__name__}: {exc})") from None
    return StackInfo(path, _check_dims(path, shape), dtype, by_page=by_page)


class StackReader:
    """Open a stack once and read slices by index (context manager)."""

    def __init__(self, info: StackInfo):
        self.info = info
        self._tf = None if info.files else tifffile.TiffFile(info.path)

    def __enter__(self) -> "StackReader":
        return self

    def __exit__(self, *exc) -> None:
        if self._tf is not None:
            self._tf.close()

    def read(self, z: int) -> np.ndarray:
        info = self.info
        if not 0 <= z < info.shape[0]:
            raise DataError(f"{info.path}: slice {z} is outside the stack (0..{info.shape[0] - 1})")
        if info.files:
            arr = read_2d_file(info.files[z])
            where = info.files[z]
        else:
            where = f"{info.path} slice {z}"
            try:
                if info.by_page:
                    arr = self._tf.pages[z].asarray()
                else:
                    arr = self._tf.asarray(key=z) if info.shape[0] > 1 else self._tf.asarray()
            except Exception as exc:
                raise DataError(f"{where}: cannot decode (corrupt or truncated TIFF? "
                                f"{type(exc).__name__}: {exc})") from None
        arr = np.asarray(arr)
        if arr.shape != info.shape[1:]:
            raise DataError(f"{where}: slice shape {arr.shape} differs from the stack's {info.shape[1:]}")
        return arr

    def __iter__(self) -> Iterator[np.ndarray]:
        for z in range(self.info.shape[0]):
            yield self.read(z)


def read_slices(info: StackInfo, indices: Sequence[int]) -> Iterator[np.ndarray]:
    with StackReader(info) as reader:
        for z in indices:
            yield reader.read(int(z))


def context_indices(z: int, n: int, k: int) -> list[int]:
    """Slice ``z`` of a stack of ``n`` with its (k - 1) / 2 neighbours on each side, in stack order; an
    index past either end is mirrored back into the stack (reflection without repeating the end slice)."""
    out = []
    for j in range(z - k // 2, z + k // 2 + 1):
        while n > 1 and not 0 <= j < n:
            j = -j if j < 0 else 2 * (n - 1) - j
        out.append(j if n > 1 else 0)
    return out


def context_stack(info: StackInfo, k: int, mean: float, std: float,
                  zs: Sequence[int] | None = None) -> Iterator[np.ndarray]:
    """Slices ``zs`` of a stack (default: every slice), normalised, in that order: (H, W) for ``k`` 1,
    else (k, H, W) with its neighbours (:func:`context_indices`). Each slice is read once while it stays
    in the window of the next one; at most k are held."""
    n = info.shape[0]
    zs = list(range(n)) if zs is None else [int(z) for z in zs]
    held: dict[int, np.ndarray] = {}
    with StackReader(info) as reader:
        for i, z in enumerate(zs):
            if k == 1:
                yield normalise(reader.read(z), mean, std)
                continue
            want = context_indices(z, n, k)
            for j in want:
                if j not in held:
                    held[j] = normalise(reader.read(j), mean, std)
            yield np.stack([held[j] for j in want])
            keep = set(context_indices(zs[i + 1], n, k)) if i + 1 < len(zs) else set()
            for j in [j for j in held if j not in keep]:
                del held[j]


def where(info: StackInfo, z: int) -> str:
    """How errors name slice z: its own file for a folder of slices, the stack and index otherwise."""
    return str(info.files[z]) if info.files else f"{info.path} slice {z}"


MAX_ABS_VALUE = 1e30  # beyond it a float "intensity" is a fill value (float32's max is 3.4e38), not a signal


def check_values(sl: np.ndarray, where: str) -> None:
    """Refuse slices whose values no normalisation can make sense of (before anything is written)."""
    if np.issubdtype(sl.dtype, np.floating):
        if not np.isfinite(sl).all():
            raise DataError(f"{where}: image holds NaN or infinite values")
        big = float(np.abs(sl).max(initial=0.0))
        if big > MAX_ABS_VALUE:
            raise DataError(f"{where}: image holds values up to {big:.3g}, beyond the {MAX_ABS_VALUE:.0e} "
                            "emseg accepts "
                            "(a fill value?); rescale or clip the stack")


def normalise(raw: np.ndarray, mean: float, std: float) -> np.ndarray:
    """z-score one slice to float32; float inputs are computed in float64 so that nothing overflows."""
    work = np.float64 if np.issubdtype(raw.dtype, np.floating) else np.float32
    return ((raw.astype(work) - mean) / std).astype(np.float32)


def check_image_dtype(info: StackInfo) -> None:
    if info.dtype not in IMAGE_DTYPES and not np.issubdtype(info.dtype, np.floating):
        raise DataError(f"{info.path}: expected uint8 or uint16 (or float) grey images, got {info.dtype}")


def check_pair(image: StackInfo, labels: StackInfo) -> None:
    if image.shape != labels.shape:
        raise DataError(
            f"{labels.path}: label stack shape {labels.shape} differs from image stack {image.path} shape {image.shape}"
        )


def sha256_of(path: str | Path, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file, or of a folder stack's slice files (names and bytes) in natural order; streamed."""
    path = Path(path)
    h = hashlib.sha256()
    files = slice_files(path) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
    return h.hexdigest()


def write_stack(path: str | Path, stack: np.ndarray) -> None:
    """Write a (z, y, x) stack as a zlib-compressed multi-page TIFF (one page per slice)."""
    tifffile.imwrite(path, stack, compression="zlib", photometric="minisblack")


def stack_stats(info: StackInfo) -> tuple[float, float]:
    """Mean and standard deviation of a whole stack, streamed slice by slice.

    Per-slice means and squared deviations are combined pairwise (Chan et al.), in float64, so
    neither large values nor many slices lose the variance to cancellation. Values no normalisation
    can use (NaN, inf, fill values near float32's limit) are refused here, before anything is written.
    """
    total, mean, m2 = 0, 0.0, 0.0
    with StackReader(info) as reader:
        for z, sl in enumerate(tqdm(reader, total=info.shape[0], desc=f"statistics {info.path.name}", unit="slice")):
            check_values(sl, where(info, z))
            sl = sl.astype(np.float64)
            n, m = sl.size, float(sl.mean())
            s2 = float(np.square(sl - m).sum())
            delta = m - mean
            mean += delta * n / (total + n)
            m2 += s2 + delta * delta * total * n / (total + n)
            total += n
    std = float(np.sqrt(max(m2 / total, 0.0)))
    if not std > 1e-6 * max(1.0, abs(mean)) or not np.isfinite(std):
        raise DataError(f"{info.path}: image stack is constant (every pixel {mean:g}); nothing to segment")
    return float(mean), std


def label_mapping(values: set[int], path: Path, ignore: Optional[int]) -> int:
    """Return the foreground value (255 or 1) of a label stack given its distinct values."""
    annotated = values - ({ignore} if ignore is not None else set())
    for fg in (255, 1):
        if annotated <= {0, fg}:
            return fg
    allowed = "{0, 255} or {0, 1}" + (f" plus ignore value {ignore}" if ignore is not None else "")
    raise DataError(f"{path}: label values {sorted(annotated - {0, 1, 255}) or sorted(annotated)} unexpected; "
                    f"expected {allowed}")
