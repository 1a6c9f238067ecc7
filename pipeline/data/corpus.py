"""Reading multilingual corpora into per-language documents, held out by document.

Accepted inputs (`corpus.path`):
- a folder of `<lang>.txt` files, one document per line (the sample corpus's format);
- `.jsonl` or `.parquet` files (a single file, or every such file in the folder) whose records
  have string fields `text` and `lang`.

Every line or record that is not used is counted under a named reason (`empty_line`,
`duplicate`, `invalid_utf8`, `language_not_selected`); nothing is dropped silently. Problems the
user must fix (a missing path, an empty file, invalid UTF-8 without `on_invalid_utf8: skip`, a
selected language with no data, a malformed record) raise InputError naming the file and line.

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
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.core.config import require
from pipeline.core.errors import InputError

LANG_CODE = re.compile(r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})*$")
"""An ISO 639-1/639-3 code with optional BCP 47 subtags (`en`, `yue`, `zh-Hant`, `pt-BR`)."""

SAMPLE_LANGUAGES = (
    "ar", "bn", "de", "el", "en", "es", "fr", "he", "hi", "hy", "ja",
    "ka", "ko", "pt", "ru", "sw", "th", "tr", "uk", "vi", "zh",
)  # fmt: skip
"""The 21 languages of the bundled sample corpus (data/corpora/sample), the default selection."""

SKIP_REASONS = ("empty_line", "duplicate", "invalid_utf8", "language_not_selected")
"""Every reason a line or record may be left out; each is counted per language."""


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

    def __post_init__(self) -> None:
        require(bool(self.path), "corpus.path", "must not be empty")
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


def read_corpus(cfg: CorpusConfig) -> Documents:
    """Read every selected language's documents and split them (see module docstring)."""
    root = Path(cfg.path)
    if not root.exists():
        raise InputError(f"corpus.path: {root} does not exist (set corpus.path in params.yaml)")
    selected = set(cfg.languages)
    raw: dict[str, list[str]] = {lang: [] for lang in cfg.languages}
    skipped: dict[str, Counter] = {lang: Counter() for lang in cfg.languages}
    sources: dict[str, list[str]] = {lang: [] for lang in cfg.languages}
    other_langs: Counter = Counter()

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
        if lang not in selected:
            continue
        for text in _read_text_lines(path, cfg.on_invalid_utf8, skipped[lang]):
            raw[lang].append(text)
        sources[lang].append(str(path))
    for path in record_files:
        for lang, text in _read_records(path):
            if lang not in selected:
                other_langs[lang] += 1
                continue
            if not text.strip():
                skipped[lang]["empty_line"] += 1
                continue
            raw[lang].append(text.strip())
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
    return Documents(train=train, validation=validation, skipped=result, sources=sources)


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


def _read_text_lines(path: Path, on_invalid: str, skipped: Counter) -> list[str]:
    """Documents of a <lang>.txt file: one per non-empty line, stripped."""
    data = path.read_bytes()
    if not data.strip():
        raise InputError(f"{path}: file is empty; add documents (one per line) or remove it")
    lines = data.split(b"\n")
    if lines[-1] == b"":  # the empty piece after a final newline is not a line
        lines.pop()
    docs = []
    for lineno, line in enumerate(lines, start=1):
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
        if not text:
            skipped["empty_line"] += 1
            continue
        docs.append(text.lstrip("\ufeff"))
    return docs


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
    file, a missing parquet column, invalid UTF-8, bad JSON, or a record that is not an object.
    """
    if path.stat().st_size == 0:
        raise InputError(f"{path}: file is empty; add records or remove it")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        names = pq.read_schema(path).names
        for col in required:
            if col not in names:
                raise InputError(f"{path}: no `{col}` column (found: {', '.join(names)})")
        columns = [c for c in (*required, *optional) if c in names]
        table = pq.read_table(path, columns=columns)
        for row, rec in enumerate(table.to_pylist()):
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
