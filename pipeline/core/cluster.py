"""Dask clusters for the stages that spread work over processes or hosts (the `dask` params).

`DaskConfig` is the params block every such stage has (`teacher_logits.dask`, `tokenize.dask`):
a running scheduler's address, or a `distributed.LocalCluster` of `n_workers` processes started
for the run. `dask_client` opens it; `map_ordered` runs one task per item, reports each as it
finishes, and returns the results in submission order, so a stage's output never depends on
which worker finished first. A remote scheduler's workers must import this package and see the
stage's input and work folders at the same paths (a shared filesystem).

On CUDA a local cluster has one worker per visible GPU (dask-cuda's LocalCUDACluster if it is
installed, which pins CUDA_VISIBLE_DEVICES per worker; else plain processes, and the stage picks
`cuda:i` per worker). On CPU each of the `n_workers` processes runs one task at a time and gets
cores // n_workers threads for its own thread pools (returned to the caller to apply).

Trade-off: one task per item keeps scheduling simple and failure handling coarse (a lost
worker's item is recomputed whole by another); items should be large enough (a shard, a corpus
slice) that the per-task overhead (~ms) is noise.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pipeline.core.config import require

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DaskConfig:
    """Params block `dask` of a stage (teacher_logits.dask, tokenize.dask): optional
    distributed execution."""

    SECTION = "teacher_logits.dask"  # checks name this section; from_mapping renames it

    enabled: bool = False
    """Run the stage's tasks on Dask instead of in this process."""
    scheduler_address: str | None = None
    """Address of a running scheduler (e.g. tcp://host:8786); null starts a local cluster."""
    n_workers: int = 2
    """Worker processes of the local cluster (CPU; with CUDA, one worker per visible GPU)."""

    def __post_init__(self) -> None:
        require(
            self.n_workers >= 1,
            f"{self.SECTION}.n_workers",
            f"must be >= 1, got {self.n_workers}",
        )


@contextmanager
def dask_client(
    dask: DaskConfig, *, cuda: bool = False, env: dict[str, str] | None = None
) -> Iterator[tuple[Any, int | None]]:
    """(client, threads per worker) of the cluster `dask` names, or of a local cluster started
    for the block and closed after it. `env`: environment of local worker processes.
    threads is None where the caller should not change its workers' thread counts."""
    from distributed import Client

    cluster, threads = None, None
    if dask.scheduler_address:
        client = Client(dask.scheduler_address)
        log.info("dask: connected to %s", dask.scheduler_address)
    else:
        cluster, threads = _local_cluster(dask.n_workers, cuda, env or {})
        client = Client(cluster)
    try:
        yield client, threads
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def map_ordered(
    client: Any,
    fn: Callable[..., Any],
    items: Sequence[tuple[Any, ...]],
    on_done: Callable[[int, Any], None] = lambda i, r: None,
) -> list[Any]:
    """fn(*item) for every item as a Dask task; on_done(index, result) as each finishes; the
    results in `items` order. The first task error cancels the rest and is raised (the work of
    finished tasks stays where they wrote it)."""
    from distributed import as_completed

    futures = [client.submit(fn, *item, pure=False) for item in items]
    index = {fut.key: i for i, fut in enumerate(futures)}
    results: list[Any] = [None] * len(futures)
    try:
        for fut in as_completed(futures):
            i = index[fut.key]
            results[i] = fut.result()
            on_done(i, results[i])
    except BaseException:
        client.cancel(futures)
        raise
    return results


def _local_cluster(n_workers: int, cuda: bool, env: dict[str, str]) -> tuple[Any, int | None]:
    """A local cluster of processes; returns it and the threads per CPU worker."""
    from distributed import LocalCluster

    common: dict[str, Any] = {
        "threads_per_worker": 1,
        "dashboard_address": None,
        "silence_logs": logging.WARNING,
    }
    if env:
        common["env"] = env
    if cuda:
        import torch

        gpus = torch.cuda.device_count()
        try:
            from dask_cuda import LocalCUDACluster

            log.info("dask: LocalCUDACluster with %d workers (one per GPU)", gpus)
            return LocalCUDACluster(n_workers=gpus, **common), None
        except ImportError:
            log.info("dask: LocalCluster with %d workers (one per GPU)", gpus)
            return LocalCluster(n_workers=gpus, processes=True, **common), None
    threads = max(1, (os.cpu_count() or 1) // n_workers)
    log.info("dask: LocalCluster with %d workers x %d threads", n_workers, threads)
    return LocalCluster(n_workers=n_workers, processes=True, **common), threads
