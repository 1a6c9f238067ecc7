"""Computing and writing whole shards of soft labels: the loop shared by in-process runs and
Dask workers.

One `ShardRunner` owns a teacher (`SoftLabelKernel`) and the tokenized input ids. Its `run` walks
shards batch by batch and hands each batch's outputs, in order, to a writer thread through a
bounded queue; the writer assembles the shard in host memory, writes it with `store.write_shard`
(compression and sha256 happen there) and then records it with an atomic per-shard record file,
while the next batches compute. On CPU, `streams` threads compute whole batches side by side
(see `ShardRunner`). On CUDA the outputs are copied into pinned host buffers with non-blocking
copies and a CUDA event, so the copy overlaps the next batch's kernels and the writer waits on
the event, not on the device.

Trade-off: the queue (`QUEUE_BATCHES` batches) bounds host memory and how far compute can run
ahead of a slow disk; one shard is held in host memory while it is assembled (a shard is the unit
of writing), so the last shard's write is not overlapped. A shard is either recorded (written
completely, checksums known) or not, so a run killed at any moment loses at most the shards in
flight.

Sampling draws come from `UniformStream`, one per shard, consumed row by row, so a batch that is
split after a CUDA out-of-memory error reuses exactly the draws it would have used.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.capture.kernel import (
    NON_FINITE,
    NON_FINITE_ADVICE,
    PHASES,
    Fidelity,
    PhaseClock,
    SoftLabelKernel,
    SoftLabels,
    check_split,
    draw_uniforms,
    per_sequence_stats,
    shard_generator,
)
from pipeline.core.errors import InputError, first_line, load_errors
from pipeline.data.tokenized import TokenizedData
from pipeline.store.format import StoreSpec, write_shard
from pipeline.store.work import write_record

log = logging.getLogger(__name__)

QUEUE_BATCHES = 4
"""Batches that may wait for the writer before compute blocks."""
CPU_STREAMS = 2
"""Compute threads of an in-process CPU run (each gets 1/CPU_STREAMS of torch's threads)."""


@dataclass(frozen=True, kw_only=True)
class Job:
    """Everything a process needs to compute shards of one run (picklable, for Dask)."""

    teacher: str
    """The prepared teacher folder."""
    tokenized: str
    """The tokenized dataset folder."""
    store: str
    """The store being built (inside the work dir)."""
    records: str
    """Folder of per-shard record files."""
    spec: StoreSpec
    method: str
    k: int
    seed: int
    sampling: str
    """`systematic` or `iid` placement of a sample store's draws (`draw_uniforms`)."""
    batch_size: int
    head_chunk_tokens: int
    vocab_passes: str
    """Resolved: "native", "fused" or "eager" (`pipeline.capture.kernel.resolve_vocab_passes`)."""
    device: str
    """Resolved: "cpu" or "cuda" (a Dask worker may pick its own "cuda:i")."""
    dtype: str
    """Resolved: "float32", "bfloat16" or "float16"."""

    @property
    def logprobs(self) -> bool:
        """Whether the store keeps logprobs and tails (and so the kernel computes them)."""
        return "logprobs" in self.spec.ARRAYS


# -- inputs -----------------------------------------------------------------------------------


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_teacher(teacher: str | Path, device: str, dtype: str) -> torch.nn.Module:
    """The prepared teacher as an eval-mode causal LM on `device` in `dtype`."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(teacher), dtype=torch_dtype(dtype))
    except load_errors() as e:
        raise InputError(
            f"{teacher}: cannot load the teacher model ({first_line(e)}); re-run "
            "`dvc repro prepare_teacher` (or `dvc pull` the teacher) to restore it"
        ) from e
    return model.to(device).eval()


def build_kernel(model: torch.nn.Module, job: Job) -> SoftLabelKernel:
    """The soft-label kernel of `model`, checked against the model's own logits."""
    kernel = SoftLabelKernel(
        model,
        method=job.method,
        k=job.k,
        head_chunk_tokens=job.head_chunk_tokens,
        logprobs=job.logprobs,
        vocab_passes=job.vocab_passes,
    )
    check_split(model, kernel)
    return kernel


# -- records ----------------------------------------------------------------------------------


# -- compute ----------------------------------------------------------------------------------


class UniformStream:
    """A shard's sampling draws, consumed row by row; `peek` may look ahead without consuming."""

    def __init__(self, generator: torch.Generator, k: int, sampling: str) -> None:
        self.generator, self.k, self.sampling = generator, k, sampling
        self.ahead = torch.empty(0, k, dtype=torch.float64)

    def peek(self, rows: int) -> torch.Tensor:
        if self.ahead.shape[0] < rows:
            more = draw_uniforms(self.generator, rows - self.ahead.shape[0], self.k, self.sampling)
            self.ahead = torch.cat([self.ahead, more])
        return self.ahead[:rows]

    def advance(self, rows: int) -> None:
        self.ahead = self.ahead[rows:]


@dataclass
class _HostBatch:
    offset: int
    """First row of this batch within its shard."""
    tensors: tuple[torch.Tensor, ...]
    """ids, logprobs, tail, covered, entropy, top1 on the host (pinned on CUDA)."""
    event: Any = None
    """CUDA event recorded after the device-to-host copies (None on CPU)."""
    clock: PhaseClock | None = None
    """Where the batch's compute time went (read by the writer once the copies are done)."""


class ShardRunner:
    """Computes and writes whole shards (module docstring).

    `streams` > 1 (CPU): that many threads each compute whole batches (backbone and head), with
    torch's threads divided among them, and results are handed to the writer in batch order.
    Several independent streams of work keep every core busy without the per-op barriers of one
    stream spread over all cores, which on a few shared cores cost more than the parallelism
    gains. Results are identical whatever the streams (per-row results do not depend on torch's
    thread count). `streams` = 1 computes in the calling thread (CUDA, Dask workers) and halves
    the batch after an out-of-memory error.
    """

    def __init__(
        self,
        kernel: SoftLabelKernel,
        job: Job,
        data: TokenizedData,
        *,
        progress: Callable[[int], None] | None = None,
        streams: int = 1,
    ) -> None:
        self.kernel, self.job, self.data = kernel, job, data
        self.progress = progress or (lambda tokens: None)
        self.batch = job.batch_size
        self.device = kernel.device
        self.streams = streams if self.device.type == "cpu" else 1

    def run(self, shards: Sequence[tuple[str, int]]) -> None:
        """Compute, write and record each (split, shard); raise the first error (compute or
        write). Shards recorded before an error stay recorded."""
        writer = _Pipe("softlabels-writer", _ShardWriter(self.job, self.data).handle)
        writer.start()
        threads = torch.get_num_threads()
        pool = None
        if self.streams > 1:
            torch.set_num_threads(max(1, threads // self.streams))
            pool = ThreadPoolExecutor(self.streams, thread_name_prefix="softlabels-compute")
        order: deque = deque()  # markers and batch results (or futures), in write order
        try:
            with torch.inference_mode():
                for split, shard in shards:
                    self._shard(order, writer, pool, split, shard)
            self._forward(order, writer, keep=0)
            writer.finish()
        except BaseException:
            for item in order:
                if isinstance(item, Future):
                    item.cancel()
            writer.abort()
            raise
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
            torch.set_num_threads(threads)

    def _shard(
        self,
        order: deque,
        writer: _Pipe,
        pool: ThreadPoolExecutor | None,
        split: str,
        shard: int,
    ) -> None:
        start, stop = self.job.spec.shards(split)[shard]
        seq_len = self.job.spec.split(split).seq_len
        ids = self.data[split].input_ids
        stream = None
        if self.job.method == "sample":
            stream = UniformStream(
                shard_generator(self.job.seed, split, shard), self.job.k, self.job.sampling
            )
        order.append(("begin", split, shard))
        pos = start
        while pos < stop:
            n = min(self.batch, stop - pos)
            u = None if stream is None else stream.peek(n * seq_len)
            batch = torch.from_numpy(ids[pos : pos + n].astype(np.int64))  # (n, L)
            if pool is not None:
                order.append(pool.submit(self._compute, batch, u, pos - start))
                self._forward(order, writer, keep=self.streams)
            else:
                try:
                    order.append(("batch", self._compute(batch, u, pos - start)))
                except torch.OutOfMemoryError:
                    if n == 1:
                        raise
                    self.batch = max(1, n // 2)
                    log.warning("out of memory: batch size halved to %d sequences", self.batch)
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                self._forward(order, writer, keep=0)
            if stream is not None:
                stream.advance(n * seq_len)
            pos += n
        order.append(("end",))

    def _forward(self, order: deque, writer: _Pipe, keep: int) -> None:
        """Hand items to the writer in order, waiting for results while more than `keep`
        batches are in flight."""
        in_flight = sum(isinstance(x, Future) for x in order)
        while order:
            item = order[0]
            if isinstance(item, Future):
                if in_flight <= keep and not item.done():
                    return
                item = ("batch", item.result())
                in_flight -= 1
            order.popleft()
            if item[0] == "batch":
                hb = item[1]
                self.progress(hb.tensors[0].numel() // self.job.k)
            writer.put(item)

    def _compute(self, batch: torch.Tensor, u: torch.Tensor | None, offset: int) -> _HostBatch:
        clock = PhaseClock(self.device)
        with torch.inference_mode():
            out = self.kernel(batch, u, clock)
        fields = _fields(out)
        if self.device.type != "cuda":
            return _HostBatch(offset, fields, clock=clock)
        host = []
        for t in fields:
            h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            h.copy_(t, non_blocking=True)
            host.append(h)
        event = torch.cuda.Event()
        event.record()
        return _HostBatch(offset, tuple(host), event, clock)


def _check_finite(entropy: np.ndarray, split: str, first: int, seq_len: int) -> None:
    """InputError naming the first position whose teacher entropy is not finite: the teacher's
    logits there hold a NaN or an infinity (broken weights, or half precision overflowing), and
    labels computed from them would be garbage; raised before the shard is written."""
    bad = np.flatnonzero(~np.isfinite(entropy.reshape(-1)))
    if bad.size:
        row, pos = divmod(int(bad[0]), seq_len)
        raise InputError(
            f"teacher_logits: {NON_FINITE} in split {split!r}, sequence {first + row}, position "
            f"{pos} ({bad.size} positions in this batch); {NON_FINITE_ADVICE}"
        )


def _fields(out: SoftLabels) -> tuple[torch.Tensor, ...]:
    return (out.ids, out.logprobs, out.tail, out.covered, out.entropy, out.top1)


class _Pipe(threading.Thread):
    """A thread handling items from a bounded queue; its error re-raises in the producer."""

    def __init__(self, name: str, handle: Callable[[tuple], None], size: int = QUEUE_BATCHES):
        super().__init__(name=name, daemon=True)
        self.handle = handle
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, size))
        self.error: BaseException | None = None
        self.stopping = False

    def put(self, item: Any) -> None:
        """Enqueue (blocks while full); raise this thread's error if it failed."""
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def finish(self) -> None:
        """Let the queue drain, stop the thread, raise its error if any."""
        self.put(None)
        self.join()
        if self.error is not None:
            raise self.error

    def abort(self) -> None:
        """Stop without handling what is still queued (no partial shard is written)."""
        self.stopping = True
        while self.is_alive():
            try:
                self.queue.put(None, timeout=0.2)
                break
            except queue.Full:
                continue
        self.join()

    def run(self) -> None:
        try:
            while (item := self.queue.get()) is not None:
                if not self.stopping:
                    self.handle(item)
        except BaseException as e:  # handed to the producer by put/finish
            self.error = e
            while self.queue.get() is not None:  # keep draining: the producer never blocks
                pass


class _ShardWriter:
    """Assembles shards from batches, then writes and records them (runs in the writer pipe)."""

    def __init__(self, job: Job, data: TokenizedData) -> None:
        self.job, self.data = job, data
        self.current: dict[str, Any] | None = None

    def handle(self, item: tuple) -> None:
        getattr(self, f"_{item[0]}")(*item[1:])

    def _begin(self, split: str, shard: int) -> None:
        start, stop = self.job.spec.shards(split)[shard]
        n, seq_len, k = stop - start, self.job.spec.split(split).seq_len, self.job.k
        self.current = {
            "split": split,
            "shard": shard,
            "start": start,
            "stop": stop,
            "ids": np.empty((n, seq_len, k), np.int32),
            "logprobs": np.empty((n, seq_len, k), np.float16),
            "tail": np.empty((n, seq_len), np.float16),
            "entropy": np.empty((n, seq_len), np.float16),
            "stats": np.empty((n, 3), np.float64),
            "seconds": dict.fromkeys((*PHASES, "write"), 0.0),
        }

    def _batch(self, hb: _HostBatch) -> None:
        cur = self.current
        assert cur is not None
        if hb.event is not None:
            hb.event.synchronize()
        seq_len, k = self.job.spec.split(cur["split"]).seq_len, self.job.k
        ids, lp, tail, covered, entropy, top1 = (t.numpy() for t in hb.tensors)
        n = ids.size // (seq_len * k)  # tensors are (n, L, ...) or (n*L, ...)
        a, b = hb.offset, hb.offset + n
        _check_finite(entropy, cur["split"], cur["start"] + a, seq_len)
        cur["ids"][a:b] = ids.reshape(n, seq_len, k)
        cur["logprobs"][a:b] = lp.reshape(n, seq_len, k)
        cur["tail"][a:b] = tail.reshape(n, seq_len)
        cur["entropy"][a:b] = entropy.reshape(n, seq_len)
        cur["stats"][a:b] = per_sequence_stats(
            *(x.reshape(n, seq_len) for x in (covered, entropy, top1))
        )
        if hb.clock is not None:
            for phase, seconds in hb.clock.seconds().items():
                cur["seconds"][phase] += seconds

    def _end(self) -> None:
        cur, self.current = self.current, None
        assert cur is not None
        split, shard, start, stop = cur["split"], cur["shard"], cur["start"], cur["stop"]
        data = self.data[split]
        started = time.perf_counter()
        checksums = write_shard(
            self.job.store,
            self.job.spec,
            split,
            shard,
            np.ascontiguousarray(data.input_ids[start:stop]),
            cur["ids"],
            cur["logprobs"],
            cur["tail"],
            cur["entropy"] if self.job.spec.compact else None,
        )
        fidelity = Fidelity()
        fidelity.add(
            list(data.languages),
            data.lang_codes[start:stop],
            cur["stats"],
            self.job.spec.split(split).seq_len,
        )
        cur["seconds"]["write"] += time.perf_counter() - started
        write_record(
            self.job.records,
            split,
            shard,
            checksums,
            fidelity=fidelity.sums,
            seconds={k: round(v, 4) for k, v in cur["seconds"].items()},
        )
