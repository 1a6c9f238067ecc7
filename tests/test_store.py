"""The logits store: layout, attributes, deterministic bytes, checksums, verification, compatibility."""

from __future__ import annotations

import json
import multiprocessing
import random

import numpy as np
import pytest
import zarr
from store_fixtures import (
    SPEC,
    K,
    L,
    V,
    build_store,
    files_of,
    flip_bytes,
    make_attrs,
    make_data,
    make_tokenized,
    make_tokenizer,
    shard_rows,
    write_in_child,
)

from pipeline import __version__
from pipeline.core.errors import StoreError
from pipeline.core.provenance import ids_fingerprint, sha256_file
from pipeline.store.format import (
    ARRAYS,
    FORMAT_VERSION,
    SplitSpec,
    StoreSpec,
    create_store,
    finalize_store,
    iter_chunks,
    open_split,
    read_attrs,
    shard_checksums,
    write_shard,
)
from pipeline.store.verify import _StreamingFingerprint, check_compatible, verify_store


def test_spec_shards_and_order():
    spec = StoreSpec((SplitSpec("validation", 3, L), SplitSpec("train", 10, L)), K, 2, 2)
    assert spec == SPEC  # split order is canonical whatever it is given in
    assert spec.shard_sequences() == 4
    assert spec.shards("train") == [(0, 4), (4, 8), (8, 10)]
    assert spec.shards("validation") == [(0, 3)]
    assert spec.all_shards() == [("train", 0), ("train", 1), ("train", 2), ("validation", 0)]
    assert StoreSpec((SplitSpec("train", 0, L),), K, 2, 2).shards("train") == []


def test_spec_rejects_bad_values():
    with pytest.raises(ValueError, match=r"^StoreSpec.k: must be >= 1, got 0$"):
        StoreSpec((SplitSpec("train", 10, L),), 0, 2, 2)
    with pytest.raises(ValueError, match=r"SplitSpec.name: must be one of"):
        SplitSpec("test", 10, L)


def test_round_trip(tmp_path):
    data = make_data()
    build_store(tmp_path / "s.zarr", data)
    for split in ("train", "validation"):
        arrays = open_split(tmp_path / "s.zarr", split)
        for name, expected in zip(ARRAYS, data[split][:4], strict=True):
            got = arrays[name][:]
            assert got.dtype == expected.dtype
            np.testing.assert_array_equal(got, expected)
        assert arrays["ids"].chunks == (2, L, K) and arrays["ids"].shards == (4, L, K)
        assert arrays["tail"].chunks == (2, L) and arrays["tail"].shards == (4, L)
    # Chunk-by-chunk streaming yields every row once, in order, chunk-aligned.
    arrays = open_split(tmp_path / "s.zarr", "train")
    firsts, rows = zip(*[(a, r["ids"]) for a, r in iter_chunks(arrays)], strict=True)
    assert firsts == (0, 2, 4, 6, 8)
    np.testing.assert_array_equal(np.concatenate(rows), data["train"][1])
    assert [a for a, _ in iter_chunks(arrays, 3, 7)] == [3, 4, 6]


def test_one_file_per_array_per_shard(tmp_path):
    build_store(tmp_path / "s.zarr")
    files = [p for p in (tmp_path / "s.zarr" / "train" / "ids").rglob("*") if p.is_file()]
    assert sorted(str(p.relative_to(tmp_path / "s.zarr")) for p in files) == [
        "train/ids/c/0/0/0",
        "train/ids/c/1/0/0",
        "train/ids/c/2/0/0",
        "train/ids/zarr.json",
    ]


def test_attributes(tmp_path):
    data = make_data()
    attrs = make_attrs(data)
    create_store(tmp_path / "s.zarr", SPEC, attrs)
    layout = {
        "format_version": FORMAT_VERSION,
        "k": K,
        "chunk_sequences": 2,
        "shard_chunks": 2,
        "dtypes": {"input_ids": "int32", "ids": "int32", "logprobs": "float16", "tail": "float16"},
        "splits": {"train": {"n": 10, "seq_len": L}, "validation": {"n": 3, "seq_len": L}},
        "softlabels_version": __version__,
        "encoding": {
            "ids": "topk",
            "logprobs": True,
            "id_bits": 32,
            "compressors": {a: ["blosc"] for a in ("input_ids", "ids", "logprobs", "tail")},
            "filters": {},
        },
    }
    assert read_attrs(tmp_path / "s.zarr") == {**attrs, **layout, "shards": {}, "complete": False}
    sums = {}
    for split, shard in SPEC.all_shards():
        sums.update(
            write_shard(tmp_path / "s.zarr", SPEC, split, shard, *shard_rows(data, split, shard))
        )
    finalize_store(tmp_path / "s.zarr", sums)
    final = read_attrs(tmp_path / "s.zarr")
    assert final == {**attrs, **layout, "shards": sums, "complete": True}
    assert list(final["shards"])[:5] == [
        "train/ids/0",
        "train/ids/1",
        "train/ids/2",
        "train/input_ids/0",
        "train/input_ids/1",
    ]
    # Stable key order on disk: every mapping in the attributes is sorted.
    raw = json.loads((tmp_path / "s.zarr" / "zarr.json").read_text())["attributes"]["softlabels"]
    assert list(raw) == sorted(raw) and list(raw["teacher"]) == sorted(raw["teacher"])


