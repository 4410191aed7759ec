"""`make bench`: run every benchmark in turn; results land in bench-results/*.json (see docs/benchmarks.md).

`make bench` runs them all (about 5.5 hours on a 2-core CPU, most of it the learning curves, with and
without issue 18's options, the defaults, the EPFL profile, blockwise and active learning;
bench_gpu_train.py is left out: it needs a GPU machine); `python benchmarks/run_all.py NAME...` runs
those whose file name contains one of the NAMEs.
"""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
BENCHES = ["bench_prepare_memory.py", "bench_train_throughput.py", "bench_semi_step.py", "bench_layout.py",
           "bench_pruning.py", "bench_predict.py", "bench_blockwise.py memory", "bench_blockwise.py overhead",
           "bench_blockwise.py zaverage",
           "bench_epfl_train.py", "bench_defaults.py", "bench_active_learning.py", "bench_learning_curve.py",
           "bench_learning_curve.py --inits pretrained ssl --options plain z_context semi --counts 1 4 "
           "--name learning_curve_options_epfl_cpu",
           "bench_learning_curve.py --inits scratch pretrained --options plain --counts 1 4 12 "
           "--name learning_curve_zavg_epfl_cpu"]

if __name__ == "__main__":
    only = sys.argv[1:]
    for name in BENCHES:
        if only and not any(o in name for o in only):
            continue
        print(f"== {name}", flush=True)
        script, *args = name.split()
        subprocess.run([sys.executable, str(HERE / script), *args], check=True)
