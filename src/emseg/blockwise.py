"""Blockwise prediction of volumes larger than memory, on Dask, into an OME-Zarr; objects in 3D.

The work is five passes over blocks, each a Dask task that reads and writes its own region only:

1. ``stats``: per block count, mean and squared deviations, combined (Chan et al., in a fixed order)
   into the whole volume's mean and sd, which normalise it as training did;
2. ``predict``: prediction blocks (whole slices up to 2048 px, two slices deep) read their slices
   with their z neighbours (``model.z_context``, ends mirrored), are predicted tile by tile exactly as
   the in-process path does, and write the probability pyramid and a foreground mask;
3. ``label``: object blocks (default 16 x 512 x 512 in 3D, 4 whole slices in 2D) read the mask with a
   halo, split objects (a 3D watershed, or per slice with ``2d``), write their core's labels as
   block-unique ids, and keep the labels they found on the plane just inside each lower neighbour.
   2D objects of slices up to 2048 px are split by the prediction blocks themselves (``Job.fused``);
   this pass is then skipped;
4. ``stitch``: on those planes each block's objects are matched with the neighbour's (the larger
   share of either object's voxels there); the client joins matches with union-find;
5. ``relabel``: the final consecutive ids go into the label pyramid; each block returns its objects'
   voxels, bounding boxes and coordinate sums, which the client adds up into ``objects.csv``.

Resumable: the job works in ``OUTPUT.partial/``; every finished (pass, block) writes its result to
``state/done/`` atomically, after its data. A run killed at any point, run again with the same
arguments, skips what is done; a killed worker's task reruns elsewhere and rewrites the same chunks.
The folder becomes ``OUTPUT`` only when every block of every pass is done.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from itertools import product
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from emseg import ngff
from emseg.data.containers import Volume
from emseg.errors import ConfigError, OutputError
from emseg.fsutil import output_error

PASSES = ("stats", "predict", "label", "stitch", "relabel")
BYTES_PER_VOXEL_3D = 150  # peak of a 3D watershed (see InstanceParams.truth), per voxel of a block and halo
BYTES_PER_VOXEL_2D = 40
IOU = 0.5  # objects on the two sides of a block face are one when their overlap there has IoU above this


@dataclass(frozen=True)
class Grid:
    """Blocks of ``block`` voxels tiling ``shape``; ``halo`` voxels more on each side when read."""

    shape: tuple[int, int, int]
    block: tuple[int, int, int]
    halo: tuple[int, int, int] = (0, 0, 0)

    def blocks(self) -> list[tuple[int, int, int]]:
        return list(product(*(range(-(-s // b)) for s, b in zip(self.shape, self.block))))

    def core(self, b) -> tuple[slice, ...]:
        return tuple(slice(i * n, min((i + 1) * n, s)) for i, n, s in zip(b, self.block, self.shape))

    def outer(self, b) -> tuple[slice, ...]:
        return tuple(slice(max(c.start - h, 0), min(c.stop + h, s))
                     for c, h, s in zip(self.core(b), self.halo, self.shape))

    def index(self, b) -> int:
        return int(np.ravel_multi_index(b, [-(-s // n) for s, n in zip(self.shape, self.block)]))


@dataclass(frozen=True)
class Job:
    volume: Volume
    work: str  # OUTPUT.partial
    predict_grid: Grid
    label_grid: Grid
    levels: int
    z_context: int
    inference: dict
    threshold: float
    instances: dict  # min_size, h, smooth
    mode: str  # "3d" or "2d"
    model_sha256: str
    threads: int = 1
    fused: bool = False  # 2D objects in the prediction blocks themselves (same grid): no label pass
    z_average: bool = False  # each probability averaged with its z neighbours' (evaluate.z_average)

    @property
    def image(self) -> Path:
        return Path(self.work) / "prediction.ome.zarr"

    @property
    def state(self) -> Path:
        return Path(self.work) / "state"

    def identity(self) -> dict:
        """What makes two runs the same job (a resumed run must match it)."""
        d = asdict(self)
        d.pop("threads")
        if not d["z_average"]:  # as a job written before the setting existed, which may be resumed
            d.pop("z_average")
        d["volume"] = {**d["volume"], "path": str(Path(self.volume.path).resolve())}
        return json.loads(json.dumps(d, default=str))


def estimate_bytes(job: Job) -> int:
    """Peak memory of the largest task: an object block with its halo, or a prediction block."""
    zl, yl, xl = (b + 2 * h for b, h in zip(job.label_grid.block, job.label_grid.halo))
    # 2D: the float mask, local and global uint64 ids and a temporary of them, plus one slice's watershed
    label = zl * yl * xl * BYTES_PER_VOXEL_3D if job.mode == "3d" else zl * yl * xl * 28 + yl * xl * BYTES_PER_VOXEL_2D
    zp, yp, xp = job.predict_grid.block
    tile = job.inference["tile"]
    # data (and the two neighbours z-averaging predicts too), activations, weights
    predict = (zp + job.z_context + 2 * job.z_average) * yp * xp * 12 + tile * tile * 1500 + 400 * 2 ** 20
    return max(label, predict)


# ---------------------------------------------------------------- tasks (run on the workers)

_NETS: dict = {}


def _net(blob: bytes, sha: str, threads: int):
    import torch

    from emseg.model.network import load_weights

    if sha not in _NETS:
        if threads:
            torch.set_num_threads(threads)
        _NETS.clear()
        with _tmp_weights(blob) as path:
            _NETS[sha] = load_weights(path)[0].eval()
    return _NETS[sha]


class _tmp_weights:
    def __init__(self, blob: bytes):
        import tempfile

        fd, self.path = tempfile.mkstemp(suffix=".pt")
        with os.fdopen(fd, "wb") as fh:
            fh.write(blob)

    def __enter__(self) -> str:
        return self.path

    def __exit__(self, *exc) -> None:
        os.unlink(self.path)


def _done_path(job: Job, pass_name: str, b) -> Path:
    return job.state / "done" / f"{pass_name}-{'_'.join(map(str, b))}.json"


def _mark_done(job: Job, pass_name: str, b, result) -> dict:
    path = _done_path(job, pass_name, b)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, path)  # atomic: a marker is either absent or whole
    return result


def task(job: Job, pass_name: str, b: tuple, extra=None, blob: Optional[bytes] = None):
    """One (pass, block): do it, record it as done (with the seconds it took), return its result."""
    t = time.perf_counter()
    result = TASKS[pass_name](job, tuple(b), extra, blob)
    return _mark_done(job, pass_name, b, {**result, "task_seconds": time.perf_counter() - t})


def _stats(job: Job, b, extra, blob):
    from emseg.data.io import check_values

    zs, ys, xs = job.predict_grid.core(b)
    data = job.volume.read(range(zs.start, zs.stop), ys, xs)
    check_values(data, f"{job.volume.name} slices {zs.start}..{zs.stop - 1}")
    data = data.astype(np.float64)
    m = float(data.mean())
    return {"n": int(data.size), "mean": m, "m2": float(np.square(data - m).sum())}


def combine_stats(parts: Sequence[dict], where: str) -> tuple[float, float]:
    from emseg.errors import DataError

    total, mean, m2 = 0, 0.0, 0.0
    for p in parts:
        n, delta = p["n"], p["mean"] - mean
        mean += delta * n / (total + n)
        m2 += p["m2"] + delta * delta * total * n / (total + n)
        total += n
    std = float(np.sqrt(max(m2 / total, 0.0)))
    if not std > 1e-6 * max(1.0, abs(mean)) or not np.isfinite(std):
        raise DataError(f"{where}: image volume is constant (every voxel {mean:g}); nothing to segment")
    return float(mean), std


def _predict(job: Job, b, extra, blob):
    import zarr

    from emseg.data.io import context_indices, normalise
    from emseg.inference import predict_tiled, z_average
    from emseg.model.network import channels_last

    mean, std = extra
    net = _net(blob, job.model_sha256, job.threads)
    zs, ys, xs = job.predict_grid.core(b)
    n = job.volume.shape[0]
    cores = range(zs.start, zs.stop)
    # z-averaging: the slices next to the block are predicted too (mirrored at the ends of the stack).
    around = {z: context_indices(z, n, 3) if job.z_average else [z] for z in cores}
    want = {z: context_indices(z, n, job.z_context) for z in sorted({j for js in around.values() for j in js})}
    needed = sorted({j for js in want.values() for j in js})
    raw = dict(zip(needed, job.volume.read(needed, ys, xs)))
    probs = {}
    with channels_last(net, job.inference["channels_last"]):
        for z, js in want.items():
            image = normalise(raw[z], mean, std) if job.z_context == 1 else np.stack(
                [normalise(raw[j], mean, std) for j in js])
            probs[z] = predict_tiled(net, image, **job.inference)
    prob = np.stack([z_average(*(probs[j] for j in around[z])) if job.z_average else probs[z] for z in cores])
    ngff.write_pyramid(job.image, np.round(prob * 255).astype(np.uint8), (zs.start, ys.start, xs.start),
                       job.levels, labels=False)
    mask = (prob > job.threshold).astype(np.uint8)
    if job.fused:  # the block holds whole slices: their 2D objects are split here, from memory
        return _label_mask(job, b, mask)
    zarr.open_array(str(job.state / "mask.zarr"), mode="r+")[zs, ys, xs] = mask
    return {}


def _label(job: Job, b, extra, blob):
    import zarr

    return _label_mask(job, b, zarr.open_array(str(job.state / "mask.zarr"), mode="r")[job.label_grid.outer(b)])


def _label_mask(job: Job, b, mask: np.ndarray) -> dict:
    """Objects of the (0/1) mask read over block ``b`` and its halo: the core's block-unique ids into
    ``raw.zarr``, the planes its lower neighbours will match against, and the ids found."""
    import zarr

    from emseg.instances import split_instances

    g = job.label_grid
    core, outer = g.core(b), g.outer(b)
    p = job.instances
    if job.mode == "3d":
        local = split_instances(mask, 0.5, p["min_size"], p["h"], p["smooth"]).astype(np.uint64)
    else:
        local, top = np.zeros(mask.shape, np.uint64), 0
        for z in range(mask.shape[0]):
            lab = split_instances(mask[z], 0.5, p["min_size"], p["h"], p["smooth"]).astype(np.uint64)
            local[z] = np.where(lab > 0, lab + top, 0)
            top += int(lab.max())
    base = np.uint64(g.index(b) + 1) << np.uint64(32)
    ids = np.where(local > 0, local + base, np.uint64(0))
    inner = tuple(slice(c.start - o.start, c.stop - o.start) for c, o in zip(core, outer))
    zarr.open_array(str(job.state / "raw.zarr"), mode="r+")[core] = ids[inner]
    for axis in _lower_faces(job, b):
        plane = list(inner)
        plane[axis] = slice(0, inner[axis].start)  # the halo inside the lower neighbour's core
        np.save(job.state / "faces" / f"{g.index(b)}-{axis}.npy", ids[tuple(plane)])
    present = np.flatnonzero(np.bincount(local[inner].ravel().astype(np.intp)))  # counted, not sorted
    return {"ids": [int(i) for i in present if i]}


def _lower_faces(job: Job, b) -> list[int]:
    """Axes along which object block ``b`` has a lower neighbour to stitch with (serial sections: not z,
    objects do not cross slices)."""
    core = job.label_grid.core(b)
    return [a for a in ((0, 1, 2) if job.mode == "3d" else (1, 2)) if core[a].start > 0]


def _stitch(job: Job, b, extra, blob):
    import zarr

    g = job.label_grid
    core = g.core(b)
    raw = zarr.open_array(str(job.state / "raw.zarr"), mode="r")
    pairs = []
    for axis in _lower_faces(job, b):
        mine = np.load(job.state / "faces" / f"{g.index(b)}-{axis}.npy")
        region = list(core)
        region[axis] = slice(core[axis].start - mine.shape[axis], core[axis].start)
        pairs += match_planes(mine, raw[tuple(region)])
    return {"pairs": pairs}


def match_planes(a: np.ndarray, b: np.ndarray) -> list[list[int]]:
    """Objects of two labellings of one plane that are the same: each object's largest overlap, kept when
    it holds more than half of that object's voxels on the plane."""
    both = (a > 0) & (b > 0)
    if not both.any():
        return []
    pa, pb = a[both], b[both]
    pairs, counts = np.unique(np.stack([pa, pb]), axis=1, return_counts=True)
    size_a = dict(zip(*[v.tolist() for v in np.unique(a[a > 0], return_counts=True)]))
    size_b = dict(zip(*[v.tolist() for v in np.unique(b[b > 0], return_counts=True)]))
    return [[ia, ib] for (ia, ib), c in zip(pairs.T.tolist(), counts.tolist())
            if c > IOU * (size_a[ia] + size_b[ib] - c)]


