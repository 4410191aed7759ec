"""Active-learning simulation on EPFL hippocampus with the CPU profile in params.yaml (section `active`).

Run: .venv/bin/python benchmarks/bench_active_learning.py
Runs `emseg active-learning` in a scratch project whose EPFL mirror is ../shared/data; copies the
summary (every strategy, every budget, mean and spread over seeds) into bench-results/.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from common import EPFL, RESULTS, ROOT, run_measured, save  # noqa: E402


def main() -> None:
    proj = Path(tempfile.mkdtemp(prefix="emseg-bench-al-"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["epfl"]["mirrors"] = [str(EPFL)]
    params["data"]["epfl"]["cache_dir"] = str(proj / "cache")
    params["active"]["source"] = "epfl"
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    res = run_measured(["emseg", "active-learning"], proj)
    summary = json.loads((proj / "reports/active_learning/summary.json").read_text())
    RESULTS.mkdir(exist_ok=True)
    for f in ("curves.png", "summary.md", "curves.csv"):
        shutil.copy(proj / "reports/active_learning" / f, RESULTS / f"active_learning_{f}")
    save("active_learning_epfl_cpu", {
        "command": ".venv/bin/python benchmarks/bench_active_learning.py", "active": params["active"],
        "wall_seconds": round(res["seconds"], 1), "peak_rss_mib": round(res["peak_rss_mib"]),
        "summary": summary, "project": str(proj)})


if __name__ == "__main__":
    main()
