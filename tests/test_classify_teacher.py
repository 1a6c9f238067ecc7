"""The classify_teacher stage and classifier inference: builtin fine-tuning from a tiny LM
teacher, loading by path, label-set checks, and errors that name the key or folder."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from pipeline import __version__
from pipeline.classify.corpus import read_labeled_corpus
from pipeline.classify.inference import class_logprobs, load_classifier
from pipeline.classify.teacher import ClassifyTeacherConfig, load_base, prepare_classify_teacher
from pipeline.core.config import from_params
from pipeline.core.errors import ConfigError, InputError
from pipeline.core.provenance import files_sha256, read_provenance
from pipeline.modeling.optim import adamw_with_schedule
from pipeline.stages.classify_teacher import main as stage_main
from tests.classify_fixtures import corpus_config, make_classifier, write_sib_slice
from tests.conftest import make_teacher, make_tokenizer

TINY = ClassifyTeacherConfig(
    steps=8, batch_size=8, warmup_steps=1, eval_every=4, max_length=48, learning_rate=0.01
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run faster on one thread (no spin-waiting on shared cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A SIB-200 slice (de, en, ja), its label set, and a tiny LM teacher trained on nothing."""
    root = tmp_path_factory.mktemp("classify_teacher")
    corpus_dir = write_sib_slice(root / "corpus")
    ccfg = corpus_config(corpus_dir)
    corpus = read_labeled_corpus(ccfg)
    tok = make_tokenizer([t for r in corpus.splits.values() for t in r.text], vocab_size=300)
    lm = make_teacher(root / "lm", tok, hidden=16)
    return root, ccfg, corpus, tok, lm


@pytest.fixture(scope="module")
def builtin(world):
    root, ccfg, _, _, lm = world
    out, metrics = root / "teacher", root / "teacher.json"
    result = prepare_classify_teacher(
        TINY, ccfg, lm_teacher=lm, out=out, metrics=metrics, progress=False
    )
    return out, metrics, result


def test_builtin_output_loads_as_a_classifier_of_the_label_set(world, builtin):
    _, _, corpus, _, _ = world
    out, _, _ = builtin
    model, tok = load_classifier(out, "cpu", labels=corpus.labels)
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert model.config.num_labels == 7
    assert [model.config.id2label[i] for i in range(7)] == corpus.labels
    assert model.config.pad_token_id == tok.pad_token_id != tok.eos_token_id
    # The saved tokenizer ends every text on EOS, for any consumer that loads it.
    plain = AutoTokenizer.from_pretrained(out)
    assert plain("Hello there")["input_ids"][-1] == plain.eos_token_id
    assert plain("Hello there", add_special_tokens=False)["input_ids"][-1] != plain.eos_token_id
    # Loads with transformers alone too.
    assert AutoModelForSequenceClassification.from_pretrained(out).config.num_labels == 7
    lp = class_logprobs(model, tok, corpus.splits["dev"].text, batch_size=5)  # (N, C)
    assert lp.shape == (len(corpus.splits["dev"]), 7) and lp.dtype == np.float32
    np.testing.assert_allclose(np.exp(lp).sum(-1), 1.0, rtol=1e-5)


def test_builtin_provenance_and_metrics(world, builtin):
    _, ccfg, corpus, _, lm = world
    out, metrics, result = builtin
    prov = read_provenance(out)
    assert prov == result["provenance"]
    digest, files = files_sha256(out)
    assert prov["sha256"] == digest and prov["files"] == files
    assert prov["name"] == "builtin" and prov["revision"] is None
    assert prov["architecture"] == "LlamaForSequenceClassification"
    assert prov["num_labels"] == 7 and prov["labels"] == corpus.labels
    assert prov["labeled_languages"] == ["en"] and prov["finetuned"] is True
    assert prov["corpus"]["fingerprint"] == corpus.fingerprint()
    assert prov["base"]["sha256"] == read_provenance(lm)["sha256"]
    assert prov["softlabels_version"] == __version__
    m = json.loads(metrics.read_text())
    assert m == result["metrics"]
    assert m["steps"] == 8 and m["train_rows"] == 24 and m["train_seconds"] > 0
    assert m["pooling"] == prov["pooling"] == "mean"
    assert [c["step"] for c in m["dev_curve"]] == [4, 8]
    assert m["best_step"] in (4, 8)
    assert max(c["dev_accuracy"] for c in m["dev_curve"]) == m["dev_accuracy"]["en"]
    assert set(m["dev_accuracy"]) == {"labeled", "en"} == set(m["test_accuracy"])
    assert set(m["dev_accuracy_direct"]) == {"de", "ja"}
    assert prov["dev_accuracy"] == m["dev_accuracy"]["labeled"]
    for value in [*m["dev_accuracy"].values(), *m["dev_accuracy_direct"].values()]:
        assert 0.0 <= value <= 1.0


