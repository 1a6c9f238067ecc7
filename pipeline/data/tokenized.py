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
from pipeline.core.provenance import IdsHasher, ids_fingerprint

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
    """Write a DatasetDict of {split: ((N, L) int32 rows, N language codes)} held in memory
    (tests, benchmarks); returns {split: ids_fingerprint}. The same bytes as `SplitWriter`."""
    import pyarrow as pa

    fingerprints = {}
    for split, (rows, langs) in splits.items():
        lang_bytes = sum(len(lang.encode()) for lang in langs)
        with SplitWriter(out, split, len(rows), rows.shape[1], lang_bytes) as writer:
            writer.write(rows, pa.array(langs, pa.string()))
        fingerprints[split] = writer.fingerprint
    write_dataset_dict(out, list(splits))
    return fingerprints


def write_dataset_dict(out: Path, splits: Sequence[str]) -> None:
    """The DatasetDict's `dataset_dict.json` (what `load_from_disk` looks for), as
    `DatasetDict.save_to_disk` writes it."""
    import json

    Path(out).mkdir(parents=True, exist_ok=True)
    with open(Path(out) / "dataset_dict.json", "w", encoding="utf-8") as f:
        json.dump({"splits": list(splits)}, f)


class SplitWriter:
    """Writes one split of the tokenized dataset from row blocks, in bounded memory.

    The files are byte for byte those `DatasetDict.save_to_disk(num_shards=1)` writes for the
    same rows (checked by tests/test_tokenize.py against `save_to_disk` itself): one Arrow
    stream file written by `datasets.arrow_writer.ArrowWriter` in tables of `writer_batch_size`
    rows (what `save_to_disk` iterates by), then `state.json` and `dataset_info.json`. The
    fingerprint (`_fingerprint` in state.json) is derived from the content: the sha256 of the ids
    (`ids_fingerprint`, computed incrementally) and of the languages, so the same rows give
    the same bytes. The number of rows and the languages' total UTF-8 size are needed up front:
    both go into the content hash and the batch size, as `save_to_disk` would compute them.
    """

    def __init__(self, out: Path, split: str, n_rows: int, seq_len: int, lang_bytes: int) -> None:
        import datasets
        from datasets.arrow_writer import ArrowWriter, get_writer_batch_size_from_data_size

        self.dir = Path(out) / split
        self.dir.mkdir(parents=True, exist_ok=True)
        self.split, self.n_rows, self.seq_len = split, n_rows, seq_len
        self.features = features(seq_len)
        nbytes = n_rows * seq_len * 4 + 4 * n_rows + lang_bytes  # pyarrow's table.nbytes
        self.batch = datasets.config.DEFAULT_MAX_BATCH_SIZE
        if nbytes > 0:
            self.batch = min(self.batch, get_writer_batch_size_from_data_size(n_rows, nbytes))
        self._writer = ArrowWriter(
            features=self.features, path=str(self.dir / _DATA_FILE), embed_local_files=True
        )
        self._ids = IdsHasher((n_rows, seq_len))
        self._langs = hashlib.sha256()
        self._pending: list[tuple[np.ndarray, Any]] = []
        self._pending_rows = 0
        self.written = 0
        self.fingerprint = ""

    def write(self, rows: np.ndarray, langs: Any) -> None:
        """Append rows ((n, L) int32) and their languages (a pyarrow string array of n)."""
        if len(rows) != len(langs):
            raise ValueError(f"{len(rows)} rows but {len(langs)} languages")
        self._ids.update(rows)
        names = "\n".join(langs.to_pylist())  # the digest is of all languages joined by \n
        self._langs.update((names if self.written == 0 or not len(rows) else "\n" + names).encode())
        self.written += len(rows)
        self._pending.append((rows, langs))
        self._pending_rows += len(rows)
        while self._pending_rows >= self.batch:
            self._flush(self.batch)

    def _flush(self, n: int) -> None:
        """Write the first `n` pending rows as one table (one record batch)."""
        import pyarrow as pa

        rows = (
            np.concatenate([r for r, _ in self._pending])
            if len(self._pending) > 1
            else self._pending[0][0]
        )
        langs = (
            pa.concat_arrays([lg for _, lg in self._pending])
            if len(self._pending) > 1
            else self._pending[0][1]
        )
        head = np.ascontiguousarray(rows[:n], dtype=np.int32)
        ids = pa.FixedSizeListArray.from_arrays(pa.array(head.reshape(-1)), self.seq_len)
        table = pa.table({INPUT_IDS: ids, LANG: langs[:n]}).cast(self.features.arrow_schema)
        self._writer.write_table(table)
        self._pending = [(rows[n:], langs[n:])] if n < len(rows) else []
        self._pending_rows = len(rows) - n

    def close(self) -> str:
        """Finish the files; returns the split's ids_fingerprint. ValueError if fewer or more
        rows were written than announced."""
        import json

        import datasets
        from datasets.utils.py_utils import asdict

        if self.written != self.n_rows:
            raise ValueError(f"{self.split}: {self.written} rows written, {self.n_rows} announced")
        if self._pending_rows:
            self._flush(self._pending_rows)
        self._writer.finalize()
        self._writer.close()
        self.fingerprint = self._ids.hexdigest()
        digest = f"{self.fingerprint}:{self._langs.hexdigest()}"
        state = {
            "_fingerprint": hashlib.sha256(digest.encode()).hexdigest()[:16],
            "_format_columns": None,
            "_format_kwargs": {},
            "_format_type": None,
            "_output_all_columns": False,
            "_split": self.split,
            "_data_files": [{"filename": _DATA_FILE}],
        }
        with open(
            self.dir / datasets.config.DATASET_STATE_JSON_FILENAME, "w", encoding="utf-8"
        ) as f:
            json.dump(state, f, indent=2, sort_keys=True)
        info = asdict(datasets.DatasetInfo(features=self.features))
        with open(self.dir / datasets.config.DATASET_INFO_FILENAME, "w", encoding="utf-8") as f:
            json.dump({key: info[key] for key in sorted(info)}, f, indent=2)
        return self.fingerprint

    def __enter__(self) -> SplitWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self._writer.close()


_DATA_FILE = "data-00000-of-00001.arrow"
"""The split's one Arrow file (`save_to_disk`'s name for shard 0 of 1)."""


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
