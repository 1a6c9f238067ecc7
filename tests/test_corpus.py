"""Corpus reading: formats, the document-level split, counted skips, and exact input errors."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core.config import from_mapping
from pipeline.core.errors import ConfigError, InputError
from pipeline.data.corpus import CorpusConfig, has_visible_text, read_corpus, split_documents
from tests.conftest import write_corpus


def cfg(path, langs=("en", "de"), **kw) -> CorpusConfig:
    return CorpusConfig(path=str(path), languages=list(langs), **kw)


def test_reads_txt_folder_and_counts_skips(tmp_path):
    root = write_corpus(tmp_path, {"en": ["a b", "", "a b", "c d", "e f"], "de": ["x", "y"]})
    docs = read_corpus(cfg(root))
    assert sorted(docs.train["en"] + docs.validation["en"]) == ["a b", "c d", "e f"]
    assert docs.skipped["en"]["empty_line"] == 1
    assert docs.skipped["en"]["duplicate"] == 1
    assert len(docs.validation["de"]) == 1 and len(docs.train["de"]) == 1


def test_split_is_by_document_hash_stable_and_order_free():
    docs = [f"document number {i}" for i in range(400)]
    train, val = split_documents("en", docs, 0.1)
    assert 20 < len(val) < 60 and len(train) + len(val) == 400
    # Reordering or adding documents never moves an existing document across the split.
    train2, val2 = split_documents("en", list(reversed(docs)) + ["new one"], 0.1)
    assert set(val) <= set(val2) and set(train) <= set(train2)


def test_jsonl_and_parquet_records(tmp_path):
    rows = [
        {"text": "hello world", "lang": "en"},
        {"text": "hallo welt", "lang": "de"},
        {"text": "good day", "lang": "en"},
        {"text": "guten tag", "lang": "de"},
        {"text": "bonjour", "lang": "fr"},
    ]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:3]) + "\n")
    pq.write_table(pa.Table.from_pylist(rows[3:]), tmp_path / "b.parquet")
    docs = read_corpus(cfg(tmp_path))
    assert sorted(docs.train["en"] + docs.validation["en"]) == ["good day", "hello world"]
    assert docs.skipped["fr"]["language_not_selected"] == 1


@pytest.mark.parametrize(
    "content",
    [b"PAR1" + bytes(range(256)) * 4 + b"PAR1", b"not parquet at all"],
    ids=["garbage_between_magics", "no_magic"],
)
def test_corrupt_parquet_is_one_input_error(tmp_path, content):
    (tmp_path / "a.parquet").write_bytes(content)
    with pytest.raises(InputError, match=r"a.parquet: not a readable parquet file \(") as e:
        read_corpus(cfg(tmp_path))
    assert "\n" not in str(e.value)


def test_missing_path(tmp_path):
    with pytest.raises(
        InputError, match=r"^corpus.path: .*nope does not exist \(set corpus.path in params.yaml\)$"
    ):
        read_corpus(cfg(tmp_path / "nope"))


def test_empty_file(tmp_path):
    write_corpus(tmp_path, {"en": ["a", "b"]})
    (tmp_path / "de.txt").write_text("\n\n")
    with pytest.raises(
        InputError, match=r"de.txt: file is empty; add documents \(one per line\) or remove it$"
    ):
        read_corpus(cfg(tmp_path))


def test_language_without_file(tmp_path):
    write_corpus(tmp_path, {"en": ["a", "b"]})
    with pytest.raises(
        InputError, match=r"^corpus.languages: no data for de \(looked for .*/<lang>.txt"
    ):
        read_corpus(cfg(tmp_path))


def test_invalid_utf8_names_file_and_line_or_is_skipped_and_counted(tmp_path):
    write_corpus(tmp_path, {"de": ["x", "y"]})
    (tmp_path / "en.txt").write_bytes(b"fine line\nbad \xff\xfe line\nanother\n")
    with pytest.raises(
        InputError,
        match=r"en.txt:2: invalid UTF-8 at byte 4 of the line .*corpus.on_invalid_utf8: skip",
    ):
        read_corpus(cfg(tmp_path))
    docs = read_corpus(cfg(tmp_path, on_invalid_utf8="skip"))
    assert docs.skipped["en"]["invalid_utf8"] == 1
    assert sorted(docs.train["en"] + docs.validation["en"]) == ["another", "fine line"]


def test_bad_jsonl_record(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "hi", "lang": "en"}\n{"text": 3, "lang": "en"}\n')
    with pytest.raises(InputError, match=r"a.jsonl: line 2: field `text` must be a string"):
        read_corpus(cfg(tmp_path, langs=["en"]))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"languages": ["english"]}, "corpus.languages: 'english' is not a language code"),
        ({"languages": ["en", "en"]}, "corpus.languages: listed more than once: en"),
        ({"languages": []}, "corpus.languages: list at least one language"),
        (
            {"validation_fraction": 0.7},
            r"corpus.validation_fraction: must be in \(0, 0.5\), got 0.7",
        ),
        (
            {"on_invalid_utf8": "ignore"},
            "corpus.on_invalid_utf8: must be one of 'error', 'skip', got 'ignore'",
        ),
        ({"langauges": ["en"]}, "corpus.langauges: unknown key .*did you mean 'corpus.languages'"),
    ],
)
def test_param_errors_name_the_key(values, message):
    with pytest.raises(ConfigError, match=message):
        from_mapping(CorpusConfig, values, "corpus")


def test_invisible_lines_are_counted_under_no_visible_text(tmp_path):
    junk = [
        "\x00",
        "\x00\x00 \x00",
        "\u200b",
        "\u200d\u2060\ufeff",
        "\x1b\x9f\u00ad",
        "\u2028\u3000\u200e",
    ]
    root = write_corpus(
        tmp_path, {"en": ["a b", *junk, "", "\u2028\u3000 \t", "\ufeff", "c d"], "de": ["x", "y"]}
    )
    docs = read_corpus(cfg(root))
    assert sorted(docs.train["en"] + docs.validation["en"]) == ["a b", "c d"]
    assert docs.skipped["en"]["no_visible_text"] == len(junk) + 1  # the lone BOM too
    assert docs.skipped["en"]["empty_line"] == 2  # "" and the one of only whitespace
    # Invisible characters inside a document with visible text are kept as they are.
    assert has_visible_text("\u200bword") and not has_visible_text("\u200b\ufeff\x00")


def test_invisible_records_are_counted_too(tmp_path):
    rows = [{"text": t, "lang": "en"} for t in ("hello", "\x00\u200b", "   ", "world")]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    docs = read_corpus(cfg(tmp_path, langs=["en"]))
    assert sorted(docs.train["en"] + docs.validation["en"]) == ["hello", "world"]
    assert docs.skipped["en"]["no_visible_text"] == 1 and docs.skipped["en"]["empty_line"] == 1


def test_too_long_lines_are_counted_and_the_rest_kept(tmp_path, monkeypatch):
    monkeypatch.setattr("pipeline.data.corpus.READ_BLOCK", 64)
    write_corpus(tmp_path, {"de": ["x", "y"]})
    # 11 chars (decoded, then too long); 2 kB of invalid UTF-8 (over 4 x 10 bytes: never decoded,
    # or on_invalid_utf8=error would stop); a 5 kB line, read past in 64-byte blocks; 10 chars
    # (kept: the cap is inclusive); and a last line without a final newline.
    (tmp_path / "en.txt").write_bytes(
        b"short one\n" + b"z" * 11 + b"\n" + b"\xff" * 2000 + b"\nkept\n" + b"q" * 5000
        + b"\nten chars!\nlast"
    )  # fmt: skip
    docs = read_corpus(cfg(tmp_path, max_doc_chars=10))
    kept = ["kept", "last", "short one", "ten chars!"]
    assert sorted(docs.train["en"] + docs.validation["en"]) == kept
    assert docs.skipped["en"]["too_long"] == 3
    assert docs.skipped["en"]["invalid_utf8"] == 0
    # Under the default cap (100k characters) none of these is too long.
    assert read_corpus(cfg(tmp_path, on_invalid_utf8="skip")).skipped["en"]["too_long"] == 0


def test_unselected_and_misnamed_txt_files_are_counted_and_logged(tmp_path, caplog):
    root = write_corpus(tmp_path, {"en": ["a", "b"], "de": ["x", "y"], "fr": ["f"], "pt-BR": ["p"]})
    (root / "english.txt").write_text("misnamed\n")
    (root / "SOURCES.md").write_text("# sources\n")  # not a data file: neither read nor counted
    (root / "manifest.json").write_text("{}")
    with caplog.at_level("INFO", logger="pipeline.data.corpus"):
        docs = read_corpus(cfg(root))
    assert docs.files_skipped == {
        "language_not_selected": [str(root / "fr.txt"), str(root / "pt-BR.txt")],
        "not_a_language_code": [str(root / "english.txt")],
    }
    assert "2 .txt file(s) not read (language_not_selected): fr.txt, pt-BR.txt" in caplog.text
    assert "1 .txt file(s) not read (not_a_language_code): english.txt" in caplog.text


@pytest.mark.parametrize("slice_bytes", [1, 7, 64, 1000])
def test_any_slicing_reads_every_document_once_in_order(tmp_path, slice_bytes):
    """Slices own the lines that start in their byte range (parquet: their row groups): read in
    plan order they give the documents and skip counts of one whole-file read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.data.corpus import SliceReport, plan_slices, read_slice

    long = "y" * 50
    (tmp_path / "en.txt").write_bytes(
        "\ufeffone\n\ntwo two\r\n".encode() + long.encode() + b"\n\xc3\n" + b"drei\nvier"
    )
    (tmp_path / "de.txt").write_text("eins\n\n\nzwei\n", "utf-8")
    recs = [{"lang": g, "text": f"{g} record {i}"} for i in range(25) for g in ("en", "de", "fr")]
    with open(tmp_path / "r.jsonl", "w") as f:
        f.writelines(
            json.dumps(r) + "\n" + ("\n" if i % 3 == 0 else "") for i, r in enumerate(recs)
        )
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "r.parquet", row_group_size=4)
    c = CorpusConfig(
        path=str(tmp_path), languages=["en", "de"], max_doc_chars=20, on_invalid_utf8="skip"
    )

    def read(plan):
        docs, skipped = [], {}
        for piece in plan.slices:
            rep = SliceReport()
            docs += list(read_slice(c, piece, rep))
            for lang, counts in rep.skipped.items():
                for reason, n in counts.items():
                    skipped[lang, reason] = skipped.get((lang, reason), 0) + n
        return docs, skipped

    whole = plan_slices(c)
    sliced = plan_slices(c, slice_bytes)
    assert len(sliced.slices) > len(whole.slices)
    assert read(sliced) == read(whole)
    docs, skipped = read(whole)
    assert docs[:4] == [("de", "eins"), ("de", "zwei"), ("en", "one"), ("en", "two two")]
    assert skipped[("en", "too_long")] == 1 and skipped[("en", "invalid_utf8")] == 1


def test_invalid_utf8_in_a_later_slice_names_the_files_line(tmp_path):
    from pipeline.data.corpus import SliceReport, plan_slices, read_slice

    (tmp_path / "en.txt").write_bytes(
        b"".join(b"line %d\n" % i for i in range(1, 40)) + b"bad \xff\n"
    )
    c = CorpusConfig(path=str(tmp_path), languages=["en"])
    plan = plan_slices(c, 16)
    with pytest.raises(InputError, match=r"en.txt:40: invalid UTF-8 at byte 4 of the line"):
        for piece in plan.slices:
            list(read_slice(c, piece, SliceReport()))
    (tmp_path / "r.jsonl").write_bytes(b'{"lang": "en", "text": "a"}\n' * 30 + b"{oops\n")
    (tmp_path / "en.txt").unlink()
    with pytest.raises(InputError, match=r"r.jsonl:31: not valid JSON"):
        for piece in plan_slices(c, 16).slices:
            list(read_slice(c, piece, SliceReport()))
