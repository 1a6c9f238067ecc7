"""Reading a labeled multilingual classification corpus (params section `classify_corpus`).

Input: a folder with one file per split, `train`, `dev` and `test` (each `<split>.jsonl` or
`<split>.parquet`), whose records have `lang` (a language code), `text`, and optionally `label`
(a name from the label file) and `id` (an int >= 0: the same id in two languages is the same
sentence translated, which parallel transfer relies on). The label set is a text file, one label
per line, in order: a label's index there is its class index everywhere (teacher head, stores,
students).

Rows keep file order. A record of a language not in `languages` is counted under
`language_not_selected`, one whose text is empty or blank under `empty_text`; nothing else is
left out. A record keeps its gold label whatever its language (evaluation scores every language
on it); `labeled_languages` says whose labels may be *trained* on (`LabeledRows.gold_mask`), and
a record of a labeled language must have one. Problems the user must fix raise InputError with
one line naming the file and line (or the params key) and what to do: a missing folder or file,
an empty file, invalid UTF-8, bad JSON, a malformed language code, a label not in the label set,
a labeled-language record without a label, a (lang, id) pair twice in one split, a selected
language without rows in a split.

Identity: `text_hash` is the first 8 bytes of sha256 of the UTF-8 text (big-endian, an unsigned
64-bit int), stored next to soft labels so a consumer can tell a row's text changed;
`LabeledRows.fingerprint` and `LabeledCorpus.fingerprint` hash every row's (lang, id, text hash,
label) in order, so any edit, reordering or relabeling changes them and nothing else does.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.config import require
from pipeline.core.errors import InputError
from pipeline.data.corpus import LANG_CODE, iter_records

LABELED_SPLITS = ("train", "dev", "test")
"""The splits of a classification corpus, in the order they are read and fingerprinted."""

SKIP_REASONS = ("empty_text", "language_not_selected")
"""Every reason a record may be left out; each is counted per language."""

# fmt: off
SIB200_LANGUAGES = (
    "ar", "bn", "de", "el", "en", "es", "fr", "he", "hi", "hy", "ja",
    "ka", "ko", "pt", "ru", "sw", "th", "tr", "uk", "vi", "zh",
)
# fmt: on
"""The 21 languages of the bundled SIB-200 corpus (the default `classify_corpus.languages`)."""

NO_ID = -1
"""`LabeledRows.id` of a record without `id`."""
NO_LABEL = -1
"""`LabeledRows.label` of a record without `label`."""


@dataclass(frozen=True)
class ClassifyCorpusConfig:
    """Params section `classify_corpus`: the labeled corpus every classification stage reads."""

    path: str = "data/corpora/sib200"
    """Folder with train, dev and test files (`<split>.jsonl` or `<split>.parquet`) whose
    records have `lang`, `text`, and optionally `label` and `id` (same id = same sentence in
    another language; needed for parallel transfer)."""
    labels: str = "data/corpora/sib200/labels.txt"
    """Text file with the label set, one label per line, in class-index order."""
    languages: list[str] = field(default_factory=lambda: list(SIB200_LANGUAGES))
    """Language codes to use (ISO 639 codes, e.g. en, de, zh). Each must have rows in every
    split; records of other languages are skipped and counted."""
    labeled_languages: list[str] = field(default_factory=lambda: ["en"])
    """Languages whose gold labels may be trained on (teacher fine-tuning, students' CE term,
    model selection on dev). Each must be in `languages`, and each of its records must have a
    `label`. Every other language is reached by transfer; its labels, if any, only score."""

    def __post_init__(self) -> None:
        s = "classify_corpus"
        require(bool(self.path.strip()), f"{s}.path", "must not be empty")
        require(bool(self.labels.strip()), f"{s}.labels", "must not be empty")
        for key in ("languages", "labeled_languages"):
            langs = getattr(self, key)
            require(len(langs) > 0, f"{s}.{key}", "list at least one language")
            for lang in langs:
                require(
                    bool(LANG_CODE.match(lang)),
                    f"{s}.{key}",
                    f"{lang!r} is not a language code (expected an ISO 639 code such as 'en' "
                    "or 'zh', optionally with subtags such as 'pt-BR')",
                )
            dupes = sorted(lang for lang, n in Counter(langs).items() if n > 1)
            require(not dupes, f"{s}.{key}", f"listed more than once: {', '.join(dupes)}")
        extra = [lang for lang in self.labeled_languages if lang not in self.languages]
        require(
            not extra,
            f"{s}.labeled_languages",
            f"{', '.join(extra)} not in {s}.languages; add it there or remove it here",
        )


def text_hash(text: str) -> int:
    """First 8 bytes of sha256 of the UTF-8 text, big-endian: an int in [0, 2**64)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


