"""Data sources: materialise the raw stacks of the chosen source into one folder.

``fetch_raw`` writes ``train_image``, ``train_labels`` and, where the source has them,
``test_image`` and ``test_labels`` (each a TIFF file or a folder of slices) plus ``source.json``
into a folder that DVC versions as a stage output. Three sources:

- ``generated``: the built-in EM-like generator (no download, deterministic);
- ``tiff``: a user's own stacks, validated and copied as they are;
- ``epfl``: the EPFL hippocampus files from the first mirror that serves them (a local folder, a
  ``file://`` URL or ``http(s)://``), verified by SHA-256 and cached so they are never fetched twice.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from emseg.config import DataParams, EpflSource
from emseg.data.generate import generate_slice
from emseg.data.io import check_image_dtype, check_pair, inspect_stack, sha256_of
from emseg.errors import ConfigError, DataError, DownloadError
from emseg.fsutil import atomic_dir, copy_files, follow_umask, write_json

ROLES = ("train_image", "train_labels", "test_image", "test_labels")
EPFL_FILES = {
    "train_image": "training.tif",
    "train_labels": "training_groundtruth.tif",
    "test_image": "testing.tif",
    "test_labels": "testing_groundtruth.tif",
}


def _write_generated(cfg, out: Path) -> dict[str, Path]:
    """Write the generated train and test stacks; their origin is the generator itself."""
    import tifffile

    files = {}
    total = cfg.slices + cfg.test_slices
    bar = tqdm(total=total, desc="generate EM-like slices", unit="slice")
    for split, n, z0 in (("train", cfg.slices, 0), ("test", cfg.test_slices, cfg.slices)):
        paths = {kind: out / f"{split}_{kind}.tif" for kind in ("image", "labels", "instances")}
        with tifffile.TiffWriter(paths["image"]) as ti, tifffile.TiffWriter(paths["labels"]) as tl, \
                tifffile.TiffWriter(paths["instances"]) as tn:
            for z in range(z0, z0 + n):
                for writer, page in zip((ti, tl, tn),
                                        generate_slice(cfg.seed, z, cfg.height, cfg.width, instances=True)):
                    writer.write(page, compression="zlib", photometric="minisblack", contiguous=False)
                bar.update()
        files.update({f"{split}_{kind}": path for kind, path in paths.items()})
    bar.close()
    return files


def check_label_values(info, ignore) -> None:
    """Every slice of a label stack decodes and holds only 0, the foreground value and ``ignore``."""
    from emseg.data.io import StackReader
    from emseg.data.io import label_mapping

    with StackReader(info) as reader:
        for lab in tqdm(reader, total=info.shape[0], desc=f"check {info.path.name}", unit="slice"):
            label_mapping(set(np.unique(lab).tolist()), info.path, ignore)


def _copy_user_stacks(cfg, out: Path, ignore=None) -> dict[str, Path]:
    if cfg is None:
        raise ConfigError("params.yaml: data.tiff: required when data.source is 'tiff' (keys image, labels)")
    given = {"train_image": cfg.image, "train_labels": cfg.labels,
             "test_image": cfg.test_image, "test_labels": cfg.test_labels}
    if (cfg.test_image is None) != (cfg.test_labels is None):
        raise ConfigError("params.yaml: data.tiff.test_image and data.tiff.test_labels must be given together")
    # Validate every header before copying anything large, naming the user's own files.
    infos = {role: inspect_stack(Path(p).expanduser()) for role, p in given.items() if p is not None}
    for split in ("train", "test"):
        if f"{split}_image" in infos:
            check_image_dtype(infos[f"{split}_image"])
            check_pair(infos[f"{split}_image"], infos[f"{split}_labels"])
    from emseg.data.io import stack_stats
    # Decode every slice before copying: unreadable pages, NaN, fill values and stray label values are
    # refused now, naming the user's file, rather than versioned by DVC and found by `prepare`.
    for role, info in infos.items():
        if role.endswith("_image"):
            stack_stats(info)
        else:
            check_label_values(info, ignore)
    files = {}
    for role, info in infos.items():
        if info.files:  # the slice files it will read, and nothing else from that folder
            dst = out / role
            copy_files(info.files, dst)
        else:
            dst = out / (role + info.path.suffix.lower())
            shutil.copyfile(info.path, dst)
        files[role] = dst
    return files


def _download(url: str, dst: Path, timeout: float) -> None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(dst, "wb") as fh:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {dst.name}") as bar:
                while block := resp.read(1 << 20):
                    fh.write(block)
                    bar.update(len(block))
            if total is not None and fh.tell() != total:
                raise DownloadError(f"{url}: connection closed after {fh.tell()} of {total} bytes")
    except urllib.error.HTTPError as exc:
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadError(f"{url}: cannot download ({reason})") from None


def _fetch_from_mirror(mirror: str, name: str, dst: Path, timeout: float) -> None:
    if mirror.startswith(("http://", "https://")):
        _download(mirror.rstrip("/") + "/" + name, dst, timeout)
        return
    base = Path(mirror.removeprefix("file://")).expanduser()
    src = base / name
    if not src.is_file():
        raise DownloadError(f"{src}: not found on this mirror")
    shutil.copyfile(src, dst)


def ensure_epfl_file(name: str, cfg: EpflSource | None) -> Path:
    """Return the cached, verified copy of one EPFL file, fetching it from the mirrors if needed.

    A hash given in ``cfg.sha256`` must match; without one, the hash of the first download is
    recorded beside the file and every later use is checked against it.
    """
    if cfg is None or not cfg.mirrors:
        raise ConfigError("params.yaml: data.epfl.mirrors: at least one mirror is required to read the EPFL stacks")
    cache = Path(cfg.cache_dir).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    target, record = cache / name, cache / f"{name}.sha256"
    expected = cfg.sha256.get(name)
    if target.exists():
        actual = sha256_of(target)
        known = expected or (record.read_text().strip() if record.exists() else None)
        if known is None or actual == known:
            return target
        os.replace(target, target.with_suffix(target.suffix + ".bad"))  # keep it for inspection
    failures = []
    for mirror in cfg.mirrors:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.part-", dir=cache)
        os.close(fd)
        tmp = Path(tmp_name)
        follow_umask(tmp, directory=False)  # a shared cache stays readable by the group, as the umask says
        try:
            _fetch_from_mirror(mirror, name, tmp, cfg.timeout_s)
            actual = sha256_of(tmp)
            if expected and actual != expected:
                raise DownloadError(f"{mirror}: {name} has SHA-256 {actual}, expected {expected}")
            os.replace(tmp, target)
            record.write_text(actual + "\n")
            return target
        except DownloadError as exc:
            failures.append(str(exc))
        finally:
            tmp.unlink(missing_ok=True)
    raise DownloadError(f"EPFL file {name} is not available from any mirror: " + " | ".join(failures))


def _copy_epfl(cfg, out: Path) -> dict[str, Path]:
    if cfg is None or not cfg.mirrors:
        raise ConfigError("params.yaml: data.epfl.mirrors: at least one mirror is required when data.source is 'epfl'")
    files = {}
    for role, name in EPFL_FILES.items():
        cached = ensure_epfl_file(name, cfg)
        files[role] = out / f"{role}.tif"
        shutil.copyfile(cached, files[role])
    return files


def _origins(params: DataParams) -> dict[str, str]:
    if params.source == "tiff":
        t = params.tiff
        return {k: str(v) for k, v in {"train_image": t.image, "train_labels": t.labels,
                                        "test_image": t.test_image, "test_labels": t.test_labels}.items() if v}
    if params.source == "epfl":
        return {role: f"EPFL {name}" for role, name in EPFL_FILES.items()}
    return {}


def fetch_raw(params: DataParams, out_dir: str | Path) -> dict:
    """Materialise the chosen source into ``out_dir`` (all or nothing); return its description."""
    out_dir = Path(out_dir)
    writers = {"generated": (_write_generated, params.generated), "tiff": (_copy_user_stacks, params.tiff),
               "epfl": (_copy_epfl, params.epfl)}
    write, cfg = writers[params.source]
    with atomic_dir(out_dir) as tmp:
        files = write(cfg, tmp, params.ignore_value) if params.source == "tiff" else write(cfg, tmp)
        origins = _origins(params)
        if "train_image" not in files or "train_labels" not in files:
            raise DataError(f"source {params.source!r} gave no training image and label stacks")
        desc = {"source": params.source, "files": {}}
        for role, path in files.items():
            info = inspect_stack(path)
            desc["files"][role] = {"name": path.name, "origin": origins.get(role, "generated"),
                                   "sha256": sha256_of(path),
                                   "shape": list(info.shape), "dtype": str(info.dtype)}
            if info.files:  # the order slices were read in (natural order of the file names)
                desc["files"][role]["slice_files"] = [f.name for f in info.files]
        desc["config"] = cfg.model_dump() if cfg is not None else None
        write_json(tmp / "source.json", desc)
    return desc


def load_source(raw_dir: str | Path) -> dict:
    raw_dir = Path(raw_dir)
    path = raw_dir / "source.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: not found; run `emseg fetch` (or `dvc repro fetch`) first") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: corrupt ({exc})") from None
