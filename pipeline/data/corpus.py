"""Reading multilingual corpora into per-language documents, held out by document.

Accepted inputs (`corpus.path`):
- a folder of `<lang>.txt` files, one document per line (the sample corpus's format);
- `.jsonl` or `.parquet` files (a single file, or every such file in the folder) whose records
  have string fields `text` and `lang`.

Every line or record that is not used is counted under exactly one named reason
(SKIP_REASONS, checked in this order: `too_long`, `invalid_utf8`, `empty_line`,
`no_visible_text`, then `duplicate` once all lines are read; records of other languages are
`language_not_selected`), and every `.txt` file of a corpus folder that is not read is counted
under a file reason (FILE_SKIP_REASONS); nothing is dropped silently. Problems the user must fix
(a missing path, an empty file, invalid UTF-8 without `on_invalid_utf8: skip`, a selected
language with no data, a malformed record) raise InputError naming the file and line.

Which files of a folder are data: `<lang>.txt` files and every `.jsonl` / `.parquet` file. Other
files (SOURCES.md, manifest.json, ...) are not data and are not counted. A `.txt` file whose name
is not a language code (`README.txt`, `EN.txt`, `english.txt`) is counted as
`not_a_language_code` (and logged), one of a language not in `corpus.languages` as
`language_not_selected`.

`.txt` files are read line by line, so memory follows the longest line kept, not the file; with
a `max_doc_chars` cap a line of more than 4 * max_doc_chars bytes (UTF-8 needs at most 4 bytes a
character) is counted `too_long` and read past in blocks, never held whole nor decoded.
`.jsonl` / `.parquet` records are parsed whole before their text's length is checked.

The validation split is chosen per document by a keyed hash of (lang, text), not by position or
a random draw: it is stable when documents are added or reordered, identical documents always
land on the same side (no train/validation leakage), and the `prepare_teacher` and `tokenize`
stages, which both read the corpus, agree on it without sharing state. Trade-off: the
validation share per language is `validation_fraction` only in expectation; each language is
guaranteed at least one validation and one training document when it has two or more.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import unicodedata
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

from pipeline.core.config import require
from pipeline.core.errors import InputError, first_line

log = logging.getLogger(__name__)

LANG_CODE = re.compile(r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})*$")
"""An ISO 639-1/639-3 code with optional BCP 47 subtags (`en`, `yue`, `zh-Hant`, `pt-BR`)."""

SAMPLE_LANGUAGES = (
    "ar", "bn", "de", "el", "en", "es", "fr", "he", "hi", "hy", "ja",
    "ka", "ko", "pt", "ru", "sw", "th", "tr", "uk", "vi", "zh",
)  # fmt: skip
"""The 21 languages of the bundled sample corpus (data/corpora/sample), the default selection."""

SKIP_REASONS = (
    "empty_line",
    "no_visible_text",
    "too_long",
    "duplicate",
    "invalid_utf8",
    "language_not_selected",
)
"""Every reason a line or record may be left out; each is counted per language."""

FILE_SKIP_REASONS = ("language_not_selected", "not_a_language_code")
"""Every reason a `.txt` file of a corpus folder may be left unread; each is counted."""

INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp"})
"""Unicode categories that show nothing: control characters (C0/C1, NUL), format characters
(zero-width space/joiners, word joiner, BOM, direction marks) and separators (spaces, line and
paragraph separators). Every whitespace character is in one of them."""

READ_BLOCK = 1 << 20
"""Bytes read at a time when skipping past the rest of a `too_long` line."""


@dataclass(frozen=True)
class CorpusConfig:
    """Params section `corpus`: where the raw text is and how it is split."""

    path: str = "data/corpora/sample"
    """A folder of <lang>.txt files (one document per line), or a .jsonl/.parquet file or folder
    of them with `text` and `lang` fields."""
    languages: list[str] = field(default_factory=lambda: list(SAMPLE_LANGUAGES))
    """Language codes to use (ISO 639 codes, e.g. en, de, zh). Each must have data."""
    validation_fraction: float = 0.1
    """Share of each language's documents held out for validation (chosen by document hash)."""
    on_invalid_utf8: Literal["error", "skip"] = "error"
    """What to do with a line that is not valid UTF-8: stop with an error naming the file and
    line, or skip it and count it under `invalid_utf8`."""
    max_doc_chars: int = 100_000
    """Longest document kept, in characters; longer ones are skipped, counted as `too_long`, and
    never tokenized (a .txt line over 4x this many bytes is not even decoded). 100k characters
    is about 25k tokens, well above a long article (the sample corpus's longest line is ~1.5k),
    so a longer line is almost always a format accident (a file without newlines, a dump) that
    would cost GBs to tokenize and dominate its language's rows. Raise it for corpora of books.
    Read by every stage that reads the corpus (the builtin teacher's training and tokenize)."""

    def __post_init__(self) -> None:
        require(bool(self.path), "corpus.path", "must not be empty")
        require(
            self.max_doc_chars >= 1,
            "corpus.max_doc_chars",
            f"must be >= 1 (characters per document), got {self.max_doc_chars}",
        )
        require(len(self.languages) > 0, "corpus.languages", "list at least one language")
        for lang in self.languages:
            require(
                bool(LANG_CODE.match(lang)),
                "corpus.languages",
                f"{lang!r} is not a language code (expected an ISO 639 code such as 'en' or "
                "'zh', optionally with subtags such as 'pt-BR')",
            )
        dupes = sorted(lang for lang, n in Counter(self.languages).items() if n > 1)
        require(not dupes, "corpus.languages", f"listed more than once: {', '.join(dupes)}")
        require(
            0.0 < self.validation_fraction < 0.5,
            "corpus.validation_fraction",
            f"must be in (0, 0.5), got {self.validation_fraction}",
        )


