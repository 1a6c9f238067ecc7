"""Format 2: the distinct-ids + counts encoding, its loss, its checks, `convert`, other readers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr

from pipeline.cli import main
from pipeline.core.errors import InputError, StoreError
from pipeline.store.convert import convert_store
from pipeline.store.format import (
    StoreSpec,
    create_store,
    open_split,
    read_attrs,
    write_shard,
    write_shard_arrays,
)
from pipeline.store.labels import decode_block, encode_draws, id_dtype
from pipeline.store.verify import verify_store
from pipeline.student.losses import sampled_kd
from tests.store_fixtures import (
    K,
    build_store,
    make_attrs,
    make_data,
    shard_rows,
    spec_for,
)


def draws(seed: int = 0, shape=(3, 5, 16), vocab: int = 9) -> tuple[np.ndarray, np.ndarray]:
    """Peaky draws with repeats, and a log-probability per id that is the same wherever it is
    drawn (as the kernel gives it)."""
    rng = np.random.default_rng(seed)
    ids = rng.zipf(1.6, size=shape).clip(max=vocab) - 1  # (n, L, k) many repeats
    table = np.log(rng.dirichlet(np.ones(vocab), size=shape[:2]))  # (n, L, V)
    lp = np.take_along_axis(table, ids, -1).astype(np.float16)
    return ids.astype(np.int32), lp


def test_encoding_keeps_the_draws_as_a_multiset():
    ids, lp = draws()
    enc = encode_draws(ids, lp, ids_as="uint16", counts_as="uint8")
    k = ids.shape[-1]
    assert enc["id_deltas"].dtype == np.uint16 and enc["extra_draws"].dtype == np.uint8
    dec = decode_block(enc)
    flat_ids, counts = dec["ids"].reshape(-1, k), dec["counts"].reshape(-1, k).astype(int)
    deltas, extra = enc["id_deltas"].reshape(-1, k), enc["extra_draws"].reshape(-1, k)
    assert (counts.sum(1) == k).all()
    for p, row in enumerate(np.sort(ids.reshape(-1, k), axis=1)):
        used = counts[p] > 0
        m = used.sum()
        assert used[:m].all() and not used[m:].any()  # padding last
        assert (np.diff(flat_ids[p, :m].astype(int)) > 0).all()  # distinct, ascending
        assert (flat_ids[p, m:] == flat_ids[p, m - 1]).all()  # padding repeats the last id
        assert (deltas[p, m:] == 0).all() and (deltas[p, 1:m] > 0).all()  # gaps, then 0s
        assert (extra[p, m:] == 0).all() and np.array_equal(extra[p, :m] + 1, counts[p, :m])
        assert np.array_equal(np.repeat(flat_ids[p], counts[p]), row)
    # Order of the draws does not matter: the same multiset gives the same bytes.
    perm = np.random.default_rng(1).permutation(k)
    again = encode_draws(ids[..., perm], lp[..., perm], ids_as="uint16", counts_as="uint8")
    for name in enc:
        assert np.array_equal(enc[name].view(np.uint8), again[name].view(np.uint8))
    # Without logprobs (the default store) the fast path gives the same ids and counts.
    bare = encode_draws(ids[..., perm], None, ids_as="uint16", counts_as="uint8")
    assert sorted(bare) == ["extra_draws", "id_deltas"]
    for name in bare:
        assert np.array_equal(enc[name].view(np.uint8), bare[name].view(np.uint8))


def test_ids_that_do_not_fit_the_narrow_dtype_are_refused():
    ids, lp = draws()
    ids[0, 0, 0] = 70_000
    with pytest.raises(ValueError, match=r"^ids: values in \[0, 70000\] do not fit uint16$"):
        encode_draws(ids, lp, ids_as="uint16", counts_as="uint8")
    assert id_dtype(65_536) == "uint16" and id_dtype(65_537) == "int32"


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("weights", ["empirical", "inclusion"])
def test_counts_loss_equals_the_raw_draws_loss(temperature, weights):
    """The format-2 loss on distinct ids + counts is the format-1 loss on the same k draws."""
    ids, lp = draws(shape=(2, 4, 12))
    enc = decode_block(encode_draws(ids, lp, ids_as="int32", counts_as="uint8"))
    z = torch.randn(2, 4, 9, generator=torch.Generator().manual_seed(0))
    kw = dict(temperature=temperature, weights=weights)
    raw = sampled_kd(z, torch.from_numpy(ids), torch.from_numpy(lp), **kw)
    compact = sampled_kd(
        z,
        torch.from_numpy(enc["ids"]),
        torch.from_numpy(enc["logprobs"]),
        counts=torch.from_numpy(enc["counts"]),
        **kw,
    )
    torch.testing.assert_close(compact, raw, rtol=1e-5, atol=1e-6)


def test_without_logprobs_the_entropy_takes_the_draws_mean_place():
    ids, lp = draws(shape=(2, 4, 12))
    enc = decode_block(encode_draws(ids, lp, ids_as="int32", counts_as="uint8"))
    z = torch.randn(2, 4, 9, generator=torch.Generator().manual_seed(1), requires_grad=True)
    raw = sampled_kd(z, torch.from_numpy(ids), torch.from_numpy(lp))
    h = -torch.from_numpy(lp).float().mean(-1)  # the draws' estimate of H(p), (n, L)
    counts = torch.from_numpy(enc["counts"])
    compact = sampled_kd(z, torch.from_numpy(enc["ids"]), None, counts=counts, entropy=h)
    torch.testing.assert_close(compact, raw, rtol=1e-5, atol=1e-5)
    (g_raw,) = torch.autograd.grad(raw.sum(), z)
    (g_compact,) = torch.autograd.grad(compact.sum(), z)
    torch.testing.assert_close(g_compact, g_raw)  # the same gradient, whatever H is
    with pytest.raises(ValueError, match="keeps no logprobs, so only temperature 1"):
        sampled_kd(z, torch.from_numpy(enc["ids"]), None, counts=counts, entropy=h, temperature=2.0)


@pytest.mark.parametrize("logprobs", [False, True])
def test_a_format2_sample_store_verifies_and_decodes(tmp_path, logprobs):
    data = make_data("sample")
    build_store(tmp_path / "s.zarr", data, method="sample", logprobs=logprobs)
    assert verify_store(tmp_path / "s.zarr") == []
    attrs = read_attrs(tmp_path / "s.zarr")
    assert attrs["format_version"] == 2 and attrs["encoding"]["ids"] == "distinct_deltas_counts"
    assert attrs["encoding"]["logprobs"] is logprobs and attrs["encoding"]["id_bits"] == 16
    assert attrs["encoding"]["filters"] == {"extra_draws": ["transpose"]}  # k-major counts
    arrays = open_split(tmp_path / "s.zarr", "train")
    block = decode_block({name: arr[:] for name, arr in arrays.items()})
    expected = {"ids", "counts", "entropy"} | ({"logprobs", "tail"} if logprobs else set())
    assert set(block) == expected and block["ids"].dtype == np.int32
    raw_ids = data["train"][1].reshape(-1, K)
    expanded = np.repeat(block["ids"].ravel(), block["counts"].ravel()).reshape(-1, K)
    assert np.array_equal(expanded, np.sort(raw_ids, axis=1))


def test_a_store_with_the_earlier_counts_codec_reads_the_same(tmp_path, monkeypatch):
    """Stores written before `extra_draws` went k-major (zstd 12, position-major) still verify
    and decode to the same arrays: the codec is in each array's zarr.json, not in the reader,
    and only the shard files' bytes differ."""
    from zarr.codecs import ZstdCodec

    from pipeline.store import format as store_format

    data = make_data("sample")
    now = build_store(tmp_path / "now.zarr", data, method="sample")
    monkeypatch.setattr(store_format, "_filters", lambda compact, array: [])
    current = store_format._compressors

    def earlier(dtype: str, method: str, compact: bool = False, array: str = "") -> list:
        return (
            [ZstdCodec(level=12)]
            if array == "extra_draws"
            else current(dtype, method, compact, array)
        )

    monkeypatch.setattr(store_format, "_compressors", earlier)
    before = build_store(tmp_path / "before.zarr", data, method="sample")
    monkeypatch.undo()
    old = zarr.open_array(tmp_path / "before.zarr" / "train" / "extra_draws", mode="r")
    assert [c.to_dict()["name"] for c in old.filters] == []  # really the earlier codec
    differs = [key for key in now if "extra_draws" in key and now[key] != before[key]]
    assert differs and all(now[k] == before[k] for k in now if "extra_draws" not in k)
    assert verify_store(tmp_path / "before.zarr") == []
    for split in ("train", "validation"):
        a, b = (open_split(tmp_path / name, split) for name in ("now.zarr", "before.zarr"))
        for name in a:
            assert np.array_equal(a[name][:], b[name][:]), (split, name)


