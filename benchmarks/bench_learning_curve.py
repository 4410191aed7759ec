"""Cross-dataset pretraining + learning curves with the CPU profile in params.yaml, through DVC.

Run: .venv/bin/python benchmarks/bench_learning_curve.py [--inits ...] [--options ...] [--counts ...]
(defaults: params.yaml's learning_curve; issue 18's options, 2026-12-07:
 --inits pretrained ssl --options plain z_context semi --counts 1 4)
In a scratch copy of the project (own git, DVC and MLflow store; ../shared/data as the EPFL mirror and
the VNC source), runs `dvc repro pipelines/learning_curve/dvc.yaml`, which runs the pretrain stage
first. Records both stages' wall times and the learning-curve summary in bench-results/.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from common import BIN, EPFL, RESULTS, ROOT, SHARED, run_measured, save  # noqa: E402


def scratch_project(overrides: dict) -> Path:
    proj = Path(tempfile.mkdtemp(prefix="emseg-bench-lc-"))
    for name in ("params.yaml", "dvc.yaml", ".gitignore"):
        shutil.copy(ROOT / name, proj / name)
    for d in ("src", "pipelines", "annotations"):
        shutil.copytree(ROOT / d, proj / d, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "dvc.lock"))
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["data"]["epfl"]["mirrors"] = [str(EPFL)]
    params["data"]["epfl"]["cache_dir"] = str(proj / "cache")
    for src in params["pretrain"]["sources"]:
        for key in ("image", "labels"):
            src[key] = str((ROOT / src[key]).resolve())
    params["learning_curve"]["source"] = "epfl"
    params["learning_curve"].update(overrides)
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (["git", "init", "-q"], [str(Path(BIN) / "dvc"), "init", "-q"]):
        subprocess.run(cmd, cwd=proj, check=True)
    return proj


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inits", nargs="+", help="learning_curve.inits (scratch, pretrained, ssl)")
    ap.add_argument("--options", nargs="+", help="learning_curve.options (plain, z_context, semi)")
    ap.add_argument("--counts", nargs="+", help="learning_curve.slice_counts (numbers or all)")
    ap.add_argument("--patience", type=int, help="learning_curve.patience (epochs without a better validation IoU)")
    ap.add_argument("--name", default="learning_curve_epfl_cpu", help="bench-results/<name>.json")
    a = ap.parse_args()
    overrides = {k: v for k, v in (("inits", a.inits), ("options", a.options),
                                   ("slice_counts", [c if c == "all" else int(c) for c in a.counts or []]),
                                   ("patience", a.patience))
                 if v}
    proj = scratch_project(overrides)
    res = run_measured(["dvc", "repro", "pipelines/learning_curve/dvc.yaml"], proj)
    pre = json.loads((proj / "reports/pretrain/metrics.json").read_text())
    summary = json.loads((proj / "reports/learning_curve/summary.json").read_text())
    RESULTS.mkdir(exist_ok=True)
    for f in ("curves.png", "table.md", "points.csv"):
        shutil.copy(proj / "reports/learning_curve" / f, RESULTS / f"{a.name}_{f}")
    shutil.copy(proj / "reports/pretrain/curves.png", RESULTS / "pretrain_curves.png")
    save(a.name, {
        "command": ".venv/bin/python benchmarks/bench_learning_curve.py  (dvc repro pipelines/learning_curve/dvc.yaml)",
        "pretrain": yaml.safe_load((proj / "params.yaml").read_text())["pretrain"],
        "learning_curve": yaml.safe_load((proj / "params.yaml").read_text())["learning_curve"],
        "dvc_repro_wall_seconds": round(res["seconds"], 1), "peak_rss_mib": round(res["peak_rss_mib"]),
        "pretrain_seconds": pre["train_seconds"], "pretrain_best_val_iou": round(pre["best_val_iou"], 4),
        "summary": summary, "project": str(proj), "shared": str(SHARED)})


if __name__ == "__main__":
    main()
