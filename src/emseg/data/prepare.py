"""Prepare: validate raw stacks, choose slices, normalise, write arrays and a manifest.

Outputs in the prepared folder (all written slice by slice through memory maps):

- ``{train,val,test}_images.npy``: float32 (n, y, x), each stack z-scored by its own statistics
  (per-dataset normalisation, so stacks of different contrast are comparable); with ``z_context``
  k > 1, (n, k, y, x): each chosen slice with its (k - 1) / 2 neighbours above and below (the ends of
  the stack mirrored), unlabelled context for the labelled centre slice;
- ``{train,val,test}_labels.npy``: uint8 (n, y, x), 0 background, 1 foreground, ``IGNORE`` (255)
  for pixels the annotator left unlabelled;
- ``{train,val,test}_instances.npy``: uint32 object labels, only where the source knows its objects
  (the generator); instance scores use them as the true objects;
- ``val_context_images.npy`` (the `prepare` stage): each validation slice with the inputs of its two
  z neighbours, (n, 3, y, x) or (n, 3, k, y, x), for choosing z-averaging on the validation slices;
- ``unlabelled_images.npy``: like the training images, for ``data.unlabelled_slices`` slices whose
  labels are not used (semi-supervised training); only when that count is above 0;
- ``manifest.json``: shapes, dtypes, slice indices, foreground fractions, normalisation, hashes.

Peak memory is a few slices, whatever the stack size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from tqdm.auto import tqdm

from emseg import IGNORE
from emseg.config import DataParams
from emseg.data.io import (StackInfo, StackReader, check_image_dtype, check_pair, check_values, context_indices,
                          inspect_stack, label_mapping, normalise, stack_stats, where)
from emseg.data.sources import load_source
from emseg.errors import ConfigError, DataError
from emseg.fsutil import allocated_memmap, atomic_dir, write_json

SliceSpec = Union[int, Sequence[int], None]


def select_slices(spec: SliceSpec, available: Sequence[int], key: str, n_total: int) -> list[int]:
    """An int k picks k slices spread evenly over ``available``; a list is taken as given (and checked)."""
    available = list(available)
    if isinstance(spec, int):
        if spec > len(available):
            raise ConfigError(
                f"params.yaml: {key}: asks for {spec} slices but only {len(available)} are free in a stack of {n_total}"
            )
        pos = [len(available) // 2] if spec == 1 else np.round(np.linspace(0, len(available) - 1, spec))
        return [available[int(p)] for p in pos]
    chosen = [int(z) for z in spec]
    bad = [z for z in chosen if not 0 <= z < n_total]
    if bad:
        raise ConfigError(f"params.yaml: {key}: slices {bad} are outside the stack (0..{n_total - 1})")
    taken = sorted(set(chosen) - set(available))
    if taken:
        raise ConfigError(f"params.yaml: {key}: slices {taken} are already used by another split")
    if len(set(chosen)) != len(chosen):
        raise ConfigError(f"params.yaml: {key}: slice list has duplicates")
    return chosen


def _distance(z: int, others: Sequence[int]) -> int:
    return min((abs(z - o) for o in others), default=1 << 30)


def _away_from(candidates: Sequence[int], others: Sequence[int], gap: int) -> list[int]:
    return [z for z in candidates if _distance(z, others) >= gap]


def _farthest(candidates: Sequence[int], others: Sequence[int], k: int) -> list[int]:
    """k candidates chosen one by one, each as far as possible from ``others`` and from those chosen."""
    chosen: list[int] = []
    pool = list(candidates)
    for _ in range(k):
        z = max(pool, key=lambda c: (_distance(c, list(others) + chosen), -abs(c - pool[len(pool) // 2])))
        chosen.append(z)
        pool.remove(z)
    return sorted(chosen)


def _gap_error(key: str, want: int, room: int, gap: int, n: int) -> ConfigError:
    return ConfigError(f"params.yaml: {key}: {want} slice(s) asked, but only {room} fit at least data.min_gap={gap} "
                       f"slices from every slice of another split in a stack of {n}; label fewer slices, lower "
                       f"data.min_gap, or use a longer stack")


def choose_splits(n: int, train: SliceSpec, val: SliceSpec, test: SliceSpec, gap: int) -> dict[str, list[int]]:
    """Training, validation and (when ``test`` is not None) test slices of one stack of ``n`` slices.

    Any two slices of different splits lie at least ``gap`` slices apart (1: neighbours allowed): in
    a near-isotropic stack a neighbouring slice is a near duplicate, and selection on it says little
    about new data. Validation slices are placed as far from the training slices as the stack allows:
    when both are counts, train and validation slices share one even spacing over the stack (validation
    interleaved among the training slices), so each validation slice sits a full spacing from its
    neighbours. An int test count is a block at the end of the stack.
    """
    test_idx: list[int] = []
    if test is not None:
        if isinstance(test, int):
            if test >= n:
                raise ConfigError(f"params.yaml: data.test_slices: {test} slices leave none to train on "
                                  f"(stack has {n})")
            test_idx = list(range(n - test, n))
        else:
            test_idx = select_slices(test, range(n), "data.test_slices", n)
    everything = [z for z in range(n) if z not in test_idx]
    free = _away_from(everything, test_idx, gap)
    if isinstance(train, int) and isinstance(val, int):
        if train + val > len(free):
            raise _gap_error("data.train_slices + data.val_slices", train + val, len(free), gap, n)
        slots = select_slices(train + val, free, "data.train_slices + data.val_slices", n)
        val_pos = sorted({min(len(slots) - 1, int(round((j + 0.5) * len(slots) / val))) for j in range(val)})
        val_idx = [slots[i] for i in val_pos]
        if len(val_idx) < val or min(np.diff(slots), default=gap) < gap:
            room = 1 + (free[-1] - free[0]) // gap if free else 0
            raise _gap_error("data.train_slices + data.val_slices", train + val, room, gap, n)
        train_idx = [z for z in slots if z not in val_idx]
    elif isinstance(val, int):
        train_idx = select_slices(train, everything, "data.train_slices", n)
        candidates = _away_from([z for z in free if z not in train_idx], train_idx, gap)
        if len(candidates) < val:
            raise _gap_error("data.val_slices", val, len(candidates), gap, n)
        val_idx = _farthest(candidates, train_idx + test_idx, val)
    else:
        val_idx = select_slices(val, everything, "data.val_slices", n)
        if isinstance(train, int):
            candidates = _away_from([z for z in free if z not in val_idx], val_idx, gap)
            if len(candidates) < train:
                raise _gap_error("data.train_slices", train, len(candidates), gap, n)
            train_idx = select_slices(train, candidates, "data.train_slices", n)
        else:
            train_idx = select_slices(train, [z for z in everything if z not in val_idx], "data.train_slices", n)
    splits = {"train": sorted(train_idx), "val": sorted(val_idx), "test": test_idx}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        close = [(x, y) for x in splits[a] for y in splits[b] if abs(x - y) < gap]
        if close:
            x, y = close[0]
            raise ConfigError(f"params.yaml: data.{a}_slices / data.{b}_slices: {a} slice {x} and {b} slice {y} are "
                              f"{abs(x - y)} apart; data.min_gap asks for at least {gap}")
    return splits


def unlabelled_slices(n: int, train: Sequence[int], held_out: Sequence[int], gap: int, count: int) -> list[int]:
    """``count`` slices for semi-supervised training, spread evenly over those that are not training
    slices and lie at least ``gap`` from every validation and test slice of the stack: their images
    (and z neighbours, gap > z_context // 2) never show what selection and reporting are measured on."""
    free = _away_from([z for z in range(n) if z not in train], held_out, gap)
    if count > len(free):
        raise ConfigError(f"params.yaml: data.unlabelled_slices: {count} asked, but only {len(free)} slices of the "
                          f"stack of {n} are neither training slices nor within data.min_gap={gap} of a validation "
                          "or test slice")
    return select_slices(count, free, "data.unlabelled_slices", n)


def split_distances(splits: dict[str, list[int]]) -> dict[str, int | None]:
    """For each split, the smallest z-distance from one of its slices to a slice of another split."""
    out = {}
    for name, idx in splits.items():
        others = [z for other, zs in splits.items() if other != name for z in zs]
        out[name] = min((_distance(z, others) for z in idx), default=None) if others and idx else None
    return out


def _write_inputs(name, img_info, indices, stats, out: Path, z_context: int = 1):
    """``{name}_images.npy``: the network inputs of the chosen slices, yielding each slice index once
    its input is written (so a caller can write what belongs to it beside)."""
    n, (h, w) = len(indices), img_info.shape[1:]
    k = z_context
    images = allocated_memmap(out / f"{name}_images.npy", np.float32, (n, h, w) if k == 1 else (n, k, h, w))
    mean, std = stats
    with StackReader(img_info) as ir:
        for i, z in enumerate(tqdm(indices, desc=f"prepare {name}", unit="slice")):
            for c, zc in enumerate(context_indices(z, img_info.shape[0], k)):  # [z] itself when k is 1
                img = ir.read(zc)
                check_values(img, where(img_info, zc))
                images[(i,) if k == 1 else (i, c)] = normalise(img, mean, std)
            yield i, z
    images.flush()
    del images


def _write_val_context(img_info, indices, stats, out: Path, z_context: int = 1):
    """``val_context_images.npy``: each validation slice z with the network inputs of z - 1, z and z + 1
    (mirrored at the ends of the stack, as prediction mirrors them), which z-averaging predicts: for
    ``z_context`` 1 the three slices, (n, 3, H, W); else the three windows of z_context slices centred
    on them, (n, 3, k, H, W). A window of the neighbour beyond an end is that neighbour's own window
    (z = 0: slice 1's, in stack order), never one more slice of the mirrored wider window, which at
    an end would run backwards in z. Returns the shape of one input, for the manifest."""
    n, (h, w), k = len(indices), img_info.shape[1:], z_context
    per_input = (3,) if k == 1 else (3, k)
    images = allocated_memmap(out / "val_context_images.npy", np.float32, (n, *per_input, h, w))
    mean, std = stats
    with StackReader(img_info) as ir:
        for i, z in enumerate(tqdm(indices, desc="prepare val_context", unit="slice")):
            for j, c in enumerate(context_indices(z, img_info.shape[0], 3)):
                for m, zc in enumerate(context_indices(c, img_info.shape[0], k)):
                    img = ir.read(zc)
                    check_values(img, where(img_info, zc))
                    images[(i, j) if k == 1 else (i, j, m)] = normalise(img, mean, std)
    images.flush()
    del images
    return 3 if k == 1 else [3, k]


def _write_split(name, img_info, lab_info, indices, stats, out: Path, ignore, fg_value, z_context: int = 1) -> dict:
    n, (h, w) = len(indices), img_info.shape[1:]
    k = z_context
    labels = allocated_memmap(out / f"{name}_labels.npy", np.uint8, (n, h, w))
    fg = labelled = 0
    with StackReader(lab_info) as lr:
        for i, z in _write_inputs(name, img_info, indices, stats, out, k):
            lab = lr.read(z)
            label_mapping(set(np.unique(lab).tolist()), lab_info.path, ignore)  # every slice checked
            out_lab = np.where(lab == fg_value, 1, 0).astype(np.uint8)
            if ignore is not None:
                out_lab[lab == ignore] = IGNORE
            labels[i] = out_lab
            fg += int((out_lab == 1).sum())
            labelled += int((out_lab != IGNORE).sum())
    labels.flush()
    del labels
    if labelled == 0:
        raise DataError(f"{lab_info.path}: every pixel of the {name} slices {list(indices)} is the ignore value")
    return {"slices": [int(z) for z in indices], "shape": [n, h, w], "z_context": k,
            "foreground_fraction": fg / labelled,
            "labelled_fraction": labelled / (n * h * w)}


def _write_instances(name, info, indices, out: Path) -> None:
    """The split's object labels (uint32, 0 background), slice for slice beside its labels."""
    n, (h, w) = len(indices), info.shape[1:]
    objects = allocated_memmap(out / f"{name}_instances.npy", np.uint32, (n, h, w))
    with StackReader(info) as r:
        for i, z in enumerate(indices):
            objects[i] = r.read(z)
    objects.flush()
    del objects


def _fg_value(lab_info: StackInfo, indices, ignore) -> int:
    values: set[int] = set()
    with StackReader(lab_info) as lr:
        for z in indices:
            values |= set(np.unique(lr.read(z)).tolist())
    return label_mapping(values, lab_info.path, ignore)


def prepare(params: DataParams, raw_dir: str | Path, out_dir: str | Path, z_context: int = 1,
            val_neighbours: bool = False) -> dict:
    """Validate the raw stacks, pick slices, write normalised arrays and the manifest (all or nothing).
    ``z_context`` (model.z_context): how many slices each input holds, the labelled one in the middle.
    ``val_neighbours``: also ``val_context_images.npy``, each validation slice with the inputs of its
    two z neighbours (:func:`_write_val_context`), so that a choice of z-averaging can be made on the
    validation slices."""
    desc = load_source(raw_dir)
    try:
        return _prepare(params, Path(raw_dir), Path(out_dir), desc, z_context, val_neighbours)
    except DataError as exc:
        # Name the user's own file, not our copy of it under data/raw.
        msg = str(exc)
        for f in desc["files"].values():
            origin = f.get("origin", "generated")
            if origin != "generated":
                msg = msg.replace(str(Path(raw_dir) / f["name"]), origin)
        raise DataError(msg) from None


def _prepare(params: DataParams, raw_dir: Path, out_dir: Path, desc: dict, z_context: int = 1,
             val_neighbours: bool = False) -> dict:
    infos = {role: inspect_stack(raw_dir / f["name"]) for role, f in desc["files"].items()}
    train_img, train_lab = infos["train_image"], infos["train_labels"]
    check_image_dtype(train_img)
    check_pair(train_img, train_lab)
    n = train_img.shape[0]
    gap = params.min_gap

    if "test_image" in infos:
        if params.test_slices is not None:
            raise ConfigError("params.yaml: data.test_slices: must be null when the source has its own test stack")
        test_img, test_lab = infos["test_image"], infos["test_labels"]
        check_image_dtype(test_img)
        check_pair(test_img, test_lab)
        splits = choose_splits(n, params.train_slices, params.val_slices, None, gap)
        test_idx = list(range(test_img.shape[0]))
        same_stack = {"train": splits["train"], "val": splits["val"]}
    else:
        if params.test_slices is None:
            raise ConfigError("params.yaml: data.test_slices: required (an int or a list) when the source has no "
                              "test stack")
        test_img, test_lab = train_img, train_lab
        # A contiguous block at the end, min_gap away: slices next to training slices leak through 3D continuity.
        splits = choose_splits(n, params.train_slices, params.val_slices, params.test_slices, gap)
        test_idx = splits["test"]
        same_stack = splits
    train_idx, val_idx = splits["train"], splits["val"]
    distances = split_distances(same_stack)

    ignore = params.ignore_value
    fg_train = _fg_value(train_lab, train_idx + val_idx, ignore)
    fg_test = _fg_value(test_lab, test_idx, ignore) if test_lab is not train_lab else fg_train
    train_stats = stack_stats(train_img)
    test_stats = stack_stats(test_img) if test_img is not train_img else train_stats

    manifest = {"source": desc["source"], "files": desc["files"], "ignore_value": ignore, "min_gap": gap,
                "z_context": z_context,
                "nearest_other_split": distances,
                "internal_labels": {"background": 0, "foreground": 1, "ignore": IGNORE},
                "normalisation": {"train": dict(zip(("mean", "std"), train_stats)),
                                  "test": dict(zip(("mean", "std"), test_stats))},
                "label_foreground_value": {"train": fg_train, "test": fg_test}, "splits": {}}
    with atomic_dir(out_dir) as tmp:
        splits = (("train", train_img, train_lab, train_idx, train_stats, fg_train),
                  ("val", train_img, train_lab, val_idx, train_stats, fg_train),
                  ("test", test_img, test_lab, test_idx, test_stats, fg_test))
        for name, img, lab, idx, stats, fgv in splits:
            manifest["splits"][name] = _write_split(name, img, lab, idx, stats, tmp, ignore, fgv, z_context)
        if val_neighbours:  # (no key otherwise: manifests, and the hashes made of them, stay as they were)
            manifest["splits"]["val"]["context_images"] = _write_val_context(train_img, val_idx, train_stats, tmp,
                                                                             z_context)
        # Object labels where the source knows them (the generator's 2D objects): instance scores use them.
        role = {"train": "train_instances", "val": "train_instances",
                "test": "test_instances" if "test_image" in infos else "train_instances"}
        if all(r in infos for r in set(role.values())):
            for name, idx in (("train", train_idx), ("val", val_idx), ("test", test_idx)):
                _write_instances(name, infos[role[name]], idx, tmp)
            manifest["instances"] = {"truth": "object labels of the source", "objects": "2d"}
        else:
            manifest["instances"] = None
        held_out = {"validation": val_idx, "test": test_idx if test_img is train_img else []}
        if params.unlabelled_slices:  # (no key otherwise: manifests, and the hashes made of them, stay as they were)
            idx = unlabelled_slices(n, train_idx, [z for zs in held_out.values() for z in zs], gap,
                                    params.unlabelled_slices)
            for _ in _write_inputs("unlabelled", train_img, idx, train_stats, tmp, z_context):
                pass
            manifest["unlabelled"] = {"slices": idx, "shape": [len(idx), *train_img.shape[1:]], "z_context": z_context}
        manifest["annotations"] = _write_annotations(params.annotations, tmp, desc, held_out, gap, z_context)
        if manifest["splits"]["train"]["foreground_fraction"] == 0:
            raise DataError(f"{train_lab.path}: the training slices {train_idx} hold no foreground; nothing to learn")
        write_json(tmp / "manifest.json", manifest)
    return manifest


def _stack_of(record: dict, desc: dict) -> str | None:
    """Which raw stack (train_image, test_image) a painted crop was cut from, if it was one of them."""
    for role in ("train_image", "test_image"):
        f = desc["files"].get(role)
        if f is None:
            continue
        if record.get("source_sha256") and record["source_sha256"] == f.get("sha256"):
            return role
        origin = f.get("origin")
        if record.get("source") and origin and Path(origin).exists() and \
                Path(record["source"]).resolve() == Path(origin).resolve():
            return role
    return None


def _refuse_held_out(records: list[dict], desc: dict, held_out: dict[str, list[int]], gap: int, folder: str) -> None:
    """Painted crops from the test stack, or from validation or test slices (or within min_gap of them)
    of the training stack, would leak what selection and reporting are measured on: refused."""
    for r in records:
        stack = _stack_of(r, desc)
        where = f"{Path(folder) / r['file']}: painted crop of slice {r['slice']}"
        if stack == "test_image":
            raise DataError(f"{where} of the test stack; test data is never trained on: move it out of {folder}")
        if stack != "train_image":
            continue
        for split, zs in held_out.items():
            near = [z for z in zs if abs(z - int(r["slice"])) < gap]
            if near:
                raise DataError(f"{where} lies {abs(near[0] - int(r['slice']))} slice(s) from {split} slice {near[0]} "
                                f"(data.min_gap {gap}); label slices away from the {split} slices, "
                                f"or move it out of {folder}")


def _write_annotations(folder: Optional[str], out: Path, desc: dict, held_out: dict[str, list[int]], gap: int,
                       z_context: int = 1) -> dict:
    """Painted `emseg suggest` templates under ``folder`` -> annotations_{images,labels}.npy (the images
    with their z neighbours for ``z_context`` > 1, as the training slices)."""
    from emseg.data.annotations import collect, stack_padded

    if not folder:
        return {"folder": None, "patches": 0}
    images, labels, records = collect(folder, z_context)
    _refuse_held_out(records, desc, held_out, gap, folder)
    if images:
        x, y = stack_padded(images, labels)
        np.save(out / "annotations_images.npy", x)
        np.save(out / "annotations_labels.npy", y)
    return {"folder": folder, "patches": len(images), "labelled_pixels": sum(r["labelled_pixels"] for r in records),
            "records": records}


def load_instances(prepared_dir: str | Path, name: str) -> np.ndarray | None:
    """The split's object labels (memory-mapped) where the source gave them, else None."""
    path = Path(prepared_dir) / f"{name}_instances.npy"
    return np.load(path, mmap_mode="r") if path.exists() else None


def load_unlabelled(prepared_dir: str | Path) -> np.ndarray | None:
    """The unlabelled slices' inputs (memory-mapped) where prepare kept some (data.unlabelled_slices)."""
    path = Path(prepared_dir) / "unlabelled_images.npy"
    return np.load(path, mmap_mode="r") if path.exists() else None


def load_val_context(prepared_dir: str | Path) -> np.ndarray | None:
    """The validation slices with the inputs of their z neighbours (memory-mapped; (n, 3, H, W) or
    (n, 3, k, H, W), :func:`_write_val_context`), where prepare kept them (the `prepare` stage always
    does), else None."""
    path = Path(prepared_dir) / "val_context_images.npy"
    if not path.exists():
        return None
    wide = np.load(path, mmap_mode="r")
    if wide.ndim == 4 and wide.shape[1] != 3:  # emseg before 2026-12-07: one wider window (k + 2), 2.5D
        raise ConfigError(f"{path}: validation neighbours in an earlier layout ({wide.shape[1]} slices, "
                          "whose end windows run backwards in z): run `emseg prepare` again (dvc repro does)")
    return wide


def load_val_inputs(prepared_dir: str | Path, need_neighbours: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The validation inputs and labels to predict: with their z neighbours where prepare kept them (what
    z-averaging needs; predictions without it take the middle slices), else as prepared.
    ``need_neighbours``: refuse data prepared without them."""
    x, y = load_split(prepared_dir, "val")
    wide = load_val_context(prepared_dir)
    if wide is None and need_neighbours:
        raise ConfigError(f"{prepared_dir}: holds no z neighbours of the validation slices, which "
                          "evaluate.z_average and evaluate.choose_z_average need: run `emseg prepare` again "
                          "(dvc repro does)")
    return (x if wide is None else wide), y


def load_split(prepared_dir: str | Path, name: str, mmap: bool = True) -> tuple[np.ndarray, np.ndarray]:
    d = Path(prepared_dir)
    try:
        mode = "r" if mmap else None
        return np.load(d / f"{name}_images.npy", mmap_mode=mode), np.load(d / f"{name}_labels.npy", mmap_mode=mode)
    except FileNotFoundError as exc:
        raise DataError(f"{exc.filename}: prepared data missing; run `emseg prepare` first") from None