def test_verify_finds_ids_out_of_order_and_counts_that_do_not_sum_to_k(tmp_path):
    spec = spec_for("sample")
    data = make_data("sample")
    path = tmp_path / "s.zarr"
    create_store(path, spec, make_attrs(data, method="sample"))
    sums = {}
    for split, shard in spec.all_shards():
        sums.update(write_shard(path, spec, split, shard, *shard_rows(data, split, shard, spec)))
    # A buggy writer: shard 0 with two ids swapped and one count changed.
    group = zarr.open_group(path, mode="r")
    rows = {name: group[f"train/{name}"][0:4] for name in spec.ARRAYS}
    deltas, extra = rows["id_deltas"].copy(), rows["extra_draws"].copy()
    # (0, 0): a drawn id after the padding; the first position with padding: draws on it.
    deltas[0, 0, 1:] = [0, 5, 0]
    pad = np.argwhere(deltas[..., -1] == 0)[1]  # a position whose last slot is padding
    extra[pad[0], pad[1], -1] = 2
    extra[1, 2, 0] += 1  # counts no longer sum to k
    sums.update(
        write_shard_arrays(
            path, spec, "train", 0, {**rows, "id_deltas": deltas, "extra_draws": extra}
        )
    )
    from pipeline.store.format import finalize_store

    finalize_store(path, sums)
    problems = verify_store(path)
    assert any("2 positions whose counts do not sum to k=4" in p for p in problems)
    assert any(
        "not distinct and ascending" in p and "sequence 0, position 0" in p for p in problems
    )


