"""Helpers for benchmarks: scratch projects beside the real data, child-process peak memory."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = (ROOT.parent / "shared" / "data").resolve()
EPFL = SHARED / "epfl-hippocampus"
RESULTS = ROOT / "bench-results"
BIN = str(Path(sys.executable).parent)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    return f"{platform.node()} {os.cpu_count()} CPU, {cpu}, Python {platform.python_version()}"


def run_measured(cmd: list[str], cwd: Path, env: dict | None = None) -> dict:
    """Run a command in a fresh process; return wall seconds and its peak resident memory (MiB).

    Each call is run through a tiny Python wrapper so that RUSAGE_CHILDREN holds only this command.
    """
    wrapper = ("import resource,subprocess,sys,time;t=time.time();r=subprocess.run(sys.argv[1:]);"
               "print('BENCH', r.returncode, time.time()-t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    full_env = {**os.environ, "PATH": BIN + os.pathsep + os.environ["PATH"], **(env or {})}
    proc = subprocess.run([sys.executable, "-c", wrapper, *cmd], cwd=cwd, capture_output=True, text=True, env=full_env)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH")][-1].split()
    if int(line[1]) != 0:
        raise SystemExit(f"{cmd} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return {"seconds": float(line[2]), "peak_rss_mib": int(line[3]) / 1024, "stdout": proc.stdout}


def save(name: str, result: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    result = {"benchmark": name, "machine": machine(), "date": time.strftime("%Y-%m-%d"), **result}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return path
