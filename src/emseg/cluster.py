"""The Dask cluster a blockwise prediction runs on: a ``distributed.LocalCluster`` sized to this machine,
or an existing scheduler (``--scheduler tcp://HOST:PORT``) whose workers can import emseg and see the
input and output paths (the model travels to them through the scheduler)."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Iterator, Optional

from emseg.errors import ConfigError

CONNECT_TIMEOUT_S = 10
WORKER_WAIT_S = 30


def machine() -> tuple[int, int]:
    """Usable cores and memory (bytes) of this machine."""
    import psutil

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores, int(psutil.virtual_memory().total)


def local_layout(task_bytes: int, workers: Optional[int] = None) -> tuple[int, int, int]:
    """(workers, torch threads per worker, memory per worker): one single-threaded worker per core, fewer
    when the machine's memory cannot hold a task per worker (with a GiB to spare for each)."""
    cores, memory = machine()
    fit = max(1, int(memory * 0.8 // (task_bytes + 2 ** 30)))
    n = workers or max(1, min(cores, fit))
    return n, max(1, cores // n), int(memory * 0.9 // n)


def check_workers(client, scheduler: str, task_bytes: int) -> None:
    """An existing cluster has workers, and each can hold one block (those without a memory limit can)."""
    try:
        client.wait_for_workers(1, timeout=WORKER_WAIT_S)
    except TimeoutError:
        raise ConfigError(f"--scheduler {scheduler}: the scheduler has no workers (waited {WORKER_WAIT_S} s); "
                          "start some with: dask worker " + scheduler) from None
    workers = client.scheduler_info(n_workers=-1)["workers"]
    # A worker's memory is shared by the tasks its threads run at once.
    limits = {addr: (w.get("memory_limit") or 0) // max(1, w.get("nthreads") or 1) for addr, w in workers.items()}
    small = {addr: m for addr, m in limits.items() if 0 < m < task_bytes}
    if small:
        addr, m = min(small.items(), key=lambda kv: kv[1])
        raise ConfigError(f"--block: one block needs about {task_bytes / 2 ** 30:.1f} GiB, worker {addr} has "
                          f"{m / 2 ** 30:.1f} GiB per thread ({len(small)} of {len(limits)} workers too small); "
                          "choose a smaller --block, or give the workers more memory or fewer threads")


@contextmanager
def dask_client(scheduler: Optional[str], task_bytes: int, workers: Optional[int] = None) -> Iterator:
    """A connected ``distributed.Client``; the local cluster, if one was started, is closed on the way out."""
    from distributed import Client, LocalCluster

    if scheduler:
        try:
            client = Client(scheduler, timeout=CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError, ValueError) as exc:
            raise ConfigError(f"--scheduler {scheduler}: no Dask scheduler answered within {CONNECT_TIMEOUT_S} s "
                              f"({type(exc).__name__})") from None
        try:
            check_workers(client, scheduler, task_bytes)
            client.threads = 0  # the workers' own torch defaults
            yield client
        finally:
            client.close()
        return
    n, threads, memory = local_layout(task_bytes, workers)
    if task_bytes > memory:
        raise ConfigError(f"--block: one block needs about {task_bytes / 2 ** 30:.1f} GiB, a worker has "
                          f"{memory / 2 ** 30:.1f} GiB; choose a smaller --block (or fewer --workers)")
    import dask

    # distributed sets MALLOC_TRIM_THRESHOLD_ in its workers, which turns off glibc's adaptive mmap
    # threshold: every large torch buffer is then mapped and unmapped again, and prediction ran 3x slower
    # (most of it in the kernel). The workers keep glibc's defaults.
    # A failed task's error reaches the client, which turns it into one line (a full disk, say); the workers'
    # own "Compute Failed" log records would only repeat it, so only critical ones are shown.
    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, memory_limit=memory,
                               dashboard_address=None, silence_logs=logging.CRITICAL)
    try:
        with Client(cluster) as client:
            client.threads = threads
            yield client
    finally:
        cluster.close()