@dataclass(frozen=True)
class LabeledRows:
    """One split of a classification corpus, row i being the i-th kept record in file order."""

    split: str
    """`train`, `dev` or `test`."""
    lang: np.ndarray
    """(N,) str: language code of each row."""
    id: np.ndarray
    """(N,) int64: the record's `id`, or NO_ID (-1) when it has none."""
    text: list[str]
    """N texts, exactly as in the file."""
    label: np.ndarray
    """(N,) int64: gold class index into the label set, or NO_LABEL (-1) when it has none."""
    text_hash: np.ndarray
    """(N,) uint64: `text_hash(text)` of each row."""

    def __len__(self) -> int:
        return len(self.text)

    def gold_mask(self, labeled_languages: list[str] | tuple[str, ...]) -> np.ndarray:
        """(N,) bool: rows whose gold label may be trained on (a labeled language, has a label)."""
        return np.isin(self.lang, list(labeled_languages)) & (self.label >= 0)

    def fingerprint(self) -> str:
        """sha256 hex over every row's `lang \\t id \\t text_hash \\t label \\n` line, in order."""
        h = hashlib.sha256()
        for lang, i, th, lab in zip(
            self.lang.tolist(),
            self.id.tolist(),
            self.text_hash.tolist(),
            self.label.tolist(),
            strict=True,
        ):
            h.update(f"{lang}\t{i}\t{th}\t{lab}\n".encode())
        return h.hexdigest()


@dataclass
class LabeledCorpus:
    """A classification corpus read and checked: the label set, the splits, what was skipped."""

    labels: list[str]
    """The label set, in class-index order."""
    splits: dict[str, LabeledRows]
    """split name (LABELED_SPLITS) -> its rows."""
    skipped: dict[str, dict[str, int]]
    """reason (SKIP_REASONS) -> lang -> count of records left out, over all splits."""
    languages: list[str] = field(default_factory=list)
    """The selected languages, in `classify_corpus.languages` order."""
    files: dict[str, str] = field(default_factory=dict)
    """split name -> the file it was read from."""

    def fingerprint(self) -> str:
        """sha256 hex over the label set and every split's name and fingerprint."""
        blob = json.dumps(
            {
                "labels": self.labels,
                "splits": {name: self.splits[name].fingerprint() for name in self.splits},
            },
            sort_keys=True,
            ensure_ascii=False,
        )
        return hashlib.sha256(blob.encode()).hexdigest()


