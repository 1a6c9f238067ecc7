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


def read_corpus(cfg: CorpusConfig) -> Documents:
    """Read every selected language's documents and split them (see module docstring).
    Documents longer than `cfg.max_doc_chars` characters are left out, counted as `too_long`."""
    max_doc_chars = cfg.max_doc_chars
    root = Path(cfg.path)
    if not root.exists():
        raise InputError(f"corpus.path: {root} does not exist (set corpus.path in params.yaml)")
    selected = set(cfg.languages)
    raw: dict[str, list[str]] = {lang: [] for lang in cfg.languages}
    skipped: dict[str, Counter] = {lang: Counter() for lang in cfg.languages}
    sources: dict[str, list[str]] = {lang: [] for lang in cfg.languages}
    other_langs: Counter = Counter()
    files_skipped: dict[str, list[str]] = {r: [] for r in FILE_SKIP_REASONS}

    if root.is_file():
        record_files, text_files = [root], []
    else:
        record_files = sorted(p for p in root.iterdir() if p.suffix in (".jsonl", ".parquet"))
        text_files = sorted(p for p in root.iterdir() if p.suffix == ".txt")
    if root.is_file() and root.suffix not in (".jsonl", ".parquet"):
        raise InputError(f"corpus.path: {root} must be a folder, a .jsonl or a .parquet file")
    if not record_files and not text_files:
        raise InputError(f"corpus.path: {root} holds no <lang>.txt, .jsonl or .parquet files")

    for path in text_files:
        lang = path.stem
        if not LANG_CODE.match(lang):
            files_skipped["not_a_language_code"].append(str(path))
            continue
        if lang not in selected:
            files_skipped["language_not_selected"].append(str(path))
            continue
        raw[lang].extend(_read_text_lines(path, cfg.on_invalid_utf8, skipped[lang], max_doc_chars))
        sources[lang].append(str(path))
    _log_skipped_files(root, files_skipped)
    for path in record_files:
        for lang, text in _read_records(path):
            if lang not in selected:
                other_langs[lang] += 1
                continue
            text = text.strip()
            reason = document_skip_reason(text, max_doc_chars)
            if reason is not None:
                skipped[lang][reason] += 1
                continue
            raw[lang].append(text)
            if str(path) not in sources[lang]:
                sources[lang].append(str(path))

    missing = [lang for lang in cfg.languages if not sources[lang]]
    if missing:
        where = f"{root}/<lang>.txt" if root.is_dir() else str(root)
        raise InputError(
            f"corpus.languages: no data for {', '.join(missing)} (looked for {where} and "
            f"records with that `lang` in {root}); add the data or remove the language"
        )

    train: dict[str, list[str]] = {}
    validation: dict[str, list[str]] = {}
    for lang in cfg.languages:
        docs = _dedupe(raw[lang], skipped[lang])
        if not docs:
            raise InputError(
                f"corpus.languages: {lang!r} has no usable documents in "
                f"{', '.join(sources[lang])} (skipped: {dict(skipped[lang])})"
            )
        train[lang], validation[lang] = split_documents(lang, docs, cfg.validation_fraction)
    result = {lang: {r: skipped[lang][r] for r in SKIP_REASONS} for lang in cfg.languages}
    for lang, n in other_langs.items():
        result.setdefault(lang, {r: 0 for r in SKIP_REASONS})["language_not_selected"] = n
    return Documents(
        train=train,
        validation=validation,
        skipped=result,
        sources=sources,
        files_skipped=files_skipped,
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


def _read_text_lines(
    path: Path, on_invalid: str, skipped: Counter, max_doc_chars: int | None = None
) -> list[str]:
    """Documents of a <lang>.txt file: one per line, stripped, skips counted in `skipped`."""
    max_bytes = None if max_doc_chars is None else 4 * max_doc_chars
    docs = []
    has_content = False
    with open(path, "rb") as f:
        for lineno, line in enumerate(_iter_lines(f, max_bytes), start=1):
            if line is None:
                has_content = True
                skipped["too_long"] += 1
                continue
            has_content = has_content or bool(line.strip())
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                if on_invalid == "skip":
                    skipped["invalid_utf8"] += 1
                    continue
                raise InputError(
                    f"{path}:{lineno}: invalid UTF-8 at byte {e.start} of the line ({e.reason}); "
                    "fix the file, or set corpus.on_invalid_utf8: skip to skip such lines"
                ) from None
            text = text.strip()
            reason = document_skip_reason(text, max_doc_chars)
            if reason is not None:
                skipped[reason] += 1
                continue
            docs.append(text.lstrip("\ufeff"))
    if not has_content:
        raise InputError(f"{path}: file is empty; add documents (one per line) or remove it")
    return docs


def _iter_lines(f: BinaryIO, max_bytes: int | None) -> Iterator[bytes | None]:
    """The lines of a binary file without their newline; None for a line of more than
    `max_bytes` bytes, whose rest is read past in READ_BLOCK pieces (never held whole)."""
    while True:
        line = f.readline() if max_bytes is None else f.readline(max_bytes + 1)
        if not line:
            return
        if line.endswith(b"\n"):
            yield line[:-1]
        elif max_bytes is None or len(line) <= max_bytes:
            yield line  # the last line, without a final newline
        else:
            while (rest := f.readline(READ_BLOCK)) and not rest.endswith(b"\n"):
                pass
            yield None


def _read_records(path: Path) -> list[tuple[str, str]]:
    """(lang, text) pairs of a .jsonl or .parquet file, with errors naming file and line/row."""
    return [
        _check_record(path, where, rec.get("lang"), rec.get("text"))
        for where, rec in iter_records(path, required=("lang", "text"))
    ]


def iter_records(
    path: Path, *, required: tuple[str, ...], optional: tuple[str, ...] = ()
) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, record) for every record of a .jsonl or .parquet file, in file order.

    `where` is `line N` (jsonl, 1-based; blank lines are not records) or `row N` (parquet,
    0-based), for error messages. A parquet file must have every `required` column and is read
    for `required` + `optional` columns only; a jsonl record is returned as parsed (a missing
    field is the caller's to report). Raises InputError naming the file (and line) for an empty
    file, an unreadable or corrupt parquet file, a missing parquet column, invalid UTF-8, bad JSON, or a record that is not an object.
    """
    if path.stat().st_size == 0:
        raise InputError(f"{path}: file is empty; add records or remove it")
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            names = pq.read_schema(path).names
            for col in required:
                if col not in names:
                    raise InputError(f"{path}: no `{col}` column (found: {', '.join(names)})")
            columns = [c for c in (*required, *optional) if c in names]
            records = pq.read_table(path, columns=columns).to_pylist()
        except pa.ArrowException as e:
            raise InputError(
                f"{path}: not a readable parquet file ({first_line(e)}); rewrite it (for example with "
                "pyarrow.parquet.write_table) or remove it"
            ) from None
        for row, rec in enumerate(records):
            yield f"row {row}", rec
        return
    fields = " and ".join(f"`{c}`" for c in required)
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
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


def _check_record(path: Path, where: str, lang: object, text: object) -> tuple[str, str]:
    if not isinstance(text, str):
        raise InputError(f"{path}: {where}: field `text` must be a string, got {text!r:.40}")
    if not isinstance(lang, str) or not LANG_CODE.match(lang):
        raise InputError(f"{path}: {where}: field `lang` must be a language code, got {lang!r}")
    return lang, text
