"""The student's streaming loader: coverage without overlap, a pure order, resume, refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from pipeline.core.errors import InputError, StoreError
from pipeline.core.provenance import ids_fingerprint
from pipeline.data.tokenized import load_tokenized
from pipeline.student.data import BlockOrder, SoftLabelStream, check_store
from tests.store_fixtures import (
    V,
    build_store,
    make_attrs,
    make_data,
    make_tokenized,
    make_tokenizer,
)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tokenizer, a tokenized dataset and a complete top-k store made from it."""
    root = tmp_path_factory.mktemp("student-data")
    identity = make_tokenizer(root / "tok")
    data = make_data("topk")
    make_tokenized(root / "tokenized", data)
    build_store(root / "store.zarr", data, attrs=make_attrs(data, identity))
    return {"root": root, "identity": identity, "data": data}


def stream(env, **kw) -> SoftLabelStream:
    args = dict(batch_size=3, seed=7, chunk_sequences=2, store=env["root"] / "store.zarr")
    return SoftLabelStream(env["root"] / "tokenized", **(args | kw))


def test_each_epoch_covers_every_row_once_across_slots():
    order = BlockOrder(n_rows=23, chunk_sequences=4, batch_size=5, seed=1, buffer_chunks=2, slots=3)
    for epoch in range(3):
        rows = [
            order.window_rows(epoch, slot, i, w)
            for slot in range(3)
            for i, w in enumerate(order.windows(epoch, slot))
        ]
        assert sorted(np.concatenate(rows).tolist()) == list(range(23))
    # Epochs are shuffled differently, and the order is a pure function of the seed.
    first = [order.window_rows(0, 0, 0, order.windows(0, 0)[0])]
    again = BlockOrder(n_rows=23, chunk_sequences=4, batch_size=5, seed=1, buffer_chunks=2, slots=3)
    assert np.array_equal(first[0], again.window_rows(0, 0, 0, again.windows(0, 0)[0]))
    assert not np.array_equal(order.slot_blocks(0, 0), order.slot_blocks(1, 0))


def test_batches_carry_the_rows_soft_labels(env):
    tokens, ids, logprobs, tail, _ = env["data"]["train"]
    s = stream(env)
    it = iter(s)
    for step in range(8):  # > 2 epochs of 10 rows in batches of 3
        batch = next(it)
        rows = s.order.batch_rows(step)
        assert batch["input_ids"].dtype == torch.int32
        assert np.array_equal(batch["input_ids"].numpy(), tokens[rows])
        assert np.array_equal(batch["ids"].numpy(), ids[rows])
        assert np.array_equal(batch["logprobs"].numpy(), logprobs[rows])
        assert np.array_equal(batch["tail"].numpy(), tail[rows])
        assert batch["logprobs"].dtype == torch.float16


