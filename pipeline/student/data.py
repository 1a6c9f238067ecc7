"""Streaming training batches (token ids + stored soft labels) for the student, in a fixed order.

Reading: the unit is a block of `chunk_sequences` consecutive sequences, the store's chunk, so a
block is one decompression of each Zarr array and never a partial chunk. Token ids come from the
tokenized dataset (memory-mapped Arrow), soft labels from the store, decoded into the form the
losses take whatever the store's format (`pipeline.store.labels.decode_block`: `ids`, and
`logprobs`, `tail`, `counts`, `entropy` where the store has them);
`check_store` has verified beforehand that the store was made from exactly these token ids and
that every shard file matches its checksum, and each block's values are range-checked as it is
read (a few ms per block, in the reader thread), so a damaged store stops training with one
line naming the shard, never with NaN losses.

Order (a pure function of the seed, the step and the layout): epoch e permutes the blocks with
a generator seeded by (seed, e). The permuted blocks are dealt round-robin to `slots`: one slot
per DataLoader worker, so no two workers ever touch the same block and together they cover the
epoch exactly once. Each slot groups its blocks into windows of `buffer_chunks` blocks held in
memory and shuffles the rows of a window (seeded by seed, epoch, slot, window): chunk-granular
shuffling for cheap reads, plus an in-memory shuffle buffer so a batch mixes several blocks. A
slot's rows, epoch after epoch, are cut into global batches of `batch_size`; the DataLoader takes
batches from its workers round-robin, so global step g is batch g // W of slot g % W (W workers).
Resuming at step s therefore needs no state beyond s: every slot skips its first batches by index
arithmetic, without reading them. The order depends on the number of workers, so a resumed run
must use the same one (the checkpoint key includes it).

Data-parallel ranks (`rank`, `world_size`) do not change the order: the global batch of step g
is the same rows whatever the world size, and rank r takes its contiguous share of it, rows
[r * b, (r + 1) * b) with b = batch_size / world_size (`share_bounds`). With equal shares of
fixed-length rows, the mean of the ranks' per-batch losses is the one process's loss, so DDP's
averaged gradient is the one-process gradient and the weights agree up to float rounding; a
checkpoint of any world size resumes under any other. The trade-off: every rank reads and
decodes the whole windows its batches come from (the same reads as one process) and keeps its
rows of each batch, so reading is repeated on every rank while the compute is split. (The public
`softlabels.SoftLabelDataset` shards otherwise: there a rank is a group of slots, reading
disjoint blocks, as trainers that build their own batches per rank expect.)

Prefetching: each slot reads its next windows in a background thread, `prefetch` windows ahead,
while batches of the current one are handed out (the training step runs in torch kernels that
release the GIL); with DataLoader workers the batches are also produced in other processes.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr.errors
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.core.errors import InputError, StoreError
from pipeline.data.tokenized import SPLITS, load_tokenized
from pipeline.store.format import StoreSpec, open_split, read_attrs
from pipeline.store.integrity import DAMAGED_ADVICE, check_integrity
from pipeline.store.labels import decode_block, label_arrays
from pipeline.store.verify import compatibility_problems, label_problems, refuse


@dataclass(frozen=True)
class BlockOrder:
    """The deterministic data order described in the module docstring (indices only, no I/O)."""

    n_rows: int
    """Sequences in the split."""
    chunk_sequences: int
    """Sequences per block: the store's chunk (params teacher_logits.chunk_sequences)."""
    batch_size: int
    """Sequences per batch."""
    seed: int
    """Seed of every permutation."""
    buffer_chunks: int = 4
    """Blocks per in-memory shuffle window."""
    slots: int = 1
    """Independent readers: the stream's DataLoader workers (the public dataset's: ranks x
    workers), at least 1."""

    def __post_init__(self) -> None:
        for key in ("chunk_sequences", "batch_size", "buffer_chunks", "slots"):
            if getattr(self, key) < 1:
                raise ValueError(f"BlockOrder.{key} must be >= 1, got {getattr(self, key)}")
        if self.n_blocks < self.slots:
            raise InputError(
                f"the training split has {self.n_blocks} blocks of {self.chunk_sequences} sequences, "
                f"fewer than the {self.slots} readers (ranks x DataLoader workers); use fewer "
                "train_student.num_workers"
            )

    @property
    def n_blocks(self) -> int:
        return math.ceil(self.n_rows / self.chunk_sequences)

    def block_range(self, block: int) -> tuple[int, int]:
        """[start, stop) rows of `block`; the last block may be short."""
        start = block * self.chunk_sequences
        return start, min(start + self.chunk_sequences, self.n_rows)

    def slot_blocks(self, epoch: int, slot: int) -> np.ndarray:
        """Blocks slot `slot` reads in `epoch`, in reading order."""
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_blocks)
        return perm[slot :: self.slots]

    def windows(self, epoch: int, slot: int) -> list[np.ndarray]:
        """The slot's blocks of `epoch`, grouped into shuffle windows."""
        mine = self.slot_blocks(epoch, slot)
        return [mine[i : i + self.buffer_chunks] for i in range(0, len(mine), self.buffer_chunks)]

    def window_rows(self, epoch: int, slot: int, index: int, blocks: np.ndarray) -> np.ndarray:
        """Row ids of window `index` in the order they are served (a seeded shuffle)."""
        rows = np.concatenate([np.arange(*self.block_range(int(b))) for b in blocks])
        rng = np.random.default_rng([self.seed, epoch, slot, index, 1])
        return rows[rng.permutation(len(rows))]

    def slot_epoch_rows(self, epoch: int, slot: int) -> int:
        blocks = self.slot_blocks(epoch, slot)
        return sum(b - a for a, b in (self.block_range(int(x)) for x in blocks))

    def locate(self, slot: int, row_offset: int) -> tuple[int, int, int]:
        """(epoch, window index, offset in window) of the slot's `row_offset`-th row."""
        epoch = 0
        while row_offset >= (n := self.slot_epoch_rows(epoch, slot)):
            row_offset -= n
            epoch += 1
        for index, blocks in enumerate(self.windows(epoch, slot)):
            n = sum(b - a for a, b in (self.block_range(int(x)) for x in blocks))
            if row_offset < n:
                return epoch, index, row_offset
            row_offset -= n
        raise AssertionError("unreachable: offset inside the epoch")

    def slot_batches_before(self, step: int, worker: int, workers: int) -> int:
        """Batches worker `worker` (of `workers`) produced for global steps [0, step)."""
        return max(0, (step - worker + workers - 1) // workers)

    def batch_rows(
        self, step: int, *, num_workers: int = 0, rank: int = 0, world_size: int = 1
    ) -> np.ndarray:
        """Row ids `SoftLabelStream` serves at global step `step` with `num_workers` workers:
        the whole global batch, or with `world_size` > 1 rank `rank`'s share of it
        (`share_bounds`). For tests and the in-memory benchmark."""
        workers = max(1, num_workers)
        it = self.iter_rows(step % workers, (step // workers) * self.batch_size)
        rows = np.concatenate([rows for rows, _ in _take(it, self.batch_size)])
        lo, hi = share_bounds(self.batch_size, rank, world_size)
        return rows[lo:hi]

    def iter_rows(self, slot: int, start: int = 0) -> Iterator[tuple[np.ndarray, tuple]]:
        """Yield (row ids of one window from `start` on, window key) forever for a slot."""
        epoch, index, offset = self.locate(slot, start)
        while True:
            wins = self.windows(epoch, slot)
            for i in range(index, len(wins)):
                rows = self.window_rows(epoch, slot, i, wins[i])
                yield rows[offset:], (epoch, i, wins[i])
                offset = 0
            epoch, index = epoch + 1, 0


def _take(it: Iterator[tuple[np.ndarray, Any]], n: int) -> Iterator[tuple[np.ndarray, Any]]:
    """First `n` rows of a window stream, as (rows, key) pieces."""
    while n > 0:
        rows, key = next(it)
        yield rows[:n], key
        n -= len(rows[:n])


def share_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """[lo, hi) of rank `rank`'s contiguous share of `n` items split over `world_size` ranks:
    equal shares when `world_size` divides `n` (a batch), sizes differing by at most one
    otherwise (the validation rows); (0, n) for one rank."""
    return n * rank // world_size, n * (rank + 1) // world_size


def distributed_share(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world size) of this reader: as given, else torch.distributed's when a process
    group is initialised, else (0, 1), the whole split. ValueError for a rank outside it."""
    dist = torch.distributed
    live = dist.is_available() and dist.is_initialized()
    if world_size is None:
        world_size = dist.get_world_size() if live else 1
    if rank is None:
        rank = dist.get_rank() if live else 0
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    return rank, world_size


class RowReader:
    """Token ids and decoded soft labels of one split, read a chunk at a time.

    The one reader of (tokenized rows, store) pairs: the training stream, the public row
    datasets (`pipeline.student.datasets`) and the benchmarks go through it. Holds paths, not
    open files, so it pickles cheaply into DataLoader workers; the memory-mapped token ids and
    the Zarr arrays are opened on first use in each process. `store` None reads token ids only.
    """

    def __init__(
        self, tokenized: str | Path, *, store: str | Path | None = None, split: str = "train"
    ) -> None:
        self.tokenized, self.store, self.split = Path(tokenized), store, split
        self._arrays: dict[str, Any] | None = None
        self._token_rows: np.ndarray | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_arrays"] = None
        state["_token_rows"] = None  # reopened (memory-mapped) in each process
        return state

    def tokens(self) -> np.ndarray:
        """(N, L) token ids of the split (memory-mapped)."""
        if self._token_rows is None:
            self._token_rows = load_tokenized(self.tokenized, [self.split])[self.split].input_ids
        return self._token_rows

    def _labels(self) -> dict[str, Any]:
        if self._arrays is None:
            attrs = read_attrs(self.store)
            self._vocab = int(attrs["teacher"]["vocab_size"])
            self._k = int(attrs["k"])
            self._shard_rows = int(attrs["chunk_sequences"]) * int(attrs["shard_chunks"])
            self._arrays = open_split(self.store, self.split, label_arrays(attrs))
        return self._arrays

    def read_labels(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Soft labels of rows [start, stop) (one chunk), decoded (`decode_block`), after the
        cheap value checks (`label_problems`). A chunk that cannot be
        decoded or holds impossible values is a StoreError naming the shard and what to do,
        not a decoder traceback or NaN losses."""
        arrays = self._labels()
        shard = start // self._shard_rows
        where = f"{self.store}: {self.split} shard {shard} (rows {start}:{stop})"
        try:
            block = decode_block(
                {name: np.asarray(arr[start:stop]) for name, arr in arrays.items()}
            )
        except (ValueError, RuntimeError, OSError, zarr.errors.BaseZarrError) as e:
            raise StoreError(
                f"{where}: cannot be decoded ({type(e).__name__}: {e}); {DAMAGED_ADVICE}"
            ) from e
        problems = label_problems(block, start, self._vocab, self._k)
        if problems:
            raise StoreError(f"{where}: {'; '.join(problems)}; {DAMAGED_ADVICE}")
        return block

    def read_ranges(
        self, ranges: list[tuple[int, int]]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(sorted row ids, {name: rows}) of whole row ranges (chunks): `input_ids` (n, L) and
        the decoded labels (n, L[, k]); one chunk read per range and array."""
        ranges = sorted(ranges)
        rows = np.concatenate([np.arange(a, b) for a, b in ranges])
        data = {"input_ids": np.ascontiguousarray(self.tokens()[rows])}  # (n, L)
        if self.store is not None:
            parts = [self.read_labels(a, b) for a, b in ranges]
            for name in parts[0]:
                data[name] = np.concatenate([p[name] for p in parts])  # (n, L[, k])
        return rows, data


class SoftLabelStream(IterableDataset):
    """An endless stream of training batches in `BlockOrder` order (module docstring).

    Each item is a dict of tensors for one batch: `input_ids` (B, L) int32 and, when `store`
    is given, the decoded labels (`decode_block`): `ids` (B, L, k) int32, and as the store has
    them `logprobs` (B, L, k) float16, `tail` (B, L) float16, `counts` (B, L, k) uint8,
    `entropy` (B, L) float16.
    Use it with `DataLoader(stream, batch_size=None, num_workers=W)` and the same W as
    `num_workers`. Paths, not open files, are held, so it pickles cheaply into worker processes.
    With `world_size` > 1 each batch is rank `rank`'s share of the global batch of
    `batch_size` rows (module docstring): B = batch_size / world_size, which must be whole.
    """

    def __init__(
        self,
        tokenized: str | Path,
        *,
        batch_size: int,
        seed: int,
        chunk_sequences: int,
        store: str | Path | None = None,
        split: str = "train",
        buffer_chunks: int = 4,
        num_workers: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
        prefetch: int = 2,
    ) -> None:
        super().__init__()
        self.reader = RowReader(tokenized, store=store, split=split)
        self.workers = max(1, num_workers)
        self.rank, self.world_size = distributed_share(rank, world_size)
        if batch_size % world_size:
            raise ValueError(
                f"batch_size {batch_size} must be a multiple of world_size {world_size} (each "
                "rank takes an equal share of every global batch)"
            )
        self.start_step, self.prefetch = start_step, max(1, prefetch)
        self.order = BlockOrder(
            n_rows=len(self.reader.tokens()),
            chunk_sequences=chunk_sequences,
            batch_size=batch_size,
            seed=seed,
            buffer_chunks=buffer_chunks,
            slots=self.workers,
        )

    def read_labels(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """`RowReader.read_labels` of this stream's store and split."""
        return self.reader.read_labels(start, stop)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if info is not None and info.num_workers != self.workers:
            raise ValueError(
                f"SoftLabelStream built for {self.workers} workers, DataLoader has {info.num_workers}"
            )
        # The DataLoader asks worker 0 first: after a restart at step s, worker 0 serves
        # global step s, which belongs to the order's slot s % W.
        slot = (self.start_step + worker) % self.workers
        done = self.order.slot_batches_before(self.start_step, slot, self.workers)
        b = self.order.batch_size
        lo, hi = share_bounds(b, self.rank, self.world_size)  # this rank's rows of a batch
        pieces: list[tuple[np.ndarray, dict]] = []
        have = 0  # rows of the current global batch passed so far
        windows = prefetched_windows(self.reader, self.order, slot, done * b, self.prefetch)
        for local, data in windows:
            pos = 0
            while pos < len(local):
                n = min(len(local) - pos, b - have)  # batch rows [have, have + n) are here
                first, last = max(lo, have), min(hi, have + n)
                if first < last:
                    pieces.append((local[pos + first - have : pos + last - have], data))
                have += n
                pos += n
                if have == b:
                    yield _assemble(pieces)
                    pieces, have = [], 0


def prefetched_windows(
    reader: RowReader, order: BlockOrder, slot: int, start: int, prefetch: int
) -> Iterator[tuple[np.ndarray, dict]]:
    """(served row ids, window data indexed by those rows) of `slot` of `order` from its
    `start`-th row on, each window's whole blocks read by `reader` (one chunk read per block
    and array), `prefetch` windows ahead in a background thread."""
    q: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()

    def produce() -> None:
        try:
            for served, (_, _, blocks) in order.iter_rows(slot, start):
                rows, data = reader.read_ranges([order.block_range(int(b)) for b in blocks])
                local = np.searchsorted(rows, served)  # (n,) positions in `data`
                item = (local, data)
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as e:  # hand any failure to the consumer
            q.put(e)

    thread = threading.Thread(target=produce, name=f"softlabels-prefetch-{slot}", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def _assemble(pieces: list[tuple[np.ndarray, dict[str, np.ndarray]]]) -> dict[str, torch.Tensor]:
    """Gather a batch's rows from one or two windows into tensors."""
    names = pieces[0][1].keys()
    out = {}
    for name in names:
        parts = [data[name][idx] for idx, data in pieces]
        out[name] = torch.from_numpy(parts[0] if len(parts) == 1 else np.concatenate(parts))
    return out


def check_store(
    store: str | Path,
    *,
    tokenized: str | Path | None = None,
    tokenizer_identity: dict[str, Any] | None = None,
    vocab_size: int | None = None,
    splits: Sequence[str] = ("train",),
    purpose: str = "train from",
    checksums: bool = True,
) -> dict[str, Any]:
    """The store's attributes, after refusing one this consumer must not use (by default: a
    training run, which needs `train`).

    Refused (StoreError naming every differing field and what to do, "refusing to `purpose`"):
    a missing or incomplete store, one without each of `splits`, and, for the arguments given,
    one made with another tokenizer, one whose teacher vocabulary is not the student's
    `vocab_size`, or one whose recorded input-id fingerprints differ from the `tokenized`
    dataset's (every split both have). Then, with `checksums`, the arrays of `splits` are
    checked against the attributes and every shard file against its recorded sha256
    (`pipeline.store.integrity.check_integrity`): a damaged store is refused here, before the
    first step, not when training first reaches the damaged chunk.
    """
    attrs = read_attrs(store)
    store_splits = attrs.get("dataset", {}).get("splits", {})
    problems = [
        f"dataset.splits.{name} is missing: the store has no "
        f"{'training' if name == 'train' else name} split; re-run teacher_logits with a "
        "tokenized dataset that has one"
        for name in splits
        if name not in store_splits
    ]
    fingerprints = None
    if tokenized is not None:
        both = [s for s in SPLITS if s in store_splits]
        fingerprints = load_tokenized(tokenized, both, missing_ok=True).fingerprints()
    problems += compatibility_problems(
        attrs,
        tokenizer_identity=tokenizer_identity,
        dataset_fingerprints=fingerprints,
        vocab_size=vocab_size,
    )
    refuse(store, purpose, problems)
    if checksums:
        spec = StoreSpec.from_attrs(attrs)
        check_integrity(store, spec, attrs, list(splits), purpose=purpose)
    return attrs
