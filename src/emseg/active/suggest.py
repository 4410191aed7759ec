"""`emseg suggest`: the patches (or slices) of a person's own stack worth labelling next.

Writes a new folder:

- ``suggestions.csv``: rank, slice, y, x, size, score and the files of each suggestion;
- ``NN_image.tif``: the crop as it is in the stack (same dtype), for the annotation tool;
- ``NN_context.tif``: the same crop on the slice and its neighbours, ``CONTEXT`` slices (or the
  model's ``z_context`` if more; ends of the stack mirrored): what a 2.5D network is fed with the
  painted slice, so the painting trains any network up to that ``z_context``;
- ``NN_labels.tif``: the template to paint, uint8 filled with the blank value (default 128):
  paint 255 (or 1) on the structure, 0 on background, leave blank what you do not want to decide;
- ``NN_uncertainty.png``: where the model is unsure (bright), to guide the eye;
- ``overview.png``: the suggestions drawn on their slices;
- ``suggestions.json``: model, stack, its normalisation, patch size, strategy, blank value.

Put the folder under ``annotations/`` (the default of ``data.annotations``): once a template holds
any painted pixel, the next ``dvc repro`` adds that patch to the training data (blank = ignore).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from emseg.active.pool import score_pool
from emseg.active.strategies import STRATEGIES, Candidates, grid_candidates, select
from emseg.data.io import check_image_dtype, context_indices, context_stack, inspect_stack, read_slices, sha256_of
from emseg.data.io import stack_stats
from emseg.model.arch import in_channels
from emseg.errors import ConfigError
from emseg.fsutil import atomic_dir, claim_output, write_json

BLANK = 128
CONTEXT = 5  # slices kept around each suggestion (z_context up to 5 can train on the painted crop)


def _slices_to_score(n: int, every: int) -> list[int]:
    return list(range(0, n, every))


def suggest(net, input_path: str | Path, output: str | Path, *, k: int = 4, unit: str = "patch",
            patch_size: int = 128, strategy: str = "entropy", every: int = 1, mc_passes: int = 8,
            blank: int = BLANK, model_ref: str = "", seed: int = 0, max_overlap: float = 0.25,
            z_gap: int = 2, progress: bool = True, overwrite: bool = False, stride: int | None = None) -> dict:
    claim_output(output, overwrite, inputs=[input_path])
    if strategy not in STRATEGIES:
        raise ConfigError(f"--strategy: {strategy!r} is not one of {', '.join(STRATEGIES)}")
    if unit not in ("patch", "slice"):
        raise ConfigError(f"--unit: expected patch or slice, got {unit!r}")
    if not 0 < blank < 255 or blank == 1:
        raise ConfigError(f"--blank: {blank} must lie in 2..254 (0, 1 and 255 are label values)")
    info = inspect_stack(input_path)
    check_image_dtype(info)
    n, H, W = info.shape
    size = min(H, W) if unit == "slice" else patch_size
    if size > H or size > W:
        raise ConfigError(f"--patch-size: {size} is larger than the slices of {input_path} ({H}x{W})")
    mean, std = stack_stats(info)
    zs = _slices_to_score(n, every)
    k_net = in_channels(net.spec)  # 2.5D: each slice is scored with its neighbours, as the network was trained
    context = max(CONTEXT, k_net)
    passes = mc_passes if strategy == "bald" else 1
    scores: dict[str, list] = {key: [] for key in ("entropy", "least_confidence", "bald")}
    zyx, feats = [], []
    # One slice at a time, keeping only patch scores and features: memory does not grow with the stack.
    for z, img in zip(tqdm(zs, desc="suggest: score slices", unit="slice", disable=not progress),
                      context_stack(info, k_net, mean, std, zs)):
        img = img[None]
        local = (grid_candidates(1, H, W, size, stride or max(size // 2, 1)) if unit == "patch"
                 else Candidates(np.array([[0, 0, 0]]), min(H, W)))
        pool = score_pool(net, img, local, passes, progress=False, keep_maps=unit == "slice")
        for key in scores:
            scores[key].append(pool.scores[key] if unit == "patch" else np.array([pool.maps[key][0].sum()]))
        zyx.append(np.column_stack([np.full(len(local), z), local.zyx[:, 1:]]))
        feats.append(pool.features)
    cands = Candidates(np.concatenate(zyx), size if unit == "patch" else min(H, W))
    score = {key: np.concatenate(v) for key, v in scores.items()}
    base = "entropy" if strategy in ("hybrid", "kmeans", "coreset", "random") else strategy
    picks = select(strategy, min(k, len(cands)), cands, rng=np.random.default_rng(seed), uncertainty=score[base],
                   features=np.concatenate(feats), max_overlap=max_overlap, z_gap=z_gap)
    summary = {"input": str(Path(input_path).resolve()),
               "input_sha256": sha256_of(info.path) if info.path.is_file() else None,
               "shape": [n, H, W], "dtype": str(info.dtype), "normalisation": {"mean": mean, "std": std},
               "model": model_ref, "strategy": strategy, "unit": unit, "size": int(cands.size), "k": len(picks),
               "blank": blank, "scored_slices": len(zs), "z_context": k_net, "context_slices": context,
               "suggestions": []}
    maps = {}  # the uncertainty map of each chosen slice, recomputed for the pictures
    chosen = sorted({int(cands.zyx[i][0]) for i in picks})
    for z, img in zip(chosen, context_stack(info, k_net, mean, std, chosen)):
        img = img[None]
        one = Candidates(np.array([[0, 0, 0]]), min(H, W))
        maps[z] = score_pool(net, img, one, passes, progress=False).maps["bald" if strategy == "bald" else "entropy"][0]
    with atomic_dir(output, marker={"command": "suggest"}) as tmp:
        _write(tmp, info, cands, picks, score[base], maps, blank, summary, context)
    return summary


def _write(tmp: Path, info, cands: Candidates, picks, score, maps, blank: int, summary: dict, context: int) -> None:
    import tifffile

    from emseg.plots import save_uncertainty_png, plot_suggestions

    s = cands.size
    rows = []
    n = info.shape[0]
    slices = dict(zip(maps, read_slices(info, list(maps))))
    for rank, i in enumerate(picks, 1):
        z, y, x = (int(v) for v in cands.zyx[i])
        h, w = (s, s) if summary["unit"] == "patch" else slices[z].shape
        stem = f"{rank:02d}"
        crop = slices[z][y:y + h, x:x + w]
        tifffile.imwrite(tmp / f"{stem}_image.tif", crop, photometric="minisblack")
        tifffile.imwrite(tmp / f"{stem}_labels.tif", np.full(crop.shape, blank, np.uint8), photometric="minisblack")
        # One pick's neighbours at a time, cropped as they are read: memory stays at a slice or two.
        near = [sl[y:y + h, x:x + w] for sl in read_slices(info, context_indices(z, n, context))]
        tifffile.imwrite(tmp / f"{stem}_context.tif", np.stack(near), photometric="minisblack")
        save_uncertainty_png(np.asarray(maps[z][y:y + h, x:x + w], np.float32), tmp / f"{stem}_uncertainty.png")
        rows.append({"rank": rank, "slice": z, "y": y, "x": x, "height": h, "width": w,
                     "score": round(float(score[i]), 4), "image": f"{stem}_image.tif", "labels": f"{stem}_labels.tif",
                     "uncertainty": f"{stem}_uncertainty.png", "context": f"{stem}_context.tif"})
    with open(tmp / "suggestions.csv", "w", newline="") as fh:
        wr = csv.DictWriter(fh, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    summary["suggestions"] = rows
    write_json(tmp / "suggestions.json", summary)
    plot_suggestions(slices, rows, tmp / "overview.png")
