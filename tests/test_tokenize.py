"""The tokenize stage: output contract, balancing, determinism, and bad input."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest

from pipeline.core.errors import ConfigError, InputError
from pipeline.data.corpus import SKIP_REASONS, CorpusConfig
from pipeline.data.tokenize import TokenizeConfig, balance, run_tokenize
from tests.conftest import REPO, write_corpus

LANGS = ["en", "de", "zh"]


def corpus(path: Path, **kw) -> CorpusConfig:
    return CorpusConfig(path=str(path), languages=LANGS, validation_fraction=0.1, **kw)


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def run(tmp_path, tiny_corpus, tiny_teacher, name="tok", **kw):
    cfg = TokenizeConfig(**{"seq_len": 32, "num_proc": 1, **kw})
    out, metrics = tmp_path / name, tmp_path / f"{name}.json"
    result = run_tokenize(cfg, corpus(tiny_corpus), teacher=tiny_teacher, out=out, metrics=metrics)
    return out, metrics, result


def test_output_contract(tmp_path, tiny_corpus, tiny_teacher, tiny_tokenizer):
    out, metrics, result = run(tmp_path, tiny_corpus, tiny_teacher)
    dd = datasets.load_from_disk(str(out))
    assert set(dd) == {"train", "validation"}
    for split in dd.values():
        assert split.features["input_ids"] == datasets.List(datasets.Value("int32"), length=32)
        assert split.features["lang"] == datasets.Value("string")
        assert set(split["lang"]) == set(LANGS)
    ids = np.asarray(dd["train"].data.column("input_ids").combine_chunks().values).reshape(-1, 32)
    assert ids.max() < len(tiny_tokenizer)
    assert (ids == tiny_tokenizer.eos_token_id).any()  # documents are EOS-separated
    # Metrics account for every document and token: nothing dropped silently.
    m = json.loads(metrics.read_text())
    assert m == result
    for lang in LANGS:
        st = m["languages"][lang]
        assert st["train_documents"] + st["validation_documents"] == 60
        assert (
            st["train_tokens"]
            == st["train_tokens_before_balancing"] + st["train_remainder_tokens_dropped"]
        )
        assert set(SKIP_REASONS) <= set(st)
    assert m["files_skipped"] == {"language_not_selected": 0, "not_a_language_code": 0}
    assert m["total"]["train_tokens_after_balancing"] == len(dd["train"]) * 32


def test_two_runs_give_identical_bytes(tmp_path, tiny_corpus, tiny_teacher, monkeypatch):
    monkeypatch.setattr("pipeline.data.tokenize.ENCODE_BATCH", 16)  # so num_proc=2 really forks
    a, _, _ = run(tmp_path, tiny_corpus, tiny_teacher, name="a")
    b, _, _ = run(tmp_path, tiny_corpus, tiny_teacher, name="b", num_proc=2)
    assert tree_digest(a) == tree_digest(b)


def test_balance_follows_temperature_and_keeps_total():
    rows = {"big": np.zeros((900, 4), np.int32), "small": np.ones((100, 4), np.int32)}
    out = balance(rows, alpha=0.5, seed=0)
    n_big, n_small = len(out["big"]), len(out["small"])
    assert n_big + n_small == 1000
    assert n_small / 1000 == pytest.approx(
        10 / (30 + 10), abs=1e-3
    )  # sqrt(100)/(sqrt(900)+sqrt(100))
    same = balance(rows, alpha=1.0, seed=0)
    assert len(same["big"]) == 900 and len(same["small"]) == 100


def test_seq_len_longer_than_teacher_context(tmp_path, tiny_corpus, tiny_teacher):
    with pytest.raises(
        ConfigError,
        match=r"^tokenize.seq_len: 512 is longer than the teacher's context \(max_position_embeddings=256 in .*config.json\); use at most 256$",
    ):
        run_tokenize(
            TokenizeConfig(seq_len=512),
            corpus(tiny_corpus),
            teacher=tiny_teacher,
            out=tmp_path / "o",
            metrics=tmp_path / "m.json",
        )


def test_missing_teacher(tmp_path, tiny_corpus):
    with pytest.raises(
        InputError, match=r"nope: teacher folder not found \(run `dvc repro prepare_teacher`\)"
    ):
        run_tokenize(
            TokenizeConfig(),
            corpus(tiny_corpus),
            teacher=tmp_path / "nope",
            out=tmp_path / "o",
            metrics=tmp_path / "m.json",
        )


def test_failure_leaves_no_output_that_looks_complete(tmp_path, tiny_teacher):
    (tmp_path / "c").mkdir()
    for lang in LANGS:
        (tmp_path / "c" / f"{lang}.txt").write_text("short\nlines\n")
    out = tmp_path / "o"
    with pytest.raises(InputError, match="the train split is empty"):
        run_tokenize(
            TokenizeConfig(seq_len=64),
            corpus(tmp_path / "c"),
            teacher=tiny_teacher,
            out=out,
            metrics=tmp_path / "m.json",
        )
    assert not out.exists() and not list(tmp_path.glob(".o.partial*"))


def test_stage_script_help_and_error_exit(tmp_path):
    help_text = subprocess.run(
        [sys.executable, "-m", "pipeline.stages.tokenize_corpus", "--help"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    ).stdout
    assert "tokenize.alpha" in help_text and "corpus.languages" in help_text
    params = tmp_path / "params.yaml"
    params.write_text("corpus: {languages: [en]}\ntokenize: {seq_lenn: 3}\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.stages.tokenize_corpus",
            "--params",
            str(params),
            "--teacher",
            "x",
            "--out",
            str(tmp_path / "o"),
            "--metrics",
            str(tmp_path / "m.json"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        "error: tokenize.seq_lenn: unknown key (known: alpha, num_proc, seed, seq_len); "
        "did you mean 'tokenize.seq_len'?"
    )


def test_junk_lines_and_files_are_counted_not_tokenized(tmp_path, tiny_corpus, tiny_teacher):
    lines = {lang: (tiny_corpus / f"{lang}.txt").read_text("utf-8").splitlines() for lang in LANGS}
    junk = ["\x00\x00\x00", "\u200b\u200c\u200d", "\x01\x7f\x85 \u2060\ufeff"]
    cap = max(len(line) for doc_lines in lines.values() for line in doc_lines)
    long_line = "x" * (cap + 1)
    lines["en"] = lines["en"][:30] + junk + [long_line] + lines["en"][30:]
    root = write_corpus(tmp_path / "c", {**lines, "fr": ["bonjour"]})
    (root / "notes.txt").write_text("not a corpus file\n")
    (root / "manifest.json").write_text("{}")  # not a data file: not counted
    cfg = TokenizeConfig(seq_len=32, num_proc=1)
    out, metrics = tmp_path / "o", tmp_path / "m.json"
    ccfg = corpus(root, max_doc_chars=cap)
    result = run_tokenize(cfg, ccfg, teacher=tiny_teacher, out=out, metrics=metrics)
    en = result["languages"]["en"]
    assert en["no_visible_text"] == 3 and en["too_long"] == 1
    assert en["train_documents"] + en["validation_documents"] == 60  # the rest is kept
    assert result["total"]["no_visible_text"] == 3 and result["total"]["too_long"] == 1
    assert result["files_skipped"] == {"language_not_selected": 1, "not_a_language_code": 1}
    # Same rows as the clean corpus: the junk never reached the tokenizer.
    _, _, clean = run(tmp_path, tiny_corpus, tiny_teacher, name="clean")
    assert result["fingerprints"] == clean["fingerprints"]


@pytest.mark.parametrize("value", [0, -5])
def test_max_doc_chars_error_names_the_key(value):
    with pytest.raises(ConfigError, match=rf"^corpus.max_doc_chars: must be >= 1 .*got {value}$"):
        CorpusConfig(languages=["en"], max_doc_chars=value)