def read_labels(path: str | Path) -> list[str]:
    """The label set of a label file: one label per non-blank line (stripped), in order.

    Raises InputError naming `classify_corpus.labels` or the file and line for a missing file,
    invalid UTF-8, a duplicate label, or fewer than two labels.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(
            f"classify_corpus.labels: {path} does not exist (set classify_corpus.labels in "
            "params.yaml to a file with one label per line)"
        )
    labels: list[str] = []
    for lineno, line in enumerate(path.read_bytes().split(b"\n"), start=1):
        try:
            label = line.decode("utf-8").strip().lstrip("\ufeff")
        except UnicodeDecodeError as e:
            raise InputError(f"{path}:{lineno}: invalid UTF-8 ({e.reason})") from None
        if not label:
            continue
        if label in labels:
            raise InputError(f"{path}:{lineno}: label {label!r} is listed twice; keep one")
        labels.append(label)
    if len(labels) < 2:
        raise InputError(f"{path}: lists {len(labels)} label(s); a classifier needs at least 2")
    return labels


def split_file(root: Path, split: str) -> Path:
    """The file of `split` in `root` (`<split>.jsonl` or `<split>.parquet`), or InputError."""
    found = [p for p in (root / f"{split}.jsonl", root / f"{split}.parquet") if p.is_file()]
    if not found:
        raise InputError(
            f"classify_corpus.path: {root} has no {split}.jsonl or {split}.parquet; every "
            f"corpus needs the splits {', '.join(LABELED_SPLITS)}"
        )
    if len(found) > 1:
        raise InputError(
            f"classify_corpus.path: {root} has both {split}.jsonl and {split}.parquet; keep one"
        )
    return found[0]


def read_labeled_corpus(cfg: ClassifyCorpusConfig) -> LabeledCorpus:
    """Read and check the label set and every split of the corpus (see module docstring)."""
    root = Path(cfg.path)
    if not root.is_dir():
        raise InputError(
            f"classify_corpus.path: {root} is not a folder (set classify_corpus.path in "
            "params.yaml to a folder with train, dev and test .jsonl or .parquet files)"
        )
    labels = read_labels(cfg.labels)
    skipped: dict[str, Counter] = {reason: Counter() for reason in SKIP_REASONS}
    splits: dict[str, LabeledRows] = {}
    files: dict[str, str] = {}
    for split in LABELED_SPLITS:
        path = split_file(root, split)
        splits[split] = _read_split(path, split, cfg, labels, skipped)
        files[split] = str(path)
    return LabeledCorpus(
        labels=labels,
        splits=splits,
        skipped={reason: dict(sorted(skipped[reason].items())) for reason in SKIP_REASONS},
        languages=list(cfg.languages),
        files=files,
    )


def _read_split(
    path: Path,
    split: str,
    cfg: ClassifyCorpusConfig,
    labels: list[str],
    skipped: dict[str, Counter],
) -> LabeledRows:
    """The kept rows of one split file, checked record by record (errors name file and line)."""
    selected = set(cfg.languages)
    labeled = set(cfg.labeled_languages)
    index = {name: i for i, name in enumerate(labels)}
    langs: list[str] = []
    ids: list[int] = []
    texts: list[str] = []
    golds: list[int] = []
    seen: dict[tuple[str, int], str] = {}
    records = 0
    for where, rec in iter_records(path, required=("lang", "text"), optional=("id", "label")):
        records += 1
        lang = _field_lang(path, where, rec.get("lang"))
        text = rec.get("text")
        if not isinstance(text, str):
            raise InputError(f"{path}: {where}: field `text` must be a string, got {text!r:.40}")
        rid = _field_id(path, where, rec.get("id"))
        label = rec.get("label")
        if label is not None and (not isinstance(label, str) or label not in index):
            raise InputError(
                f"{path}: {where}: label {label!r:.60} is not in the label set "
                f"({cfg.labels}: {', '.join(labels)}); fix the record or the label file"
            )
        if lang not in selected:
            skipped["language_not_selected"][lang] += 1
            continue
        if label is None and lang in labeled:
            raise InputError(
                f"{path}: {where}: a record of labeled language {lang!r} has no `label`; add "
                "it, or remove the language from classify_corpus.labeled_languages"
            )
        if not text.strip():
            skipped["empty_text"][lang] += 1
            continue
        if rid != NO_ID:
            first = seen.setdefault((lang, rid), where)
            if first != where:
                raise InputError(
                    f"{path}: {where}: id {rid} of language {lang!r} already appears at {first} "
                    f"of this split; ids must be unique per language and split"
                )
        langs.append(lang)
        ids.append(rid)
        texts.append(text)
        golds.append(index[label] if label is not None else NO_LABEL)
    if records == 0:
        raise InputError(f"{path}: file has no records; add the {split} split's records")
    present = set(langs)
    missing = [lang for lang in cfg.languages if lang not in present]
    if missing:
        raise InputError(
            f"{path}: no {split} rows for {', '.join(missing)}; add them, or remove the "
            "language from classify_corpus.languages"
        )
    return LabeledRows(
        split=split,
        lang=np.asarray(langs, dtype=np.str_),
        id=np.asarray(ids, dtype=np.int64),
        text=texts,
        label=np.asarray(golds, dtype=np.int64),
        text_hash=np.asarray([text_hash(t) for t in texts], dtype=np.uint64),
    )


def _field_lang(path: Path, where: str, lang: Any) -> str:
    if not isinstance(lang, str) or not LANG_CODE.match(lang):
        raise InputError(
            f"{path}: {where}: field `lang` must be a language code such as 'en' or 'pt-BR', "
            f"got {lang!r:.40}"
        )
    return lang


def _field_id(path: Path, where: str, rid: Any) -> int:
    if rid is None:
        return NO_ID
    if isinstance(rid, bool) or not isinstance(rid, int) or rid < 0:
        raise InputError(f"{path}: {where}: field `id` must be an integer >= 0, got {rid!r:.40}")
    return rid
