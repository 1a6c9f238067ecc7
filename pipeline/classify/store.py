"""The classification store: a teacher's full class distribution per example, in sharded Zarr v3.

Layout (one group per split of the corpus: `train`, `dev`, `test`), every array indexed by row,
in corpus order:

    logprobs     float32 (N, C)  the teacher's log-probabilities over all C classes at T = 1, for
                                 the text it read for this row (exact: C is small, nothing is cut)
    lang         int16   (N,)    index into the attribute `languages`
    id           int64   (N,)    the row's `id` (-1 when the corpus has none)
    text_hash    uint64  (N,)    `pipeline.classify.corpus.text_hash` of the row's own text
    source_hash  uint64  (N,)    text_hash of the text the teacher read: the row's own for a
                                 `gold` or `direct` language, the parallel source sentence (same
                                 `id`, language `parallel_source`) for a `parallel` one

The store depends on no tokenizer: rows are matched to a corpus by (lang, id, text_hash), so a
student with another tokenizer learns from it. Attributes (under "softlabels", next to the
shared keys of every store: format_version, dtypes, splits, shards, complete, softlabels_version)
add `task: "classification"`, `labels` (the label set, in order), `languages`, `sources`
{lang: "gold" | "direct" | "parallel"}, `parallel_source`, `corpus` {fingerprint, splits: {name:
{n, fingerprint}}}, `teacher` {name, revision, sha256, architecture, num_labels} and
`temperature` (1.0). Writing, checksums, `complete` and resumable building are the shared
machinery of `pipeline.store.format` and `pipeline.store.work`; this module owns the layout, the
reader and the consumer checks.

Trade-off: float32 log-probabilities (4 B per class) rather than float16: with C = 7 a row costs
28 B, and exact T = 1 distributions keep KD at any temperature exact; rows are chunked by
`chunk_rows` (thousands of rows: a chunk is tens of KB) so even large corpora stay hundreds of files.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from zarr.codecs import BloscCodec

from pipeline import __version__
from pipeline.core.errors import StoreError
from pipeline.core.text import printable
from pipeline.store.format import (
    ShardedLayout,
    _canonical,
    create_store,
    finalize_store,
    iter_chunks,
    open_split,
    read_attrs,
    write_shard_arrays,
)
from pipeline.store.integrity import check_integrity, integrity_problems

if TYPE_CHECKING:  # only for annotations: the corpus module is the row-identity owner
    from pipeline.classify.corpus import LabeledCorpus

TASK = "classification"
"""Value of the `task` attribute that marks a classification store."""

CLASS_ARRAYS = ("logprobs", "lang", "id", "text_hash", "source_hash")
"""The arrays of every split, in the fixed order used for listings and checksum keys."""

CLASS_DTYPES: dict[str, str] = {
    "logprobs": "float32",
    "lang": "int16",
    "id": "int64",
    "text_hash": "uint64",
    "source_hash": "uint64",
}
"""The dtype of each array (recorded in the attributes as `dtypes`)."""

SOURCES = ("gold", "direct", "parallel")
"""Where a language's soft labels come from: a language with gold labels (the teacher reads its
own text), `direct` (the teacher reads the target-language text, zero-shot) or `parallel` (the
teacher reads the source-language sentence with the same id)."""

REQUIRED_CLASS_ATTRS: dict[str, tuple[str, ...]] = {
    "teacher": ("name", "revision", "sha256", "architecture", "num_labels"),
    "labels": (),
    "languages": (),
    "sources": (),
    "parallel_source": (),
    "corpus": ("fingerprint", "splits"),
    "temperature": (),
}
"""Keys the caller of `create_store` must supply for a classification store."""


CLASS_FORMAT_VERSION = 1
"""Version of the classification store's layout (unchanged by LM store format 2, whose
compact encoding is for sampled token labels; `read_attrs` accepts it)."""


@dataclass(frozen=True)
class ClassSplitSpec:
    """One split of a classification store: `n` rows."""

    name: str
    n: int

    def __post_init__(self) -> None:
        if not self.name or self.n < 0:
            raise ValueError(f"ClassSplitSpec: need a name and n >= 0, got {self.name!r}, {self.n}")


@dataclass(frozen=True)
class ClassStoreSpec(ShardedLayout):
    """Shape of a classification store: its splits, the class count, chunking and sharding."""

    splits: tuple[ClassSplitSpec, ...]
    """The splits, in corpus order (train, dev, test)."""
    num_classes: int
    """C: classes per distribution (the label set's size)."""
    chunk_rows: int
    """Rows per chunk (the unit a reader decompresses)."""
    shard_chunks: int
    """Chunks per shard file (the unit of writing and of checksums)."""

    ARRAYS = CLASS_ARRAYS
    DTYPES = CLASS_DTYPES
    DIMENSIONS = {
        "logprobs": ("row", "class"),
        "lang": ("row",),
        "id": ("row",),
        "text_hash": ("row",),
        "source_hash": ("row",),
    }

    def __post_init__(self) -> None:
        names = [s.name for s in self.splits]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"ClassStoreSpec.splits: need distinct splits, got {names}")
        for key in ("num_classes", "chunk_rows", "shard_chunks"):
            if getattr(self, key) < 1:
                raise ValueError(f"ClassStoreSpec.{key}: must be >= 1, got {getattr(self, key)}")

    def rows_per_chunk(self) -> int:
        return self.chunk_rows

    def array_shape(self, split: str, array: str) -> tuple[int, ...]:
        n = self.split(split).n
        return (n, self.num_classes) if array == "logprobs" else (n,)

    def compressors(self, array: str, attrs: dict[str, Any]) -> list[Any]:
        """Blosc-zstd with byte shuffle for every array (grouping bytes of equal significance
        is what compresses float log-probabilities and small-range integers best)."""
        size = np.dtype(CLASS_DTYPES[array]).itemsize
        return [BloscCodec(cname="zstd", clevel=5, shuffle="shuffle", typesize=size)]

    def check_attrs(self, attrs: dict[str, Any]) -> None:
        for key, subkeys in REQUIRED_CLASS_ATTRS.items():
            if key not in attrs:
                raise ValueError(f"create_store: attrs lacks required key '{key}'")
            for sub in subkeys:
                if not isinstance(attrs[key], dict) or sub not in attrs[key]:
                    raise ValueError(f"create_store: attrs lacks required key '{key}.{sub}'")
        if len(attrs["labels"]) != self.num_classes:
            raise ValueError(
                f"create_store: {len(attrs['labels'])} labels but num_classes={self.num_classes}"
            )
        bad = {k: v for k, v in attrs["sources"].items() if v not in SOURCES}
        if bad:
            raise ValueError(f"create_store: sources must be one of {SOURCES}, got {bad}")

    def layout_attrs(self) -> dict[str, Any]:
        return {
            "format_version": CLASS_FORMAT_VERSION,
            "task": TASK,
            "num_classes": self.num_classes,
            "chunk_rows": self.chunk_rows,
            "shard_chunks": self.shard_chunks,
            "dtypes": dict(CLASS_DTYPES),
            "splits": {s.name: {"n": s.n} for s in self.splits},
            "split_order": [s.name for s in self.splits],
            "shards": {},
            "complete": False,
            "softlabels_version": __version__,
        }

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> ClassStoreSpec:
        try:
            if attrs.get("task") != TASK:
                raise ValueError(f"task is {attrs.get('task')!r}, not {TASK!r}")
            splits = tuple(
                ClassSplitSpec(name, int(attrs["splits"][name]["n"]))
                for name in attrs["split_order"]
            )
            return cls(
                splits,
                int(attrs["num_classes"]),
                int(attrs["chunk_rows"]),
                int(attrs["shard_chunks"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise StoreError(
                f"store attributes do not describe a valid classification layout: {e!r}"
            ) from e


def is_class_store(attrs: dict[str, Any]) -> bool:
    """Whether a store's attributes (any store kind) are a classification store's."""
    return attrs.get("task") == TASK


def row_identity(corpus: LabeledCorpus, split: str) -> dict[str, np.ndarray]:
    """The identity arrays a store holds for `split` of `corpus`: lang (as indices into
    `languages_of(corpus)`), id and text_hash, in corpus order."""
    rows = corpus.splits[split]
    index = {lang: i for i, lang in enumerate(languages_of(corpus))}
    return {
        "lang": np.array([index[str(x)] for x in rows.lang], dtype=np.int16),
        "id": np.asarray(rows.id, dtype=np.int64),
        "text_hash": np.asarray(rows.text_hash, dtype=np.uint64),
    }


def languages_of(corpus: LabeledCorpus) -> list[str]:
    """The corpus's selected languages, in `classify_corpus.languages` order (the store's
    `languages`, which its `lang` array indexes)."""
    return list(corpus.languages)


def corpus_attrs(corpus: LabeledCorpus) -> dict[str, Any]:
    """The `corpus` attribute: the corpus fingerprint and each split's n and fingerprint."""
    return {
        "fingerprint": corpus.fingerprint(),
        "splits": {
            name: {"n": len(rows.text), "fingerprint": rows.fingerprint()}
            for name, rows in corpus.splits.items()
        },
    }


def spec_for(corpus: LabeledCorpus, *, chunk_rows: int, shard_chunks: int) -> ClassStoreSpec:
    """The layout of a store over every split of `corpus`."""
    splits = tuple(ClassSplitSpec(name, len(rows.text)) for name, rows in corpus.splits.items())
    return ClassStoreSpec(splits, len(corpus.labels), chunk_rows, shard_chunks)


def build_class_store(
    path: str | Path,
    *,
    corpus: LabeledCorpus,
    logprobs: dict[str, np.ndarray],
    source_hash: dict[str, np.ndarray] | None = None,
    teacher: dict[str, Any],
    sources: dict[str, str],
    parallel_source: str | None,
    chunk_rows: int = 1024,
    shard_chunks: int = 4,
) -> dict[str, Any]:
    """Create, write whole and finalize a store in one call (tests and small tools; the stage
    builds resumably, shard by shard). `logprobs[split]` is (N, C) float32 in corpus order;
    `source_hash` defaults to each row's own text hash. Returns the attributes written."""
    spec = spec_for(corpus, chunk_rows=chunk_rows, shard_chunks=shard_chunks)
    attrs = store_attrs(corpus, teacher=teacher, sources=sources, parallel_source=parallel_source)
    create_store(path, spec, attrs)
    checksums: dict[str, str] = {}
    for split, shard in spec.all_shards():
        a, b = spec.shards(split)[shard]
        ident = row_identity(corpus, split)
        src = ident["text_hash"] if source_hash is None else source_hash[split]
        data = {
            "logprobs": np.ascontiguousarray(logprobs[split][a:b], dtype=np.float32),
            "lang": ident["lang"][a:b],
            "id": ident["id"][a:b],
            "text_hash": ident["text_hash"][a:b],
            "source_hash": np.asarray(src[a:b], dtype=np.uint64),
        }
        checksums.update(write_shard_arrays(path, spec, split, shard, data))
    finalize_store(path, checksums, ClassStoreSpec)
    return read_attrs(path)


def store_attrs(
    corpus: LabeledCorpus,
    *,
    teacher: dict[str, Any],
    sources: dict[str, str],
    parallel_source: str | None,
) -> dict[str, Any]:
    """The caller-supplied attributes of a classification store (provenance and label sources)."""
    return _canonical(
        {
            "teacher": teacher,
            "labels": list(corpus.labels),
            "languages": languages_of(corpus),
            "sources": dict(sources),
            "parallel_source": parallel_source,
            "corpus": corpus_attrs(corpus),
            "temperature": 1.0,
        }
    )


# -- reading -----------------------------------------------------------------------------------


def read_class_attrs(path: str | Path) -> dict[str, Any]:
    """A classification store's attributes; StoreError if it is missing or another kind."""
    path = Path(path)
    if not path.exists():
        raise StoreError(
            f"{path}: no such classification store (run `dvc repro classify_logits`, or "
            "`dvc pull` it)"
        )
    attrs = read_attrs(path)
    if not is_class_store(attrs):
        raise StoreError(
            f"{path}: not a classification store (it is a token-level LM logits store); pass "
            "the store classify_logits wrote"
        )
    return attrs


def check_class_store(path: str | Path, corpus: LabeledCorpus) -> dict[str, Any]:
    """Refuse a store a consumer must not train on; return its attributes when it is usable.

    Checked before any compute, in this order, each failure one StoreError naming the store, the
    field or row, and what to do: it is a classification store of a supported format; it is
    complete; its arrays have the shapes, dtypes, chunks and shards the attributes imply and
    every shard file's sha256 matches the recorded checksum (`check_integrity`: a damaged or
    truncated shard is named); the label set equals the corpus's (same names, same order); every split of
    the corpus is in the store with the same row count; and the row identities (lang, id,
    text_hash) equal the corpus's, row by row (the first differing row is named, with its
    language and id). The corpus fingerprint is compared last, as a summary.
    """
    path = Path(path)
    attrs = read_class_attrs(path)
    if not attrs.get("complete"):
        raise StoreError(
            f"{path}: store is not complete (classify_logits did not finish); re-run "
            "`dvc repro classify_logits` (it resumes)"
        )
    check_integrity(path, ClassStoreSpec.from_attrs(attrs), attrs, purpose="use")
    if list(attrs["labels"]) != list(corpus.labels):
        raise StoreError(
            f"{path}: labels differ: store {attrs['labels']}, corpus {list(corpus.labels)}; "
            "use a store made for this label set (re-run classify_logits)"
        )
    for split, rows in corpus.splits.items():
        if split not in attrs["splits"]:
            raise StoreError(
                f"{path}: split {split!r} is not in the store (splits: {list(attrs['splits'])}); "
                "re-run classify_logits on this corpus"
            )
        n = attrs["splits"][split]["n"]
        if n != len(rows.text):
            raise StoreError(
                f"{path}: split {split!r} has {n} rows in the store, {len(rows.text)} in the "
                "corpus; re-run classify_logits on this corpus"
            )
        _check_rows(path, attrs, corpus, split)
    if attrs["corpus"]["fingerprint"] != corpus.fingerprint():
        raise StoreError(
            f"{path}: corpus fingerprint differs: store {attrs['corpus']['fingerprint'][:12]}…, "
            f"corpus {corpus.fingerprint()[:12]}… (labels changed?); re-run classify_logits"
        )
    return attrs


def verify_class_store(path: str | Path, corpus: LabeledCorpus | None = None) -> list[str]:
    """The full audit behind `softlabels verify` for a classification store: one line per
    problem (empty when it is sound). Checks `complete`, every shard's checksum, every row's
    values (a distribution over the classes), and with `corpus` everything `check_class_store`
    checks. Decompresses the whole store, a chunk at a time."""
    path = Path(path)
    try:
        attrs = read_class_attrs(path)
        spec = ClassStoreSpec.from_attrs(attrs)
    except StoreError as e:
        return [str(e)]
    problems = [] if attrs.get("complete") else [f"{path}: store is not complete"]
    if len(attrs.get("labels", [])) != spec.num_classes:
        problems.append(
            f"{path}: {len(attrs.get('labels', []))} labels, {spec.num_classes} classes"
        )
    problems += integrity_problems(path, spec, attrs)
    if problems:
        return problems
    for split in spec.split_names():
        try:
            for _ in iter_class_chunks(path, split):
                pass
        except StoreError as e:
            problems.append(str(e))
    if corpus is not None and not problems:
        try:
            check_class_store(path, corpus)
        except StoreError as e:
            problems.append(str(e))
    return problems


def describe_class_store(path: str | Path) -> str:
    """Human-readable provenance, label sources and size of a classification store."""
    s = class_store_summary(path)
    t = s["teacher"]
    lines = [
        f"classification store {s['path']} ({'complete' if s['complete'] else 'INCOMPLETE'})",
        f"  teacher: {t.get('name')} @ {t.get('revision') or '-'} (sha256 "
        f"{str(t.get('sha256'))[:12]}…), {t.get('architecture')}",
        f"  labels ({len(s['labels'])}): {', '.join(s['labels'])}",
        f"  corpus fingerprint: {s['corpus_fingerprint'][:16]}…",
        f"  parallel source: {s['parallel_source'] or '-'}",
    ]
    by_source: dict[str, list[str]] = {}
    for lang, src in s["sources"].items():
        by_source.setdefault(src, []).append(lang)
    lines += [f"  {src}: {' '.join(langs)}" for src, langs in sorted(by_source.items())]
    lines += [f"  {name}: {v['n']} rows" for name, v in s["splits"].items()]
    per_row = s["bytes_per_row"]
    lines.append(
        f"  {s['bytes']:,} bytes on disk" + (f" ({per_row:.1f} B per row)" if per_row else "")
    )
    return "\n".join(printable(line) for line in lines)  # attribute strings: escaped


def _check_rows(path: Path, attrs: dict[str, Any], corpus: LabeledCorpus, split: str) -> None:
    """StoreError naming the first row whose (lang, id, text_hash) differs from the corpus's."""
    mine = row_identity(corpus, split)
    languages = list(attrs["languages"])
    ours = languages_of(corpus)
    rows = corpus.splits[split]
    for start, chunk in iter_chunks(open_split(path, split, ("lang", "id", "text_hash"))):
        stop = start + len(chunk["id"])
        lang_names = np.array(languages, dtype=object)[chunk["lang"].astype(np.int64)]
        our_names = np.array(ours, dtype=object)[mine["lang"][start:stop].astype(np.int64)]
        bad = (
            (lang_names != our_names)
            | (chunk["id"] != mine["id"][start:stop])
            | (chunk["text_hash"] != mine["text_hash"][start:stop])
        )
        if bad.any():
            i = int(np.argmax(bad))
            r = start + i
            what = (
                "text differs"
                if lang_names[i] == our_names[i] and chunk["id"][i] == mine["id"][start + i]
                else f"store has (lang={lang_names[i]}, id={int(chunk['id'][i])})"
            )
            raise StoreError(
                f"{path}: {split} row {r} (lang={rows.lang[r]}, id={int(rows.id[r])}): {what}; "
                "the corpus changed since classify_logits ran: re-run it"
            )


def iter_class_chunks(
    path: str | Path, split: str, start: int = 0, stop: int | None = None
) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Yield (first_row, {array: rows}) chunk by chunk over rows [start, stop) of `split`.

    Memory stays bounded by one chunk. Each chunk's `logprobs` are checked as they stream: all
    finite, all <= 0, and each row's probabilities summing to 1 (within 1e-3); a violation is a
    StoreError naming the split and row (the store was edited or damaged after its checksums).
    """
    for first, chunk in iter_chunks(open_split(path, split, CLASS_ARRAYS), start, stop):
        lp = chunk["logprobs"]  # (R, C)
        mass = np.exp(lp.astype(np.float64)).sum(axis=1)  # (R,)
        bad = ~np.isfinite(lp).all(axis=1) | (lp > 1e-6).any(axis=1) | (np.abs(mass - 1) > 1e-3)
        if bad.any():
            r = first + int(np.argmax(bad))
            raise StoreError(
                f"{path}: {split} row {r}: logprobs are not a distribution (NaN, positive or not "
                "summing to 1); the store is damaged: pull it again or re-run classify_logits"
            )
        yield first, chunk


def read_class_split(path: str | Path, split: str) -> dict[str, np.ndarray]:
    """Every array of `split`, whole (checked like `iter_class_chunks`)."""
    parts = [chunk for _, chunk in iter_class_chunks(path, split)]
    if not parts:
        return {
            name: np.zeros((0, *(() if name != "logprobs" else (0,))), CLASS_DTYPES[name])
            for name in CLASS_ARRAYS
        }
    return {name: np.concatenate([p[name] for p in parts]) for name in CLASS_ARRAYS}


def class_store_summary(path: str | Path) -> dict[str, Any]:
    """Plain-data summary for `softlabels inspect` (attributes and sizes; reads no data)."""
    path = Path(path)
    attrs = read_class_attrs(path)
    total = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    rows = sum(int(v["n"]) for v in attrs["splits"].values())
    return {
        "path": str(path),
        "task": TASK,
        "complete": bool(attrs.get("complete")),
        "teacher": attrs["teacher"],
        "labels": attrs["labels"],
        "sources": attrs["sources"],
        "parallel_source": attrs["parallel_source"],
        "splits": attrs["splits"],
        "corpus_fingerprint": attrs["corpus"]["fingerprint"],
        "bytes": total,
        "bytes_per_row": total / rows if rows else None,
    }
