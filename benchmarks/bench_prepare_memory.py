"""Peak memory of `emseg fetch` + `emseg prepare` on the 165x768x1024 EPFL training stack (12 slices).

Side by side with the naive way (read the whole stack with tifffile.imread, z-score it as float32),
in the same run, so the ratio holds however noisy the machine is.
Run: .venv/bin/python benchmarks/bench_prepare_memory.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from common import EPFL, ROOT, run_measured, save  # noqa: E402

NAIVE = (
    "import sys,tifffile,numpy as np;a=tifffile.imread(sys.argv[1]);"
    "x=(a.astype(np.float32)-a.mean())/a.std();print(x.shape)"
)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        proj = Path(tmp)
        params = yaml.safe_load((ROOT / "params.yaml").read_text())
        params["data"].update(source="tiff", train_slices=12, val_slices=3, test_slices=None, tiff={
            "image": str(EPFL / "training.tif"), "labels": str(EPFL / "training_groundtruth.tif"),
            "test_image": str(EPFL / "testing.tif"), "test_labels": str(EPFL / "testing_groundtruth.tif")})
        (proj / "params.yaml").write_text(yaml.safe_dump(params))
        fetch = run_measured(["emseg", "fetch"], proj)
        prepare = run_measured(["emseg", "prepare"], proj)
        naive = run_measured([sys.executable, "-c", NAIVE, str(EPFL / "training.tif")], proj)
    save("prepare_memory", {
        "command": ".venv/bin/python benchmarks/bench_prepare_memory.py",
        "stack": "EPFL training.tif 165x768x1024 uint8 (130 MB) + testing.tif 82x768x1024",
        "fetch_peak_rss_mib": round(fetch["peak_rss_mib"], 1), "fetch_seconds": round(fetch["seconds"], 1),
        "prepare_peak_rss_mib": round(prepare["peak_rss_mib"], 1), "prepare_seconds": round(prepare["seconds"], 1),
        "naive_whole_stack_peak_rss_mib": round(naive["peak_rss_mib"], 1),
        "ratio_prepare_to_naive": round(prepare["peak_rss_mib"] / naive["peak_rss_mib"], 3),
        "target": "prepare peak RSS < 1024 MiB",
    })


if __name__ == "__main__":
    main()
