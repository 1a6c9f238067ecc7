"""The logits store: sparse teacher soft labels in a sharded Zarr v3 group (see docs/logits-store.md).

Layout: one group per split (`train`, `validation`), each with arrays indexed by sequence. Format 1
(read, and written for tests and `convert`'s source): `input_ids` (N, L) int32, `ids` (N, L, k)
int32, `logprobs` (N, L, k) float16 and `tail` (N, L) float16. Format 2 (written by this release):
the same for `topk` with ids as narrow as the vocabulary allows; for `sample`, distinct ids +
counts + `entropy` (`pipeline.store.labels`: `id_deltas`, `extra_draws`), `logprobs` and `tail`
only on request. The
arrays of a store follow from its `StoreSpec` and are recorded in its `dtypes` attribute. Every
array is chunked by whole sequences along axis 0 (`chunk_sequences` rows, full L
and k) so a reader streams whole sequences, and `shard_chunks` consecutive chunks are packed into
one file by the `sharding_indexed` codec, so a store is hundreds of files rather than hundreds of
thousands and DVC push/pull stays fast. Trade-off: a shard is the unit of writing; it is always
written whole, by exactly one writer, and rewriting any row rewrites its whole shard file.

Compression (lossless; chosen by measuring zstd against blosc-zstd with byte shuffle on synthetic
teacher distributions, V=32000, k=32, and for format 2 on the default run; numbers in
docs/logits-store.md): a format-2 sample store's `input_ids` use zstd level 12, its `extra_draws`
blosc-zstd level 7 with bit shuffle on k-major chunks (a `transpose` codec); float16 arrays use
blosc-zstd level 5 with byte shuffle (grouping the exponent bytes makes log-probabilities up to a
quarter smaller than plain zstd). For int32 arrays the winner depends on `method`: distinct top-k
ids compress best byte-shuffled (blosc-zstd 5, 6-9% smaller than zstd 9 or 3), while sampled ids, which
repeat within a position, compress best unshuffled (zstd 9, ~16% smaller than blosc), because
shuffling breaks the repeated 4-byte patterns that zstd's matcher finds. Each chunk is compressed
by one thread (numcodecs zstd never spawns workers; blosc's internal threads are off), and the
sharding codec lays chunks out in a fixed (Morton) order, so the same data written with the same
library versions always yields the same bytes, whatever the order or process shards are written in.

Integrity: `write_shard` returns the sha256 of every shard file it wrote; `finalize_store`
re-hashes them, records them in the group attributes and sets `complete`; `verify_store` (in
`pipeline.store.verify`) checks them and the data against the attributes.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numcodecs.blosc
import numpy as np
import zarr
import zarr.errors
from zarr.codecs import BloscCodec, TransposeCodec, ZstdCodec

from pipeline import __version__
from pipeline.core.errors import StoreError
from pipeline.core.provenance import sha256_file
from pipeline.data.tokenized import SPLITS  # an LM store's splits are the tokenized data's
from pipeline.store.labels import SAMPLE_ARRAYS_V2, count_dtype, encode_draws, narrow

# Determinism: blosc compresses in the calling thread only (zarr sets this too; we rely on it).
numcodecs.blosc.use_threads = False

FORMAT_VERSION: int = 2
"""Version written by this release: format 2 (docs/logits-store.md), the compact encoding of
`pipeline.store.labels`."""

READABLE_VERSIONS: tuple[int, ...] = (1, 2)
"""Versions this release reads; any other is refused with what to do."""

ARRAYS = ("input_ids", "ids", "logprobs", "tail")
"""The arrays of a format-1 split (and of a format-2 topk split), in the fixed order used for
listings and checksum keys."""

Method = Literal["topk", "sample"]
"""How `ids` were chosen: the k most probable ids, or k draws with replacement."""

METHODS: tuple[str, ...] = get_args(Method)
"""The values of `Method`, in order."""

Sampling = Literal["systematic", "iid"]
"""How a sample store's k draws per position were placed on the teacher's CDF: one uniform
spread over k evenly spaced points, or k independent uniforms (attribute `sampling`)."""

SAMPLINGS: tuple[str, ...] = get_args(Sampling)
"""The values of `Sampling`, in order (the first is teacher_logits' default)."""

LEGACY_SAMPLING = "iid"
"""What a sample store without a `sampling` attribute used (every store before it existed)."""


def sampling_of(attrs: dict[str, Any]) -> str | None:
    """A store's `sampling` (None for top-k stores; `LEGACY_SAMPLING` where unrecorded)."""
    if attrs.get("method") != "sample":
        return None
    return attrs.get("sampling", LEGACY_SAMPLING)


ATTRS_KEY = "softlabels"
"""Key of the store's attributes inside the group's zarr.json `attributes`."""

DTYPES: dict[str, str] = {
    "input_ids": "int32",
    "ids": "int32",
    "logprobs": "float16",
    "tail": "float16",
}
"""The dtype of each array of a format-1 store (recorded in the attributes as `dtypes`)."""

DIMENSIONS: dict[str, tuple[str, ...]] = {
    "input_ids": ("sequence", "position"),
    "ids": ("sequence", "position", "candidate"),
    "id_deltas": ("sequence", "position", "candidate"),
    "extra_draws": ("sequence", "position", "candidate"),
    "logprobs": ("sequence", "position", "candidate"),
    "tail": ("sequence", "position"),
    "entropy": ("sequence", "position"),
}
"""Dimension names recorded in each array's metadata (every format)."""

PER_CANDIDATE = ("ids", "id_deltas", "extra_draws", "logprobs")
"""Arrays with a candidate axis, (N, L, k); the others are (N, L)."""

REQUIRED_ATTRS: dict[str, tuple[str, ...]] = {
    "teacher": ("name", "revision", "sha256", "architecture", "vocab_size"),
    "tokenizer": ("sha256", "vocab_size", "eos_id"),
    "dataset": ("splits",),
    "method": (),
    "seed": (),
    "temperature": (),
}
"""Keys the caller of `create_store` must supply (top-level key -> required sub-keys)."""


class ShardedLayout:
    """What every store kind shares: rows along axis 0, grouped into chunks and shard files.

    A store kind (the LM `StoreSpec` below, `pipeline.classify.store.ClassStoreSpec`) is a frozen
    dataclass deriving from this, with `splits` (objects with `name` and `n`), `shard_chunks`, the
    class attributes `ARRAYS`, `DTYPES`, `DIMENSIONS` and the methods `rows_per_chunk`,
    `array_shape`, `compressors`, `check_attrs`, `layout_attrs` and `from_attrs`. Everything
    else (creating, writing shards, checksums, finalizing, opening, iterating) is written once,
    in this module, for every kind.
    """

    ARRAYS: tuple[str, ...] = ()
    DTYPES: dict[str, str] = {}
    DIMENSIONS: dict[str, tuple[str, ...]] = {}
    splits: tuple[Any, ...]
    shard_chunks: int

    def rows_per_chunk(self) -> int:  # pragma: no cover - every kind overrides it
        raise NotImplementedError

    def array_shape(self, split: str, array: str) -> tuple[int, ...]:  # pragma: no cover
        raise NotImplementedError

    def compressors(self, array: str, attrs: dict[str, Any]) -> list[Any]:  # pragma: no cover
        raise NotImplementedError

    def filters(self, array: str) -> list[Any]:
        """Array-to-array codecs applied to each chunk before its compressors (none unless a
        kind says otherwise)."""
        return []

    def check_attrs(self, attrs: dict[str, Any]) -> None:  # pragma: no cover
        raise NotImplementedError

    def layout_attrs(self) -> dict[str, Any]:  # pragma: no cover
        raise NotImplementedError

    def split(self, name: str) -> Any:
        """The split called `name`; ValueError naming the known splits if there is none."""
        for s in self.splits:
            if s.name == name:
                return s
        raise ValueError(f"split {name!r} is not in this store (splits: {self.split_names()})")

    def split_names(self) -> list[str]:
        return [s.name for s in self.splits]

    def shard_rows(self) -> int:
        """Rows per shard: rows_per_chunk() * shard_chunks."""
        return self.rows_per_chunk() * self.shard_chunks

    def shards(self, split: str) -> list[tuple[int, int]]:
        """[start, stop) row ranges of `split`, one per shard, in order; the last may be short."""
        n, step = self.split(split).n, self.shard_rows()
        return [(start, min(start + step, n)) for start in range(0, n, step)]

    def all_shards(self) -> list[tuple[str, int]]:
        """Every (split, shard_index) of the store, splits in their canonical order."""
        return [(s.name, i) for s in self.splits for i in range(len(self.shards(s.name)))]


@dataclass(frozen=True)
class SplitSpec:
    """One split of a store: `n` sequences of `seq_len` tokens."""

    name: str
    """"train" or "validation"."""
    n: int
    """Number of sequences (rows)."""
    seq_len: int
    """Tokens per sequence (L)."""

    def __post_init__(self) -> None:
        if self.name not in SPLITS:
            raise ValueError(f"SplitSpec.name: must be one of {SPLITS}, got {self.name!r}")
        if self.n < 0 or self.seq_len < 1:
            raise ValueError(
                f"SplitSpec({self.name}): need n >= 0 and seq_len >= 1, got n={self.n}, "
                f"seq_len={self.seq_len}"
            )


@dataclass(frozen=True)
class StoreSpec(ShardedLayout):
    """Shape and encoding of a whole LM store: its splits, k, chunking, format and array dtypes.

    `splits` is kept in the canonical order (train, then validation) whatever order it is given in,
    so two specs describing the same store compare equal. The arrays follow from `format_version`,
    `method` and `logprobs` (`ARRAYS`, `DTYPES`): format 1 stores `input_ids`, `ids`, `logprobs`,
    `tail` at 32/16 bits; format 2 narrows the ids to `id_dtype`/`input_dtype` and encodes a sample
    store as distinct ids + counts + `entropy` (`pipeline.store.labels`), with `logprobs` and
    `tail` only when `logprobs` is true.
    """

    splits: tuple[SplitSpec, ...]
    """The splits, at most one per name."""
    k: int
    """Stored ids per position: top-k ids, or sample draws (format 2: the width of the padded
    distinct ids, and the sum of each position's counts)."""
    chunk_sequences: int
    """Sequences per chunk (the unit a reader decompresses)."""
    shard_chunks: int
    """Chunks per shard file (the unit of writing and of checksums)."""
    method: str = "topk"
    """How the ids were chosen (`METHODS`)."""
    format_version: int = FORMAT_VERSION
    """1 or 2 (`READABLE_VERSIONS`); writers use `FORMAT_VERSION`."""
    id_dtype: str = "int32"
    """dtype of `ids`: int32 in format 1; `labels.id_dtype(teacher vocab)` in format 2."""
    input_dtype: str = "int32"
    """dtype of `input_ids`: int32 in format 1; `labels.id_dtype(tokenizer vocab)` in format 2."""
    logprobs: bool = True
    """Whether `logprobs` and `tail` are stored (always, but for format-2 sample stores)."""

    def __post_init__(self) -> None:
        splits = tuple(sorted(self.splits, key=lambda s: SPLITS.index(s.name)))
        names = [s.name for s in splits]
        if not splits or len(set(names)) != len(names):
            raise ValueError(f"StoreSpec.splits: need 1-2 distinct splits, got {names}")
        for key in ("k", "chunk_sequences", "shard_chunks"):
            if getattr(self, key) < 1:
                raise ValueError(f"StoreSpec.{key}: must be >= 1, got {getattr(self, key)}")
        if self.method not in METHODS:
            raise ValueError(f"StoreSpec.method: must be one of {METHODS}, got {self.method!r}")
        if self.format_version not in READABLE_VERSIONS:
            raise ValueError(
                f"StoreSpec.format_version: must be one of {READABLE_VERSIONS}, "
                f"got {self.format_version!r}"
            )
        for key in ("id_dtype", "input_dtype"):
            allowed = ("int32",) if self.format_version == 1 else ("uint16", "int32")
            if getattr(self, key) not in allowed:
                raise ValueError(
                    f"StoreSpec.{key}: format {self.format_version} allows {allowed}, got "
                    f"{getattr(self, key)!r}"
                )
        if not self.logprobs and not self.compact:
            raise ValueError(
                "StoreSpec.logprobs: only format-2 sample stores may leave out logprobs"
            )
        object.__setattr__(self, "splits", splits)

    @property
    def compact(self) -> bool:
        """Whether sample draws are stored as distinct ids + counts (format 2, `sample`)."""
        return self.format_version >= 2 and self.method == "sample"

    @property
    def ARRAYS(self) -> tuple[str, ...]:  # type: ignore[override]  # noqa: N802
        if not self.compact:
            return ARRAYS
        return tuple(a for a in SAMPLE_ARRAYS_V2 if self.logprobs or a not in ("logprobs", "tail"))

    @property
    def DTYPES(self) -> dict[str, str]:  # type: ignore[override]  # noqa: N802
        kinds = {
            "input_ids": self.input_dtype,
            "ids": self.id_dtype,
            "id_deltas": self.id_dtype,
            "extra_draws": count_dtype(self.k),
            "logprobs": "float16",
            "tail": "float16",
            "entropy": "float16",
        }
        return {a: kinds[a] for a in self.ARRAYS}

    DIMENSIONS = DIMENSIONS

    def rows_per_chunk(self) -> int:
        return self.chunk_sequences

    def shard_sequences(self) -> int:
        """Sequences per shard: chunk_sequences * shard_chunks."""
        return self.shard_rows()

    def array_shape(self, split: str, array: str) -> tuple[int, ...]:
        """Shape of `array` in `split`: (N, L) or (N, L, k)."""
        s = self.split(split)
        return (s.n, s.seq_len, self.k) if array in PER_CANDIDATE else (s.n, s.seq_len)

    def compressors(self, array: str, attrs: dict[str, Any]) -> list[Any]:
        return _compressors(self.DTYPES[array], self.method, self.compact, array)

    def filters(self, array: str) -> list[Any]:
        return _filters(self.compact, array)

    def check_attrs(self, attrs: dict[str, Any]) -> None:
        _check_attrs(self, attrs)

    def layout_attrs(self) -> dict[str, Any]:
        return layout_attrs(self)

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> StoreSpec:
        """The spec recorded in a store's attributes (see `read_attrs`)."""
        try:
            splits = tuple(
                SplitSpec(name, int(v["n"]), int(v["seq_len"]))
                for name, v in attrs["splits"].items()
            )
            version = int(attrs.get("format_version", FORMAT_VERSION))
            dtypes = attrs.get("dtypes", DTYPES) if version >= 2 else DTYPES
            return cls(
                splits,
                int(attrs["k"]),
                int(attrs["chunk_sequences"]),
                int(attrs["shard_chunks"]),
                method=attrs.get("method"),
                format_version=version,
                id_dtype=dtypes["ids"] if "ids" in dtypes else dtypes["id_deltas"],
                input_dtype=dtypes["input_ids"],
                logprobs="logprobs" in dtypes,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise StoreError(f"store attributes do not describe a valid layout: {e!r}") from e


def shard_key(split: str, array: str, shard: int) -> str:
    """Checksum key of one shard file: "<split>/<array>/<shard>"."""
    return f"{split}/{array}/{shard}"


def _natural(key: str) -> tuple[Any, ...]:
    """Sort key that orders "train/ids/10" after "train/ids/2"."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key))


def _canonical(value: Any) -> Any:
    """Deep copy of JSON data with every mapping's keys in natural order (stable bytes)."""
    if isinstance(value, dict):
        return {k: _canonical(value[k]) for k in sorted(value, key=lambda k: _natural(str(k)))}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return value


def _compressors(dtype: str, method: str, compact: bool = False, array: str = "") -> list[Any]:
    """Lossless compressor per array, dtype and method, chosen by measurement (module
    docstring): byte-shuffled blosc-zstd for floats, top-k ids and the gaps of a format-2
    sample store; bit-shuffled blosc-zstd for a format-2 sample store's counts (k-major, see
    `_filters`); plain zstd for repeating integers (format-1 draws, input ids)."""
    size = np.dtype(dtype).itemsize
    if compact and array == "extra_draws":
        return [BloscCodec(cname="zstd", clevel=7, shuffle="bitshuffle", typesize=size)]
    if dtype == "float16" or method == "topk" or array == "id_deltas":
        return [BloscCodec(cname="zstd", clevel=5, shuffle="shuffle", typesize=size)]
    return [ZstdCodec(level=COMPACT_ZSTD_LEVEL if compact else 9)]


def _filters(compact: bool, array: str) -> list[Any]:
    """A format-2 sample store's `extra_draws` is stored k-major (each chunk transposed to
    (k, rows, L), a standard Zarr v3 codec): slot j of every position side by side, so the
    high slots, nearly all padding zeros, form long runs; with blosc-zstd 7 and bit shuffle
    that is 6-13% smaller than zstd 12 on position-major counts and 2.5 times cheaper to write
    (docs)."""
    return [TransposeCodec(order=(2, 0, 1))] if compact and array == "extra_draws" else []


def codec_chains(spec: ShardedLayout) -> dict[str, list[dict[str, Any]]]:
    """Each array's codecs (filters, then compressors) as Zarr metadata: what its chunks'
    bytes depend on besides the data (part of `teacher_logits`' resume key)."""
    return {
        a: [c.to_dict() for c in (*spec.filters(a), *spec.compressors(a, {}))] for a in spec.ARRAYS
    }


def _fill_value(dtype: str) -> Any:
    """Never-valid fill value, so unwritten rows read as obviously invalid (-1 ids, NaN floats,
    the largest value of an unsigned type)."""
    if dtype.startswith("float"):
        return float("nan")
    return int(np.iinfo(dtype).max) if dtype.startswith("uint") else -1


COMPACT_ZSTD_LEVEL = 12
"""zstd level of a format-2 sample store's `input_ids` (its chunks are small: ~1 ms each)."""


def _check_attrs(spec: StoreSpec, attrs: dict[str, Any]) -> None:
    for key, subkeys in REQUIRED_ATTRS.items():
        if key not in attrs:
            raise ValueError(f"create_store: attrs lacks required key '{key}'")
        for sub in subkeys:
            if not isinstance(attrs[key], dict) or sub not in attrs[key]:
                raise ValueError(f"create_store: attrs lacks required key '{key}.{sub}'")
    if attrs["method"] not in METHODS:
        raise ValueError(
            f"create_store: attrs.method must be one of {METHODS}, got {attrs['method']!r}"
        )
    if attrs["method"] != spec.method:
        raise ValueError(
            f"create_store: attrs.method {attrs['method']!r} differs from the spec's "
            f"{spec.method!r}"
        )
    dsplits = attrs["dataset"]["splits"]
    for s in spec.splits:
        d = dsplits.get(s.name) if isinstance(dsplits, dict) else None
        if not d or "fingerprint" not in d:
            raise ValueError(f"create_store: attrs lacks 'dataset.splits.{s.name}.fingerprint'")
        if (d.get("n"), d.get("seq_len")) != (s.n, s.seq_len):
            raise ValueError(
                f"create_store: attrs dataset.splits.{s.name} has n={d.get('n')}, "
                f"seq_len={d.get('seq_len')} but the spec says n={s.n}, seq_len={s.seq_len}"
            )


def layout_attrs(spec: StoreSpec) -> dict[str, Any]:
    """The attributes `create_store` derives from the spec (everything but the caller's)."""
    out = {
        "format_version": spec.format_version,
        "k": spec.k,
        "chunk_sequences": spec.chunk_sequences,
        "shard_chunks": spec.shard_chunks,
        "dtypes": dict(spec.DTYPES),
        "splits": {s.name: {"n": s.n, "seq_len": s.seq_len} for s in spec.splits},
        "shards": {},
        "complete": False,
        "softlabels_version": __version__,
    }
    if spec.format_version >= 2:
        out["encoding"] = encoding_attrs(spec)
    return out


def encoding_attrs(spec: StoreSpec) -> dict[str, Any]:
    """The format-2 encoding choices, recorded in the attributes as `encoding` (docs)."""
    filters = {a: [c.to_dict()["name"] for c in spec.filters(a)] for a in spec.ARRAYS}
    return {
        "ids": "distinct_deltas_counts" if spec.compact else "topk",
        "logprobs": spec.logprobs,
        "id_bits": np.dtype(spec.id_dtype).itemsize * 8,
        "compressors": {
            a: [c.to_dict()["name"] for c in spec.compressors(a, {})] for a in spec.ARRAYS
        },
        "filters": {a: names for a, names in filters.items() if names},  # arrays that have any
    }


def create_store(
    path: str | Path, spec: ShardedLayout, attrs: dict[str, Any], *, overwrite: bool = False
) -> None:
    """Create the group and every (empty) array, with attributes["softlabels"] = attrs + layout.

    `attrs` carries the provenance (teacher, tokenizer, dataset, method, seed, temperature; see
    REQUIRED_ATTRS for an LM store; each kind's `check_attrs` says). Keys are written in sorted order and nothing time-dependent is recorded, so
    the same inputs give the same zarr.json bytes. An existing non-empty `path` is refused unless
    `overwrite` (then it is deleted first).
    """
    path = Path(path)
    spec.check_attrs(attrs)
    derived = spec.layout_attrs()
    for key in derived:
        if key in attrs and attrs[key] != derived[key]:
            raise ValueError(
                f"create_store: attrs.{key}={attrs[key]!r} conflicts with the spec ({derived[key]!r})"
            )
    if path.exists() and (path.is_file() or any(path.iterdir())):
        if not overwrite:
            raise StoreError(f"{path}: already exists; remove it or pass overwrite=True")
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    full = _canonical({**attrs, **derived})
    group = zarr.open_group(path, mode="w", attributes={ATTRS_KEY: full}, zarr_format=3)
    for s in spec.splits:
        sub = group.create_group(s.name)
        for name in spec.ARRAYS:
            shape = spec.array_shape(s.name, name)
            sub.create_array(
                name,
                shape=shape,
                dtype=spec.DTYPES[name],
                chunks=(spec.rows_per_chunk(), *shape[1:]),
                shards=(spec.shard_rows(), *shape[1:]),
                filters=spec.filters(name),
                compressors=spec.compressors(name, attrs),
                fill_value=_fill_value(spec.DTYPES[name]),
                chunk_key_encoding={"name": "default", "separator": "/"},
                dimension_names=spec.DIMENSIONS[name],
            )


def read_attrs(path: str | Path) -> dict[str, Any]:
    """The store's "softlabels" attributes; StoreError if missing, not a store, or another version."""
    attrs = read_attrs_any_version(path)
    version = attrs.get("format_version")
    if version not in READABLE_VERSIONS:
        raise StoreError(
            f"{path}: format_version {version!r} is not supported (softlabels {__version__} reads "
            f"format_version {' and '.join(map(str, READABLE_VERSIONS))}); use a matching "
            "softlabels release or re-run teacher_logits with this one"
        )
    return attrs


def read_attrs_any_version(path: str | Path) -> dict[str, Any]:
    """Like `read_attrs` but without the format_version check (for `verify` and `inspect`)."""
    path = Path(path)
    if not path.exists():
        raise StoreError(
            f"{path}: no such logits store (run `dvc repro teacher_logits`, or `dvc pull` it)"
        )
    try:
        group = zarr.open_group(path, mode="r")
    except (OSError, zarr.errors.BaseZarrError, ValueError) as e:
        raise StoreError(f"{path}: not a Zarr group ({e}); expected a logits store folder") from e
    attrs = group.attrs.asdict().get(ATTRS_KEY)
    if group.metadata.zarr_format != 3 or not isinstance(attrs, dict):
        raise StoreError(
            f"{path}: not a softlabels logits store (its zarr.json has no '{ATTRS_KEY}' attributes)"
        )
    return attrs


def shard_files(
    path: str | Path, split: str, shard: int, arrays: tuple[str, ...] = ARRAYS
) -> dict[str, Path]:
    """{"<split>/<array>/<shard>": path of that array's shard file} for each of `arrays` (the
    LM store's four by default; another kind passes its spec's `ARRAYS`)."""
    group = zarr.open_group(Path(path), mode="r")
    files = {}
    for name in arrays:
        arr = group[f"{split}/{name}"]
        key = arr.metadata.encode_chunk_key((shard,) + (0,) * (arr.ndim - 1))
        files[shard_key(split, name, shard)] = Path(path) / split / name / key
    return files


def shard_checksums(
    path: str | Path, spec: ShardedLayout, split: str, shard: int
) -> dict[str, str]:
    """sha256 of each array's file for one shard, read from disk; StoreError if one is missing."""
    _shard_range(spec, split, shard)
    out = {}
    for key, file in shard_files(path, split, shard, spec.ARRAYS).items():
        if not file.is_file():
            raise StoreError(
                f"{file}: shard file missing ({key} was never written); re-run teacher_logits "
                "(it resumes from the last finished shard)"
            )
        out[key] = sha256_file(file)
    return out


def _shard_range(spec: ShardedLayout, split: str, shard: int) -> tuple[int, int]:
    ranges = spec.shards(split)
    if not 0 <= shard < len(ranges):
        raise ValueError(f"shard {shard} out of range: split '{split}' has {len(ranges)} shards")
    return ranges[shard]


def write_shard(
    path: str | Path,
    spec: StoreSpec,
    split: str,
    shard: int,
    input_ids: np.ndarray,
    ids: np.ndarray,
    logprobs: np.ndarray,
    tail: np.ndarray,
    entropy: np.ndarray | None = None,
) -> dict[str, str]:
    """Write one whole shard of an LM store from what the teacher pass produces, encoded as
    `spec` says (see `write_shard_arrays`): input_ids (n, L) int, ids (n, L, k) int (top-k ids
    or raw draws), logprobs (n, L, k) float16, tail (n, L) float16 and, for a format-2 sample
    store, entropy (n, L) (the teacher's entropy in nats). Encoding to distinct ids + counts and
    narrowing ids to the spec's dtypes (checked, never wrapped) happen here, in the caller's
    (writer) thread."""
    data = {"input_ids": input_ids, "ids": ids, "logprobs": logprobs, "tail": tail}
    if spec.compact:
        if entropy is None:
            raise ValueError(f"write_shard({split}, shard {shard}): a sample store needs entropy")
        data.update(
            encode_draws(
                ids,
                logprobs if spec.logprobs else None,
                ids_as=spec.id_dtype,
                counts_as=spec.DTYPES["extra_draws"],
            )
        )
        data["entropy"] = np.asarray(entropy, np.float16)
        data = {name: data[name] for name in spec.ARRAYS}
    elif entropy is not None:
        raise ValueError(f"write_shard({split}, shard {shard}): this store keeps no entropy")
    for name, kind in (("input_ids", spec.input_dtype), ("ids", spec.id_dtype)):
        if name in data and np.issubdtype(data[name].dtype, np.integer):
            data[name] = narrow(data[name], kind, f"write_shard({split}, shard {shard}): {name}")
    return write_shard_arrays(path, spec, split, shard, data)


def write_shard_arrays(
    path: str | Path,
    spec: ShardedLayout,
    split: str,
    shard: int,
    data: dict[str, np.ndarray],
) -> dict[str, str]:
    """Write one whole shard of every array; return {"<split>/<array>/<shard>": sha256}.

    `data` holds exactly that shard's rows of each of `spec.ARRAYS`, with the shapes and dtypes
    of the spec (ValueError naming the array otherwise; no silent casts). Only this shard's files
    are touched (no metadata is rewritten), and each file appears atomically (zarr writes a
    temporary file and renames it), so several processes may write different shards at once,
    and a shard left over from a crashed run is simply replaced.
    """
    path = Path(path)
    start, stop = _shard_range(spec, split, shard)
    if set(data) != set(spec.ARRAYS):
        raise ValueError(
            f"write_shard({split}, shard {shard}): got arrays {sorted(data)}, expected "
            f"{sorted(spec.ARRAYS)}"
        )
    for name in spec.ARRAYS:
        arr = data[name]
        shape = (stop - start, *spec.array_shape(split, name)[1:])
        if not isinstance(arr, np.ndarray):
            raise ValueError(f"write_shard({split}, shard {shard}): {name} must be a numpy array")
        if arr.shape != shape:
            raise ValueError(
                f"write_shard({split}, shard {shard}): {name} has shape {arr.shape}, expected "
                f"{shape} (rows {start}:{stop})"
            )
        if arr.dtype != np.dtype(spec.DTYPES[name]):
            raise ValueError(
                f"write_shard({split}, shard {shard}): {name} has dtype {arr.dtype}, expected "
                f"{spec.DTYPES[name]}"
            )
    stored = type(spec).from_attrs(read_attrs(path))
    if stored != spec:
        raise StoreError(f"{path}: the store was created with {stored}, not {spec}")
    group = zarr.open_group(path, mode="r+")
    for key, file in shard_files(path, split, shard, spec.ARRAYS).items():
        # Start from nothing: zarr would otherwise merge into an existing shard file.
        file.unlink(missing_ok=True)
        for stale in file.parent.glob(f"{file.name}.*.partial"):  # left by a killed writer
            stale.unlink(missing_ok=True)
        name = key.split("/")[1]
        arr = group[f"{split}/{name}"].with_config({"write_empty_chunks": True})
        arr[start:stop] = data[name]
    return shard_checksums(path, spec, split, shard)


def expected_keys(spec: ShardedLayout) -> list[str]:
    """Every shard checksum key of a store, in canonical order."""
    return [shard_key(sp, a, i) for sp, i in spec.all_shards() for a in spec.ARRAYS]


def finalize_store(
    path: str | Path, checksums: dict[str, str], spec_type: type[ShardedLayout] = StoreSpec
) -> None:
    """Record every shard's checksum and set complete=True, after checking them against disk.

    `checksums` must have exactly one entry per shard file of the store (as returned by
    `write_shard`); each file is hashed again, so `complete` is only ever set on a store whose
    every shard is present and matches what its writer reported. StoreError lists what is wrong.
    """
    path = Path(path)
    attrs = read_attrs(path)
    spec = spec_type.from_attrs(attrs)
    expected = expected_keys(spec)
    problems = [
        f"{k}: no checksum given (shard not written?)" for k in expected if k not in checksums
    ]
    problems += [f"{k}: not a shard of this store" for k in checksums if k not in set(expected)]
    if not problems:
        for split, shard in spec.all_shards():
            try:
                on_disk = shard_checksums(path, spec, split, shard)
            except StoreError as e:
                problems.append(str(e))
                continue
            problems += [
                f"{k}: sha256 on disk {v[:12]}… differs from the writer's {checksums[k][:12]}…"
                for k, v in on_disk.items()
                if v != checksums[k]
            ]
    if problems:
        raise StoreError(f"{path}: cannot mark complete:\n  " + "\n  ".join(problems))
    new = _canonical({**attrs, "shards": {k: checksums[k] for k in expected}, "complete": True})
    zarr.open_group(path, mode="r+").update_attributes({ATTRS_KEY: new})


def open_split(
    path: str | Path, split: str, arrays: tuple[str, ...] | None = None
) -> dict[str, zarr.Array]:
    """The arrays of `split` (by default every array of an LM store, as its format has them),
    opened read-only (index them by whole chunks for speed)."""
    attrs = read_attrs(path)
    if split not in attrs.get("splits", {}):
        raise StoreError(f"{path}: no split '{split}' (splits: {sorted(attrs.get('splits', {}))})")
    if arrays is None:
        arrays = StoreSpec.from_attrs(attrs).ARRAYS
    group = zarr.open_group(Path(path), mode="r")
    return {name: group[f"{split}/{name}"] for name in arrays}


def iter_chunks(
    arrays: dict[str, zarr.Array], start: int = 0, stop: int | None = None
) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Yield (first_row, {array: rows}) one chunk at a time over rows [start, stop).

    Memory stays bounded by one chunk of each array; `start` should be chunk-aligned for speed.
    """
    first = next(iter(arrays.values()))
    n, step = first.shape[0], first.chunks[0]
    stop = n if stop is None else min(stop, n)
    a = start
    while a < stop:
        b = min((a // step + 1) * step, stop)
        yield a, {name: np.asarray(arr[a:b]) for name, arr in arrays.items()}
        a = b


def entries(spec: StoreSpec) -> int:
    """Number of stored (id, logprob) pairs: sum over splits of N * L * k."""
    return sum(s.n * s.seq_len * spec.k for s in spec.splits)


def raw_bytes_per_sequence(spec: StoreSpec, seq_len: int) -> int:
    """Uncompressed bytes of one sequence over every array of the store (format 1: L*k*(4+2) +
    L*(4+2))."""
    return sum(
        np.dtype(dtype).itemsize * seq_len * (spec.k if name in PER_CANDIDATE else 1)
        for name, dtype in spec.DTYPES.items()
    )
