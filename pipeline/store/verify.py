"""Checking a logits store: integrity, internal consistency, compatibility with a consumer.

`check_compatible` is what a consumer (the student stage, another team) calls before using a
store: it compares the store's recorded tokenizer identity, dataset fingerprints and teacher
vocabulary with its own and refuses an incomplete store, raising one StoreError that names each
differing field, both values, and what to do.

`verify_store` is the full audit behind `softlabels verify`: format version and `complete`; the
attributes against the arrays' shapes, dtypes, chunks and shards; every shard file of every array
present and matching its recorded sha256 (all bad shards are reported, not just the first); then,
streaming one chunk at a time (memory bounded by a chunk, never a split), the data itself: ids
inside the teacher vocabulary, finite log-probabilities <= 0, top-k ids in descending order,
probability mass of the distinct ids plus exp(tail) summing to 1, and the stored input ids
matching the recorded fingerprint. Optionally it also checks a tokenizer folder and a tokenized
dataset against the store. Trade-off: the audit decompresses the whole store (seconds per GB);
`check_compatible` reads only the attributes and is what a training run should call.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.errors

from pipeline.core.errors import InputError, StoreError
from pipeline.core.provenance import tokenizer_identity
from pipeline.core.text import printable
from pipeline.data.tokenized import TokenizedSplit, load_tokenized
from pipeline.store.format import (
    METHODS,
    READABLE_VERSIONS,
    REQUIRED_ATTRS,
    StoreSpec,
    iter_chunks,
    read_attrs_any_version,
)
from pipeline.store.integrity import checksum_problems, layout_problems
from pipeline.store.labels import decode_block, real_slots

MASS_TOLERANCE = 0.02
"""Allowed |sum of distinct ids' probabilities + exp(tail) - 1| (float16 rounding is ~1e-3)."""

LOGPROB_TOLERANCE = 1e-3
"""Largest positive value tolerated in logprobs/tail (log-softmax rounding)."""

_TOKENIZER_ADVICE = (
    "the store was made with another tokenizer — re-run teacher_logits with this tokenizer "
    "or use the teacher's tokenizer"
)
_DATASET_ADVICE = (
    "the store's input ids are not this tokenized dataset — re-run teacher_logits on it "
    "(`dvc repro teacher_logits`) or tokenize with the corpus and params the store was made from"
)


def abbreviate(value: Any) -> str:
    """A value for a message: long strings (digests) cut to 12 characters and an ellipsis,
    control characters escaped (`printable`: the value comes from an artifact)."""
    text = str(value)
    return (
        printable(text[:12]) + "…" if isinstance(value, str) and len(text) > 16 else printable(text)
    )


def content_sha256(attrs: dict[str, Any]) -> str | None:
    """The identity of a store's data: sha256 of its per-shard checksums (sorted JSON), or None
    while no shard is recorded. Two stores with the same value hold the same bytes in every
    shard; a student records it so it can be traced to the exact teacher pass it learned from."""
    shards = attrs.get("shards")
    if not shards:
        return None
    return hashlib.sha256(json.dumps(shards, sort_keys=True).encode()).hexdigest()


def _differs(field: str, store: Any, yours: Any, advice: str) -> str:
    return f"{field} differs: store {abbreviate(store)} vs yours {abbreviate(yours)}; {advice}"


