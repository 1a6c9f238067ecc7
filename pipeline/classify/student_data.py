"""Training data of a classification student: token ids, gold targets, soft labels, batch order.

Everything is held in memory: a classification example is one short text and C floats of soft
label (28 B per row for 7 classes: 28 MB per million rows), unlike token-level LM labels. The
soft labels are read from the store chunk by chunk (`pipeline.classify.store.iter_class_chunks`,
which checks each chunk is a distribution) into one (N, C) array, each chunk matched to the
corpus rows it claims to hold by its text hashes, so a row can never receive another row's label.

Order: a pure function of (seed, step). The training rows are permuted once per epoch with a
generator seeded by (seed, epoch), and step s takes positions s*B .. s*B + B - 1 of the endless
concatenation of those permutations (a batch may straddle two epochs). A resumed run therefore
needs nothing but the step to see exactly the batches an uninterrupted run sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from pipeline.classify.corpus import LabeledRows
from pipeline.classify.inference import pad_batch
from pipeline.classify.store import iter_class_chunks
from pipeline.core.errors import StoreError


def read_soft_labels(store: str | Path, rows: LabeledRows) -> np.ndarray:
    """(N, C) float32 teacher log-probabilities (T = 1) of `rows.split`, in corpus row order.

    Streams the store chunk by chunk; every chunk's `text_hash` must equal the corpus rows it
    covers (`check_class_store` has compared every row already: this keeps the guarantee local
    to the read). A mismatch or a short split is a StoreError naming the row.
    """
    out: np.ndarray | None = None
    filled = 0
    for first, chunk in iter_class_chunks(store, rows.split):
        lp = chunk["logprobs"]  # (R, C)
        stop = first + len(lp)
        if out is None:
            out = np.empty((len(rows), lp.shape[1]), dtype=np.float32)
        if first != filled or stop > len(rows):
            raise StoreError(
                f"{store}: {rows.split} chunk at row {first} does not follow row {filled} of "
                f"{len(rows)}; the store is damaged: pull it again or re-run classify_logits"
            )
        bad = chunk["text_hash"] != rows.text_hash[first:stop]
        if bad.any():
            r = first + int(np.argmax(bad))
            raise StoreError(
                f"{store}: {rows.split} row {r} (lang={rows.lang[r]}, id={int(rows.id[r])}): "
                "its soft label was computed for another text; re-run classify_logits"
            )
        out[first:stop] = lp
        filled = stop
    if out is None or filled != len(rows):
        raise StoreError(
            f"{store}: {rows.split} holds {filled} rows, the corpus {len(rows)}; re-run "
            "classify_logits on this corpus"
        )
    return out


@dataclass(frozen=True)
class TrainingSet:
    """What the student trains on, row-aligned with the corpus's train split."""

    input_ids: list[list[int]]
    """N token-id lists (ragged, at most max_length each), encoded by
    `pipeline.classify.inference.encode` exactly as `class_logprobs` encodes for prediction."""
    gold: np.ndarray
    """(N,) int64: the CE target of each row, or -1 where the student may not use a gold label."""
    soft: np.ndarray | None
    """(N, C) float32 teacher log-probabilities at T = 1, or None when no KD term is trained."""
    rows: np.ndarray
    """(M,) int64: the rows sampled for training (all rows, or those with a gold target)."""

    def batch(self, step: int, batch_size: int, seed: int, pad_id: int) -> dict[str, torch.Tensor]:
        """The batch of optimisation step `step` (see module docstring)."""
        pick = self.rows[batch_positions(len(self.rows), batch_size, seed, step)]  # (B,)
        input_ids, mask = pad_batch([self.input_ids[i] for i in pick], pad_id)
        out = {
            "input_ids": input_ids,  # (B, L)
            "attention_mask": mask,  # (B, L)
            "gold": torch.from_numpy(self.gold[pick]),  # (B,)
        }
        if self.soft is not None:
            out["teacher_logprobs"] = torch.from_numpy(self.soft[pick])  # (B, C)
        return out


@lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_positions(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """(batch_size,) indices into n training rows for `step`: a pure function of its arguments."""
    if n < 1:
        raise ValueError("no training rows")
    pos = np.arange(step * batch_size, (step + 1) * batch_size, dtype=np.int64)
    epochs = pos // n
    out = np.empty(batch_size, dtype=np.int64)
    for e in np.unique(epochs):
        sel = epochs == e
        out[sel] = _permutation(n, seed, int(e))[pos[sel] % n]
    return out
