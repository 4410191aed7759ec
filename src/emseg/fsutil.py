"""Write outputs all-or-nothing, and never replace what emseg did not write.

A failed step leaves no partial file that looks valid: outputs are built in a temporary folder
beside their destination and moved into place only when complete. The temporary names carry the
host and process id (``.NAME.tmp-HOST-PID-XXXX``), so the next run can remove what a process killed
with SIGKILL left behind, without touching the work of a live process on this or another host.

``--overwrite`` is dangerous in a folder that holds a person's data, so :func:`claim_output` lets a
command replace only a folder that emseg itself wrote (it carries the :data:`MARKER` file), never a
folder that is or contains an input or the current folder, and never one with painted labels below it.
Everything created here follows the umask, as files written by ``open`` do, so lab-mates can read it.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from emseg.errors import OutputError

MARKER = ".emseg-output.json"  # written into every folder that emseg may later replace with --overwrite
_HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<host>[A-Za-z0-9._]+)-(?P<pid>\d+)(?:-[a-z0-9_]+)?$")


def output_error(path: Path, exc: OSError) -> OutputError:
    why = "disk full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
    return OutputError(f"{path}: cannot write output ({why})")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: Path, directory: bool) -> None:
    """mkdtemp/mkstemp create 0700/0600 whatever the umask; give the usual permissions back."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def _temp_prefix(final: Path, kind: str) -> str:
    return f".{final.name}.{kind}-{_HOST}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(final: str | Path) -> list[Path]:
    """Remove the temporaries beside ``final`` left by dead processes of this host (kill -9, power loss)."""
    final = Path(final)
    removed = []
    try:
        entries = list(final.parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _TEMP.match(p.name)
        if not m or m["name"] != final.name or m["host"] != _HOST or _pid_alive(int(m["pid"])):
            continue
        _remove(p)
        removed.append(p)
    return removed


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        try:
            p.unlink()
        except OSError:
            pass


@contextmanager
def atomic_dir(final: str | Path, marker: dict | None = None) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``final``; move it into place only if the block succeeds.

    With ``marker`` (what wrote the folder), :data:`MARKER` is written into it, so a later
    ``--overwrite`` may replace it. An existing ``final`` is replaced: callers check with
    :func:`claim_output` first where ``final`` is a place a user chose.
    """
    final = Path(final)
    created = [p for p in (final.parent, *final.parent.parents) if not p.exists()]
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(final)
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(final, "tmp"), dir=final.parent))
        follow_umask(tmp, directory=True)
    except OSError as exc:
        _remove_empty(created)
        raise output_error(final, exc) from None
    try:
        yield tmp
        if marker is not None:
            write_json(tmp / MARKER, {"written_by": "emseg", **marker})
        old = final.with_name(_temp_prefix(final, "old").rstrip("-"))
        if final.exists() or final.is_symlink():
            os.replace(final, old)
        os.replace(tmp, final)
        _remove(old)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise output_error(final, exc) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise


def _remove_empty(folders: list[Path]) -> None:
    """Remove the parent folders this call created (innermost first), if they are still empty."""
    for p in folders:
        try:
            p.rmdir()
        except OSError:
            return


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or path.is_relative_to(folder)


def claim_output(output: str | Path, overwrite: bool, inputs: Iterable[str | Path] = ()) -> None:
    """Refuse, in one line, an output folder whose replacement could lose somebody's data.

    Without ``overwrite`` an existing output is refused. With it, only a folder that emseg wrote
    (it holds :data:`MARKER`) or an empty folder may be replaced, and never one that is or contains
    one of ``inputs`` or the current folder, nor one with painted label templates anywhere below it.
    """
    out = Path(output)
    resolved = out.resolve()
    for given in inputs:
        src = Path(given).resolve()
        if _inside(src, resolved):
            raise OutputError(f"{output}: is or contains the input {given}; choose a new output folder")
    if _inside(Path.cwd().resolve(), resolved) and (out.exists() or out.is_symlink()):
        raise OutputError(f"{output}: is or contains the current folder; choose a new output folder")
    if not (out.exists() or out.is_symlink()):
        return
    if not overwrite:
        raise OutputError(f"{output}: already exists; choose another output or pass --overwrite")
    if out.is_symlink() or not out.is_dir():
        raise OutputError(f"{output}: is a file, not an emseg output folder; refusing to replace it")
    if any(out.iterdir()) and not (out / MARKER).is_file():
        raise OutputError(f"{output}: was not written by emseg (it has no {MARKER}); refusing to replace it "
                          "with --overwrite; choose a new output folder")
    from emseg.data.annotations import painted_templates_below

    painted = painted_templates_below(out)
    if painted:
        names = ", ".join(str(p.relative_to(out)) for p in painted[:3]) + (", ..." if len(painted) > 3 else "")
        raise OutputError(f"{output}: holds painted labels ({names}); refusing to replace it; "
                          "write the new output to another folder")


@contextmanager
def staged_files(dest: str | Path) -> Iterator[Path]:
    """Write several files into a temporary folder, then move each into ``dest`` once all succeeded.

    Unlike :func:`atomic_dir` this keeps other files in ``dest`` (DVC's .gitignore, other stages' outputs).
    """
    dest = Path(dest)
    try:
        dest.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(dest / "staged")
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(dest / "staged", "tmp"), dir=dest))
        follow_umask(tmp, directory=True)
    except OSError as exc:
        raise output_error(dest, exc) from None
    try:
        yield tmp
        for f in sorted(tmp.iterdir()):
            os.replace(f, dest / f.name)
    except OSError as exc:
        raise output_error(dest, exc) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(final: str | Path, mode: str = "w") -> Iterator[Any]:
    """Open a temporary file beside ``final``; rename it into place when the block succeeds."""
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(final)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(final, "tmp"), dir=final.parent)
        follow_umask(Path(tmp), directory=False)
    except OSError as exc:
        raise output_error(final, exc) from None
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
        os.replace(tmp, final)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise output_error(final, exc) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_file(path) as fh:
        json.dump(obj, fh, indent=2, sort_keys=True)
        fh.write("\n")


def copy_files(files: Iterable[Path], dst: Path) -> None:
    """Copy the given files (the slices of a stack, nothing else) into a new folder ``dst``."""
    dst.mkdir()
    for f in files:
        shutil.copyfile(f, dst / f.name)


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
