"""Packing: every token kept in order, EOS after each document, remainder counted."""

import numpy as np
import pytest

from pipeline.data.packing import pack_documents, pack_flat


def test_pack_documents_inserts_eos_and_counts_remainder():
    rows, remainder = pack_documents([[1, 2, 3], [4, 5], [6]], eos_id=0, seq_len=4)
    assert rows.dtype == np.int32
    assert rows.tolist() == [[1, 2, 3, 0], [4, 5, 0, 6]]
    assert remainder == 1  # the final EOS


def test_pack_flat_matches_list_version():
    rng = np.random.default_rng(0)
    docs = [list(rng.integers(1, 50, size=n)) for n in rng.integers(0, 20, size=30)]
    flat = np.array([t for d in docs for t in d], dtype=np.int32)
    lengths = np.array([len(d) for d in docs])
    a, ra = pack_flat(flat, lengths, 99, 7)
    b, rb = pack_documents(docs, 99, 7)
    assert np.array_equal(a, b) and ra == rb
    stream = [t for d in docs for t in [*d, 99]]
    assert a.reshape(-1).tolist() == stream[: a.size] and ra == len(stream) - a.size


def test_seq_len_too_small():
    with pytest.raises(ValueError, match="seq_len must be >= 2"):
        pack_documents([[1]], 0, 1)