@dataclass
class Documents:
    """A corpus read and split: documents per language, and what was left out and why."""

    train: dict[str, list[str]]
    """lang -> training documents, in corpus order."""
    validation: dict[str, list[str]]
    """lang -> held-out documents, in corpus order."""
    skipped: dict[str, dict[str, int]]
    """lang -> reason -> count of lines or records left out (reasons: SKIP_REASONS)."""
    sources: dict[str, list[str]] = field(default_factory=dict)
    """lang -> files that contributed documents."""
    files_skipped: dict[str, list[str]] = field(
        default_factory=lambda: {r: [] for r in FILE_SKIP_REASONS}
    )
    """reason (FILE_SKIP_REASONS) -> `.txt` files of the corpus folder left unread."""


def has_visible_text(text: str) -> bool:
    """Whether `text` has a character outside INVISIBLE_CATEGORIES (one that shows something)."""
    return any(unicodedata.category(ch) not in INVISIBLE_CATEGORIES for ch in text)


def document_skip_reason(text: str, max_doc_chars: int | None) -> str | None:
    """The reason a stripped line or record text is not a document, or None if it is one.

    `empty_line` (nothing left), `no_visible_text` (only control, format or space characters,
    e.g. NUL or zero-width spaces), `too_long` (more than `max_doc_chars` characters; None: no cap).
    """
    if not text:
        return "empty_line"
    if max_doc_chars is not None and len(text) > max_doc_chars:
        return "too_long"
    if not has_visible_text(text):
        return "no_visible_text"
    return None


@dataclass(frozen=True)
class CorpusSlice:
    """A piece of one corpus file that can be read on its own (a task of the tokenize stage).

    `.txt` and `.jsonl` files are cut at byte offsets: a slice owns the lines that *start* in
    [start, stop) (the usual split rule: a slice skips the line it begins inside of, and reads
    on past `stop` to finish its last line), so any slicing reads every line exactly once.
    `.parquet` files are cut at row groups [start, stop). Reading slices in `plan_slices` order
    gives the documents in corpus order.
    """

    path: str
    """The file."""
    lang: str | None
    """The language of a `<lang>.txt` file; None for record files (each record has its own)."""
    start: int
    """First byte (`.txt`, `.jsonl`) or row group (`.parquet`)."""
    stop: int
    """End byte or row group (exclusive)."""


@dataclass(frozen=True)
class CorpusPlan:
    """The corpus's data files cut into slices, and the `.txt` files that are not read."""

    root: Path
    slices: list[CorpusSlice]
    """Every slice, `.txt` files first (sorted), then record files (sorted)."""
    files_skipped: dict[str, list[str]]
    """reason (FILE_SKIP_REASONS) -> `.txt` files of the corpus folder left unread."""
    text_languages: frozenset[str]
    """Selected languages that have a `<lang>.txt` file."""
    has_records: bool
    """Whether there are `.jsonl` / `.parquet` files (languages known only once read)."""