def test_same_data_same_bytes_whatever_the_shard_order(tmp_path):
    order = SPEC.all_shards()
    shuffled = order[:]
    random.Random(1).shuffle(shuffled)
    assert shuffled != order
    sums_a = build_store(tmp_path / "a.zarr", order=order)
    sums_b = build_store(tmp_path / "b.zarr", order=list(reversed(shuffled)))
    assert sums_a == sums_b
    a, b = files_of(tmp_path / "a.zarr"), files_of(tmp_path / "b.zarr")
    assert list(a) == list(b) and len(a) == 1 + 2 + 2 * 4 + 16  # zarr.json files + shard files
    for name in a:
        assert a[name] == b[name], name


def test_writes_from_two_processes_give_the_same_bytes(tmp_path):
    build_store(tmp_path / "serial.zarr")
    path = tmp_path / "parallel.zarr"
    create_store(path, SPEC, make_attrs(make_data()))
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        results = pool.starmap(write_in_child, [(str(path), s, i) for s, i in SPEC.all_shards()])
    sums = {k: v for r in results for k, v in r.items()}
    finalize_store(path, sums)
    assert files_of(path) == files_of(tmp_path / "serial.zarr")


def test_rewriting_a_shard_replaces_it(tmp_path):
    path = tmp_path / "s.zarr"
    data = make_data()
    sums = build_store(path, data, finalize=False)
    rows = shard_rows(data, "train", 1)
    garbage = tuple(np.zeros_like(a) for a in rows)
    stale = path / "train" / "ids" / "c" / "1" / "0" / "0.0123abcd.partial"  # a killed writer's
    stale.write_bytes(b"junk")
    write_shard(path, SPEC, "train", 1, *garbage)
    assert write_shard(path, SPEC, "train", 1, *rows) == {
        k: v for k, v in sums.items() if k.endswith("/1") and k.startswith("train")
    }
    assert not stale.exists()


def test_write_shard_validates_arrays(tmp_path):
    path = tmp_path / "s.zarr"
    data = make_data()
    create_store(path, SPEC, make_attrs(data))
    inp, ids, lp, tail = shard_rows(data, "train", 2)
    with pytest.raises(ValueError) as e:
        write_shard(path, SPEC, "train", 2, inp, ids[:, :, :3], lp, tail)
    assert (
        str(e.value)
        == "write_shard(train, shard 2): ids has shape (2, 8, 3), expected (2, 8, 4) (rows 8:10)"
    )
    with pytest.raises(ValueError) as e:
        write_shard(path, SPEC, "train", 2, inp, ids, lp.astype(np.float32), tail)
    assert (
        str(e.value) == "write_shard(train, shard 2): logprobs has dtype float32, expected float16"
    )
    with pytest.raises(ValueError, match=r"^shard 3 out of range: split 'train' has 3 shards$"):
        write_shard(path, SPEC, "train", 3, inp, ids, lp, tail)
    other = StoreSpec(SPEC.splits, K, 2, 3)
    with pytest.raises(StoreError, match="the store was created with"):
        write_shard(path, other, "train", 1, *shard_rows(data, "train", 1, other))


def test_create_store_checks_attrs_and_refuses_existing(tmp_path):
    data = make_data()
    attrs = make_attrs(data)
    del attrs["tokenizer"]["eos_id"]
    with pytest.raises(
        ValueError, match=r"^create_store: attrs lacks required key 'tokenizer.eos_id'$"
    ):
        create_store(tmp_path / "s.zarr", SPEC, attrs)
    create_store(tmp_path / "s.zarr", SPEC, make_attrs(data))
    with pytest.raises(StoreError, match="already exists; remove it or pass overwrite=True"):
        create_store(tmp_path / "s.zarr", SPEC, make_attrs(data))
    create_store(tmp_path / "s.zarr", SPEC, make_attrs(data), overwrite=True)