def test_fine_tuning_learns_and_is_deterministic(world, builtin, tmp_path):
    root, ccfg, corpus, _, lm = world
    _, _, first = builtin
    again = prepare_classify_teacher(
        TINY, ccfg, lm_teacher=lm, out=tmp_path / "t", metrics=tmp_path / "m", progress=False
    )
    assert again["provenance"]["files"] == first["provenance"]["files"]
    # Training fits the 24 gold sentences: the loss falls well below chance (log 7).
    longer = replace(TINY, steps=40, eval_every=40, label_smoothing=0.0, dropout=0.0)
    m = prepare_classify_teacher(
        longer, ccfg, lm_teacher=lm, out=tmp_path / "t2", metrics=tmp_path / "m2", progress=False
    )["metrics"]
    assert m["train_final_loss"] < 0.75 * np.log(7)


def test_mean_pooling_is_uniform_attention_in_the_last_layer(world, builtin):
    _, _, corpus, _, _ = world
    model, tok = load_classifier(builtin[0], "cpu")
    k_proj = model.model.layers[-1].self_attn.k_proj
    assert not k_proj.weight.any()  # zero keys, saved as such: uniform attention
    ids = tok(corpus.splits["dev"].text[0])["input_ids"]  # ends on EOS
    shuffled = [*np.random.default_rng(0).permutation(ids[:-1]).tolist(), ids[-1]]
    with torch.no_grad():
        a = model(input_ids=torch.tensor([ids])).logits  # (1, C)
        b = model(input_ids=torch.tensor([shuffled])).logits  # (1, C)
    # The read-out at EOS is the mean over the text: word order does not change it.
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_pooling_last_keeps_the_attention(world):
    _, _, corpus, _, lm = world
    start = load_base(replace(TINY, pooling="last"), corpus.labels, lm)
    assert start.pooling == "last" and not start.frozen
    assert start.model.model.layers[-1].self_attn.k_proj.weight.any()
    mean = load_base(TINY, corpus.labels, lm)
    assert mean.pooling == "mean"
    assert mean.frozen == {"model.layers.0.self_attn.k_proj.weight"}
    assert mean.head == {"score.weight"}


