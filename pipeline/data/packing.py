"""Packing tokenized documents into fixed-length rows, each document followed by EOS.

Documents of one language are concatenated in order, each followed by the EOS id, and the stream
is cut into rows of `seq_len` tokens. No padding and no attention mask are needed, every token
is trained on, and a document may span two rows (the model sees EOS where one ends). The
trade-off: the final partial row of each stream (fewer than `seq_len` tokens) is dropped, and is
counted and reported as `remainder_tokens`.
"""

from __future__ import annotations

import numpy as np


def pack_flat(
    values: np.ndarray, lengths: np.ndarray, eos_id: int, seq_len: int
) -> tuple[np.ndarray, int]:
    """Pack documents given as one flat id array plus per-document lengths.

    values: (sum(lengths),) token ids of all documents back to back; lengths: (D,).
    Returns (rows (N, seq_len) int32, remainder_tokens), where remainder_tokens counts tokens
    (EOS included) of the final partial row, which is dropped.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    stream = with_eos(values, lengths, eos_id)  # (sum(lengths) + D,)
    n_rows = len(stream) // seq_len
    rows = stream[: n_rows * seq_len].reshape(n_rows, seq_len)  # (N, L)
    return np.ascontiguousarray(rows), len(stream) - n_rows * seq_len


def with_eos(values: np.ndarray, lengths: np.ndarray, eos_id: int) -> np.ndarray:
    """The packing stream: documents (flat `values`, per-document `lengths` (D,)) back to back,
    each followed by `eos_id`; (sum(lengths) + D,) int32."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum()) + len(lengths)
    stream = np.empty(total, dtype=np.int32)
    eos_at = np.cumsum(lengths + 1) - 1  # (D,) index of each document's EOS
    is_eos = np.zeros(total, dtype=bool)
    is_eos[eos_at] = True
    stream[is_eos] = eos_id
    stream[~is_eos] = np.asarray(values, dtype=np.int32)
    return stream


def pack_documents(docs: list[list[int]], eos_id: int, seq_len: int) -> tuple[np.ndarray, int]:
    """`pack_flat` for documents given as lists of ids."""
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    values = np.fromiter((t for d in docs for t in d), dtype=np.int32, count=int(lengths.sum()))
    return pack_flat(values, lengths, eos_id, seq_len)
