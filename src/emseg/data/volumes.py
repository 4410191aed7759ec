"""Unlabelled slices held in memory for self-supervised pretraining (emseg.model.ssl).

Which slices of the project's own stack may be seen without labels (every slice at least
``data.min_gap`` from a validation or test slice, as `prepare` recorded them), and loading them with
their z neighbours, normalised as `prepare` normalised them, rescaled, in float16.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from emseg.errors import ConfigError, DataError


@dataclass
class Volume:
    """Slices of one stack held in memory (float16, normalised and rescaled): ``rows[z]`` is where slice
    z of the stack (of ``n`` slices) sits in ``data``; patches are centred on the slices ``centres``."""

    name: str
    data: np.ndarray  # (m, H, W) float16
    rows: dict[int, int]
    n: int
    centres: list[int]


def eligible_slices(n: int, held_out: list[int], gap: int) -> list[int]:
    """Slices of a stack of ``n`` at least ``gap`` from every held-out (validation, test) slice."""
    return [z for z in range(n) if min((abs(z - h) for h in held_out), default=gap) >= gap]


def _evenly(items: list[int], k: int | None) -> list[int]:
    if k is None or k >= len(items):
        return list(items)
    return [items[int(round(i))] for i in np.linspace(0, len(items) - 1, k)]


def load_volume(name: str, path: str | Path, centres: list[int], k: int, scale: float,
                stats: tuple[float, float] | None = None):
    """Slices ``centres`` of a stack and their z neighbours (model.z_context), normalised (by ``stats``,
    or the stack's own), rescaled, as a :class:`~emseg.model.ssl.Volume` in float16."""
    from tqdm.auto import tqdm

    from emseg.data.io import StackReader, check_image_dtype, check_values, context_indices, inspect_stack
    from emseg.data.io import normalise, stack_stats, where
    from emseg.data.stacks import rescale

    info = inspect_stack(path)
    check_image_dtype(info)
    mean, std = stats or stack_stats(info)
    n = info.shape[0]
    need = sorted({j for z in centres for j in context_indices(z, n, k)})
    data, rows = None, {}
    with StackReader(info) as reader:
        for i, z in enumerate(tqdm(need, desc=f"ssl: load {name}", unit="slice")):
            raw = reader.read(z)
            check_values(raw, where(info, z))
            sl, _ = rescale(normalise(raw, mean, std), None, scale)
            if data is None:
                data = np.empty((len(need), *sl.shape), np.float16)
            data[i] = sl
            rows[z] = i
    return Volume(name, data, rows, n, list(centres))


def own_stack(params, prepared: Path, raw: Path) -> tuple[dict, list[int], list[int]]:
    """The project's training stack as `prepare` recorded it: (file record and statistics, slices for
    restoration, slices for the validation loss)."""
    manifest_path = prepared / "manifest.json"
    if not manifest_path.is_file():
        raise DataError(f"{manifest_path}: not found; run `dvc repro prepare` (or emseg fetch and emseg prepare) "
                        "first: the splits decide which slices self-supervision may see")
    m = json.loads(manifest_path.read_text())
    record = m["files"]["train_image"]
    n = int(record["shape"][0])
    held_out = list(m["splits"]["val"]["slices"])
    if "test_image" not in m["files"]:  # the test block is cut from the same stack
        held_out += list(m["splits"]["test"]["slices"])
    free = eligible_slices(n, held_out, int(m["min_gap"]))
    cfg = params.ssl
    if len(free) <= cfg.val_slices:
        raise ConfigError(f"params.yaml: ssl.val_slices: {cfg.val_slices} leaves no slice to train on: only "
                          f"{len(free)} of the {n} slices of {raw / record['name']} lie data.min_gap="
                          f"{m['min_gap']} from every validation and test slice")
    val = _evenly(free, cfg.val_slices)
    train = _evenly([z for z in free if z not in val], cfg.max_slices)
    stats = (m["normalisation"]["train"]["mean"], m["normalisation"]["train"]["std"])
    return {"path": str(raw / record["name"]), "origin": record.get("origin", "generated"), "n": n,
            "stats": stats, "held_out": sorted(held_out), "min_gap": int(m["min_gap"])}, train, val


def ssl_volumes(params, prepared: Path, raw: Path, params_path: str = "params.yaml"):
    """What self-supervision trains and validates on: (training volumes, the project's and those of
    ``ssl.stacks``; the validation volume; a description of each for the metrics)."""
    from emseg.data.io import inspect_stack

    cfg, k = params.ssl, params.model.z_context
    own, train_z, val_z = own_stack(params, prepared, raw)
    volumes = [load_volume("project", own["path"], train_z, k, cfg.scale, own["stats"])]
    desc = [{"name": "project", "image": own["origin"], "slices": train_z, "val_slices": val_z,
             "held_out": own["held_out"], "min_gap": own["min_gap"], "scale": cfg.scale}]
    for s in cfg.stacks:
        if not Path(s.image).expanduser().exists():
            raise ConfigError(f"{params_path}: ssl.stacks[{s.name}].image: {s.image} not found")
        centres = _evenly(list(range(inspect_stack(s.image).shape[0])), cfg.max_slices)
        volumes.append(load_volume(s.name, s.image, centres, k, s.scale))
        desc.append({"name": s.name, "image": s.image, "slices": len(centres), "scale": s.scale})
    val_volume = load_volume("project-val", own["path"], val_z, k, cfg.scale, own["stats"])
    return volumes, val_volume, desc
