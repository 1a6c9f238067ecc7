"""Running teacher_logits shards on a Dask cluster: one task per shard, whole shards per worker.

Cluster: `dask.scheduler_address` connects to a running scheduler (its workers must import this
package and see the teacher, tokenized and work folders at the same paths: a shared filesystem).
Otherwise a `distributed.LocalCluster` of `dask.n_workers` processes with one thread each is
started; when the run is on CUDA, one worker per visible GPU (dask-cuda's LocalCUDACluster if it
is installed, which pins CUDA_VISIBLE_DEVICES per worker; else worker i uses cuda:i).

Each worker process loads the teacher and opens the tokenized dataset once (cached per process
for the run's settings) and then runs `ShardRunner` on each shard it is given: it writes the
shard's files and its record itself, so no two workers touch one shard and the driver holds no
data. CPU workers run torch with cores // n_workers threads each; per-row results do not depend
on the thread count (verified by the tests), so the store is byte-identical to an in-process run.

Trade-off: per-shard tasks keep scheduling trivial and failure handling coarse (a lost worker's
shard is recomputed whole by another); within one worker the write of a shard does not overlap
the next shard's compute, which other workers' compute hides.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from pipeline.capture.kernel import SoftLabelKernel
from pipeline.capture.shards import Job, ShardRunner, build_kernel, load_teacher
from pipeline.core.allocator import keep_freed_memory
from pipeline.core.config import require
from pipeline.data.tokenized import TokenizedData, load_tokenized
from pipeline.store.work import read_record

log = logging.getLogger(__name__)

_CACHE: dict[tuple, tuple[SoftLabelKernel, TokenizedData]] = {}
"""Per worker process: the loaded teacher and data of the current run's settings."""


@dataclass(frozen=True)
class DaskConfig:
    """Params section `teacher_logits.dask`: optional distributed execution."""

    enabled: bool = False
    """Run shards as Dask tasks instead of in this process."""
    scheduler_address: str | None = None
    """Address of a running scheduler (e.g. tcp://host:8786); null starts a local cluster."""
    n_workers: int = 2
    """Worker processes of the local cluster (CPU; with CUDA, one worker per visible GPU)."""

    def __post_init__(self) -> None:
        require(
            self.n_workers >= 1,
            "teacher_logits.dask.n_workers",
            f"must be >= 1, got {self.n_workers}",
        )


def compute_shard(job: Job, split: str, shard: int, threads: int | None) -> dict[str, Any]:
    """Worker task: compute, write and record one shard; return its record."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    job = replace(job, device=_worker_device(job.device))
    key = (
        job.teacher,
        job.tokenized,
        job.device,
        job.dtype,
        job.method,
        job.k,
        job.head_chunk_tokens,
    )
    if key not in _CACHE:
        _CACHE.clear()
        keep_freed_memory()  # a worker process does this job only (see pipeline/core/allocator.py)
        model = load_teacher(job.teacher, job.device, job.dtype)
        _CACHE[key] = (build_kernel(model, job), load_tokenized(job.tokenized))
    kernel, data = _CACHE[key]
    ShardRunner(kernel, job, data).run([(split, shard)])
    record = read_record(job.records, split, shard)
    if record is None:  # pragma: no cover - run() raises before this can happen
        raise RuntimeError(f"shard {split}/{shard}: no record after writing it")
    return record


def _worker_device(device: str) -> str:
    """On a multi-GPU worker without dask-cuda's pinning, worker i takes GPU i (mod count)."""
    if device != "cuda":
        return device
    import torch

    count = torch.cuda.device_count()
    if count <= 1:
        return device
    try:
        from distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError):
        return device
    return f"cuda:{int(name) % count}" if str(name).isdigit() else device


def run_on_dask(
    job: Job,
    shards: Sequence[tuple[str, int]],
    dask: DaskConfig,
    progress: Callable[[int], None],
) -> None:
    """Compute `shards` on the cluster `dask` names or starts; raise the first task error
    (finished shards stay)."""
    from distributed import Client, as_completed

    cluster, threads = None, None
    if dask.scheduler_address:
        client = Client(dask.scheduler_address)
        log.info("dask: connected to %s", dask.scheduler_address)
    else:
        cluster, threads = _local_cluster(job, dask.n_workers)
        client = Client(cluster)
    try:
        futures = {}
        for split, shard in shards:
            start, stop = job.spec.shards(split)[shard]
            tokens = (stop - start) * job.spec.split(split).seq_len
            fut = client.submit(compute_shard, job, split, shard, threads, pure=False)
            futures[fut] = tokens
        try:
            for fut in as_completed(list(futures)):
                fut.result()
                progress(futures[fut])
        except BaseException:
            client.cancel(list(futures))
            raise
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _local_cluster(job: Job, n_workers: int) -> tuple[Any, int | None]:
    """A local cluster of processes; returns it and the torch threads per worker."""
    from distributed import LocalCluster

    common = {"threads_per_worker": 1, "dashboard_address": None, "silence_logs": logging.WARNING}
    if job.device == "cuda":
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
    log.info("dask: LocalCluster with %d workers x %d torch threads", n_workers, threads)
    return LocalCluster(n_workers=n_workers, processes=True, **common), threads