def compatibility_problems(
    attrs: dict[str, Any],
    *,
    tokenizer_identity: dict[str, Any] | None = None,
    dataset_fingerprints: dict[str, str] | None = None,
    vocab_size: int | None = None,
    require_complete: bool = True,
) -> list[str]:
    """Every reason `attrs` (a store's "softlabels" attributes) is unusable by this consumer,
    each as "<what differs>; <what to do>" (the shape `one_line` relies on)."""
    problems = []
    if attrs.get("format_version") not in READABLE_VERSIONS:
        problems.append(
            f"format_version differs: store {attrs.get('format_version')!r} vs supported "
            f"{' and '.join(map(str, READABLE_VERSIONS))}; use a matching softlabels release "
            "or re-run teacher_logits"
        )
    if require_complete and attrs.get("complete") is not True:
        problems.append(
            "the store is not complete (complete=false): teacher_logits has not finished and "
            "verified every shard; finish it (`dvc repro teacher_logits` resumes) or pull a "
            "complete store (`dvc pull`)"
        )
    if tokenizer_identity is not None:
        store_tok = attrs.get("tokenizer", {})
        for key in ("sha256", "vocab_size", "eos_id"):
            if store_tok.get(key) != tokenizer_identity.get(key):
                problems.append(
                    _differs(
                        f"tokenizer.{key}",
                        store_tok.get(key),
                        tokenizer_identity.get(key),
                        _TOKENIZER_ADVICE,
                    )
                )
    if dataset_fingerprints is not None:
        store_splits = attrs.get("dataset", {}).get("splits", {})
        for split, fp in dataset_fingerprints.items():
            if split not in store_splits:
                problems.append(
                    f"dataset.splits.{split} is missing: the store has splits "
                    f"{sorted(store_splits)}; {_DATASET_ADVICE}"
                )
            elif store_splits[split].get("fingerprint") != fp:
                problems.append(
                    _differs(
                        f"dataset.splits.{split}.fingerprint",
                        store_splits[split].get("fingerprint"),
                        fp,
                        _DATASET_ADVICE,
                    )
                )
    if vocab_size is not None:
        teacher_vocab = attrs.get("teacher", {}).get("vocab_size")
        if teacher_vocab != vocab_size:
            problems.append(
                _differs(
                    "teacher.vocab_size",
                    teacher_vocab,
                    vocab_size,
                    "the stored ids index the teacher's vocabulary — use a student with the "
                    "teacher's vocabulary size or re-run teacher_logits with a matching teacher",
                )
            )
    return problems


def check_compatible(
    attrs: dict[str, Any],
    *,
    tokenizer_identity: dict[str, Any] | None = None,
    dataset_fingerprints: dict[str, str] | None = None,
    vocab_size: int | None = None,
) -> None:
    """Raise StoreError (one line, `one_line`) unless the store is complete and matches the caller.

    Compared only for the arguments given: the tokenizer identity ({sha256, vocab_size, eos_id},
    from `pipeline.core.provenance.tokenizer_identity`), each split's input-id fingerprint
    (`pipeline.core.provenance.ids_fingerprint`), and the vocabulary size of the caller's model.
    """
    problems = compatibility_problems(
        attrs,
        tokenizer_identity=tokenizer_identity,
        dataset_fingerprints=dataset_fingerprints,
        vocab_size=vocab_size,
    )
    if problems:
        raise StoreError(one_line(problems))


def one_line(problems: list[str]) -> str:
    """`compatibility_problems` as one line for an error message: each problem reads
    "<what differs>; <what to do>", so problems sharing their advice are listed together and
    the advice is said once ("a, b; advice; c; other advice")."""
    groups: dict[str, list[str]] = {}
    for problem in problems:
        fact, _, advice = problem.partition("; ")
        groups.setdefault(advice, []).append(fact)
    return "; ".join(
        ", ".join(facts) + (f"; {advice}" if advice else "") for advice, facts in groups.items()
    )


def refuse(path: str | Path, purpose: str, problems: list[str]) -> None:
    """Raise StoreError "`path`: refusing to `purpose` this logits store: <problems>" (one line,
    `one_line`) if there are problems; return quietly otherwise."""
    if problems:
        raise StoreError(f"{path}: refusing to {purpose} this logits store: {one_line(problems)}")


