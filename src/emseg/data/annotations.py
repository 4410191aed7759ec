"""Painted `emseg suggest` templates back into the training data.

Every ``suggestions.json`` under the annotations folder lists crops with a label template each.
A template that holds any pixel other than its blank value has been worked on: its crop joins the
training data, normalised by the statistics of the stack it was cut from (recorded by suggest),
with the blank pixels marked IGNORE so the loss skips them. Untouched templates are left out.
For a 2.5D network (``model.z_context`` k > 1) each crop comes with its k - 1 neighbours, taken from
the ``NN_context.tif`` that suggest wrote beside it (the painted slice in the middle).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from emseg import IGNORE
from emseg.data.io import read_2d_file
from emseg.errors import DataError


def _context_crop(meta_path: Path, row: dict, k: int, image: np.ndarray) -> np.ndarray:
    """The k slices (k, h, w) around a painted crop ``image``, from the context stack suggest wrote for it."""
    import tifffile

    name = row.get("context")
    if not name:
        raise DataError(f"{meta_path.parent / row['labels']}: painted crop without its neighbouring slices "
                        f"(written by an emseg suggest from before 2.5D), but model.z_context is {k}; keep the "
                        f"painting and set model.z_context: 1, or move {meta_path.parent.name} out of the "
                        "annotations folder and paint a new emseg suggest round")
    path = meta_path.parent / name
    if not path.is_file():
        raise DataError(f"{path}: context stack listed in {meta_path.name} is missing")
    try:
        ctx = np.asarray(tifffile.imread(path))
    except Exception as exc:  # noqa: BLE001 (a damaged file: its name and what went wrong)
        raise DataError(f"{path}: cannot be read ({type(exc).__name__}: {exc})") from None
    if ctx.ndim != 3 or ctx.shape[1:] != image.shape or ctx.shape[0] % 2 == 0:
        raise DataError(f"{path}: expected an odd number of slices of {image.shape}, got shape {ctx.shape}")
    if not np.array_equal(ctx[ctx.shape[0] // 2], image):
        raise DataError(f"{path}: its middle slice differs from {row['image']}; the crop and its neighbours must "
                        "come from the same emseg suggest round")
    if ctx.shape[0] < k:
        raise DataError(f"{path}: holds {ctx.shape[0]} slices; model.z_context {k} needs {k} (set model.z_context "
                        f"to at most {ctx.shape[0]}, or paint a round that emseg suggest wrote with such a model)")
    lo = ctx.shape[0] // 2 - k // 2
    return ctx[lo:lo + k]


def collect(folder: str | Path, k: int = 1) -> tuple[list[np.ndarray], list[np.ndarray], list[dict]]:
    """(images float32, labels uint8 0/1/IGNORE, records) of every painted template under ``folder``;
    images (h, w), or (k, h, w) with the neighbours for a network of ``model.z_context`` k."""
    folder = Path(folder)
    images, labels, records = [], [], []
    if not folder.is_dir():
        return images, labels, records
    for meta_path in sorted(folder.rglob("suggestions.json")):
        try:
            meta = json.loads(meta_path.read_text())
            blank, norm = int(meta["blank"]), meta["normalisation"]
            rows = meta["suggestions"]
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{meta_path}: not an `emseg suggest` record ({type(exc).__name__}: {exc})") from None
        for r in rows:
            lab_path, img_path = meta_path.parent / r["labels"], meta_path.parent / r["image"]
            if not lab_path.is_file():
                raise DataError(f"{lab_path}: label template listed in {meta_path.name} is missing")
            lab = read_2d_file(lab_path)
            if lab.ndim == 3 and lab.shape[-1] in (3, 4):  # an RGB(A) save from a paint program: one channel
                lab = lab[..., 0]
            values = set(np.unique(lab).tolist())
            painted = values - {blank}
            if not painted:
                continue
            fg = 1 if painted <= {0, 1} else 255
            if not painted <= {0, fg}:
                raise DataError(f"{lab_path}: label values {sorted(painted - {0, 1, 255}) or sorted(painted)} "
                                "unexpected; "
                                f"expected 255 (or 1) object, 0 background, {blank} blank")
            img = read_2d_file(img_path)
            if img.shape != lab.shape:
                raise DataError(f"{lab_path}: shape {lab.shape} differs from its image {img_path.name} {img.shape}")
            out = np.where(lab == fg, 1, 0).astype(np.uint8)
            out[lab == blank] = IGNORE
            if k > 1:
                img = _context_crop(meta_path, r, k, img)
            images.append(((img.astype(np.float32) - norm["mean"]) / norm["std"]).astype(np.float32))
            labels.append(out)
            records.append({"file": str(lab_path.relative_to(folder)), "slice": r["slice"], "y": r["y"], "x": r["x"],
                            "labelled_pixels": int((out != IGNORE).sum()), "source": meta.get("input"),
                            "source_sha256": meta.get("input_sha256")})
    return images, labels, records


TEMPLATE_SUFFIXES = ("_labels.tif", "_labels.tiff", "_labels.png")
DEFAULT_BLANK = 128


def _blank_of(folder: Path, cache: dict) -> int | None:
    """The blank value recorded by `emseg suggest` in ``folder`` (128 without a record; None: unreadable)."""
    if folder not in cache:
        meta = folder / "suggestions.json"
        try:
            cache[folder] = (int(json.loads(meta.read_text()).get("blank", DEFAULT_BLANK)) if meta.is_file()
                             else DEFAULT_BLANK)
        except (OSError, ValueError, TypeError, AttributeError):
            cache[folder] = None
    return cache[folder]


def painted_templates_below(folder: str | Path) -> list[Path]:
    """Every label template under ``folder`` that somebody may have painted (links are not followed).

    A template counts as painted when it holds a pixel other than its blank value, and also when it
    or its folder's ``suggestions.json`` cannot be read: when in doubt, somebody's work is kept.
    """
    found: list[Path] = []
    blanks: dict[Path, int | None] = {}
    for here, dirs, files in os.walk(folder, followlinks=False):
        for name in sorted(files):
            if not name.lower().endswith(TEMPLATE_SUFFIXES):
                continue
            path = Path(here) / name
            blank = _blank_of(Path(here), blanks)
            try:
                lab = read_2d_file(path)
            except DataError:
                found.append(path)
                continue
            if blank is None or bool((lab != blank).any()):
                found.append(path)
    return found


def stack_padded(images: list[np.ndarray], labels: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Crops of different sizes in one array each, (n, H, W), or (n, k, H, W) for crops with their
    neighbours: padded (reflect / IGNORE) to the largest."""
    h = max(i.shape[-2] for i in images)
    w = max(i.shape[-1] for i in images)
    xs = [np.pad(i, ((0, 0),) * (i.ndim - 2) + ((0, h - i.shape[-2]), (0, w - i.shape[-1])), mode="reflect")
          for i in images]
    ys = [np.pad(lab, ((0, h - lab.shape[0]), (0, w - lab.shape[1])), constant_values=IGNORE) for lab in labels]
    return np.stack(xs), np.stack(ys)