def plan_slices(cfg: CorpusConfig, slice_bytes: int | None = None) -> CorpusPlan:
    """List the corpus's data files and cut them into slices of about `slice_bytes` bytes (None:
    one slice per file). Raises InputError for a missing path, a folder without data files, an
    empty record file, or (when there are no record files) a selected language without data."""
    root = Path(cfg.path)
    if not root.exists():
        raise InputError(f"corpus.path: {root} does not exist (set corpus.path in params.yaml)")
    if root.is_file():
        if root.suffix not in (".jsonl", ".parquet"):
            raise InputError(f"corpus.path: {root} must be a folder, a .jsonl or a .parquet file")
        record_files, text_files = [root], []
    else:
        record_files = sorted(p for p in root.iterdir() if p.suffix in (".jsonl", ".parquet"))
        text_files = sorted(p for p in root.iterdir() if p.suffix == ".txt")
    if not record_files and not text_files:
        raise InputError(f"corpus.path: {root} holds no <lang>.txt, .jsonl or .parquet files")
    selected = set(cfg.languages)
    files_skipped: dict[str, list[str]] = {r: [] for r in FILE_SKIP_REASONS}
    slices: list[CorpusSlice] = []
    langs: set[str] = set()
    for path in text_files:
        lang = path.stem
        if not LANG_CODE.match(lang):
            files_skipped["not_a_language_code"].append(str(path))
        elif lang not in selected:
            files_skipped["language_not_selected"].append(str(path))
        else:
            langs.add(lang)
            slices += _byte_slices(path, lang, slice_bytes)
    _log_skipped_files(root, files_skipped)
    for path in record_files:
        if path.stat().st_size == 0:
            raise InputError(f"{path}: file is empty; add records or remove it")
        if path.suffix == ".parquet":
            slices += _row_group_slices(path, slice_bytes)
        else:
            slices += _byte_slices(path, None, slice_bytes)
    plan = CorpusPlan(root, slices, files_skipped, frozenset(langs), bool(record_files))
    if not plan.has_records:
        check_languages_found(cfg, plan, langs)
    return plan


def check_languages_found(cfg: CorpusConfig, plan: CorpusPlan, found: set[str]) -> None:
    """InputError naming every selected language with no data file or record."""
    missing = [lang for lang in cfg.languages if lang not in found]
    if missing:
        root = plan.root
        where = f"{root}/<lang>.txt" if root.is_dir() else str(root)
        raise InputError(
            f"corpus.languages: no data for {', '.join(missing)} (looked for {where} and "
            f"records with that `lang` in {root}); add the data or remove the language"
        )


def _byte_slices(path: Path, lang: str | None, slice_bytes: int | None) -> list[CorpusSlice]:
    size = path.stat().st_size
    step = max(size, 1) if slice_bytes is None else slice_bytes
    return [
        CorpusSlice(str(path), lang, a, min(a + step, size)) for a in range(0, max(size, 1), step)
    ]