def _relabel(job: Job, b, extra, blob):
    import zarr
    from scipy import ndimage

    g = job.label_grid
    core = g.core(b)
    lut = np.asarray(extra, np.uint32)  # local id -> final id
    raw = zarr.open_array(str(job.state / "raw.zarr"), mode="r")[core]
    local = (raw & np.uint64(0xFFFFFFFF)).astype(np.intp)  # block-unique id = block base + local id (< 2^32)
    del raw
    ngff.write_pyramid(job.image / "labels" / "instances", lut[local], tuple(c.start for c in core), job.levels,
                       labels=True)
    # Compact numbers 1..n for the final ids present, through the local ids (counting, not sorting: a
    # sort of every voxel was the slowest step). Pieces of one object share a final id.
    present = np.flatnonzero(np.bincount(local.ravel(), minlength=len(lut))[1:]) + 1
    ids = np.unique(lut[present])
    index = np.zeros(len(lut), np.int32)
    index[present] = np.searchsorted(ids, lut[present]) + 1
    compact = index[local]  # 1..n, 0 = background
    boxes = ndimage.find_objects(compact, max_label=len(ids))
    # Per-object sums over the foreground voxels only (a few per cent of the block), one weighted count an axis.
    fg = np.flatnonzero(compact)
    which = compact.ravel()[fg]
    voxels = np.bincount(which, minlength=len(ids) + 1)[1:]
    out = {"ids": ids.tolist(), "voxels": voxels.tolist()}
    for axis, (name, coord) in enumerate(zip("zyx", np.unravel_index(fg, compact.shape))):
        out[f"sum_{name}"] = (np.bincount(which, weights=coord, minlength=len(ids) + 1)[1:]
                              + voxels * float(core[axis].start)).tolist()
        out[f"min_{name}"] = [bx[axis].start + core[axis].start for bx in boxes]
        out[f"max_{name}"] = [bx[axis].stop - 1 + core[axis].start for bx in boxes]
    return out


