"""The prepare_teacher stage: builtin training, loading a saved model by path, and bad input."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from pipeline import __version__
from pipeline.core.config import from_params
from pipeline.core.errors import ConfigError, InputError
from pipeline.core.provenance import files_sha256, read_provenance, tokenizer_identity
from pipeline.data.corpus import CorpusConfig
from pipeline.stages.prepare_teacher import main as stage_main
from pipeline.teacher import builtin_teacher as bt
from pipeline.teacher.prepare_teacher import TeacherConfig, prepare_teacher
from tests.conftest import make_teacher, make_tokenizer, sample_lines

LANGS = ["en", "de", "zh"]
TINY = TeacherConfig(
    vocab_size=400,
    hidden_size=32,
    num_layers=2,
    num_heads=2,
    intermediate_size=64,
    max_position_embeddings=64,
    seq_len=32,
    batch_size=16,
    steps=60,
    learning_rate=0.01,
    warmup_steps=5,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models train faster on one thread (no spin-waiting on shared cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def corpus(path: Path) -> CorpusConfig:
    return CorpusConfig(path=str(path), languages=LANGS, validation_fraction=0.1)


@pytest.fixture(scope="module")
def builtin(tmp_path_factory, tiny_corpus):
    """One tiny builtin teacher, prepared once for the tests that inspect it."""
    root = tmp_path_factory.mktemp("builtin")
    result = prepare_teacher(
        TINY, corpus(tiny_corpus), out=root / "teacher", metrics=root / "teacher.json"
    )
    return root, result


def test_builtin_layout_loads_with_transformers_alone(builtin):
    root, _ = builtin
    model = AutoModelForCausalLM.from_pretrained(root / "teacher")
    tok = AutoTokenizer.from_pretrained(root / "teacher")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.vocab_size == len(tok) == 400
    assert model.config.max_position_embeddings == 64
    assert tok.eos_token == bt.EOS_TOKEN and tok.bos_token == bt.EOS_TOKEN
    assert tok.pad_token == bt.PAD_TOKEN and tok.pad_token_id != tok.eos_token_id
    assert model.config.eos_token_id == tok.eos_token_id
    text = sample_lines("zh", 1)[0] + " " + sample_lines("de", 1)[0]
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level: lossless in any script
    with torch.no_grad():
        logits = model(torch.tensor([tok(text)["input_ids"][:16]])).logits  # (1, 16, V)
    assert logits.shape == (1, 16, 400)


def test_builtin_provenance(builtin):
    root, result = builtin
    out = root / "teacher"
    prov = read_provenance(out)
    assert prov == result["provenance"]
    digest, files = files_sha256(out)
    assert prov["sha256"] == digest and prov["files"] == files
    assert "model.safetensors" in files and "tokenizer.json" in files
    tok = AutoTokenizer.from_pretrained(out)
    assert prov["name"] == "builtin" and prov["revision"] is None
    assert prov["architecture"] == "LlamaForCausalLM"
    assert prov["vocab_size"] == 400 and prov["max_position_embeddings"] == 64
    assert prov["tokenizer"] == tokenizer_identity(tok)
    assert prov["tokenizer"]["eos_id"] == tok.eos_token_id
    assert prov["softlabels_version"] == __version__


def test_builtin_metrics_beat_unigram(builtin):
    root, result = builtin
    m = json.loads((root / "teacher.json").read_text())
    assert m == result["metrics"]
    assert m["name"] == "builtin" and m["steps"] == 60
    assert m["train_tokens_seen"] == 60 * 16 * 32 and m["train_seconds"] > 0
    teacher, unigram = m["perplexity"]["teacher"], m["perplexity"]["unigram"]
    assert set(teacher) == set(unigram) == {"overall", *LANGS}
    assert set(m["tokens"]["validation_by_lang"]) == set(LANGS)
    assert m["tokens"]["validation"] == sum(m["tokens"]["validation_by_lang"].values())
    for key in teacher:
        assert 1.0 < teacher[key] < unigram[key] < 400 * 2, key


def test_builtin_is_deterministic(builtin, tmp_path, tiny_corpus):
    _, first = builtin
    again = prepare_teacher(
        TINY, corpus(tiny_corpus), out=tmp_path / "t", metrics=tmp_path / "t.json"
    )
    assert again["provenance"]["files"] == first["provenance"]["files"]
    assert again["metrics"]["perplexity"] == first["metrics"]["perplexity"]


def test_unigram_perplexity_matches_hand_computation():
    train = np.array([[0, 1, 1, 2]], np.int32)  # counts 1, 2, 1, 0 over V = 4
    val = {"xx": np.array([[3, 1, 3]], np.int32)}  # predicted: 1, 3
    p = bt.unigram_perplexity(train, val, vocab_size=4)
    expected = np.exp(-(np.log(3 / 8) + np.log(1 / 8)) / 2)
    assert p.overall == pytest.approx(expected) and p.by_lang["xx"] == pytest.approx(expected)
    assert p.tokens == {"xx": 2}


def test_model_perplexity_matches_mean_cross_entropy(builtin):
    root, _ = builtin
    model = AutoModelForCausalLM.from_pretrained(root / "teacher")
    rows = {"a": np.arange(64, dtype=np.int32).reshape(2, 32), "b": np.ones((1, 32), np.int32)}
    p = bt.model_perplexity(model, rows, batch_size=1)
    with torch.no_grad():
        batch = torch.from_numpy(rows["a"]).long()
        loss = model(input_ids=batch, labels=batch).loss  # mean over (2, 31) targets
    assert p.by_lang["a"] == pytest.approx(float(torch.exp(loss)), rel=1e-4)
    assert p.tokens == {"a": 62, "b": 31}


def test_batch_schedule_covers_every_row_each_epoch():
    order = bt.batch_schedule(10, batch_size=4, steps=5, seed=3)  # 20 draws = 2 epochs
    assert order.shape == (5, 4)
    flat = order.ravel()
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert (order == bt.batch_schedule(10, batch_size=4, steps=5, seed=3)).all()


def test_from_local_path(tmp_path, tiny_corpus, tiny_tokenizer):
    src = make_teacher(tmp_path / "src", tiny_tokenizer)
    cfg = TeacherConfig(model=str(src), seq_len=32, dtype="bfloat16")
    result = prepare_teacher(cfg, corpus(tiny_corpus), out=tmp_path / "t", metrics=tmp_path / "m")
    prov = result["provenance"]
    assert prov["name"] == str(src) and prov["revision"] is None
    assert prov["architecture"] == "LlamaForCausalLM"
    assert prov["vocab_size"] == len(tiny_tokenizer)
    assert prov["max_position_embeddings"] == 256
    assert prov["tokenizer"] == tokenizer_identity(tiny_tokenizer)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "t")
    assert model.dtype == torch.bfloat16
    m = result["metrics"]
    assert m["steps"] == 0 and set(m["perplexity"]["teacher"]) == {"overall", *LANGS}


def test_missing_path_names_teacher_model(tmp_path, tiny_corpus):
    missing = tmp_path / "no-such-teacher"
    cfg = TeacherConfig(model=str(missing))
    with pytest.raises(InputError) as e:
        prepare_teacher(cfg, corpus(tiny_corpus), out=tmp_path / "t", metrics=tmp_path / "m")
    assert str(e.value) == (
        f"teacher.model: {str(missing)!r} does not exist; give 'builtin', a hub id such as "
        "'org/name', or the path of a folder written by save_pretrained"
    )
    assert not (tmp_path / "t").exists()


def test_tokenizer_without_eos_is_refused(tmp_path, tiny_corpus, tiny_tokenizer):
    no_eos = PreTrainedTokenizerFast(
        tokenizer_object=tiny_tokenizer.backend_tokenizer, pad_token="<pad>"
    )
    assert no_eos.eos_token_id is None
    src = make_teacher(tmp_path / "src", no_eos)
    with pytest.raises(InputError) as e:
        prepare_teacher(
            TeacherConfig(model=str(src)),
            corpus(tiny_corpus),
            out=tmp_path / "t",
            metrics=tmp_path / "m",
        )
    assert str(e.value) == (
        f"teacher.model: the tokenizer of {str(src)!r} has no EOS token; packing separates "
        "documents with EOS, so set `eos_token` in its tokenizer_config.json"
    )
    assert not (tmp_path / "t").exists()


def test_embedding_smaller_than_tokenizer_is_refused(tmp_path, tiny_corpus):
    big = make_tokenizer([line for lang in LANGS for line in sample_lines(lang, 60)], 500)
    small = make_tokenizer(sample_lines("en", 60), 300)
    src = make_teacher(tmp_path / "src", small)
    big.save_pretrained(src)  # overwrite the tokenizer files: 500 ids, 300 embedding rows
    with pytest.raises(InputError) as e:
        prepare_teacher(
            TeacherConfig(model=str(src)),
            corpus(tiny_corpus),
            out=tmp_path / "t",
            metrics=tmp_path / "m",
        )
    assert str(e.value) == (
        f"teacher.model: the embedding of {str(src)!r} has 300 rows but its tokenizer has "
        "500 ids; the model and tokenizer do not belong together"
    )


def test_unknown_key_is_named():
    with pytest.raises(ConfigError) as e:
        from_params(TeacherConfig, {"teacher": {"modle": "builtin"}}, "teacher")
    assert str(e.value).startswith("teacher.modle: unknown key (known: ")
    assert str(e.value).endswith("; did you mean 'teacher.model'?")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model": " "}, "teacher.model: must not be empty (use 'builtin')"),
        (
            {"vocab_size": 100},
            "teacher.vocab_size: must be >= 258 (256 byte symbols + EOS + PAD), got 100",
        ),
        (
            {"num_heads": 3},
            "teacher.num_heads: must divide hidden_size (256) into an even head size, got 3",
        ),
        ({"steps": 0}, "teacher.steps: must be >= 1, got 0"),
        (
            {"warmup_steps": 400},
            "teacher.warmup_steps: must be >= 0 and < teacher.steps (400), got 400",
        ),
        (
            {"seq_len": 2048},
            "teacher.max_position_embeddings: must be >= teacher.seq_len (2048), got 1024",
        ),
        ({"learning_rate": 0.0}, "teacher.learning_rate: must be in (0, 1), got 0.0"),
        ({"grad_clip": 0.0}, "teacher.grad_clip: must be > 0, got 0.0"),
        ({"threads": -1}, "teacher.threads: must be >= 0 (0: all cores), got -1"),
    ],
)
def test_bad_values_are_named(changes, message):
    with pytest.raises(ConfigError) as e:
        replace(TeacherConfig(steps=400), **changes)
    assert str(e.value) == message


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"^teacher\.steps: expected an integer, got 'many'$"):
        from_params(TeacherConfig, {"teacher": {"steps": "many"}}, "teacher")


def test_stage_reports_error_and_exit_1(tmp_path, tiny_corpus, capsys):
    params = tmp_path / "params.yaml"
    params.write_text(
        json.dumps(
            {
                "teacher": {"model": str(tmp_path / "absent")},
                "corpus": {"path": str(tiny_corpus), "languages": LANGS},
            }
        )
    )
    out = tmp_path / "t"
    argv = ["--params", str(params), "--out", str(out), "--metrics", str(tmp_path / "m.json")]
    assert stage_main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: teacher.model: ") and "does not exist" in err
    assert not out.exists()


def test_stage_help_lists_both_sections(capsys):
    with pytest.raises(SystemExit) as e:
        stage_main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "params.yaml section 'teacher':" in text and "teacher.vocab_size [default: " in text
    assert "params.yaml section 'corpus':" in text and "corpus.path" in text