def _row_group_slices(path: Path, slice_bytes: int | None) -> list[CorpusSlice]:
    """A parquet file cut into runs of row groups of about `slice_bytes` (None: one slice), by
    its footer; InputError if it is not readable parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        groups = pq.read_metadata(path).num_row_groups
    except (pa.ArrowException, OSError) as e:
        raise _not_parquet(path, e) from None
    if slice_bytes is None:
        step = max(groups, 1)
    else:
        step = max(1, int(max(groups, 1) * slice_bytes // max(path.stat().st_size, 1)))
    return [
        CorpusSlice(str(path), None, g, min(g + step, groups))
        for g in range(0, max(groups, 1), step)
    ]


def _not_parquet(path: Path, e: BaseException) -> InputError:
    return InputError(
        f"{path}: not a readable parquet file ({first_line(e)}); rewrite it (for example with "
        "pyarrow.parquet.write_table) or remove it"
    )


@dataclass
class SliceReport:
    """What reading one slice left out, and what it found (merged over slices by the caller)."""

    skipped: dict[str, Counter] = field(default_factory=dict)
    """lang -> reason -> lines or records left out (selected languages)."""
    other_languages: Counter = field(default_factory=Counter)
    """lang -> records of languages not selected."""
    has_content: bool = False
    """(`.txt`) Whether the slice had a non-blank line (a file with none is an error)."""
    languages: set[str] = field(default_factory=set)
    """(records) Selected languages with at least one document in the slice."""


def read_slice(
    cfg: CorpusConfig, piece: CorpusSlice, report: SliceReport
) -> Iterator[tuple[str, str]]:
    """(lang, document) for every document of `piece`, in file order; every line or record
    left out is counted in `report` under its reason (see module docstring)."""
    selected = set(cfg.languages)
    path = Path(piece.path)
    if piece.lang is not None:
        counts = report.skipped.setdefault(piece.lang, Counter())
        for text in _iter_text_docs(path, cfg, counts, report, piece.start, piece.stop):
            yield piece.lang, text
        return
    for where, rec in iter_records(path, required=("lang", "text"), part=(piece.start, piece.stop)):
        lang, text = _check_record(path, where, rec.get("lang"), rec.get("text"))
        if lang not in selected:
            report.other_languages[lang] += 1
            continue
        text = text.strip()
        reason = document_skip_reason(text, cfg.max_doc_chars)
        if reason is not None:
            report.skipped.setdefault(lang, Counter())[reason] += 1
            continue
        report.languages.add(lang)
        yield lang, text


def merge_reports(
    cfg: CorpusConfig, plan: CorpusPlan, reports: list[SliceReport]
) -> tuple[dict[str, Counter], Counter, dict[str, list[str]]]:
    """Merge the slices' reports (in plan order): (skipped per selected language, records of other
    languages, sources per language). Raises InputError for a `.txt` file without a non-blank
    line and for a selected language with no data."""
    skipped: dict[str, Counter] = {lang: Counter() for lang in cfg.languages}
    other: Counter = Counter()
    sources: dict[str, list[str]] = {lang: [] for lang in cfg.languages}
    content: dict[str, bool] = {}
    for piece, rep in zip(plan.slices, reports, strict=True):
        for lang, counts in rep.skipped.items():
            skipped[lang].update(counts)
        other.update(rep.other_languages)
        if piece.lang is not None:
            content[piece.path] = content.get(piece.path, False) or rep.has_content
            if piece.path not in sources[piece.lang]:
                sources[piece.lang].append(piece.path)
        for lang in sorted(rep.languages):
            if piece.path not in sources[lang]:
                sources[lang].append(piece.path)
    for path, has in content.items():
        if not has:
            raise InputError(f"{path}: file is empty; add documents (one per line) or remove it")
    check_languages_found(cfg, plan, {lang for lang, src in sources.items() if src})
    return skipped, other, sources


def skip_table(
    cfg: CorpusConfig, skipped: dict[str, Counter], other: Counter
) -> dict[str, dict[str, int]]:
    """lang -> every reason of SKIP_REASONS -> count, for the selected languages and for the
    other languages records were found in (`language_not_selected`)."""
    result = {lang: {r: skipped[lang][r] for r in SKIP_REASONS} for lang in cfg.languages}
    for lang, n in other.items():
        result.setdefault(lang, {r: 0 for r in SKIP_REASONS})["language_not_selected"] = n
    return result


def read_corpus(cfg: CorpusConfig) -> Documents:
    """Read every selected language's documents and split them (see module docstring), all in
    memory (the builtin teacher's training; the tokenize stage streams `plan_slices` instead).
    Documents longer than `cfg.max_doc_chars` characters are left out, counted as `too_long`."""
    plan = plan_slices(cfg)
    raw: dict[str, list[str]] = {lang: [] for lang in cfg.languages}
    reports = []
    for piece in plan.slices:
        reports.append(SliceReport())
        for lang, text in read_slice(cfg, piece, reports[-1]):
            raw[lang].append(text)
    skipped, other, sources = merge_reports(cfg, plan, reports)
    train: dict[str, list[str]] = {}
    validation: dict[str, list[str]] = {}
    for lang in cfg.languages:
        docs = _dedupe(raw[lang], skipped[lang])
        if not docs:
            raise no_usable_documents(lang, sources[lang], skipped[lang])
        train[lang], validation[lang] = split_documents(lang, docs, cfg.validation_fraction)
    return Documents(
        train=train,
        validation=validation,
        skipped=skip_table(cfg, skipped, other),
        sources=sources,
        files_skipped=plan.files_skipped,
    )


def no_usable_documents(lang: str, sources: list[str], skipped: Counter) -> InputError:
    """The error for a selected language all of whose lines or records were left out."""
    return InputError(
        f"corpus.languages: {lang!r} has no usable documents in "
        f"{', '.join(sources)} (skipped: {dict(skipped)})"
    )


def _log_skipped_files(root: Path, files_skipped: dict[str, list[str]], show: int = 5) -> None:
    """One log line per file reason with a count, naming the first `show` files."""
    for reason, paths in files_skipped.items():
        if not paths:
            continue
        names = ", ".join(Path(p).name for p in paths[:show])
        more = f" and {len(paths) - show} more" if len(paths) > show else ""
        level = logging.WARNING if reason == "not_a_language_code" else logging.INFO
        log.log(
            level, "%s: %d .txt file(s) not read (%s): %s%s", root, len(paths), reason, names, more
        )


def validation_score(lang: str, text: str) -> float:
    """A uniform number in [0, 1) fixed by (lang, text): below the fraction means validation."""
    digest = hashlib.blake2b(f"{lang}\0{text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def split_documents(lang: str, docs: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """Split `docs` into (train, validation) by `validation_score`, keeping corpus order.

    With two or more documents each side gets at least one: the lowest-scoring document goes to
    validation if none did, the highest-scoring to train if all did.
    """
    scores = [validation_score(lang, d) for d in docs]
    is_val = [s < fraction for s in scores]
    if len(docs) >= 2 and not any(is_val):
        is_val[min(range(len(docs)), key=scores.__getitem__)] = True
    if len(docs) >= 2 and all(is_val):
        is_val[max(range(len(docs)), key=scores.__getitem__)] = False
    train = [d for d, v in zip(docs, is_val, strict=True) if not v]
    val = [d for d, v in zip(docs, is_val, strict=True) if v]
    return train, val


def _dedupe(docs: list[str], skipped: Counter) -> list[str]:
    seen: set[str] = set()
    out = []
    for d in docs:
        if d in seen:
            skipped["duplicate"] += 1
            continue
        seen.add(d)
        out.append(d)
    return out


def _iter_text_docs(
    path: Path,
    cfg: CorpusConfig,
    skipped: Counter,
    report: SliceReport,
    start: int = 0,
    stop: int | None = None,
) -> Iterator[str]:
    """Documents of the lines of a <lang>.txt file that start in [start, stop): stripped,
    skips counted in `skipped`; `report.has_content` set if any line is not blank."""
    max_doc_chars = cfg.max_doc_chars
    max_bytes = None if max_doc_chars is None else 4 * max_doc_chars
    with open(path, "rb") as f:
        for lineno, line in enumerate(_iter_lines(f, max_bytes, start, stop), start=1):
            if line is None:
                report.has_content = True
                skipped["too_long"] += 1
                continue
            report.has_content = report.has_content or bool(line.strip())
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                if cfg.on_invalid_utf8 == "skip":
                    skipped["invalid_utf8"] += 1
                    continue
                lineno += _lines_before(path, start)
                raise InputError(
                    f"{path}:{lineno}: invalid UTF-8 at byte {e.start} of the line ({e.reason}); "
                    "fix the file, or set corpus.on_invalid_utf8: skip to skip such lines"
                ) from None
            text = text.strip()
            reason = document_skip_reason(text, max_doc_chars)
            if reason is not None:
                skipped[reason] += 1
                continue
            yield text.lstrip("\ufeff")


def _lines_before(path: Path, start: int) -> int:
    """Lines that start before the first line a slice starting at byte `start` owns (for
    1-based line numbers in its errors): the newlines before `start`, plus the line `start`
    falls inside of, which the slice leaves to the one before it."""
    count = 0
    with open(path, "rb") as f:
        if start > 0:
            f.seek(start - 1)
            count += f.read(1) != b"\n"
            f.seek(0)
        left = start
        while left > 0:
            block = f.read(min(READ_BLOCK, left))
            if not block:
                break
            count += block.count(b"\n")
            left -= len(block)
    return count


def _iter_lines(
    f: BinaryIO, max_bytes: int | None, start: int = 0, stop: int | None = None
) -> Iterator[bytes | None]:
    """The lines of a binary file that start in [start, stop), without their newline; None for
    a line of more than `max_bytes` bytes, whose rest is read past in READ_BLOCK pieces (never
    held whole). A slice starting inside a line leaves that line to the slice before it."""
    pos = start
    f.seek(start)
    if start > 0:
        f.seek(start - 1)
        if f.read(1) != b"\n":  # inside a line: it belongs to the previous slice
            while (rest := f.readline(READ_BLOCK)) and not rest.endswith(b"\n"):
                pos += len(rest)
            pos += len(rest)
    while stop is None or pos < stop:
        line = f.readline() if max_bytes is None else f.readline(max_bytes + 1)
        if not line:
            return
        pos += len(line)
        if line.endswith(b"\n"):
            yield line[:-1]
        elif max_bytes is None or len(line) <= max_bytes:
            yield line  # the last line, without a final newline
        else:
            while (rest := f.readline(READ_BLOCK)) and not rest.endswith(b"\n"):
                pos += len(rest)
            pos += len(rest)
            yield None


def iter_records(
    path: Path,
    *,
    required: tuple[str, ...],
    optional: tuple[str, ...] = (),
    part: tuple[int, int] | None = None,
) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, record) for every record of a .jsonl or .parquet file, in file order.

    `where` is `line N` (jsonl, 1-based; blank lines are not records) or `row N` (parquet,
    0-based), for error messages. A parquet file must have every `required` column and is read
    for `required` + `optional` columns only, one record batch at a time; a jsonl record is
    returned as parsed (a missing field is the caller's to report). `part` limits the reading to
    a slice (`CorpusSlice`: the lines starting in a byte range, or a range of parquet row
    groups); line and row numbers stay those of the whole file. Raises InputError naming the
    file (and line) for an empty file, an unreadable or corrupt parquet file, a missing parquet
    column, invalid UTF-8, bad JSON, or a record that is not an object.
    """
    if path.stat().st_size == 0:
        raise InputError(f"{path}: file is empty; add records or remove it")
    if path.suffix == ".parquet":
        yield from _parquet_records(path, required, optional, part)
        return
    fields = " and ".join(f"`{c}`" for c in required)
    start, stop = part if part is not None else (0, None)
    base = _lines_before(path, start) if start else 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(_iter_lines(f, None, start, stop), start=base + 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise InputError(f"{path}:{lineno}: invalid UTF-8 ({e.reason})") from None
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise InputError(f"{path}:{lineno}: expected a JSON object with {fields}")
            yield f"line {lineno}", rec


PARQUET_BATCH = 8192
"""Records decoded at a time from a parquet file."""


def _parquet_records(
    path: Path, required: tuple[str, ...], optional: tuple[str, ...], part: tuple[int, int] | None
) -> Iterator[tuple[str, dict[str, Any]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        for col in required:
            if col not in names:
                raise InputError(f"{path}: no `{col}` column (found: {', '.join(names)})")
        columns = [c for c in (*required, *optional) if c in names]
        groups = range(pf.num_row_groups) if part is None else range(*part)
        row = sum(pf.metadata.row_group(g).num_rows for g in range(groups.start))
        if not groups:
            return
        for batch in pf.iter_batches(PARQUET_BATCH, row_groups=groups, columns=columns):
            for rec in batch.to_pylist():
                yield f"row {row}", rec
                row += 1
    except (pa.ArrowException, OSError) as e:
        raise _not_parquet(path, e) from None


def _check_record(path: Path, where: str, lang: object, text: object) -> tuple[str, str]:
    if not isinstance(text, str):
        raise InputError(f"{path}: {where}: field `text` must be a string, got {text!r:.40}")
    if not isinstance(lang, str) or not LANG_CODE.match(lang):
        raise InputError(f"{path}: {where}: field `lang` must be a language code, got {lang!r}")
    return lang, text
