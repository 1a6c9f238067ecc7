"""The labeled classification corpus: reading, identities, counted skips and every bad input."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.classify.corpus import (
    LABELED_SPLITS,
    SIB200_LANGUAGES,
    ClassifyCorpusConfig,
    read_labeled_corpus,
    text_hash,
)
from pipeline.core.config import from_mapping
from pipeline.core.errors import ConfigError, InputError
from tests.conftest import REPO

LABELS = ["sports", "health", "travel"]
ROWS = [
    {"id": 0, "lang": "en", "label": "sports", "text": "The match ended late."},
    {"id": 1, "lang": "en", "label": "health", "text": "Doctors found a cure."},
    {"id": 0, "lang": "de", "label": "sports", "text": "Das Spiel endete spät."},
    {"id": 1, "lang": "de", "text": "Ärzte fanden ein Heilmittel."},
]


def write_split(root: Path, split: str, rows: list[dict]) -> Path:
    path = root / f"{split}.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return path


def make_corpus(root: Path, rows: list[dict] = ROWS, labels: list[str] = LABELS) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "labels.txt").write_text("".join(f"{x}\n" for x in labels), "utf-8")
    for split in LABELED_SPLITS:
        write_split(root, split, rows)
    return root


def cfg(root: Path, langs=("en", "de"), labeled=("en",)) -> ClassifyCorpusConfig:
    return ClassifyCorpusConfig(
        path=str(root),
        labels=str(root / "labels.txt"),
        languages=list(langs),
        labeled_languages=list(labeled),
    )


def test_reads_rows_in_file_order(tmp_path):
    corpus = read_labeled_corpus(cfg(make_corpus(tmp_path)))
    assert corpus.labels == LABELS and list(corpus.splits) == list(LABELED_SPLITS)
    rows = corpus.splits["train"]
    assert len(rows) == 4 and rows.split == "train"
    assert rows.lang.tolist() == ["en", "en", "de", "de"]
    assert rows.id.dtype == np.int64 and rows.id.tolist() == [0, 1, 0, 1]
    assert rows.label.dtype == np.int64 and rows.label.tolist() == [0, 1, 0, -1]
    assert rows.text == [r["text"] for r in ROWS]
    assert rows.text_hash.dtype == np.uint64
    assert rows.text_hash.tolist() == [text_hash(r["text"]) for r in ROWS]
    # Labels of unlabeled languages are kept (for scoring) but are not gold for training.
    assert rows.gold_mask(["en"]).tolist() == [True, True, False, False]
    assert rows.gold_mask(["en", "de"]).tolist() == [True, True, True, False]
    assert corpus.skipped == {"empty_text": {}, "language_not_selected": {}}


def test_text_hash_is_first_8_bytes_of_sha256():
    digest = hashlib.sha256("Grüße, 世界".encode()).digest()
    assert text_hash("Grüße, 世界") == int.from_bytes(digest[:8], "big")
    assert 0 <= text_hash("") < 2**64
    assert np.asarray([text_hash("x")], np.uint64)[0] == text_hash("x")


def test_fingerprints_are_stable_and_see_every_change(tmp_path):
    first = read_labeled_corpus(cfg(make_corpus(tmp_path / "a")))
    again = read_labeled_corpus(cfg(make_corpus(tmp_path / "b")))
    assert first.fingerprint() == again.fingerprint()
    assert first.splits["dev"].fingerprint() == again.splits["dev"].fingerprint()
    assert len(first.fingerprint()) == 64
    relabeled = [dict(ROWS[0], label="travel"), *ROWS[1:]]
    edited = [dict(ROWS[0], text="The match ended early."), *ROWS[1:]]
    reordered = [ROWS[1], ROWS[0], *ROWS[2:]]
    for i, rows in enumerate([relabeled, edited, reordered]):
        other = read_labeled_corpus(cfg(make_corpus(tmp_path / f"c{i}", rows)))
        assert other.fingerprint() != first.fingerprint()
        assert other.splits["test"].fingerprint() != first.splits["test"].fingerprint()
    renamed = read_labeled_corpus(cfg(make_corpus(tmp_path / "d", labels=[*LABELS, "extra"])))
    assert renamed.splits["train"].fingerprint() == first.splits["train"].fingerprint()
    assert renamed.fingerprint() != first.fingerprint()


def test_counted_skips_and_optional_id(tmp_path):
    rows = [
        {"lang": "en", "label": "travel", "text": "No id here."},
        {"lang": "en", "label": "travel", "text": "Nor here."},
        {"id": 5, "lang": "en", "label": "sports", "text": "   "},
        {"id": 6, "lang": "fr", "label": "sports", "text": "Le match."},
        {"id": 7, "lang": "fr", "text": "Encore."},
        {"id": 0, "lang": "de", "text": "Hallo."},
    ]
    corpus = read_labeled_corpus(cfg(make_corpus(tmp_path, rows)))
    train = corpus.splits["train"]
    assert train.id.tolist() == [-1, -1, 0]  # records without `id` never collide
    assert train.lang.tolist() == ["en", "en", "de"]
    # Three splits with the same file: every count is over all of them.
    assert corpus.skipped == {"empty_text": {"en": 3}, "language_not_selected": {"fr": 6}}


def test_parquet_splits(tmp_path):
    root = make_corpus(tmp_path)
    (root / "train.jsonl").unlink()
    pq.write_table(pa.Table.from_pylist(ROWS), root / "train.parquet")
    corpus = read_labeled_corpus(cfg(root))
    assert corpus.splits["train"].fingerprint() == corpus.splits["dev"].fingerprint()
    assert corpus.files["train"].endswith("train.parquet")


def test_sib200_default_reads():
    c = ClassifyCorpusConfig()
    assert c.languages == list(SIB200_LANGUAGES) and c.labeled_languages == ["en"]
    corpus = read_labeled_corpus(replace(c, path=str(REPO / c.path), labels=str(REPO / c.labels)))
    assert len(corpus.labels) == 7
    assert {k: len(v) for k, v in corpus.splits.items()} == {
        "train": 701 * 21,
        "dev": 99 * 21,
        "test": 204 * 21,
    }
    assert int(corpus.splits["train"].gold_mask(["en"]).sum()) == 701


# -- bad inputs: one line, naming the file and line or the key, saying what to do --------------


def bad(tmp_path: Path, rows: list[dict] | None = None, split: str = "dev", raw: bytes = b""):
    root = make_corpus(tmp_path)
    path = root / f"{split}.jsonl"
    if rows is not None:
        write_split(root, split, rows)
    else:
        path.write_bytes(raw)
    with pytest.raises(InputError) as e:
        read_labeled_corpus(cfg(root))
    message = str(e.value)
    assert "\n" not in message
    return message, path


def test_label_not_in_label_set(tmp_path):
    message, path = bad(tmp_path, [ROWS[0], dict(ROWS[1], label="weather")])
    assert message == (
        f"{path}: line 2: label 'weather' is not in the label set ({tmp_path}/labels.txt: "
        "sports, health, travel); fix the record or the label file"
    )


def test_labeled_language_without_label(tmp_path):
    message, path = bad(tmp_path, [ROWS[0], {"id": 1, "lang": "en", "text": "x"}, *ROWS[2:]])
    assert message == (
        f"{path}: line 2: a record of labeled language 'en' has no `label`; add it, or remove "
        "the language from classify_corpus.labeled_languages"
    )


def test_duplicate_lang_id_in_one_split(tmp_path):
    message, path = bad(tmp_path, [*ROWS, dict(ROWS[0], text="again")], split="test")
    assert message == (
        f"{path}: line 5: id 0 of language 'en' already appears at line 1 of this split; ids "
        "must be unique per language and split"
    )


def test_missing_split_file(tmp_path):
    root = make_corpus(tmp_path)
    (root / "test.jsonl").unlink()
    with pytest.raises(InputError) as e:
        read_labeled_corpus(cfg(root))
    assert str(e.value) == (
        f"classify_corpus.path: {root} has no test.jsonl or test.parquet; every corpus needs "
        "the splits train, dev, test"
    )


def test_missing_folder_and_label_file(tmp_path):
    with pytest.raises(InputError, match=r"^classify_corpus.path: .*nope is not a folder"):
        read_labeled_corpus(cfg(tmp_path / "nope"))
    root = make_corpus(tmp_path / "c")
    (root / "labels.txt").unlink()
    with pytest.raises(InputError, match=r"^classify_corpus.labels: .*labels.txt does not exist"):
        read_labeled_corpus(cfg(root))


def test_bad_label_file(tmp_path):
    root = make_corpus(tmp_path)
    (root / "labels.txt").write_text("sports\nhealth\nsports\n")
    with pytest.raises(
        InputError, match=r"labels.txt:3: label 'sports' is listed twice; keep one$"
    ):
        read_labeled_corpus(cfg(root))
    (root / "labels.txt").write_text("sports\n\n")
    with pytest.raises(InputError, match=r"labels.txt: lists 1 label\(s\); a classifier needs"):
        read_labeled_corpus(cfg(root))


def test_both_jsonl_and_parquet(tmp_path):
    root = make_corpus(tmp_path)
    pq.write_table(pa.Table.from_pylist(ROWS), root / "dev.parquet")
    with pytest.raises(InputError, match=r"has both dev.jsonl and dev.parquet; keep one$"):
        read_labeled_corpus(cfg(root))


def test_invalid_utf8(tmp_path):
    good = json.dumps(ROWS[0]).encode() + b"\n"
    message, path = bad(tmp_path, raw=good + b'{"lang": "en", "text": "bad \xff"}\n')
    assert message.startswith(f"{path}:2: invalid UTF-8 (")


def test_bad_json(tmp_path):
    message, path = bad(tmp_path, raw=b'{"lang": "en",\n')
    assert (
        message == f"{path}:1: not valid JSON (Expecting property name enclosed in double quotes)"
    )


def test_unknown_language_code(tmp_path):
    message, path = bad(tmp_path, [ROWS[0], dict(ROWS[1], lang="English")])
    assert message == (
        f"{path}: line 2: field `lang` must be a language code such as 'en' or 'pt-BR', "
        "got 'English'"
    )


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"text": 3}, "line 1: field `text` must be a string, got 3"),
        ({"id": "7"}, "line 1: field `id` must be an integer >= 0, got '7'"),
        ({"id": -2}, "line 1: field `id` must be an integer >= 0, got -2"),
    ],
)
def test_bad_fields(tmp_path, change, expected):
    message, path = bad(tmp_path, [dict(ROWS[0], **change), *ROWS[1:]])
    assert message == f"{path}: {expected}"


def test_empty_file(tmp_path):
    message, path = bad(tmp_path, raw=b"")
    assert message == f"{path}: file is empty; add records or remove it"
    message, path = bad(tmp_path, raw=b"\n \n")
    assert message == f"{path}: file has no records; add the dev split's records"


def test_selected_language_without_rows(tmp_path):
    message, path = bad(tmp_path, [r for r in ROWS if r["lang"] == "en"])
    assert message == (
        f"{path}: no dev rows for de; add them, or remove the language from "
        "classify_corpus.languages"
    )


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"languages": ["english"]}, "classify_corpus.languages: 'english' is not a language code"),
        ({"languages": ["en", "en"]}, "classify_corpus.languages: listed more than once: en"),
        ({"labeled_languages": []}, "classify_corpus.labeled_languages: list at least one"),
        (
            {"languages": ["de"]},
            "classify_corpus.labeled_languages: en not in classify_corpus.languages; add it "
            "there or remove it here",
        ),
        ({"path": ""}, "classify_corpus.path: must not be empty"),
        (
            {"label": "x"},
            "classify_corpus.label: unknown key .*did you mean 'classify_corpus.labels'",
        ),
    ],
)
def test_param_errors_name_the_key(values, message):
    with pytest.raises(ConfigError, match=message):
        from_mapping(ClassifyCorpusConfig, values, "classify_corpus")