class _StreamingFingerprint:
    """`ids_fingerprint` of an (N, L) array computed from consecutive row blocks."""

    def __init__(self, n: int, seq_len: int) -> None:
        self._h = hashlib.sha256(f"int32{(n, seq_len)}".encode())

    def update(self, rows: np.ndarray) -> None:
        self._h.update(memoryview(np.ascontiguousarray(rows, dtype="<i4")).cast("B"))

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def _attr_problems(attrs: dict[str, Any]) -> list[str]:
    """Missing or malformed attributes (the store cannot be checked further if any)."""
    problems = []
    for key in ("k", "chunk_sequences", "shard_chunks", "splits", "shards", "dtypes", "complete"):
        if key not in attrs:
            problems.append(f"attributes: '{key}' is missing")
    for key, subkeys in REQUIRED_ATTRS.items():
        if key not in attrs:
            problems.append(f"attributes: '{key}' is missing")
        problems += [
            f"attributes: '{key}.{sub}' is missing"
            for sub in subkeys
            if key in attrs and sub not in (attrs[key] or {})
        ]
    if attrs.get("method") not in METHODS:
        problems.append(f"attributes: method {attrs.get('method')!r} is not one of {METHODS}")
    if not problems:
        try:
            spec = StoreSpec.from_attrs(attrs)
        except StoreError as e:
            return [f"attributes: {e}"]
        if attrs.get("dtypes") != spec.DTYPES:
            problems.append(
                f"attributes: dtypes {attrs.get('dtypes')} differ from what format "
                f"{spec.format_version} implies ({spec.DTYPES})"
            )
    return problems


def _array_problems(path: Path, spec: StoreSpec, attrs: dict[str, Any]) -> list[str]:
    """Splits' recorded dataset sizes against the layout, then arrays missing or whose
    shape/dtype/chunks/shards disagree with the attributes (`integrity.layout_problems`)."""
    problems = []
    for s in spec.splits:
        dsplit = attrs["dataset"]["splits"].get(s.name, {})
        if (dsplit.get("n"), dsplit.get("seq_len")) != (s.n, s.seq_len):
            problems.append(
                f"attributes: dataset.splits.{s.name} (n={dsplit.get('n')}, seq_len="
                f"{dsplit.get('seq_len')}) disagrees with splits.{s.name} (n={s.n}, "
                f"seq_len={s.seq_len})"
            )
    return problems + layout_problems(path, spec)


def _report(out: list[str], mask: np.ndarray, what: str, first: int) -> None:
    """Append "<count> <what> (first: sequence s, position p)" when `mask` (n, L) has a hit."""
    if mask.any():
        seq, pos = np.argwhere(mask)[0][:2]
        out.append(
            f"{int(mask.sum())} {what} (first: sequence {first + int(seq)}, position {int(pos)})"
        )


def label_problems(rows: dict[str, np.ndarray], first: int, vocab: int, k: int) -> list[str]:
    """The cheap value checks a reader runs on every chunk it streams (a few ms per chunk), on
    decoded labels (`pipeline.store.labels.decode_block`): `ids` (n, L, k) inside [0, vocab);
    where present, `logprobs` (n, L, k) finite and <= 0, `tail` (n, L) not NaN and <= 0,
    `counts` (n, L, k) summing to k at every position, `entropy` (n, L) finite and >= 0. `first`
    is the chunk's first row, for the messages."""
    out: list[str] = []
    ids = rows["ids"]
    _report(
        out, ((ids < 0) | (ids >= vocab)).any(-1), f"positions with ids outside [0, {vocab})", first
    )
    if "logprobs" in rows:
        lp = rows["logprobs"]  # float16 compares exactly against these bounds
        bad_lp = (~np.isfinite(lp) | (lp > LOGPROB_TOLERANCE)).any(-1)
        _report(out, bad_lp, "positions with logprobs not finite or > 0", first)
    if "tail" in rows:
        tail = rows["tail"]
        _report(out, np.isnan(tail) | (tail > LOGPROB_TOLERANCE), "tail values NaN or > 0", first)
    if "counts" in rows:
        drawn = rows["counts"].sum(-1, dtype=np.int64)  # (n, L)
        _report(out, drawn != k, f"positions whose counts do not sum to k={k}", first)
    if "entropy" in rows:
        h = rows["entropy"]
        _report(out, ~np.isfinite(h) | (h < -LOGPROB_TOLERANCE), "entropy not finite or < 0", first)
    return out


