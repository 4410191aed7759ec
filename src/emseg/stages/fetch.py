"""DVC stage `fetch`: materialise the raw stacks of the chosen source into data/raw/."""

from __future__ import annotations

from emseg.config import load_params
from emseg.data.sources import fetch_raw
from emseg.paths import PARAMS, RAW_DIR


def run(params_path: str = PARAMS, out_dir: str = RAW_DIR) -> dict:
    params = load_params(params_path)
    desc = fetch_raw(params.data, out_dir)
    shapes = ", ".join(f"{role} {'x'.join(map(str, f['shape']))}" for role, f in desc["files"].items())
    print(f"fetch: source {desc['source']} -> {out_dir} ({shapes})")
    return desc
