"""The tokenized dataset: the `tokenize` stage's output, written and read here and nowhere else.

Contract (docs/tokenize.md): a `datasets.DatasetDict` saved with `save_to_disk`, splits `train`
and `validation` (`SPLITS`), one Arrow file per split, two columns:

- `input_ids` (`INPUT_IDS`): fixed-size list of int32, length seq_len: one packed row of ids;
- `lang` (`LANG`): string: the language of every token in the row.

A split's identity is `pipeline.core.provenance.ids_fingerprint` of its input ids (what a logits
store records and every consumer compares). Each split's `_fingerprint` is derived from its
content, so the same rows give the same bytes.

`write_tokenized` writes it (the tokenize stage). `load_tokenized` is the one reader, for every
consumer (teacher_logits, train_student, evaluate, `softlabels verify`): each split's input ids as
one (N, L) int32 numpy array, zero-copy over the memory-mapped Arrow file where the column is one
chunk (as written here), so a large split costs page cache, not process memory; the languages
are decoded only when asked for. Every problem is an InputError naming the folder (and split)
and what to do.

`datasets` and `pyarrow` are imported inside the functions on purpose: `pipeline.store.format`
imports `SPLITS` from here, and reading a store (`softlabels inspect`) should not pay for them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import InputError
from pipeline.core.provenance import ids_fingerprint

SPLITS = ("train", "validation")
"""The splits of a tokenized dataset (and of a logits store made from it), in this order."""
INPUT_IDS = "input_ids"
"""Column of packed token-id rows (fixed-size list of int32)."""
LANG = "lang"
"""Column of each row's language code (string)."""

_ADVICE = "run `dvc repro tokenize`, or pass the folder the tokenize stage wrote"


def features(seq_len: int) -> Any:
    """The `datasets.Features` of a split with rows of `seq_len` ids."""
    import datasets

    return datasets.Features(
        {
            INPUT_IDS: datasets.List(datasets.Value("int32"), length=seq_len),
            LANG: datasets.Value("string"),
        }
    )


def write_tokenized(splits: dict[str, tuple[np.ndarray, list[str]]], out: Path) -> dict[str, str]:
    """save_to_disk a DatasetDict of {split: ((N, L) int32 rows, N language codes)} with
    content-derived fingerprints, one Arrow file per split; returns {split: ids_fingerprint}."""
    import datasets
    import pyarrow as pa

    result: dict[str, datasets.Dataset] = {}
    fingerprints = {}
    for split, (rows, langs) in splits.items():
        seq_len = rows.shape[1]
        feats = features(seq_len)
        ids_col = pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), seq_len)
        table = pa.table({INPUT_IDS: ids_col, LANG: pa.array(langs, pa.string())})
        lang_digest = hashlib.sha256("\n".join(langs).encode()).hexdigest()
        fp = ids_fingerprint(rows)
        fingerprints[split] = fp
        fingerprint = hashlib.sha256(f"{fp}:{lang_digest}".encode()).hexdigest()[:16]
        result[split] = datasets.Dataset(
            table.cast(feats.arrow_schema),
            info=datasets.DatasetInfo(features=feats),
            split=datasets.NamedSplit(split),
            fingerprint=fingerprint,
        )
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        datasets.DatasetDict(result).save_to_disk(str(out), num_shards={s: 1 for s in result})
    finally:
        if was_enabled:
            datasets.enable_progress_bars()
    return fingerprints


@dataclass(frozen=True)
class TokenizedSplit:
    """One split: its rows (memory-mapped where possible) and, decoded on first use, languages."""

    input_ids: np.ndarray
    """(N, L) int32 token ids."""
    lang_column: Any = field(repr=False)
    """The `lang` column as a pyarrow ChunkedArray (decoded by the properties below)."""

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def seq_len(self) -> int:
        """Ids per row (L)."""
        return int(self.input_ids.shape[1])

    @cached_property
    def _encoded(self) -> tuple[np.ndarray, tuple[str, ...]]:
        import pyarrow as pa
        import pyarrow.compute as pc

        langs = pc.dictionary_encode(self.lang_column).combine_chunks()
        if not isinstance(langs, pa.DictionaryArray):  # pragma: no cover - pyarrow contract
            raise InputError(f"cannot read column '{LANG}'")
        codes = langs.indices.to_numpy(zero_copy_only=False).astype(np.int32)
        return codes, tuple(str(x) for x in langs.dictionary.to_pylist())

    @property
    def lang_codes(self) -> np.ndarray:
        """(N,) int32: each row's index into `languages`."""
        return self._encoded[0]

    @property
    def languages(self) -> tuple[str, ...]:
        """The distinct language codes, in order of first appearance."""
        return self._encoded[1]

    def langs(self) -> list[str]:
        """Each row's language code."""
        return self.lang_column.to_pylist()


