"""Soft-label encodings of the logits store, and the one in-memory form every reader gets.

Format 1 keeps, per position, k raw (id, logprob) pairs plus `tail`. Format 2 keeps a `topk`
store the same way with narrower ids, and encodes a `sample` store as **distinct ids with
counts**: k draws with replacement from a peaky teacher repeat a lot (18 distinct ids in 32
draws on the default run), so each position stores its distinct drawn ids in ascending order,
delta-coded (`id_deltas`: the first id, then the gap to each next one; 0 marks the padding to
width k), how often each was drawn beyond once (`extra_draws`: count - 1, 0 on the padding), and
the teacher's entropy (`entropy`). Decoding is two lines any reader can write: ids =
cumsum(id_deltas) (the padding repeats the last id), counts = extra_draws + 1 where the id is
real (the first slot, or a gap > 0), else 0; counts sum to k. The sampled-KD loss at
T = 1 needs nothing else: (1/k) sum_j [log p(x_j) - log q(x_j)] = -H(p) - sum_i (c_i/k) log q(i)
in expectation, with the exact H(p) in place of the draws' noisy estimate (same gradient, a
lower-variance KD value). `logprobs` (and `tail`) are kept only on request
(`teacher_logits.sample_logprobs`), for T != 1, inclusion weights and fidelity checks.

Trade-off (measured in docs/logits-store.md, `benchmarks/store_bytes.py`): padding to k costs
bytes a ragged layout would not, but keeps every array a plain, fixed-shape Zarr array that
any Zarr v3 reader (tensorstore) decodes with standard codecs only: no custom filter, no
ragged index. The delta coding is in the values, not in a codec (numcodecs' `delta` filter is
not a Zarr v3 codec other readers know): small gaps byte-shuffled by blosc compress 9% better
than raw ids on the default run's training split, and `extra_draws` is mostly 0 (most ids are
drawn once), 17% smaller than the counts. Decoded ids stay valid gather indices on the padding,
so the loss never branches on it (count 0 weighs nothing).

The writer (`encode_draws`, called by `write_shard` in the writer thread, off the teacher's
compute path) and every reader (`decode_block`) live here, so the encoding has one owner.
"""

from __future__ import annotations

from typing import Any

import numpy as np

SAMPLE_ARRAYS_V2 = ("input_ids", "id_deltas", "extra_draws", "logprobs", "tail", "entropy")
"""Every array a format-2 sample store may hold, in listing order (`logprobs` and `tail` only
when kept)."""

LABEL_NAMES = ("ids", "counts", "logprobs", "tail", "entropy")
"""Names of the decoded label arrays (a block holds those its store has)."""

STORED_LABELS = ("ids", "id_deltas", "extra_draws", "logprobs", "tail", "entropy")
"""Names of the stored label arrays, every format (`label_arrays` picks a store's)."""


def id_dtype(vocab_size: int) -> str:
    """The narrowest id dtype for a vocabulary: uint16 when every id fits, else int32."""
    return "uint16" if vocab_size <= np.iinfo(np.uint16).max + 1 else "int32"


def count_dtype(k: int) -> str:
    """Counts of k draws: uint8 up to k = 255, else uint16."""
    return "uint8" if k <= np.iinfo(np.uint8).max else "uint16"


def narrow(values: np.ndarray, dtype: str, what: str) -> np.ndarray:
    """`values` cast to `dtype` after checking they fit (ValueError naming `what` otherwise)."""
    target = np.dtype(dtype)
    if values.dtype == target:
        return values
    info = np.iinfo(target)
    if values.size and (values.min() < info.min or values.max() > info.max):
        raise ValueError(f"{what}: values in [{values.min()}, {values.max()}] do not fit {dtype}")
    return values.astype(target)


