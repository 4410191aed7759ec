"""Train on 12 EPFL slices with a profile, once per seed, and score all 82 slices of testing.tif.

Each seed runs the real stages in its own scratch project: `emseg fetch`, `prepare`, `train` (the
profile's time cap), then `emseg evaluate`, which makes every choice on the validation slices only
(flip TTA on or off when the profile sets `evaluate.choose_tta`, the watershed depth h) and predicts
the test stack once. Reported: each seed's figures, and over the seeds the mean, the sample standard
deviation (ddof=1), min, max and n.

Given several profiles (the plain one first), it alternates them within each seed (A0 B0 A1 B1 ...), so
that a slower hour of the machine falls on both, and also reports each option's per-seed difference from
the first profile (paired over the seeds: mean, sample sd, n).

Run: .venv/bin/python benchmarks/bench_epfl_train.py [PROFILE ...] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from common import EPFL, ROOT, run_measured, save  # noqa: E402

SUMMARISED = ("iou", "dice", "precision", "recall", "instance_f1", "instance_f1_connected", "per_slice_iou_min",
              "best_val_iou", "epochs", "train_seconds", "patches_per_second")


def merge(dst: dict, src: dict) -> dict:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            merge(dst[k], v)
        else:
            dst[k] = v
    return dst


def spread(values: list[float]) -> dict:
    n = len(values)
    return {"mean": round(statistics.fmean(values), 4), "sd": round(statistics.stdev(values), 4) if n > 1 else None,
            "min": round(min(values), 4), "max": round(max(values), 4), "n": n}


def project(profile: Path, seed: int, prefix: str) -> tuple[Path, dict]:
    """A scratch project with the profile overlaid on params.yaml, EPFL from ../shared/data, fetched and
    prepared."""
    proj = Path(tempfile.mkdtemp(prefix=prefix))
    params = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), yaml.safe_load(profile.read_text()))
    params["seed"] = seed
    params["data"]["epfl"]["mirrors"] = [str(EPFL)]
    params["data"]["epfl"]["cache_dir"] = str(proj / "cache")
    return proj, params


def prepared(proj: Path, params: dict) -> None:
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for stage in ("fetch", "prepare"):
        run_measured(["emseg", stage], proj)


def ssl_once(profile: Path, seed: int) -> dict:
    """`emseg ssl` with the profile's settings in its own scratch project (the splits, hence the slices
    it may see, do not depend on the seed): the weights every seed then fine-tunes from, and its figures."""
    proj, params = project(profile, seed, "emseg-bench-epfl-ssl-")
    params["train"]["init"] = {"mode": "scratch", "path": None, "uri": None}
    prepared(proj, params)
    res = run_measured(["emseg", "ssl"], proj)
    m = json.loads((proj / "reports/ssl/metrics.json").read_text())
    out = {"weights": str(proj / "models/ssl.pt"), "wall_seconds": round(res["seconds"], 1),
           "peak_rss_mib": round(res["peak_rss_mib"]), "seed": seed,
           **{k: m[k] for k in ("epochs", "train_seconds", "val_masked_mse_before", "val_masked_mse",
                                "val_masked_mse_mean_fill")},
           "slices": len(m["stacks"][0]["slices"]), "work_dir": str(proj)}
    print(json.dumps({"ssl": out}), flush=True)
    return out


def one_seed(profile: Path, seed: int, init_path: str | None = None) -> dict:
    proj, params = project(profile, seed, f"emseg-bench-epfl-s{seed}-")
    init = params["train"].get("init") or {}
    if init_path:
        init["path"] = init_path
    elif init.get("path") and not Path(init["path"]).is_absolute():  # a project file, e.g. models/pretrained.pt
        init["path"] = str((ROOT / init["path"]).resolve())
        if not Path(init["path"]).is_file():
            sys.exit(f"{init['path']}: not found; the profile starts from it (dvc repro pipelines/pretrain/dvc.yaml)")
    prepared(proj, params)
    train = run_measured(["emseg", "train"], proj)
    tm = json.loads((proj / "reports/train/metrics.json").read_text())
    ev = run_measured(["emseg", "evaluate"], proj)
    m = json.loads((proj / "reports/evaluate/metrics.json").read_text())
    with open(proj / "reports/evaluate/per_slice.csv") as fh:
        per_slice = [float(r["iou"]) for r in csv.DictReader(fh)]
    choices = [ln for ln in ev["stdout"].splitlines() if "on the validation slices" in ln]
    row = {"seed": seed, "epochs": tm["epochs"], "train_seconds": tm["train_seconds"],
           "train_wall_seconds": round(train["seconds"], 1), "train_peak_rss_mib": round(train["peak_rss_mib"]),
           "patches_per_second": tm["patches_per_second"], "best_val_iou": round(tm["best_val_iou"], 4),
           "test_slices": m["slices"], "tta": m.get("tta"), "watershed_h": m["watershed_h"],
           "evaluate_seconds": round(ev["seconds"], 1), "validation_choices": choices,
           "per_slice_iou_min": round(min(per_slice), 4), "work_dir": str(proj),
           **{k: round(float(m[k]), 4) for k in ("iou", "dice", "precision", "recall", "accuracy", "instance_f1",
                                                   "instance_f1_connected")},
           "instance_truth": m.get("instance_truth", "2D connected components of each label slice"),
           "splits": m["splits"], "merges": m["merges"]}
    print(json.dumps(row), flush=True)
    return row


def summarise(profile: Path, seeds: list[int], rows: list[dict], ssl: dict | None, wall: float) -> dict:
    summary = {k: spread([float(r[k]) for r in rows]) for k in SUMMARISED}
    iou = summary["iou"]
    return {"command": f".venv/bin/python benchmarks/bench_epfl_train.py {profile.relative_to(ROOT)} --seeds "
                       + " ".join(map(str, seeds)),
            "profile": yaml.safe_load(profile.read_text()), "seeds": seeds, "wall_seconds": round(wall),
            "summary": summary, "test_iou_mean_minus_sd": round(iou["mean"] - (iou["sd"] or 0.0), 4),
            **({"ssl": ssl} if ssl else {}), "per_seed": rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("profiles", nargs="*", default=[str(ROOT / "profiles" / "epfl-cpu.yaml")])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    profiles = [Path(p).resolve() for p in args.profiles]
    if len({p.stem for p in profiles}) < len(profiles):
        sys.exit("each profile once, please: the results are saved by profile name")
    ssl, rows, wall = {}, {p: [] for p in profiles}, dict.fromkeys(profiles, 0.0)
    for profile in profiles:
        init = (yaml.safe_load(profile.read_text()).get("train") or {}).get("init") or {}
        if init.get("path") == "models/ssl.pt" and not (ROOT / "models/ssl.pt").is_file():
            t0 = time.time()
            ssl[profile] = ssl_once(profile, args.seeds[0])
            wall[profile] += time.time() - t0
    for seed in args.seeds:
        for profile in profiles:
            t0 = time.time()
            rows[profile].append(one_seed(profile, seed, ssl[profile]["weights"] if profile in ssl else None))
            wall[profile] += time.time() - t0
    for profile in profiles:
        result = summarise(profile, args.seeds, rows[profile], ssl.get(profile), wall[profile])
        save(f"epfl_train_{profile.stem}", result)
    if len(profiles) > 1:
        base = profiles[0]
        paired = {p.stem: {k: spread([float(a[k]) - float(b[k]) for a, b in zip(rows[p], rows[base])])
                           for k in ("iou", "instance_f1", "best_val_iou", "epochs", "patches_per_second")}
                  for p in profiles[1:]}
        names = " ".join(str(p.relative_to(ROOT)) for p in profiles)
        save("epfl_train_paired", {
            "command": f".venv/bin/python benchmarks/bench_epfl_train.py {names} --seeds "
                       + " ".join(map(str, args.seeds)),
            "baseline": base.stem, "order": "profiles alternate within each seed",
            "difference_from_baseline": paired,
            "test_iou": {p.stem: [r["iou"] for r in rows[p]] for p in profiles}})


if __name__ == "__main__":
    main()