def test_tensorstore_reads_a_format2_store_like_zarr_python(tmp_path):
    """Another Zarr v3 implementation decodes every array, without softlabels."""
    ts = pytest.importorskip("tensorstore", reason="pip install -e '.[dev]' installs it")
    build_store(tmp_path / "s.zarr", method="sample", logprobs=True)
    spec = spec_for("sample", logprobs=True)
    for split in spec.split_names():
        for name in spec.ARRAYS:
            path = tmp_path / "s.zarr" / split / name
            arr = ts.open(
                {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}, read=True
            ).result()
            theirs = arr.read().result()
            ours = zarr.open_array(path, mode="r")[:]
            assert theirs.dtype == ours.dtype and theirs.shape == ours.shape
            assert np.array_equal(theirs.view(np.uint8), ours.view(np.uint8)), (split, name)


@pytest.mark.parametrize("method", ["sample", "topk"])
def test_convert_a_format1_store(tmp_path, method, capsys):
    data = make_data(method)
    build_store(tmp_path / "old.zarr", data, method=method, format_version=1)
    assert (
        main(["convert", "--no-progress", str(tmp_path / "old.zarr"), str(tmp_path / "new.zarr")])
        == 0
    )
    assert "; verified" in capsys.readouterr().out
    new = tmp_path / "new.zarr"
    assert verify_store(new) == []
    attrs, old = read_attrs(new), read_attrs(tmp_path / "old.zarr")
    assert attrs["format_version"] == 2 and attrs["converted_from"]["format_version"] == 1
    for key in ("teacher", "tokenizer", "dataset", "method", "seed", "temperature"):
        assert attrs[key] == old[key]
    for split in ("train", "validation"):
        got = decode_block({n: a[:] for n, a in open_split(new, split).items()})
        inp, ids, lp, tail, _ = data[split]
        assert np.array_equal(open_split(new, split)["input_ids"][:], inp)
        if method == "topk":
            assert np.array_equal(got["ids"], ids) and np.array_equal(got["logprobs"], lp)
            continue
        # Same draws; the entropy is their own mean -log p, so the loss is format 1's.
        expanded = np.repeat(got["ids"].ravel(), got["counts"].ravel()).reshape(ids.shape)
        assert np.array_equal(expanded.reshape(-1, K), np.sort(ids.reshape(-1, K), axis=1))
        assert np.array_equal(got["entropy"], (-lp.astype(np.float32).mean(-1)).astype(np.float16))


