"""DVC stage `prepare`: validate data/raw, pick slices, write data/prepared/ and its manifest."""

from __future__ import annotations

from emseg.config import load_params
from emseg.data.prepare import prepare
from emseg.paths import PARAMS, PREPARED_DIR, RAW_DIR


def run(params_path: str = PARAMS, raw_dir: str = RAW_DIR, out_dir: str = PREPARED_DIR) -> dict:
    params = load_params(params_path)
    # The validation slices' z neighbours are always kept (a few slices): switching evaluate's z-averaging
    # then reruns evaluate only, and a champion chosen with it can be scored on any later data.
    manifest = prepare(params.data, raw_dir, out_dir, params.model.z_context, val_neighbours=True)
    s = manifest["splits"]
    print(
        f"prepare: {len(s['train']['slices'])} train slices {s['train']['slices']}, "
        f"{len(s['val']['slices'])} val, {s['test']['shape'][0]} test; "
        f"foreground {100 * s['train']['foreground_fraction']:.1f}%"
        + (f"; each with {manifest['z_context'] - 1} neighbouring slices as context"
           if manifest["z_context"] > 1 else "")
        + ("; validation slices with their z neighbours (for z-averaging)" if "context_images" in s["val"] else "")
        + (f"; {manifest['annotations']['patches']} painted suggestion(s) from {manifest['annotations']['folder']}/"
           if manifest["annotations"]["patches"] else "")
        + f" -> {out_dir}"
    )
    return manifest