TASKS = {"stats": _stats, "predict": _predict, "label": _label, "stitch": _stitch, "relabel": _relabel}


# ---------------------------------------------------------------- the client side


class UnionFind:
    def __init__(self):
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        root = x
        while self.parent.get(root, root) != root:
            root = self.parent[root]
        while x != root:
            self.parent[x], x = root, self.parent.get(x, x)
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def final_ids(job: Job, label_results: dict, pairs: Sequence[Sequence[int]]) -> dict:
    """Per object block, a table from its local ids to consecutive final ids (0 = background)."""
    uf = UnionFind()
    for a, b in pairs:
        uf.union(int(a), int(b))
    g = job.label_grid
    roots = {}
    tables = {}
    for blk in g.blocks():  # blocks in order: final ids follow the volume, z first
        base = (g.index(blk) + 1) << 32
        ids = np.asarray(label_results[blk]["ids"], np.int64).tolist()
        table = np.zeros(max(ids, default=0) + 1, np.int64)
        for i in ids:
            r = uf.find(base + i)
            table[i] = roots.setdefault(r, len(roots) + 1)
        tables[blk] = table
    if len(roots) >= 2 ** 32:
        raise OutputError(f"{job.work}: {len(roots)} objects do not fit uint32 labels")
    return tables


OBJECT_FIELDS = ("id", "voxels", "volume_nm3", *[f"bbox_{a}{e}" for e in "01" for a in "zyx"],
                 *[f"centroid_{a}" for a in "zyx"])