def test_mean_pooling_needs_a_llama_like_decoder(world, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    _, ccfg, corpus, tok, _ = world
    config = GPT2Config(
        vocab_size=len(tok), n_positions=64, n_embd=16, n_layer=1, n_head=2,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    cfg = replace(TINY, model=str(tmp_path / "gpt2"))
    with pytest.raises(ConfigError) as e:
        load_base(cfg, corpus.labels, None)
    assert str(e.value) == (
        "classify_teacher.pooling: 'mean' needs a Llama-like decoder (layers with "
        "self_attn.k_proj); GPT2ForSequenceClassification has none, so use 'last'"
    )
    assert load_base(replace(cfg, pooling="last"), corpus.labels, None).pooling == "last"


def test_class_logprobs_is_batch_and_order_independent(builtin, world):
    _, _, corpus, _, _ = world
    model, tok = load_classifier(builtin[0], "cpu")
    texts = corpus.splits["test"].text
    one = class_logprobs(model, tok, texts, batch_size=1)
    many = class_logprobs(model, tok, texts, batch_size=64)
    np.testing.assert_allclose(one, many, atol=1e-5)
    rev = class_logprobs(model, tok, texts[::-1], batch_size=7)
    np.testing.assert_allclose(rev[::-1], many, atol=1e-5)
    assert class_logprobs(model, tok, [], batch_size=4).shape == (0, 7)


def test_head_size_mismatch_is_refused(world, builtin):
    _, _, corpus, _, _ = world
    out = builtin[0]
    with pytest.raises(InputError) as e:
        load_classifier(out, "cpu", labels=corpus.labels[:5])
    assert str(e.value) == (
        f"{out}: the classifier has 7 classes but the label set has 5 "
        f"({', '.join(corpus.labels[:5])}); use a classifier trained on this label set"
    )
    swapped = [corpus.labels[1], corpus.labels[0], *corpus.labels[2:]]
    with pytest.raises(InputError, match=r"labels \(.*\) differ from the label set .* order"):
        load_classifier(out, "cpu", labels=swapped)


def test_causal_lm_is_not_a_classifier(world):
    lm = world[4]
    with pytest.raises(InputError) as e:
        load_classifier(lm, "cpu")
    assert str(e.value).startswith(
        f"{lm} is not a sequence classifier (architectures: LlamaForCausalLM); "
    )
    with pytest.raises(InputError, match=r"nope does not exist; give the folder of a saved"):
        load_classifier(lm.parent / "nope", "cpu")


@pytest.mark.parametrize("finetune", [False, True])
def test_path_model_with_wrong_num_labels_is_refused(world, tmp_path, finetune):
    _, ccfg, corpus, tok, _ = world
    src = make_classifier(tmp_path / "src", tok, corpus.labels[:3])
    cfg = replace(TINY, model=str(src), finetune=finetune)
    with pytest.raises(InputError) as e:
        prepare_classify_teacher(
            cfg, ccfg, lm_teacher=None, out=tmp_path / "t", metrics=tmp_path / "m", progress=False
        )
    assert str(e.value) == (
        f"classify_teacher.model: {str(src)!r}: the classifier has 3 classes but the label set "
        f"has 7 ({', '.join(corpus.labels)}); use a classifier trained on this label set"
    )
    assert not (tmp_path / "t").exists()


def test_path_classifier_used_as_is(world, tmp_path):
    _, ccfg, corpus, tok, _ = world
    src = make_classifier(tmp_path / "src", tok, corpus.labels)
    cfg = replace(TINY, model=str(src), finetune=False)
    result = prepare_classify_teacher(
        cfg, ccfg, lm_teacher=None, out=tmp_path / "t", metrics=tmp_path / "m", progress=False
    )
    assert result["provenance"]["finetuned"] is False and result["metrics"]["steps"] == 0
    assert result["provenance"]["name"] == str(src) and result["provenance"]["revision"] is None
    model, tok2 = load_classifier(tmp_path / "t", "cpu", labels=corpus.labels)
    before, _ = load_classifier(src, "cpu")
    texts = corpus.splits["dev"].text
    np.testing.assert_allclose(
        class_logprobs(model, tok2, texts), class_logprobs(before, tok, texts), atol=1e-6
    )


def test_path_causal_lm_fine_tuned_gets_a_new_head(world, tmp_path):
    _, ccfg, corpus, _, lm = world
    cfg = replace(TINY, model=str(lm), steps=2, eval_every=2)
    result = prepare_classify_teacher(
        cfg, ccfg, lm_teacher=None, out=tmp_path / "t", metrics=tmp_path / "m", progress=False
    )
    assert result["provenance"]["architecture"] == "LlamaForSequenceClassification"
    assert result["provenance"]["base"] is None and result["metrics"]["steps"] == 2
    load_classifier(tmp_path / "t", "cpu", labels=corpus.labels)


def test_builtin_needs_the_lm_teacher(world, tmp_path):
    _, ccfg, _, _, _ = world
    with pytest.raises(ConfigError, match=r"^classify_teacher.model: builtin fine-tunes the LM"):
        prepare_classify_teacher(
            TINY, ccfg, lm_teacher=None, out=tmp_path / "t", metrics=tmp_path / "m"
        )
    with pytest.raises(InputError, match=r"^--lm-teacher .*absent: no such folder \(run `dvc"):
        prepare_classify_teacher(
            TINY, ccfg, lm_teacher=tmp_path / "absent", out=tmp_path / "t", metrics=tmp_path / "m"
        )
    assert not (tmp_path / "t").exists()


def test_missing_path_model(world, tmp_path):
    _, ccfg, _, _, _ = world
    missing = tmp_path / "no-such-model"
    with pytest.raises(InputError) as e:
        prepare_classify_teacher(
            replace(TINY, model=str(missing), finetune=False),
            ccfg,
            lm_teacher=None,
            out=tmp_path / "t",
            metrics=tmp_path / "m",
        )
    assert str(e.value) == (
        f"classify_teacher.model: {str(missing)!r} does not exist; give 'builtin', a hub id "
        "such as 'org/name', or the path of a folder written by save_pretrained"
    )


def test_head_learning_rate_gets_its_own_group(world):
    lm = world[4]
    model = AutoModelForSequenceClassification.from_pretrained(lm, num_labels=3)
    head = {model.score.weight: 0.5}
    opt, _ = adamw_with_schedule(
        model, learning_rate=0.1, weight_decay=0.1, warmup_steps=0, steps=4, lr_overrides=head
    )
    lrs = [(g["initial_lr"], g["weight_decay"], len(g["params"])) for g in opt.param_groups]
    n_decay = sum(1 for p in model.parameters() if p.ndim >= 2) - 1
    n_norms = sum(1 for p in model.parameters() if p.ndim < 2)
    assert lrs == [(0.1, 0.1, n_decay), (0.1, 0.0, n_norms), (0.5, 0.1, 1)]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model": " "}, "classify_teacher.model: must not be empty (use 'builtin')"),
        ({"steps": 0}, "classify_teacher.steps: must be >= 1, got 0"),
        ({"head_learning_rate": 2.0}, "classify_teacher.head_learning_rate: must be in (0, 1)"),
        ({"label_smoothing": 1.0}, "classify_teacher.label_smoothing: must be in [0, 1), got 1.0"),
        ({"dropout": -0.1}, "classify_teacher.dropout: must be in [0, 1), got -0.1"),
        ({"max_length": 0}, "classify_teacher.max_length: must be >= 1, got 0"),
        ({"threads": -1}, "classify_teacher.threads: must be >= 0 (0: all cores), got -1"),
    ],
)
def test_bad_values_are_named(changes, message):
    with pytest.raises(ConfigError) as e:
        replace(ClassifyTeacherConfig(), **changes)
    assert str(e.value).startswith(message)