def test_read_attrs_errors(tmp_path):
    with pytest.raises(StoreError) as e:
        read_attrs(tmp_path / "none.zarr")
    assert str(e.value) == (
        f"{tmp_path / 'none.zarr'}: no such logits store (run `dvc repro teacher_logits`, "
        "or `dvc pull` it)"
    )
    zarr.open_group(tmp_path / "plain.zarr", mode="w")
    with pytest.raises(StoreError, match="not a softlabels logits store"):
        read_attrs(tmp_path / "plain.zarr")
    build_store(tmp_path / "s.zarr")
    meta = tmp_path / "s.zarr" / "zarr.json"
    meta.write_text(meta.read_text().replace('"format_version": 2', '"format_version": 99'))
    with pytest.raises(StoreError) as e:
        read_attrs(tmp_path / "s.zarr")
    assert str(e.value) == (
        f"{tmp_path / 's.zarr'}: format_version 99 is not supported (softlabels {__version__} "
        f"reads format_version 1 and 2); use a matching softlabels release or re-run teacher_logits "
        "with this one"
    )
    assert verify_store(tmp_path / "s.zarr") == [
        "format_version differs: store 99 vs supported 1 and 2; use a matching softlabels release or "
        "re-run teacher_logits"
    ]


@pytest.mark.parametrize("method", ["topk", "sample"])
def test_verify_ok(tmp_path, method):
    build_store(tmp_path / "s.zarr", method=method)
    assert verify_store(tmp_path / "s.zarr") == []


def test_verify_names_every_corrupt_shard(tmp_path):
    path = tmp_path / "s.zarr"
    sums = build_store(path)
    bad = {
        "train/logprobs/1": path / "train" / "logprobs" / "c" / "1" / "0" / "0",
        "validation/input_ids/0": path / "validation" / "input_ids" / "c" / "0" / "0",
    }
    for file in bad.values():
        flip_bytes(file)
    problems = verify_store(path)
    assert problems[:2] == [
        f"{key}: checksum mismatch (recorded {sums[key][:12]}…, on disk "
        f"{sha256_file(file)[:12]}…, {file.stat().st_size} bytes); the file is corrupt or "
        "truncated"
        for key, file in bad.items()
    ]
    # Nothing else is blamed: the corrupt shards' data is not decoded.
    assert len(problems) == 2


def test_verify_missing_shard_file(tmp_path):
    path = tmp_path / "s.zarr"
    build_store(path)
    missing = path / "train" / "tail" / "c" / "2" / "0"
    missing.unlink()
    assert verify_store(path) == [f"train/tail/2: shard file missing ({missing})"]
    with pytest.raises(StoreError, match=r"shard file missing \(train/tail/2 was never written\)"):
        shard_checksums(path, SPEC, "train", 2)


def test_verify_checks_values_and_fingerprint(tmp_path):
    """Data that is self-consistent on disk but wrong is caught by the value checks."""
    data = make_data()
    data["train"][1][9, 3, 0] = V + 5  # an id outside the teacher vocabulary
    data["train"][3][1, 2] = np.float16(-0.001)  # tail says ~all mass is elsewhere
    attrs = make_attrs(make_data())
    attrs["dataset"]["splits"]["train"]["fingerprint"] = "f" * 64
    build_store(tmp_path / "s.zarr", data, attrs=attrs)
    problems = verify_store(tmp_path / "s.zarr")
    assert problems[0] == (
        "train shard 0: 1 positions whose distinct ids' mass + exp(tail) is not 1 ± 0.02 "
        "(first: sequence 1, position 2)"
    )
    assert problems[1].startswith(
        "train shard 2: 1 positions with ids outside [0, 50) (first: sequence 9, position 3)"
    )
    assert problems[-1] == (
        f"train/input_ids: the stored ids' fingerprint {ids_fingerprint(data['train'][0])[:12]}… "
        "differs from the recorded dataset.splits.train.fingerprint ffffffffffff…; the store is "
        "inconsistent — re-run teacher_logits"
    )


def test_incomplete_store(tmp_path):
    build_store(tmp_path / "s.zarr", finalize=False)
    incomplete = (
        "the store is not complete (complete=false): teacher_logits has not finished and "
        "verified every shard; finish it (`dvc repro teacher_logits` resumes) or pull a complete "
        "store (`dvc pull`)"
    )
    with pytest.raises(StoreError) as e:
        check_compatible(read_attrs(tmp_path / "s.zarr"))
    assert str(e.value) == incomplete
    assert verify_store(tmp_path / "s.zarr") == [
        incomplete,
        "16 shard files have no recorded checksum (first: train/input_ids/0); finalize_store "
        "records them once every shard is written",
    ]