def test_convert_refuses_and_leaves_nothing_behind(tmp_path, monkeypatch):
    build_store(tmp_path / "new.zarr", method="sample")
    with pytest.raises(InputError, match="already format_version 2; nothing to convert"):
        convert_store(tmp_path / "new.zarr", tmp_path / "x.zarr", progress=False)
    build_store(tmp_path / "part.zarr", method="sample", format_version=1, finalize=False)
    with pytest.raises(StoreError, match="refusing to convert an incomplete store"):
        convert_store(tmp_path / "part.zarr", tmp_path / "x.zarr", progress=False)
    build_store(tmp_path / "old.zarr", method="sample", format_version=1)
    with pytest.raises(InputError, match="already exists; remove it"):
        convert_store(tmp_path / "old.zarr", tmp_path / "new.zarr", progress=False)
    # A failure half-way (disk full on the third shard) leaves no output and the source intact.
    import pipeline.store.convert as convert

    calls = []

    def failing(*args, **kw):
        calls.append(args[3])
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return write_shard(*args, **kw)

    monkeypatch.setattr(convert, "write_shard", failing)
    before = {p: p.read_bytes() for p in (tmp_path / "old.zarr").rglob("*") if p.is_file()}
    with pytest.raises(OSError, match="No space left"):
        convert_store(tmp_path / "old.zarr", tmp_path / "x.zarr", progress=False)
    assert not (tmp_path / "x.zarr").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("x.zarr")]
    assert before == {p: p.read_bytes() for p in (tmp_path / "old.zarr").rglob("*") if p.is_file()}


def test_spec_refuses_logprobs_off_outside_format2_sample():
    spec = spec_for("sample")
    with pytest.raises(ValueError, match="only format-2 sample stores may leave out logprobs"):
        StoreSpec(spec.splits, K, 2, 2, method="topk", logprobs=False)
    with pytest.raises(ValueError, match=r"StoreSpec.id_dtype: format 1 allows \('int32',\)"):
        StoreSpec(spec.splits, K, 2, 2, method="sample", format_version=1, id_dtype="uint16")


def test_inspect_json_reports_bytes_per_position(tmp_path, capsys):
    build_store(tmp_path / "s.zarr", method="sample")
    assert main(["inspect", "--json", str(tmp_path / "s.zarr")]) == 0
    summary = json.loads(capsys.readouterr().out)
    by_array = summary["bytes_per_position_by_array"]
    assert summary["positions"] == 13 * 8
    assert sum(by_array.values()) < summary["bytes_per_position"]  # + metadata