_PART_KEYS = ("ids", "voxels", *[f"{k}_{a}" for k in ("sum", "min", "max") for a in "zyx"])


def compact_part(result: dict) -> dict:
    """A relabel result as arrays (the client keeps one per block: Python lists of a 4 GiB volume's
    objects took hundreds of MB)."""
    return {**{k: np.asarray(result[k], np.float64 if k.startswith("sum") else np.int64) for k in _PART_KEYS},
            "task_seconds": result.get("task_seconds", 0.0)}


def object_table(parts: Sequence[dict], voxel: Optional[Sequence[float]]) -> np.ndarray:
    """One row per object (the fields of ``objects.csv``, ``volume_nm3`` NaN without a voxel size), its
    pieces from every block added up: a structured array, ordered by id, not rounded."""
    cols = {k: np.concatenate([np.asarray(p[k]) for p in parts] or [np.zeros(0)]) for k in _PART_KEYS}
    ids, where = np.unique(cols["ids"].astype(np.int64), return_inverse=True)
    n = len(ids)
    table = np.zeros(n, [(f, np.float64 if f.startswith(("volume", "centroid")) else np.int64)
                         for f in OBJECT_FIELDS])
    table["id"] = ids
    table["voxels"] = np.bincount(where, weights=cols["voxels"], minlength=n).round()
    table["volume_nm3"] = table["voxels"] * float(np.prod(voxel)) if voxel else np.nan
    for a in "zyx":
        lo, hi = np.full(n, np.iinfo(np.int64).max), np.full(n, -1, np.int64)
        np.minimum.at(lo, where, cols[f"min_{a}"].astype(np.int64))
        np.maximum.at(hi, where, cols[f"max_{a}"].astype(np.int64))
        table[f"bbox_{a}0"], table[f"bbox_{a}1"] = lo, hi + 1
        sums = np.bincount(where, weights=cols[f"sum_{a}"], minlength=n)
        table[f"centroid_{a}"] = sums / np.maximum(table["voxels"], 1)
    return table