@dataclass(frozen=True)
class TokenizedData:
    """A tokenized dataset as read by `load_tokenized`: {split: TokenizedSplit}."""

    path: Path
    splits: dict[str, TokenizedSplit]
    """The splits read, in `SPLITS` order."""

    def __getitem__(self, split: str) -> TokenizedSplit:
        return self.splits[split]

    def fingerprints(self) -> dict[str, str]:
        """{split: ids_fingerprint of its input ids} (what a logits store records)."""
        return {name: ids_fingerprint(s.input_ids) for name, s in self.splits.items()}


def load_tokenized(
    path: str | Path, splits: Sequence[str] = SPLITS, *, missing_ok: bool = False
) -> TokenizedData:
    """Read `splits` of the tokenized dataset in folder `path` (module docstring).

    A split the dataset lacks is an InputError, or, with `missing_ok`, left out of the result.
    """
    import datasets

    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path}: cannot load a tokenized dataset (no such folder); {_ADVICE}")
    try:
        dd = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as e:
        raise InputError(
            f"{path}: cannot load a tokenized dataset ({e}); {_ADVICE} (a DatasetDict saved "
            "with save_to_disk)"
        ) from e
    if not isinstance(dd, datasets.DatasetDict):
        raise InputError(
            f"{path}: a single Dataset, expected a DatasetDict with splits {', '.join(SPLITS)}; "
            f"{_ADVICE}"
        )
    out = {}
    for split in splits:
        if split not in dd:
            if missing_ok:
                continue
            raise InputError(
                f"{path}: split '{split}' is missing (found: {', '.join(sorted(dd)) or 'none'}); "
                "re-run `dvc repro tokenize`"
            )
        out[split] = _read_split(dd[split], f"{path}/{split}")
    return TokenizedData(path, out)


def _read_split(ds: Any, where: str) -> TokenizedSplit:
    for col in (INPUT_IDS, LANG):
        if col not in ds.column_names:
            raise InputError(f"{where}: column '{col}' is missing; re-run `dvc repro tokenize`")
    if ds._indices is not None:  # a selected/shuffled view: materialise the rows in order
        ds = ds.flatten_indices()
    table = ds.data.table
    return TokenizedSplit(_fixed_rows(table.column(INPUT_IDS), where), table.column(LANG))


def _fixed_rows(column: Any, where: str) -> np.ndarray:
    """(N, L) int32 from a list column (zero-copy for one chunk of a fixed-size list)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    parts = []
    width = None
    for chunk in column.chunks:
        if pa.types.is_fixed_size_list(chunk.type):
            n, w = len(chunk), chunk.type.list_size
        elif pa.types.is_list(chunk.type) or pa.types.is_large_list(chunk.type):
            lengths = pc.list_value_length(chunk).to_numpy(zero_copy_only=False)
            if len(lengths) and (lengths != lengths[0]).any():
                raise InputError(f"{where}: {INPUT_IDS} rows have different lengths")
            n, w = len(chunk), int(lengths[0]) if len(lengths) else 0
        else:
            raise InputError(f"{where}: {INPUT_IDS} must be a list of int32, got {chunk.type}")
        if width is not None and w != width and n:
            raise InputError(f"{where}: {INPUT_IDS} rows have different lengths")
        width = w if n else width
        values = chunk.flatten()  # respects slicing offsets
        if values.null_count:
            raise InputError(f"{where}: {INPUT_IDS} contains nulls")
        arr = values.to_numpy(zero_copy_only=False)
        parts.append(arr.reshape(n, w) if n else arr.reshape(0, w or 0))
    if not parts:
        return np.zeros((0, width or 0), np.int32)
    rows = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return rows if rows.dtype == np.int32 else rows.astype(np.int32)
