"""Write outputs all-or-nothing: a failed step leaves no partial file that looks valid."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from emseg.errors import OutputError


def _output_error(path: Path, exc: OSError) -> OutputError:
    why = "disk full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
    return OutputError(f"{path}: cannot write output ({why})")


@contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``final``; move it into place only if the block succeeds."""
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    except OSError as exc:
        raise _output_error(final, exc) from None
    try:
        yield tmp
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _output_error(final, exc) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def staged_files(dest: str | Path) -> Iterator[Path]:
    """Write several files into a temporary folder, then move each into ``dest`` once all succeeded.

    Unlike :func:`atomic_dir` this keeps other files in ``dest`` (DVC's .gitignore, other stages' outputs).
    """
    dest = Path(dest)
    try:
        dest.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".staged-", dir=dest))
    except OSError as exc:
        raise _output_error(dest, exc) from None
    try:
        yield tmp
        for f in sorted(tmp.iterdir()):
            os.replace(f, dest / f.name)
    except OSError as exc:
        raise _output_error(dest, exc) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(final: str | Path, mode: str = "w") -> Iterator[Any]:
    """Open a temporary file beside ``final``; rename it into place when the block succeeds."""
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
    except OSError as exc:
        raise _output_error(final, exc) from None
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
        os.replace(tmp, final)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise _output_error(final, exc) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_file(path) as fh:
        json.dump(obj, fh, indent=2, sort_keys=True)
        fh.write("\n")


def copy_path(src: Path, dst: Path) -> None:
    """Copy a file or a folder of slices."""
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copyfile(src, dst)


def allocated_memmap(path: str | Path, dtype, shape: tuple[int, ...]):
    """A new ``.npy`` memory map whose disk blocks are reserved up front.

    A plain memory map is a sparse file: on a full disk the first write to an unbacked page kills the
    process with SIGBUS, no error message and no clean-up. Reserving the blocks (``posix_fallocate``)
    turns that into an ``OSError`` (ENOSPC) here, before any work is done.
    """
    import numpy as np

    path = Path(path)
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    if hasattr(os, "posix_fallocate"):
        try:
            with open(path, "r+b") as fh:
                os.posix_fallocate(fh.fileno(), 0, path.stat().st_size)
        except OSError:
            del mm
            raise  # the caller's atomic_dir names its final output, not this temporary file
    return mm
