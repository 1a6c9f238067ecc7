"""Soft-label rows for any PyTorch trainer: a sharded iterable, a map-style view, a collator.

A logits store pairs with the tokenized dataset it was computed from (the teacher_logits
stage's inputs): row i of a split is `input_ids[i]` (L,) with its soft labels, decoded into
the form the losses take whatever the store's format (`pipeline.store.labels.decode_block`):
`ids` (L, k) int32, and as the store keeps them `counts` (L, k), `logprobs` (L, k) float16,
`tail` (L,) float16, `entropy` (L,) float16. Store position t holds the teacher's
distribution for token t + 1 (`DistillationLoss` lines them up).

Two views, one reader (`pipeline.student.data.RowReader`, which range-checks every chunk it
decodes and names the shard of a damaged one):

- `SoftLabelDataset` (IterableDataset): rows in the training stream's order
  (`pipeline.student.data.BlockOrder`: chunk-granular shuffling plus an in-memory shuffle
  window, a pure function of the seed), sharded so that every (rank, DataLoader worker) pair
  reads disjoint chunks and together they cover each epoch once. Sequential chunk reads: the
  fast way to stream a large store.
- `SoftLabelRows` (Dataset): random access by row for samplers (DistributedSampler, HF
  Trainer's). A row costs a chunk read unless its chunk is cached (the last `cache_chunks`
  are): fine for shuffled training on small stores and for inspection, slower than the
  iterable on large ones.

Trade-off: rows are yielded one by one (a dict of small tensors each) so any DataLoader
`batch_size` and collator work; our own stage reads whole batches at once instead.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from pipeline.data.tokenized import load_tokenized
from pipeline.store.format import read_attrs
from pipeline.store.verify import compatibility_problems, refuse
from pipeline.student.data import (
    BlockOrder,
    RowReader,
    distributed_share,
    prefetched_windows,
)


def _checked_reader(store: str | Path, tokenized: str | Path, split: str) -> tuple[RowReader, dict]:
    """A reader of `split`, after refusing (StoreError naming each problem) an incomplete or
    unreadable store, one without `split`, or one computed from other token ids."""
    attrs = read_attrs(store)
    fps = load_tokenized(tokenized, [split], missing_ok=True).fingerprints()
    problems = compatibility_problems(attrs, dataset_fingerprints={split: fps[split]})
    refuse(store, "read", problems)
    return RowReader(tokenized, store=store, split=split), attrs


def _row(data: dict[str, np.ndarray], i: int) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(np.ascontiguousarray(a[i])) for name, a in data.items()}


class SoftLabelDataset(IterableDataset):
    """The rows of one split with their soft labels, shuffled by chunk and sharded.

    store: the logits store (Zarr folder); tokenized: the tokenized DatasetDict it was
    computed from (refused if its token ids differ). seed: the order (same seed, same
    rows in the same order for the same number of readers). buffer_chunks: chunks shuffled
    together in memory. epochs: how many passes before the iterator ends (None: endless, as
    step-budgeted trainers want). rank, world_size: this process's share (default: from
    torch.distributed when it is initialised, else the whole split); DataLoader workers are
    detected at iteration time. Each (rank, worker) reads its own chunks, so the order depends
    on the number of ranks and workers. shuffle False reads chunks in ascending order, rows
    unshuffled (dealt round-robin across readers), for evaluation.
    """

    def __init__(
        self,
        store: str | Path,
        tokenized: str | Path,
        *,
        split: str = "train",
        seed: int = 0,
        buffer_chunks: int = 4,
        epochs: int | None = None,
        shuffle: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        prefetch: int = 2,
    ) -> None:
        super().__init__()
        if epochs is not None and epochs < 1:
            raise ValueError(f"epochs must be >= 1 or None (endless), got {epochs}")
        self.reader, attrs = _checked_reader(store, tokenized, split)
        self.chunk_sequences = int(attrs["chunk_sequences"])
        self.n_rows = len(self.reader.tokens())
        self.seed, self.buffer_chunks, self.epochs = seed, buffer_chunks, epochs
        self.shuffle, self.prefetch = shuffle, max(1, prefetch)
        self.rank, self.world_size = distributed_share(rank, world_size)

    def with_ranks(self, rank: int, world_size: int) -> SoftLabelDataset:
        """A copy reading share `rank` of `world_size` (e.g. 0 of 1 where one process reads
        and dispatches batches to the others, as Hugging Face accelerate does)."""
        out = copy.copy(self)
        out.rank, out.world_size = distributed_share(rank, world_size)
        return out

    def _order(self, slots: int) -> BlockOrder:
        return BlockOrder(
            n_rows=self.n_rows,
            chunk_sequences=self.chunk_sequences,
            batch_size=1,
            seed=self.seed,
            buffer_chunks=self.buffer_chunks,
            slots=slots,
        )

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        slots = self.world_size * workers
        slot = self.rank * workers + worker
        order = self._order(slots)
        if not self.shuffle:
            epoch = 0
            while self.epochs is None or epoch < self.epochs:
                for block in range(slot, order.n_blocks, slots):
                    _, data = self.reader.read_ranges([order.block_range(block)])
                    for i in range(len(data["input_ids"])):
                        yield _row(data, i)
                epoch += 1
            return
        rows_left = (
            None
            if self.epochs is None
            else sum(order.slot_epoch_rows(e, slot) for e in range(self.epochs))
        )
        for local, data in prefetched_windows(self.reader, order, slot, 0, self.prefetch):
            for i in local:
                if rows_left is not None:
                    if rows_left == 0:
                        return
                    rows_left -= 1
                yield _row(data, int(i))


class SoftLabelRows(Dataset):
    """Random access to the rows of one split with their soft labels: `rows[i]` is the same
    dict `SoftLabelDataset` yields for row i. Decoded chunks are cached (`cache_chunks`, least
    recently used first out), so neighbouring rows cost one read."""

    def __init__(
        self,
        store: str | Path,
        tokenized: str | Path,
        *,
        split: str = "train",
        cache_chunks: int = 2,
    ) -> None:
        self.reader, attrs = _checked_reader(store, tokenized, split)
        self.chunk_sequences = int(attrs["chunk_sequences"])
        self.n_rows = len(self.reader.tokens())
        self.cache_chunks = max(1, cache_chunks)
        self._cache: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__ | {"_cache": OrderedDict()}

    def __len__(self) -> int:
        return self.n_rows

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -self.n_rows <= index < self.n_rows:
            raise IndexError(f"row {index} out of range for a split of {self.n_rows} rows")
        index %= self.n_rows
        chunk, offset = divmod(index, self.chunk_sequences)
        data = self._cache.get(chunk)
        if data is None:
            start = chunk * self.chunk_sequences
            stop = min(start + self.chunk_sequences, self.n_rows)
            _, data = self.reader.read_ranges([(start, stop)])
            self._cache[chunk] = data
            while len(self._cache) > self.cache_chunks:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(chunk)
        return _row(data, offset)


class Collator:
    """Stack rows (dicts of tensors) into a batch, for LM and classification rows alike.

    Fields of equal shape are stacked; `input_ids` become int64. With `pad_id` (ragged rows:
    classification texts), `input_ids` are padded on the right and the batch always gets an
    `attention_mask` (1 on tokens, 0 on padding); rows of different lengths without `pad_id`
    are a ValueError, never a silent cut.
    Python ints (a row's `gold` class) become an int64 tensor.
    """

    def __init__(self, pad_id: int | None = None) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("cannot collate an empty batch")
        out: dict[str, torch.Tensor] = {}
        for name in rows[0]:
            values = [torch.as_tensor(r[name]) for r in rows]
            if name == "input_ids":
                values = [v.long() for v in values]
            same = all(v.shape == values[0].shape for v in values)
            if same and (name != "input_ids" or self.pad_id is None):
                out[name] = torch.stack(values)
                continue
            if name != "input_ids" or any(v.dim() != 1 for v in values):
                raise ValueError(f"rows disagree on the shape of {name!r}; cannot stack them")
            if self.pad_id is None:
                raise ValueError(
                    "rows have different lengths: give Collator(pad_id=tokenizer.pad_token_id)"
                )
            width = max(len(v) for v in values)
            ids = torch.full((len(values), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(values), width), dtype=torch.long)
            for i, v in enumerate(values):
                ids[i, : len(v)] = v
                mask[i, : len(v)] = 1
            out["input_ids"], out["attention_mask"] = ids, mask
        return out
