"""The EPFL full profile on a GPU machine: train there, score here on the whole test stack.

The GPU machine lent to a session has no network and no MLflow, and only 64 MiB travel to it, so the
benchmark is split in two steps around the same code the `train` and `evaluate` stages run:

  here:  .venv/bin/python benchmarks/bench_gpu_train.py pack [profiles/epfl-gpu.yaml] [--init models/pretrained.pt]
         (fetch + prepare the EPFL split in a scratch project, write .gpu/: train/val arrays gzipped,
          params.yaml, optional initial weights; .gpu/ is git-ignored)
  GPU:   python3 benchmarks/bench_gpu_train.py fit .gpu OUT [--max-minutes 7.5] [--workers 8]
         (emseg.model.train.fit, the function `emseg train` calls, with mixed precision; writes
          model.pt, history.csv and fit.json to OUT, plus the GPU's tiled-inference speed)
  here:  .venv/bin/python benchmarks/bench_gpu_train.py score OUT
         (tiled, blended inference on all 82 slices of testing.tif, as `emseg evaluate` does;
          writes bench-results/epfl_train_<profile>_gpu.json)
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import shutil
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from bench_epfl_train import merge  # noqa: E402
from common import EPFL, ROOT, run_measured, save  # noqa: E402

PACK = ROOT / ".gpu"


def pack(profile: Path, init: Path | None) -> None:
    import tempfile

    proj = Path(tempfile.mkdtemp(prefix="emseg-bench-gpu-"))
    params = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), yaml.safe_load(profile.read_text()))
    params["data"]["epfl"]["mirrors"] = [str(EPFL)]
    params["data"]["epfl"]["cache_dir"] = str(proj / "cache")
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for stage in ("fetch", "prepare"):
        run_measured(["emseg", stage], proj)
    shutil.rmtree(PACK, ignore_errors=True)
    (PACK / "prepared").mkdir(parents=True)
    prepared = proj / "data" / "prepared"
    shutil.copy(prepared / "manifest.json", PACK / "prepared")
    for name in ("train_images", "train_labels", "val_images", "val_labels"):
        with open(prepared / f"{name}.npy", "rb") as src, \
                gzip.open(PACK / "prepared" / f"{name}.npy.gz", "wb", 1) as dst:
            shutil.copyfileobj(src, dst)
    if init is not None:
        shutil.copy(init, PACK / "init.pt")
        params["train"]["init"] = {"mode": "checkpoint", "path": "init.pt", "uri": None}
        params["train"].setdefault("freeze_encoder_epochs", 1)  # fine-tuning as in the learning curves
        params["train"].setdefault("encoder_lr_factor", 0.5)
    (PACK / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (PACK / "pack.json").write_text(json.dumps({"profile": str(profile), "init": str(init) if init else None,
                                                "prepared_in": str(proj)}))
    size = sum(f.stat().st_size for f in PACK.rglob("*") if f.is_file())
    print(f"pack: {PACK} ({size / 2**20:.1f} MiB); test stack stays in {prepared}")


PART = 15 * 2**20


def split_file(path: Path) -> None:
    data = path.read_bytes()
    if len(data) <= PART:
        return
    for i in range(0, len(data), PART):
        path.with_name(f"{path.name}.part{i // PART}").write_bytes(data[i:i + PART])
    path.unlink()


def join_file(path: Path) -> None:
    parts = sorted(path.parent.glob(f"{path.name}.part*"), key=lambda p: int(p.name.rsplit("part", 1)[1]))
    if not path.exists() and parts:
        path.write_bytes(b"".join(p.read_bytes() for p in parts))


def fit_on_gpu(pack_dir: Path, out: Path, max_minutes: float | None, workers: int | None) -> None:
    import torch

    from emseg.config import load_params
    from emseg.inference import predict_slice
    from emseg.model.network import save_weights
    from emseg.model.train import CURVE_KEYS, fit

    prepared = Path("/tmp/emseg-gpu-prepared")
    prepared.mkdir(exist_ok=True)
    shutil.copy(pack_dir / "prepared" / "manifest.json", prepared)
    for gz in (pack_dir / "prepared").glob("*.npy.gz"):
        with gzip.open(gz, "rb") as src, open(prepared / gz.name[:-3], "wb") as dst:
            shutil.copyfileobj(src, dst)
    raw = yaml.safe_load((pack_dir / "params.yaml").read_text())
    if raw["train"]["init"].get("path"):
        raw["train"]["init"]["path"] = str((pack_dir / raw["train"]["init"]["path"]).resolve())
    if max_minutes is not None:
        raw["train"]["max_minutes"] = max_minutes
    if workers is not None:
        raw["train"]["num_workers"] = workers
    params_path = Path("/tmp/emseg-gpu-params.yaml")
    params_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    params = load_params(params_path)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"fit: torch {torch.__version__}, GPU {gpu}, {params.train.max_epochs} epochs max, "
          f"{params.train.max_minutes} min cap, {params.train.num_workers} workers", flush=True)

    def show(row):
        print(f"epoch {row['epoch']:3d}  " + "  ".join(f"{k} {row[k]:.4f}" for k in CURVE_KEYS if k in row), flush=True)

    result = fit(params, prepared, "/tmp/emseg-gpu-work", lr=params.train.lr, batch_size=params.train.batch_size,
                 on_epoch=show, progress=False)
    out.mkdir(parents=True, exist_ok=True)
    save_weights(result.net, out / "model.pt")
    split_file(out / "model.pt")  # the device tool brings back files of at most 16 MiB
    with open(out / "history.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["epoch", *CURVE_KEYS])
        w.writeheader()
        w.writerows(result.history)

    # Inference speed on the GPU: whole 768 x 1024 slices, as `emseg predict` feeds them, after a warm-up.
    from emseg.data.prepare import load_split

    vx, _ = load_split(prepared, "val")
    net = result.net.cuda() if torch.cuda.is_available() else result.net
    for i in range(3):
        predict_slice(net, vx[i % len(vx)])
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.time()
    n = 60
    for i in range(n):
        predict_slice(net, vx[i % len(vx)])
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    slices_per_s = n / (time.time() - t0)
    summary = {
        "gpu": gpu, "torch": torch.__version__, "epochs": result.epochs, "train_seconds": round(result.seconds, 1),
        "best_val_iou": round(result.best_score, 4),
        "patches_per_second": round(result.epochs * params.train.patches_per_epoch / max(result.seconds, 1e-9), 1),
        "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20) if torch.cuda.is_available() else None,
        "predict_slices_per_second": round(slices_per_s, 1), "max_minutes": params.train.max_minutes,
        "num_workers": params.train.num_workers, "precision": params.train.precision or "16-mixed (auto)",
        "init": result.init,
    }
    (out / "fit.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


def score(out: Path, pack_json: Path = PACK / "pack.json") -> None:
    from emseg.config import load_params
    from emseg.data.prepare import load_split
    from emseg.evaluate import evaluate_stack
    from emseg.model.network import load_weights

    info = json.loads(pack_json.read_text())
    proj = Path(info["prepared_in"])
    fit_summary = json.loads((out / "fit.json").read_text())
    join_file(out / "model.pt")
    net, _ = load_weights(out / "model.pt")
    x, y = load_split(proj / "data" / "prepared", "test")
    p = load_params(proj / "params.yaml")
    t0 = time.time()
    test = evaluate_stack(net, x, y, p.evaluate, p.train.threshold, keep=0).metrics
    name = Path(info["profile"]).stem + ("-pretrained" if info["init"] else "")
    save(f"epfl_train_{name}_gpu", {
        "command": "benchmarks/bench_gpu_train.py pack / fit (GPU machine) / score (here)",
        "profile": yaml.safe_load(Path(info["profile"]).read_text()), "init": info["init"], "fit": fit_summary,
        "test_slices": len(x), "test_foreground_iou": round(test["iou"], 4), "test_dice": round(test["dice"], 4),
        "test_precision": round(test["precision"], 4), "test_recall": round(test["recall"], 4),
        "test_instance_f1_watershed": round(test["instance_f1"], 4),
        "test_instance_f1_connected": round(test["instance_f1_connected"], 4),
        "score_seconds_cpu": round(time.time() - t0, 1),
    })
    shutil.copy(out / "history.csv", ROOT / "bench-results" / f"epfl_train_{name}_gpu_history.csv")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="step", required=True)
    a = sub.add_parser("pack")
    a.add_argument("profile", nargs="?", default=str(ROOT / "profiles" / "epfl-gpu.yaml"))
    a.add_argument("--init", default=None, help="initial weights (an emseg weights file), e.g. models/pretrained.pt")
    b = sub.add_parser("fit")
    b.add_argument("pack_dir")
    b.add_argument("out")
    b.add_argument("--max-minutes", type=float, default=None)
    b.add_argument("--workers", type=int, default=None)
    c = sub.add_parser("score")
    c.add_argument("out")
    c.add_argument("--pack-json", default=str(PACK / "pack.json"), help="the pack.json of the fitted pack")
    args = ap.parse_args()
    if args.step == "pack":
        init = Path(args.init).resolve() if args.init else None
        if init is not None and not init.is_file():
            sys.exit(f"{init}: not found (dvc repro pipelines/pretrain/dvc.yaml writes models/pretrained.pt)")
        pack(Path(args.profile).resolve(), init)
    elif args.step == "fit":
        fit_on_gpu(Path(args.pack_dir), Path(args.out), args.max_minutes, args.workers)
    else:
        score(Path(args.out), Path(args.pack_json))


if __name__ == "__main__":
    main()