def test_unknown_key_and_device_are_named():
    with pytest.raises(ConfigError, match=r"did you mean 'classify_teacher.steps'\?$"):
        from_params(ClassifyTeacherConfig, {"classify_teacher": {"stepz": 3}}, "classify_teacher")
    with pytest.raises(ConfigError, match=r"^classify_teacher.device: must be one of"):
        from_params(
            ClassifyTeacherConfig, {"classify_teacher": {"device": "tpu"}}, "classify_teacher"
        )


def test_stage_reports_error_and_exit_1(world, tmp_path, capsys):
    _, ccfg, _, _, _ = world
    params = tmp_path / "params.yaml"
    params.write_text(
        json.dumps(
            {
                "classify_teacher": {"model": "builtin"},
                "classify_corpus": {
                    "path": ccfg.path,
                    "labels": ccfg.labels,
                    "languages": ccfg.languages,
                },
            }
        )
    )
    out = tmp_path / "t"
    argv = ["--params", str(params), "--out", str(out), "--metrics", str(tmp_path / "m.json")]
    assert stage_main([*argv, "--lm-teacher", str(tmp_path / "absent")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --lm-teacher ") and "no such folder" in err
    assert not out.exists()


def test_stage_help_lists_both_sections(capsys):
    with pytest.raises(SystemExit) as e:
        stage_main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "params.yaml section 'classify_teacher':" in text
    assert "classify_teacher.head_learning_rate [default: " in text
    assert "params.yaml section 'classify_corpus':" in text