def test_finalize_refuses_missing_or_wrong_checksums(tmp_path):
    path = tmp_path / "s.zarr"
    sums = build_store(path, finalize=False)
    partial = {k: v for k, v in sums.items() if k != "validation/tail/0"}
    with pytest.raises(StoreError) as e:
        finalize_store(path, partial)
    assert str(e.value) == (
        f"{path}: cannot mark complete:\n  validation/tail/0: no checksum given (shard not written?)"
    )
    wrong = {**sums, "train/ids/1": "0" * 64}
    with pytest.raises(
        StoreError, match=r"train/ids/1: sha256 on disk .* differs from the writer's 000000000000…"
    ):
        finalize_store(path, wrong)
    assert read_attrs(path)["complete"] is False


def test_check_compatible_messages():
    data = make_data()
    attrs = {**make_attrs(data), "complete": True, "format_version": FORMAT_VERSION}
    tok = dict(attrs["tokenizer"])
    fps = {s: v["fingerprint"] for s, v in attrs["dataset"]["splits"].items()}
    check_compatible(attrs, tokenizer_identity=tok, dataset_fingerprints=fps, vocab_size=V)

    with pytest.raises(StoreError) as e:
        check_compatible(attrs, tokenizer_identity={**tok, "sha256": "c" * 64})
    assert str(e.value) == (
        "tokenizer.sha256 differs: store bbbbbbbbbbbb… vs yours cccccccccccc…; the store was made "
        "with another tokenizer — re-run teacher_logits with this tokenizer or use the teacher's "
        "tokenizer"
    )
    with pytest.raises(StoreError) as e:
        check_compatible(attrs, dataset_fingerprints={"validation": "d" * 64})
    assert str(e.value) == (
        f"dataset.splits.validation.fingerprint differs: store {fps['validation'][:12]}… vs yours "
        "dddddddddddd…; the store's input ids are not this tokenized dataset — re-run "
        "teacher_logits on it (`dvc repro teacher_logits`) or tokenize with the corpus and params "
        "the store was made from"
    )
    # One line: problems sharing their advice are listed together, each advice said once.
    with pytest.raises(StoreError) as e:
        other = {**tok, "sha256": "c" * 64, "eos_id": 2}
        check_compatible(attrs, vocab_size=64, tokenizer_identity=other)
    assert str(e.value) == (
        "tokenizer.sha256 differs: store bbbbbbbbbbbb… vs yours cccccccccccc…, "
        "tokenizer.eos_id differs: store 1 vs yours 2; the store was made with another tokenizer "
        "— re-run teacher_logits with this tokenizer or use the teacher's tokenizer; "
        "teacher.vocab_size differs: store 50 vs yours 64; the stored ids index the teacher's "
        "vocabulary — use a student with the teacher's vocabulary size or re-run teacher_logits "
        "with a matching teacher"
    )


def test_verify_against_tokenizer_and_tokenized_dataset(tmp_path):
    data = make_data()
    identity = make_tokenizer(tmp_path / "tok")
    other = make_tokenizer(tmp_path / "other_tok", shift=100)
    make_tokenized(tmp_path / "tokenized", data)
    store = tmp_path / "s.zarr"
    build_store(store, data, attrs=make_attrs(data, identity))
    assert verify_store(store, tokenizer=tmp_path / "tok", tokenized=tmp_path / "tokenized") == []

    assert verify_store(store, tokenizer=tmp_path / "other_tok") == [
        f"tokenizer.sha256 differs: store {identity['sha256'][:12]}… vs yours "
        f"{other['sha256'][:12]}…; the store was made with another tokenizer — re-run "
        "teacher_logits with this tokenizer or use the teacher's tokenizer"
    ]

    changed = {s: tuple(a.copy() for a in d) for s, d in data.items()}
    changed["train"][0][3, 0] = (changed["train"][0][3, 0] + 1) % V
    make_tokenized(tmp_path / "tokenized2", changed)
    assert verify_store(store, tokenized=tmp_path / "tokenized2") == [
        f"dataset.splits.train.fingerprint differs: store "
        f"{ids_fingerprint(data['train'][0])[:12]}… vs yours "
        f"{ids_fingerprint(changed['train'][0])[:12]}…; the store's input ids are not this "
        "tokenized dataset — re-run teacher_logits on it (`dvc repro teacher_logits`) or tokenize "
        "with the corpus and params the store was made from",
        "train/input_ids: 1 of 10 stored sequences differ from the tokenized dataset (first: "
        "sequence 3); the store's input ids are not this tokenized dataset — re-run "
        "teacher_logits on it (`dvc repro teacher_logits`) or tokenize with the corpus and "
        "params the store was made from",
    ]


def test_streaming_fingerprint_matches_provenance():
    ids = np.random.default_rng(0).integers(0, 1000, (7, 5), dtype=np.int32)
    fp = _StreamingFingerprint(7, 5)
    for a in range(0, 7, 3):
        fp.update(ids[a : a + 3])
    assert fp.hexdigest() == ids_fingerprint(ids)
