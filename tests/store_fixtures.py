"""Tiny logits stores, tokenizers and tokenized datasets for the store and CLI tests.

Default store: train N=10, validation N=3, L=8, k=4, chunk_sequences=2, shard_chunks=2, so train
has 3 shards (the last one short: rows 8:10) and validation 1 (short: rows 0:3). `SPEC` is a
format-2 top-k store with int32 ids; `spec_for` gives the spec of any method and format (a
format-2 sample store is distinct ids + counts, without logprobs unless asked).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.core.provenance import ids_fingerprint, tokenizer_identity
from pipeline.store.format import (
    FORMAT_VERSION,
    SplitSpec,
    StoreSpec,
    create_store,
    finalize_store,
    write_shard,
)

V, L, K = 50, 8, 4
SIZES = {"train": 10, "validation": 3}
SPEC = StoreSpec(
    splits=(SplitSpec("train", SIZES["train"], L), SplitSpec("validation", SIZES["validation"], L)),
    k=K,
    chunk_sequences=2,
    shard_chunks=2,
)


def spec_for(
    method: str = "topk", format_version: int = FORMAT_VERSION, logprobs: bool | None = None
) -> StoreSpec:
    """The default layout for `method` and `format_version`; a format-2 sample store keeps
    logprobs only when `logprobs` is true (default: not, as teacher_logits writes it)."""
    if logprobs is None:
        logprobs = not (method == "sample" and format_version >= 2)
    narrow = "uint16" if format_version >= 2 and method == "sample" else "int32"
    return StoreSpec(
        SPEC.splits,
        K,
        SPEC.chunk_sequences,
        SPEC.shard_chunks,
        method=method,
        format_version=format_version,
        id_dtype=narrow,
        input_dtype=narrow,
        logprobs=logprobs,
    )


def make_split(n: int, method: str = "topk", seed: int = 0) -> tuple[np.ndarray, ...]:
    """Valid soft labels for n sequences as a teacher pass gives them: (input_ids, ids, logprobs,
    tail, entropy) in the dtypes `write_shard` takes."""
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(0, V, (n, L), dtype=np.int32)  # (n, L)
    logits = rng.normal(size=(n, L, V)) * 2.0
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)  # (n, L, V)
    if method == "topk":
        ids = np.argsort(-p, axis=-1, kind="stable")[..., :K]  # (n, L, k) descending
    else:  # k draws with replacement per position
        u = rng.random((n, L, K, 1))
        ids = (u > np.cumsum(p, -1)[:, :, None, :]).sum(-1).clip(max=V - 1)
    ids = ids.astype(np.int32)
    pk = np.take_along_axis(p, ids, -1)  # (n, L, k)
    distinct = np.zeros_like(p)
    np.put_along_axis(distinct, ids, 1.0, -1)
    covered = (p * distinct).sum(-1)  # (n, L): mass of the distinct ids
    tail = np.log1p(-np.minimum(covered, 1 - 1e-7))
    entropy = -(p * np.log(p)).sum(-1)  # (n, L) nats
    return (
        input_ids,
        ids,
        np.log(pk).astype(np.float16),
        tail.astype(np.float16),
        entropy.astype(np.float16),
    )


def make_data(method: str = "topk", seed: int = 0) -> dict[str, tuple[np.ndarray, ...]]:
    return {s: make_split(n, method, seed + i) for i, (s, n) in enumerate(SIZES.items())}


def make_attrs(
    data: dict[str, tuple[np.ndarray, ...]], tok_identity: dict | None = None, method: str = "topk"
) -> dict:
    return {
        "teacher": {
            "name": "tiny-teacher",
            "revision": "main",
            "sha256": "a" * 64,
            "architecture": "LlamaForCausalLM",
            "vocab_size": V,
        },
        "tokenizer": tok_identity or {"sha256": "b" * 64, "vocab_size": V, "eos_id": 1},
        "dataset": {
            "splits": {
                s: {"n": d[0].shape[0], "seq_len": L, "fingerprint": ids_fingerprint(d[0])}
                for s, d in data.items()
            }
        },
        "method": method,
        "seed": 0,
        "temperature": 1.0,
    }


def shard_rows(data: dict, split: str, shard: int, spec: StoreSpec = SPEC) -> tuple:
    """A shard's rows, as `write_shard` takes them for `spec` (entropy only if it keeps it)."""
    start, stop = spec.shards(split)[shard]
    rows = tuple(a[start:stop] for a in data[split])
    return rows if spec.compact else rows[:4]


def build_store(
    path: Path,
    data: dict | None = None,
    *,
    order: list[tuple[str, int]] | None = None,
    finalize: bool = True,
    attrs: dict | None = None,
    method: str = "topk",
    format_version: int = FORMAT_VERSION,
    logprobs: bool | None = None,
) -> dict[str, str]:
    """Create, write every shard (in `order`), optionally finalize; return the checksums."""
    data = data or make_data(method)
    spec = spec_for(method, format_version, logprobs)
    create_store(path, spec, attrs or make_attrs(data, method=method))
    sums: dict[str, str] = {}
    for split, shard in order or spec.all_shards():
        sums.update(write_shard(path, spec, split, shard, *shard_rows(data, split, shard, spec)))
    if finalize:
        finalize_store(path, sums)
    return sums


def make_tokenizer(path: Path, shift: int = 0) -> dict:
    """Save a WordLevel tokenizer (V ids, eos 1) to `path`; return its identity as loaded back.

    `shift` renames the words, giving a different tokenizer with the same vocabulary size.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "</s>": 1, **{f"w{i + shift}": i for i in range(2, V)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>"
    ).save_pretrained(path)
    return tokenizer_identity(AutoTokenizer.from_pretrained(path))


def make_tokenized(path: Path, data: dict) -> None:
    """Save a DatasetDict like the tokenize stage's: input_ids (fixed-length int32) and lang."""
    import datasets

    features = datasets.Features(
        {
            "input_ids": datasets.List(datasets.Value("int32"), length=L),
            "lang": datasets.Value("string"),
        }
    )
    datasets.DatasetDict(
        {
            s: datasets.Dataset.from_dict(
                {"input_ids": d[0], "lang": ["en"] * d[0].shape[0]}, features=features
            )
            for s, d in data.items()
        }
    ).save_to_disk(str(path))


def files_of(root: Path) -> dict[str, bytes]:
    """{relative path: bytes} of every file under `root`."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def flip_bytes(file: Path, offset: int = 5) -> None:
    raw = bytearray(file.read_bytes())
    raw[offset] ^= 0xFF
    raw[offset + 1] ^= 0xFF
    file.write_bytes(bytes(raw))


def write_in_child(path: str, split: str, shard: int) -> dict[str, str]:
    """Worker for the multiprocessing test: regenerate the default data, write one shard."""
    return write_shard(path, SPEC, split, shard, *shard_rows(make_data(), split, shard))