def write_objects_csv(path: Path, table: np.ndarray) -> None:
    import csv

    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(OBJECT_FIELDS)
        for row in table.tolist():  # Python ints, and floats to 3 decimals; no volume without a voxel size
            writer.writerow([("" if v != v else round(v, 3)) if isinstance(v, float) else v for v in row])


def parse_block(values: Sequence[int], option: str) -> tuple[int, int, int]:
    z, y, x = (int(v) for v in values)
    if z < 1 or y < 1 or x < 1 or y % ngff.CHUNK or x % ngff.CHUNK:
        raise ConfigError(f"{option} {z} {y} {x}: expected z >= 1 and y, x multiples of {ngff.CHUNK} "
                          "(the output's chunk side)")
    return z, y, x


def weights_blob(net) -> tuple[bytes, str]:
    import io

    import torch

    buf = io.BytesIO()
    torch.save({"spec": net.spec, "state_dict": net.state_dict()}, buf)
    blob = buf.getvalue()
    return blob, hashlib.sha256(blob).hexdigest()


def prepare_work(job: Job, overwrite: bool) -> int:
    """Create ``OUTPUT.partial`` for a new job, or check that it holds this very job; return blocks done."""
    import zarr

    work = Path(job.work)
    ident = job.identity()
    if work.exists():
        known = work / "job.json"
        if not known.is_file():
            raise OutputError(f"{work}: exists and is not an unfinished emseg prediction; remove it or choose "
                              "another output")
        if json.loads(known.read_text()) != ident:
            if not overwrite:
                raise OutputError(f"{work}: holds an unfinished prediction with other inputs, model or settings; "
                                  "pass --overwrite to discard it, or rerun it with its own arguments")
            shutil.rmtree(work)
    if not work.exists():
        tmp = work.with_name(f".{work.name}.new-{os.getpid()}")
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "state" / "done").mkdir(parents=True)
            (tmp / "state" / "faces").mkdir()
            shape = job.volume.shape
            ngff.create(tmp / "prediction.ome.zarr", shape, job.volume.voxel_size, job.levels)
            chunks = (1, min(ngff.CHUNK, shape[1]), min(ngff.CHUNK, shape[2]))
            arrays = {"raw.zarr": "uint64"} if job.fused else {"mask.zarr": "uint8", "raw.zarr": "uint64"}
            for name, dtype in arrays.items():  # fused: the prediction blocks keep their masks in memory
                zarr.create_array(str(tmp / "state" / name), shape=shape, chunks=chunks, dtype=dtype, fill_value=0)
            (tmp / "job.json").write_text(json.dumps(ident, indent=2, sort_keys=True))
            os.replace(tmp, work)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise output_error(Path(job.work).with_suffix(""), exc) from None
    return len(list((work / "state" / "done").glob("*.json")))


def done_results(job: Job, pass_name: str, blocks, keep=lambda r: r) -> dict:
    out = {}
    for b in blocks:
        p = _done_path(job, pass_name, b)
        if p.is_file():
            out[tuple(b)] = keep(json.loads(p.read_text()))
    return out