def _chunk_problems(
    rows: dict[str, np.ndarray], first: int, method: str, vocab: int, tok_vocab: int, k: int
) -> list[str]:
    """The full value checks on one stored chunk: `label_problems`, input_ids (n, L) inside the
    tokenizer, top-k order, distinct ids ascending with their padding last (format-2 sample),
    and each position's probability mass where logprobs are kept."""
    labels = decode_block(rows)
    out = label_problems(labels, first, vocab, k)
    ids = labels["ids"]
    inp = rows["input_ids"].astype(np.int64)
    _report(out, (inp < 0) | (inp >= tok_vocab), f"input_ids outside [0, {tok_vocab})", first)
    counts = labels.get("counts")
    if "id_deltas" in rows:  # format-2 sample: gaps >= 0, padding last and without draws
        deltas = rows["id_deltas"].astype(np.int64)
        real = real_slots(rows["id_deltas"])  # (n, L, k)
        _report(
            out,
            (deltas < 0).any(-1) | (~real[..., :-1] & real[..., 1:]).any(-1),
            "positions whose drawn ids are not distinct and ascending, padding last",
            first,
        )
        _report(
            out,
            (~real & (rows["extra_draws"] != 0)).any(-1),
            "positions with extra_draws on the padding",
            first,
        )
    if "logprobs" not in labels:
        return out
    lp = labels["logprobs"].astype(np.float32)  # (n, L, k)
    tail = labels["tail"].astype(np.float32)  # (n, L)
    if method == "topk":
        _report(
            out,
            (np.diff(lp, axis=-1) > 0).any(-1),
            "top-k positions not in descending order",
            first,
        )
    # The distinct ids' probabilities plus exp(tail) must sum to 1: count each id once.
    if counts is not None:
        first_seen, lp_sorted = counts > 0, lp
    else:
        order = np.argsort(ids, axis=-1, kind="stable")
        sorted_ids = np.take_along_axis(ids, order, -1)
        first_seen = np.ones(sorted_ids.shape, bool)
        first_seen[..., 1:] = sorted_ids[..., 1:] != sorted_ids[..., :-1]
        lp_sorted = np.take_along_axis(lp, order, -1)
    with np.errstate(invalid="ignore", over="ignore"):
        mass = (np.exp(lp_sorted) * first_seen).sum(-1) + np.exp(tail)
        _report(
            out,
            ~(np.abs(mass - 1.0) <= MASS_TOLERANCE),
            f"positions whose distinct ids' mass + exp(tail) is not 1 ± {MASS_TOLERANCE}",
            first,
        )
    return out


def load_tokenizer_identity(tokenizer: str | Path) -> dict[str, Any]:
    """`tokenizer_identity` of the tokenizer saved in folder `tokenizer`; InputError if unusable."""
    from transformers import AutoTokenizer  # heavy; only needed for this check

    if not Path(tokenizer).is_dir():
        raise InputError(f"{tokenizer}: no such tokenizer folder (pass e.g. models/teacher)")
    try:
        return tokenizer_identity(AutoTokenizer.from_pretrained(str(tokenizer)))
    except (OSError, ValueError, TypeError) as e:
        raise InputError(f"{tokenizer}: cannot load a tokenizer from it ({e})") from e


