"""`softlabels convert`: rewrite a format-1 logits store as format 2, verified and atomic.

A format-1 store (k raw (id, logprob) pairs per position, int32 ids) becomes the format-2 store
`teacher_logits` would have written from the same draws (docs/logits-store.md): ids as narrow as
the vocabulary allows and, for a `sample` store, distinct ids + counts. Nothing is recomputed,
so no teacher is needed. One difference is unavoidable: a format-1 store does not hold the
teacher's entropy, so a converted sample store records, in its place, the draws' own estimate
(1/k) sum_j -log p(x_j), the very constant format 1's loss used; the attribute
`converted_from.entropy` says so. A student trained on the converted store therefore sees the
same loss as on the original, to float16 rounding of that constant.

Safety: the source must be complete and pass its checksums (`check_integrity`) before anything
is written; every converted shard is decoded again and compared with the source rows (draws as a
multiset, logprobs per id, input ids), and the new store is written in a temporary sibling that
becomes `out` in one rename only after all of that passed (`pipeline.core.atomic.atomic_dir`).
The source is only read. Memory: one shard of every array at a time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline.core.atomic import atomic_dir, check_destinations
from pipeline.core.errors import InputError, StoreError
from pipeline.store.format import (
    FORMAT_VERSION,
    StoreSpec,
    create_store,
    finalize_store,
    open_split,
    read_attrs,
    sampling_of,
    write_shard,
)
from pipeline.store.integrity import check_integrity
from pipeline.store.labels import decode_block, id_dtype
from pipeline.store.verify import content_sha256

PROVENANCE_KEYS = ("teacher", "tokenizer", "dataset", "method", "seed", "temperature")
"""Attributes carried over unchanged: everything that says where the labels came from."""


def target_spec(spec: StoreSpec, attrs: dict[str, Any], sample_logprobs: bool) -> StoreSpec:
    """The format-2 layout of a store with format-1 `spec` and attributes `attrs`."""
    return StoreSpec(
        spec.splits,
        spec.k,
        spec.chunk_sequences,
        spec.shard_chunks,
        method=spec.method,
        format_version=FORMAT_VERSION,
        id_dtype=id_dtype(int(attrs["teacher"]["vocab_size"])),
        input_dtype=id_dtype(int(attrs["tokenizer"]["vocab_size"])),
        logprobs=spec.method == "topk" or sample_logprobs,
    )


def _check_shard(
    source: dict[str, np.ndarray], written: dict[str, np.ndarray], spec: StoreSpec, where: str
) -> None:
    """StoreError unless the written rows decode to the source rows (module docstring)."""
    same = np.array_equal(written["input_ids"].astype(np.int64), source["input_ids"])
    labels = decode_block(written)
    if spec.compact:
        k = spec.k
        ids = labels["ids"].reshape(-1, k).astype(np.int64)
        counts = labels["counts"].reshape(-1, k).astype(np.int64)
        draws = np.sort(source["ids"].reshape(-1, k), axis=1)
        expanded = np.repeat(ids.ravel(), counts.ravel()).reshape(-1, k)
        same &= expanded.shape == draws.shape and np.array_equal(expanded, draws)
        if spec.logprobs:
            lp = labels["logprobs"].reshape(-1, k)
            expanded_lp = np.repeat(lp.ravel(), counts.ravel()).reshape(-1, k)
            order = np.argsort(source["ids"].reshape(-1, k), axis=1, kind="stable")
            src_lp = np.take_along_axis(source["logprobs"].reshape(-1, k), order, 1)
            same &= np.array_equal(expanded_lp.view(np.uint16), src_lp.view(np.uint16))
    else:
        same &= np.array_equal(labels["ids"].astype(np.int64), source["ids"])
        for name in ("logprobs", "tail"):
            same &= np.array_equal(written[name].view(np.uint16), source[name].view(np.uint16))
    if not same:
        raise StoreError(
            f"{where}: the converted rows do not decode to the source rows; nothing was written "
            "to the output (this is a bug: please report it with `softlabels inspect` of the source)"
        )


def convert_store(
    src: str | Path, out: str | Path, *, sample_logprobs: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Write `src` (a complete format-1 store) as a format-2 store at `out`; return the new
    attributes. `sample_logprobs` keeps a sample store's logprobs and tail (module docstring).
    Refused with one line: a missing, incomplete, damaged or already format-2 source, an
    existing `out`, or `out` inside `src`."""
    src, out = Path(src), Path(out)
    attrs = read_attrs(src)  # StoreError: missing, not a store, unknown version
    if attrs.get("format_version") == FORMAT_VERSION:
        raise InputError(f"{src}: already format_version {FORMAT_VERSION}; nothing to convert")
    if attrs.get("complete") is not True:
        raise StoreError(
            f"{src}: refusing to convert an incomplete store (complete=false); finish it first "
            "(`dvc repro teacher_logits` resumes) or pull a complete one (`dvc pull`)"
        )
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise InputError(f"{out}: the output must not be the source store or inside it")
    if out.exists():
        raise InputError(f"{out}: already exists; remove it or choose another output path")
    check_destinations(out)
    spec = StoreSpec.from_attrs(attrs)
    check_integrity(src, spec, attrs, purpose="convert")
    new = target_spec(spec, attrs, sample_logprobs)
    carried = {key: attrs[key] for key in PROVENANCE_KEYS}
    if sampling_of(attrs) is not None:  # recorded explicitly: format 1 predates the attribute
        carried["sampling"] = sampling_of(attrs)
    carried["converted_from"] = {
        "format_version": attrs["format_version"],
        "content_sha256": content_sha256(attrs),
        "softlabels_version": attrs.get("softlabels_version"),
        **(
            {"entropy": "mean -logprob of the k draws (format 1 has no entropy)"}
            if new.compact
            else {}
        ),
    }
    shards = spec.all_shards()
    with (
        atomic_dir(out) as tmp,
        tqdm(total=len(shards), desc="convert", unit="shard", disable=not progress) as bar,
    ):
        store = tmp  # the group is the folder itself
        create_store(store, new, carried)
        sums: dict[str, str] = {}
        for split in spec.split_names():
            source_arrays = open_split(src, split)
            written = open_split(store, split)  # read back each shard once it is written
            for shard, (a, b) in enumerate(spec.shards(split)):
                rows = {name: np.asarray(arr[a:b]) for name, arr in source_arrays.items()}
                entropy = None
                if new.compact:
                    lp = rows["logprobs"].astype(np.float32)  # (n, L, k)
                    entropy = (-lp.mean(-1)).astype(np.float16)  # (n, L) the draws' estimate
                sums.update(
                    write_shard(
                        store,
                        new,
                        split,
                        shard,
                        rows["input_ids"],
                        rows["ids"],
                        rows["logprobs"],
                        rows["tail"],
                        entropy,
                    )
                )
                decoded = {name: np.asarray(arr[a:b]) for name, arr in written.items()}
                _check_shard(
                    {
                        k: v.astype(np.int64) if k in ("ids", "input_ids") else v
                        for k, v in rows.items()
                    },
                    decoded,
                    new,
                    f"{src}: {split} shard {shard}",
                )
                bar.update(1)
        finalize_store(store, sums)  # re-hashes every shard file against the writer's digests
    return read_attrs(out)
