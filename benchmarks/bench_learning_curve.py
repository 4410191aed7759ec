"""Cross-dataset pretraining + learning curves with the CPU profile in params.yaml, through DVC.

Run: .venv/bin/python benchmarks/bench_learning_curve.py
In a scratch copy of the project (own git, DVC and MLflow store; ../shared/data as the EPFL mirror and
the VNC source), runs `dvc repro pipelines/learning_curve/dvc.yaml`, which runs the pretrain stage
first. Records both stages' wall times and the learning-curve summary in bench-results/.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from common import BIN, EPFL, RESULTS, ROOT, SHARED, run_measured, save  # noqa: E402


def scratch_project() -> Path:
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
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (["git", "init", "-q"], [str(Path(BIN) / "dvc"), "init", "-q"]):
        subprocess.run(cmd, cwd=proj, check=True)
    return proj


def main() -> None:
    proj = scratch_project()
    res = run_measured(["dvc", "repro", "pipelines/learning_curve/dvc.yaml"], proj)
    pre = json.loads((proj / "reports/pretrain/metrics.json").read_text())
    summary = json.loads((proj / "reports/learning_curve/summary.json").read_text())
    RESULTS.mkdir(exist_ok=True)
    for f in ("curves.png", "table.md", "points.csv"):
        shutil.copy(proj / "reports/learning_curve" / f, RESULTS / f"learning_curve_{f}")
    shutil.copy(proj / "reports/pretrain/curves.png", RESULTS / "pretrain_curves.png")
    save("learning_curve_epfl_cpu", {
        "command": ".venv/bin/python benchmarks/bench_learning_curve.py  (dvc repro pipelines/learning_curve/dvc.yaml)",
        "pretrain": yaml.safe_load((proj / "params.yaml").read_text())["pretrain"],
        "learning_curve": yaml.safe_load((proj / "params.yaml").read_text())["learning_curve"],
        "dvc_repro_wall_seconds": round(res["seconds"], 1), "peak_rss_mib": round(res["peak_rss_mib"]),
        "pretrain_seconds": pre["train_seconds"], "pretrain_best_val_iou": round(pre["best_val_iou"], 4),
        "summary": summary, "project": str(proj), "shared": str(SHARED)})


if __name__ == "__main__":
    main()