def _split_problems(
    group: zarr.Group,
    spec: StoreSpec,
    attrs: dict[str, Any],
    split: str,
    bad: set[tuple[str, int]],
    tok: TokenizedSplit | None,
) -> list[str]:
    """Stream one split chunk by chunk: values, stored-id fingerprint, rows vs the tokenized set."""
    s = spec.split(split)
    arrays = {name: group[f"{split}/{name}"] for name in spec.ARRAYS}
    problems: list[str] = []
    recorded = attrs["dataset"]["splits"][split].get("fingerprint")
    if tok is not None:
        shape = tok.input_ids.shape if len(tok) else (0, s.seq_len)
        if shape != (s.n, s.seq_len):
            problems.append(
                f"{split}: the tokenized dataset is {shape[0]} x {shape[1]} ids, the store {s.n} x {s.seq_len}"
            )
        fp = _StreamingFingerprint(*shape)
        fp.update(tok.input_ids)  # memory-mapped: read through the page cache
        problems += compatibility_problems(
            attrs, dataset_fingerprints={split: fp.hexdigest()}, require_complete=False
        )
        if shape != (s.n, s.seq_len):
            tok = None  # rows cannot be compared one to one
    fp = _StreamingFingerprint(s.n, s.seq_len)
    complete_pass = True
    n_diff, first_diff = 0, -1
    for shard, (start, stop) in enumerate(spec.shards(split)):
        if (split, shard) in bad:
            complete_pass = False
            continue
        try:
            for first, rows in iter_chunks(arrays, start, stop):
                fp.update(rows["input_ids"])
                problems += [
                    f"{split} shard {shard}: {p}"
                    for p in _chunk_problems(
                        rows,
                        first,
                        attrs["method"],
                        attrs["teacher"]["vocab_size"],
                        attrs["tokenizer"]["vocab_size"],
                        spec.k,
                    )
                ]
                if tok is not None:
                    theirs = tok.input_ids[first : first + len(rows["input_ids"])]
                    differ = (theirs != rows["input_ids"]).any(-1)  # (n,)
                    if differ.any() and not n_diff:
                        first_diff = first + int(np.argmax(differ))
                    n_diff += int(differ.sum())
        except (ValueError, RuntimeError, OSError, zarr.errors.BaseZarrError) as e:
            # zarr could not decode a chunk (a shard without a recorded checksum): report it and
            # keep auditing the rest
            problems.append(f"{split} shard {shard}: cannot decode ({type(e).__name__}: {e})")
            complete_pass = False
    if complete_pass and fp.hexdigest() != recorded:
        problems.append(
            f"{split}/input_ids: the stored ids' fingerprint {fp.hexdigest()[:12]}… differs from "
            f"the recorded dataset.splits.{split}.fingerprint {abbreviate(recorded)}; the store is "
            "inconsistent — re-run teacher_logits"
        )
    if n_diff:
        problems.append(
            f"{split}/input_ids: {n_diff} of {s.n} stored sequences differ from the tokenized "
            f"dataset (first: sequence {first_diff}); {_DATASET_ADVICE}"
        )
    return problems


def verify_store(
    path: str | Path, tokenizer: str | Path | None = None, tokenized: str | Path | None = None
) -> list[str]:
    """Audit a store (module docstring); return every problem found, [] if none.

    `tokenizer`: a folder `transformers.AutoTokenizer.from_pretrained` loads; its identity must
    match the store's. `tokenized`: a DatasetDict folder (tokenize stage output) whose splits'
    input_ids must match the store's recorded fingerprints and stored input_ids. Raises
    StoreError only when `path` is not a logits store at all, InputError when `tokenizer` or
    `tokenized` cannot be loaded. Memory stays bounded by one chunk per array.
    """
    path = Path(path)
    attrs = read_attrs_any_version(path)
    if attrs.get("format_version") not in READABLE_VERSIONS:
        return compatibility_problems(attrs, require_complete=False)
    problems = _attr_problems(attrs)
    if problems:
        return problems
    spec = StoreSpec.from_attrs(attrs)
    # Load the optional inputs first: a bad path is a usage error, found before any hashing.
    identity = load_tokenizer_identity(tokenizer) if tokenizer is not None else None
    tok_splits = (
        load_tokenized(tokenized, spec.split_names(), missing_ok=True).splits
        if tokenized is not None
        else {}
    )
    group = zarr.open_group(path, mode="r")
    problems += compatibility_problems(attrs)  # complete
    layout = _array_problems(path, spec, attrs)
    problems += layout
    if layout:  # data cannot be interpreted against the attributes
        return problems
    sums, bad = checksum_problems(path, spec, attrs["shards"])
    problems += sums
    if identity is not None:
        problems += compatibility_problems(
            attrs, tokenizer_identity=identity, require_complete=False
        )
    if tokenized is not None:
        problems += [
            f"{name}: the tokenized dataset has no split '{name}'"
            for name in spec.split_names()
            if name not in tok_splits
        ]
    for name in spec.split_names():
        problems += _split_problems(group, spec, attrs, name, bad, tok_splits.get(name))
    return problems
