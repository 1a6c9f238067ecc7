"""Running teacher_logits shards on a Dask cluster: one task per shard, whole shards per worker.

Cluster: `pipeline.core.cluster` (a running scheduler, or a local cluster; on CUDA one worker
per visible GPU, and worker i uses cuda:i where dask-cuda does not pin devices). Workers must
see the teacher, tokenized and work folders at the same paths (a shared filesystem).

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
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from pipeline.capture.kernel import SoftLabelKernel
from pipeline.capture.shards import Job, ShardRunner, build_kernel, load_teacher
from pipeline.core.allocator import keep_freed_memory
from pipeline.core.cluster import DaskConfig, dask_client, map_ordered
from pipeline.data.tokenized import TokenizedData, load_tokenized
from pipeline.store.work import read_record

log = logging.getLogger(__name__)

_CACHE: dict[tuple, tuple[SoftLabelKernel, TokenizedData]] = {}
"""Per worker process: the loaded teacher and data of the current run's settings."""


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
        job.vocab_passes,
        job.logprobs,  # what the kernel computes (`build_kernel`)
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
    tokens = []
    for split, shard in shards:
        start, stop = job.spec.shards(split)[shard]
        tokens.append((stop - start) * job.spec.split(split).seq_len)
    with dask_client(dask, cuda=job.device == "cuda") as (client, threads):
        map_ordered(
            client,
            compute_shard,
            [(job, split, shard, threads) for split, shard in shards],
            lambda i, _: progress(tokens[i]),
        )