def test_tokens_only_stream_has_the_same_order(env):
    with_labels = iter(stream(env))
    tokens_only = iter(stream(env, store=None))
    for _ in range(5):
        a, b = next(with_labels), next(tokens_only)
        assert set(b) == {"input_ids"}
        assert torch.equal(a["input_ids"], b["input_ids"])


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_workers_and_resume_follow_the_pure_order(env):
    """Two DataLoader workers, then a restart at step 5: the batches the order predicts."""
    s = stream(env, num_workers=2, buffer_chunks=1)
    batches = take(DataLoader(s, batch_size=None, num_workers=2), 9)
    tokens = env["data"]["train"][0]
    for step, batch in enumerate(batches):
        assert np.array_equal(
            batch["input_ids"].numpy(), tokens[s.order.batch_rows(step, num_workers=2)]
        )
    resumed = stream(env, num_workers=2, buffer_chunks=1, start_step=5)
    again = take(DataLoader(resumed, batch_size=None, num_workers=2), 4)
    for a, b in zip(batches[5:], again, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_ranks_take_disjoint_shares_of_the_one_process_batches(env):
    """Two ranks, with and without workers and after a restart: at every step rank r gets rows
    [2r, 2r + 2) of the batch one process gets (the global batch does not depend on the world
    size), with their labels."""
    tokens, ids = env["data"]["train"][:2]
    for workers, start in ((0, 0), (2, 3)):
        one = stream(env, batch_size=4, num_workers=workers, start_step=start)
        ranks = [
            stream(env, batch_size=4, num_workers=workers, start_step=start, rank=r, world_size=2)
            for r in range(2)
        ]
        loaders = [DataLoader(s, batch_size=None, num_workers=workers) for s in (one, *ranks)]
        whole, *shares = (take(loader, 5) for loader in loaders)
        for step, batch in enumerate(whole, start):
            rows = one.order.batch_rows(step, num_workers=workers)
            assert np.array_equal(batch["input_ids"].numpy(), tokens[rows])
            for r, share in enumerate(shares):
                got = share[step - start]
                assert np.array_equal(
                    rows[2 * r : 2 * r + 2],
                    one.order.batch_rows(step, num_workers=workers, rank=r, world_size=2),
                )
                assert all(torch.equal(got[k], batch[k][2 * r : 2 * r + 2]) for k in batch)
                assert np.array_equal(got["ids"].numpy(), ids[rows[2 * r : 2 * r + 2]])
    with pytest.raises(ValueError, match="batch_size 3 must be a multiple of world_size 2"):
        stream(env, batch_size=3, rank=0, world_size=2)


def test_too_many_readers_is_refused(env):
    with pytest.raises(InputError) as e:
        stream(env, num_workers=8)
    assert str(e.value) == (
        "the training split has 5 blocks of 2 sequences, fewer than the 8 readers (ranks x "
        "DataLoader workers); use fewer train_student.num_workers"
    )


def test_token_rows_and_fingerprint_match_the_dataset(env):
    rows = load_tokenized(env["root"] / "tokenized")["train"].input_ids
    assert rows.dtype == np.int32 and np.array_equal(rows, env["data"]["train"][0])
    assert ids_fingerprint(rows) == ids_fingerprint(env["data"]["train"][0])


def test_compatible_store_is_accepted(env):
    attrs = check_store(
        env["root"] / "store.zarr",
        tokenized=env["root"] / "tokenized",
        tokenizer_identity=env["identity"],
        vocab_size=V,
    )
    assert attrs["complete"] is True and attrs["k"] == 4


def refusal(env, store=None, tokenized=None, identity=None, vocab=V) -> str:
    store = store or env["root"] / "store.zarr"
    with pytest.raises(StoreError) as e:
        check_store(
            store,
            tokenized=tokenized or env["root"] / "tokenized",
            tokenizer_identity=identity or env["identity"],
            vocab_size=vocab,
        )
    return str(e.value)


def test_incomplete_store_is_refused(env, tmp_path):
    data = env["data"]
    build_store(tmp_path / "s.zarr", data, attrs=make_attrs(data, env["identity"]), finalize=False)
    assert refusal(env, store=tmp_path / "s.zarr") == (
        f"{tmp_path / 's.zarr'}: refusing to train from this logits store: "
        "the store is not complete (complete=false): teacher_logits has not finished and "
        "verified every shard; finish it (`dvc repro teacher_logits` resumes) or pull a "
        "complete store (`dvc pull`)"
    )


def test_store_of_another_tokenizer_or_vocab_is_refused(env, tmp_path):
    other = make_tokenizer(tmp_path / "other", shift=1)
    store = env["root"] / "store.zarr"
    assert refusal(env, identity=other) == (
        f"{store}: refusing to train from this logits store: "
        f"tokenizer.sha256 differs: store {env['identity']['sha256'][:12]}… vs yours "
        f"{other['sha256'][:12]}…; the store was made with another tokenizer — re-run "
        "teacher_logits with this tokenizer or use the teacher's tokenizer"
    )
    assert refusal(env, vocab=64) == (
        f"{store}: refusing to train from this logits store: "
        f"teacher.vocab_size differs: store {V} vs yours 64; the stored ids index the "
        "teacher's vocabulary — use a student with the teacher's vocabulary size or re-run "
        "teacher_logits with a matching teacher"
    )


def test_store_of_other_input_ids_is_refused(env, tmp_path):
    data = make_data("topk", seed=5)  # other token ids
    make_tokenized(tmp_path / "tokenized", data)
    message = refusal(env, tokenized=tmp_path / "tokenized")
    store_fp = env["data"]["train"][0]
    assert message.startswith(
        f"{env['root'] / 'store.zarr'}: refusing to train from this logits store: "
    )
    assert (
        f"dataset.splits.train.fingerprint differs: store {ids_fingerprint(store_fp)[:12]}… "
        f"vs yours {ids_fingerprint(data['train'][0])[:12]}…"
    ) in message
    assert message.endswith(
        "; the store's input ids are not this tokenized dataset — re-run teacher_logits on it "
        "(`dvc repro teacher_logits`) or tokenize with the corpus and params the store was made from"
    )
    assert "\n" not in message


def test_missing_store_is_refused(env, tmp_path):
    assert refusal(env, store=tmp_path / "none.zarr") == (
        f"{tmp_path / 'none.zarr'}: no such logits store (run `dvc repro teacher_logits`, or "
        "`dvc pull` it)"
    )