def run_pass(job: Job, pass_name: str, blocks, client, extra=None, blob=None, progress: bool = True,
             keep=lambda r: r) -> dict:
    """Run one pass over ``blocks`` (skipping those done), on the Dask ``client`` or, without one, here;
    return every block's result, as ``keep`` stores it.

    On Dask a bounded window of tasks is in flight (four per worker thread at the start, at least 32), and
    each result is released on the cluster once the client has it, so neither the scheduler's task
    records nor the results held by the workers grow with the number of blocks."""
    from tqdm.auto import tqdm

    results = done_results(job, pass_name, blocks, keep)
    todo = iter([b for b in blocks if b not in results])
    arg = extra.__getitem__ if isinstance(extra, dict) else (lambda b: extra)  # one per block, or shared
    bar = tqdm(total=len(blocks), initial=len(results), desc=f"{pass_name} blocks", unit="block",
               disable=not progress)
    with bar:
        if client is None:
            for b in todo:
                results[b] = keep(task(job, pass_name, b, arg(b), blob))
                bar.update()
            return results
        from distributed import as_completed

        flying: dict = {}
        running = as_completed(loop=client.loop)
        run = f"{job.model_sha256[:12]}-{os.getpid()}-{os.urandom(4).hex()}"  # no two jobs share a key on one scheduler

        def submit_next() -> None:
            b = next(todo, None)
            if b is not None:
                fut = client.submit(task, job, pass_name, b, arg(b), blob, pure=False,
                                    key=f"emseg-{pass_name}-{'_'.join(map(str, b))}-{run}")
                flying[fut.key] = b
                running.add(fut)

        for _ in range(max(32, 4 * sum(client.nthreads().values()))):
            submit_next()
        for fut in running:
            b = flying.pop(fut.key)
            results[b] = keep(fut.result())
            fut.release()
            submit_next()
            bar.update()
    return results


def execute(job: Job, client, blob: bytes, progress: bool = True) -> dict:
    """Every pass, in order; return the stitched objects (rows of objects.csv) and the normalisation."""
    pg, t0 = job.predict_grid, time.perf_counter()
    stats = run_pass(job, "stats", pg.blocks(), client, progress=progress)
    mean, std = combine_stats([stats[b] for b in pg.blocks()], job.volume.name)
    t1 = time.perf_counter()
    blob_ref = client.scatter(blob, broadcast=True) if client is not None else blob
    predicted = run_pass(job, "predict", pg.blocks(), client, (mean, std), blob_ref, progress, keep=_ids_array)
    seconds = {"stats": t1 - t0, "predict": time.perf_counter() - t1}
    result = label_objects(job, client, progress, predicted if job.fused else None)
    busy = {"stats": _busy(stats), "predict": _busy(predicted), **result["busy"]}
    return {"mean": mean, "std": std, **result, "seconds": {**seconds, **result["seconds"]}, "busy": busy}


def _busy(results: dict) -> float:
    """Seconds the tasks of a pass took, added up over the workers (this run's and resumed ones)."""
    return sum(r.get("task_seconds", 0.0) for r in results.values())


def _ids_array(result: dict) -> dict:
    return {**result, "ids": np.asarray(result.get("ids", []), np.int64)}


def label_objects(job: Job, client, progress: bool = True, fused: Optional[dict] = None) -> dict:
    """Passes 3 to 5 over ``state/mask.zarr`` (or, with ``fused``, the prediction blocks' own objects):
    the stitched objects (a table, rows of objects.csv)."""
    lg, t = job.label_grid, [time.perf_counter()]
    if job.fused:  # the prediction blocks split their own objects (and wrote no mask)
        fused = fused if fused is not None else done_results(job, "predict", lg.blocks(), _ids_array)
        labels = {b: {**r, "task_seconds": 0.0} for b, r in fused.items()}
    else:
        labels = run_pass(job, "label", lg.blocks(), client, progress=progress, keep=_ids_array)
    t.append(time.perf_counter())
    # Only blocks with a lower neighbour along a stitch axis have faces to match.
    faced = [b for b in lg.blocks() if _lower_faces(job, b)]
    stitched = run_pass(job, "stitch", faced, client, progress=progress)
    pairs = [p for b in faced for p in stitched[b]["pairs"]]
    tables = final_ids(job, labels, pairs)
    t.append(time.perf_counter())
    parts = run_pass(job, "relabel", lg.blocks(), client, tables, progress=progress, keep=compact_part)
    objects = object_table([parts[b] for b in lg.blocks()], job.volume.voxel_size)
    t.append(time.perf_counter())
    return {"objects": objects, "merged_across_blocks": len(pairs),
            "seconds": {name: b - a for name, a, b in zip(("label", "stitch", "relabel"), t, t[1:])},
            "busy": {"label": _busy(labels), "stitch": _busy(stitched), "relabel": _busy(parts)}}