def encode_draws(
    ids: np.ndarray,
    logprobs: np.ndarray | None,
    *,
    ids_as: str,
    counts_as: str,
) -> dict[str, np.ndarray]:
    """Distinct ids with counts from raw draws, as stored (module docstring).

    ids (n, L, k) int draws with replacement, logprobs (n, L, k) the teacher's log-probability
    of each draw. Returns `id_deltas` (n, L, k) `ids_as`: each position's distinct ids
    ascending, delta-coded, then 0s; `extra_draws` (n, L, k) `counts_as`: draws of each id
    beyond the first, 0 on the padding; `logprobs` (n, L, k) float16 aligned with the ids (the
    padding repeats the last value). Deterministic: the same draws, in any order, give the same
    arrays. ValueError naming `ids` if an id does not fit `ids_as`. With `logprobs` None (a
    store that keeps none) the result has no `logprobs` and skips their reordering.
    """
    n, seq_len, k = ids.shape
    p = n * seq_len
    draws = ids.reshape(p, k)  # (P, k)
    if logprobs is None:
        sorted_ids = draws if _rows_ascending(draws) else np.sort(draws, axis=1)  # (P, k)
    else:
        order = np.argsort(draws, axis=1, kind="stable")  # (P, k)
        sorted_ids = np.take_along_axis(draws, order, 1)  # (P, k)
    first = np.ones((p, k), bool)
    np.not_equal(sorted_ids[:, 1:], sorted_ids[:, :-1], out=first[:, 1:])
    distinct = first.sum(axis=1)  # (P,)
    # Every row starts a run, so the runs of the flattened rows are the rows' runs.
    starts = np.flatnonzero(first)  # (D,) flat index of each distinct id's first draw
    counts = np.diff(starts, append=p * k)  # (D,) draws of each distinct id
    real = np.arange(k)[None, :] < distinct[:, None]  # (P, k) slots holding a distinct id
    out_ids = _packed(sorted_ids, starts, real, distinct, np.int64)
    narrow(out_ids, ids_as, "ids")  # every id must fit; the gaps then do too
    deltas = np.diff(out_ids, axis=1, prepend=0)  # (P, k): first id, gaps, 0 on the padding
    extra = np.zeros((p, k), counts_as)
    extra[real] = counts - 1
    out = {
        "id_deltas": deltas.astype(ids_as).reshape(n, seq_len, k),
        "extra_draws": extra.reshape(n, seq_len, k),
    }
    if logprobs is not None:
        sorted_lp = np.take_along_axis(logprobs.reshape(p, k), order, 1)  # (P, k)
        lp = _packed(sorted_lp, starts, real, distinct, np.float16)
        out["logprobs"] = lp.reshape(n, seq_len, k)
    return out


def _packed(
    values: np.ndarray, starts: np.ndarray, real: np.ndarray, distinct: np.ndarray, dtype: Any
) -> np.ndarray:
    """(P, k) of `dtype`: each row's values at its distinct ids' first draws (`starts`, flat
    indices into `values` (P, k)) in its first `distinct` (P,) slots (`real`), then the row's
    last one repeated."""
    out = np.empty(real.shape, dtype)
    out[real] = values.reshape(-1)[starts]  # row-major: each row's values, then padding
    last = out[np.arange(len(out)), distinct - 1]  # (P,)
    out[~real] = np.repeat(last, real.shape[1] - distinct)
    return out


def _rows_ascending(x: np.ndarray) -> bool:
    """Whether every row of x (P, k) is already sorted (the kernel hands its draws over
    sorted; sorting them again is most of the encoding's cost)."""
    return bool((x[:, 1:] >= x[:, :-1]).all())


def real_slots(id_deltas: np.ndarray) -> np.ndarray:
    """(..., k) bool: which slots hold a drawn id (the first, and every positive gap)."""
    real = id_deltas > 0
    real[..., 0] = True
    return real


def decode_block(block: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The label arrays of one stored block in the form the losses take, whatever the format.

    `ids` become int32 (from `id_deltas` in a format-2 sample store: their running sum, so the
    padding repeats the last id); `counts` (same dtype as `extra_draws`) are extra_draws + 1 on
    real slots, 0 on the padding; `logprobs`, `tail` and `entropy` pass through as stored when
    the store has them. A block without counts (topk, or a format-1 sample store) weighs each
    of its k entries once; `input_ids` are not labels and are dropped (readers take them from
    the tokenized data).
    """
    out = {name: block[name] for name in LABEL_NAMES if name in block}
    if "id_deltas" in block:
        deltas = block["id_deltas"]
        out["ids"] = np.cumsum(deltas, axis=-1, dtype=np.int64).astype(np.int32)
        extra = block["extra_draws"]
        out["counts"] = np.where(real_slots(deltas), extra + 1, 0).astype(extra.dtype)
    else:
        out["ids"] = out["ids"].astype(np.int32, copy=False)
    return out


def label_arrays(attrs: dict[str, Any]) -> tuple[str, ...]:
    """The label arrays a store with these attributes holds (every format, every method)."""
    return tuple(name for name in attrs["dtypes"] if name in STORED_LABELS)


def has_logprobs(attrs: dict[str, Any]) -> bool:
    """Whether a store keeps the teacher's log-probabilities of its ids (all but format-2
    sample stores written without `sample_logprobs`)."""
    return "logprobs" in attrs["dtypes"]
