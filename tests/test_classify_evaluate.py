"""The classify_evaluate stage: metric functions against hand-computed values, the files it writes
(metrics, plot tables, report and figures) on tiny saved classifiers and a slice of SIB-200, its
numbers against direct computations, and its refusals (exact messages).

Setup: a 3-language slice of the default corpus (en labeled; de, ja unlabeled), two tiny random
Llama sequence classifiers saved as classify_teacher saves one (tests.classify_fixtures: a
"teacher" and a "student"), and the student compressed by the compress stage's own code.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.classify.evaluate import (
    ClassifyEvaluateConfig,
    accuracy,
    confusion_matrix,
    macro_f1,
    precision_recall_f1,
    run_classify_evaluate,
    score_predictions,
    throughput_rows,
)
from pipeline.compress.compress import CompressConfig, run_compress
from pipeline.core.config import from_params
from pipeline.core.errors import ConfigError, InputError
from tests.classify_fixtures import (
    LANGS,
    SIB200,
    corpus_config,
    labels_of,
    make_classifier,
    write_sib_slice,
)
from tests.conftest import stage_module

REPO = Path(__file__).resolve().parents[1]
PER_SPLIT = {"train": 6, "dev": 4, "test": 10}
"""Rows per language of the corpus slice (languages: tests.classify_fixtures.LANGS)."""
CFG = ClassifyEvaluateConfig(batch_size=4, throughput_examples=6, throughput_repeats=2, threads=1)

# --- metric functions, exact on toy arrays ---------------------------------------------------

GOLD = np.array([0, 0, 0, 1, 1, 2])
PRED = np.array([0, 1, 0, 1, 2, 2])


def test_confusion_matrix_and_accuracy():
    cm = confusion_matrix(GOLD, PRED, 4)
    assert cm.tolist() == [[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    assert accuracy(cm) == 4 / 6
    assert accuracy(np.zeros((3, 3), np.int64)) == 0.0
    with pytest.raises(ValueError):
        confusion_matrix(np.array([0, 3]), np.array([0, 1]), 3)


def test_precision_recall_f1_hand_computed():
    precision, recall, f1 = precision_recall_f1(confusion_matrix(GOLD, PRED, 4))
    # class 0: TP 2 of 2 predicted, of 3 gold; class 1: 1 of 2, of 2; class 2: 1 of 2, of 1;
    # class 3: never seen (0/0 -> 0)
    assert precision.tolist() == [1.0, 0.5, 0.5, 0.0]
    np.testing.assert_allclose(recall, [2 / 3, 0.5, 1.0, 0.0], rtol=0, atol=1e-15)
    np.testing.assert_allclose(f1, [0.8, 0.5, 2 / 3, 0.0], rtol=0, atol=1e-15)


def test_macro_f1_averages_present_classes():
    # class 3 is in neither gold nor predictions: not averaged
    assert macro_f1(confusion_matrix(GOLD, PRED, 4)) == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    # a gold class never predicted counts with F1 0; a predicted class never gold counts too
    cm = confusion_matrix(np.array([0, 1, 1]), np.array([0, 0, 2]), 3)
    # class 0: P 1/2, R 1 -> 2/3; class 1: 0; class 2: P 0 (1 predicted), R 0/0 -> 0
    assert macro_f1(cm) == pytest.approx((2 / 3 + 0 + 0) / 3)
    assert macro_f1(np.zeros((2, 2), np.int64)) == 0.0


def test_score_predictions_groups():
    labels = ["a", "b", "c"]
    gold = np.array([0, 1, 2, 0, 1, 2, 0, 0])
    pred = np.array([0, 1, 2, 1, 1, 0, 0, 2])
    lang = np.array(["en", "en", "en", "de", "de", "de", "zh", "zh"])
    s = score_predictions(pred, gold, lang, labels, ["en"], ["de", "zh", "ja"])
    assert list(s.per_language) == ["en", "de", "zh"]  # ja has no rows: skipped
    assert s.per_language["en"] == {"accuracy": 1.0, "macro_f1": 1.0, "examples": 3}
    assert s.per_language["de"]["accuracy"] == pytest.approx(1 / 3)
    assert s.per_language["zh"]["accuracy"] == 0.5
    assert s.summary["accuracy_labeled"] == 1.0
    assert s.summary["accuracy_unlabeled"] == pytest.approx((1 / 3 + 0.5) / 2)
    assert s.summary["accuracy"] == pytest.approx((1 + 1 / 3 + 0.5) / 3)
    # de: cm [[0,1,0],[0,1,0],[1,0,0]] -> F1 (0, 2/3, 0); zh: classes 0 and 2 present -> (2/3, 0)
    assert s.per_language["de"]["macro_f1"] == pytest.approx((2 / 3) / 3)
    assert s.per_language["zh"]["macro_f1"] == pytest.approx((2 / 3) / 2)
    assert s.confusion["unlabeled"].tolist() == [[1, 1, 1], [0, 1, 0], [1, 0, 0]]
    assert s.confusion["all"].sum() == 8
    table = {r["label"]: r for r in s.per_class["all"]}
    assert table["a"].pop("label") == "a"
    assert table["a"] == pytest.approx(
        {"precision": 2 / 3, "recall": 0.5, "f1": 4 / 7, "support": 4}
    )


def test_throughput_rows_spread_over_the_split():
    assert throughput_rows(10, 4).tolist() == [0, 3, 6, 9]
    assert throughput_rows(3, 64).tolist() == [0, 1, 2]


def test_config_errors():
    with pytest.raises(ConfigError) as e:
        from_params(
            ClassifyEvaluateConfig, {"classify_evaluate": {"int8_kernel": "x"}}, "classify_evaluate"
        )
    assert str(e.value) == (
        "classify_evaluate.int8_kernel: must be one of 'dynamic', 'dequantize', got 'x'"
    )
    with pytest.raises(ConfigError) as e:
        from_params(
            ClassifyEvaluateConfig,
            {"classify_evaluate": {"throughput_examples": 0}},
            "classify_evaluate",
        )
    assert str(e.value) == "classify_evaluate.throughput_examples: must be >= 1, got 0"


# --- end to end on tiny saved classifiers ----------------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("classify_evaluate")
    labels = labels_of(SIB200)
    corpus = corpus_config(write_sib_slice(root / "corpus", LANGS, PER_SPLIT))
    teacher = make_classifier(root / "teacher", tiny_tokenizer, labels, hidden=48, seed=3)
    student = make_classifier(root / "student", tiny_tokenizer, labels, seed=1)
    compressed = root / "student-int8"
    run_compress(CompressConfig(), student=student, out=compressed, metrics=root / "c.json")
    return {
        "root": root,
        "corpus": corpus,
        "labels": labels,
        "teacher": teacher,
        "student": student,
        "compressed": compressed,
    }


def evaluate(setup, out: Path, models=None, cfg=CFG, **kw):
    models = models or [
        ("teacher", setup["teacher"]),
        ("student", setup["student"]),
        ("student-int8", setup["compressed"]),
    ]
    return run_classify_evaluate(
        cfg,
        kw.pop("corpus", setup["corpus"]),
        models=models,
        metrics=out / "metrics.json",
        plots=out / "plots",
        report_dir=out / "report",
        **kw,
    )


def corpus_test_rows(setup) -> tuple[list[str], np.ndarray, np.ndarray]:
    lines = Path(setup["corpus"].path, "test.jsonl").read_text("utf-8").splitlines()
    rows = [json.loads(x) for x in lines]
    labels = setup["labels"]
    return (
        [r["text"] for r in rows],
        np.array([labels.index(r["label"]) for r in rows]),
        np.array([r["lang"] for r in rows]),
    )


def direct_predictions(folder: Path, texts: list[str], compressed: bool = False) -> np.ndarray:
    """Predicted classes computed independently: one text at a time, no padding at all."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pipeline.compress.compressed import load_compressed

    if compressed:
        model = load_compressed(folder, int8_kernel="dequantize")
    else:
        model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    out = []
    with torch.no_grad():
        for text in texts:
            ids = tok(text, truncation=True, max_length=128, return_tensors="pt")["input_ids"]
            out.append(int(model(input_ids=ids).logits[0].argmax()))
    return np.array(out)


def test_end_to_end(setup, tmp_path):
    cfg = dataclasses.replace(CFG, int8_kernel="dequantize")
    result = evaluate(setup, tmp_path, cfg=cfg, confusion=["teacher", "student"])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(result))
    texts, gold, lang = corpus_test_rows(setup)
    n = PER_SPLIT["test"]
    assert metrics["test"]["examples"] == len(texts) == 3 * n
    assert metrics["test"]["labeled_languages"] == 1 and metrics["test"]["labeled"] == "en"
    assert metrics["test"]["unlabeled_languages"] == 2
    assert metrics["test"]["unscored_languages"] == 0 and metrics["test"]["unscored"] == ""
    assert metrics["test"]["chance_accuracy"] == pytest.approx(1 / 7)
    counts = np.bincount(gold, minlength=7)
    assert metrics["test"]["majority_class_accuracy"] == pytest.approx(counts.max() / counts.sum())
    keys = {
        "accuracy",
        "accuracy_labeled",
        "accuracy_unlabeled",
        "macro_f1",
        "macro_f1_labeled",
        "macro_f1_unlabeled",
        "parameters",
        "nonzero_parameters",
        "weights_bytes",
        "size_bytes",
        "examples_per_s",
    }
    for name, folder, comp in (
        ("teacher", "teacher", False),
        ("student", "student", False),
        ("student-int8", "compressed", True),
    ):
        m = metrics["models"][name]
        assert set(m) == keys, name
        pred = direct_predictions(setup[folder], texts, comp)
        per_lang = {x: float((pred[lang == x] == gold[lang == x]).mean()) for x in LANGS}
        assert m["accuracy_labeled"] == pytest.approx(per_lang["en"])
        assert m["accuracy_unlabeled"] == pytest.approx((per_lang["de"] + per_lang["ja"]) / 2)
        assert m["accuracy"] == pytest.approx(sum(per_lang.values()) / 3)
        assert m["examples_per_s"] > 0
        with open(tmp_path / "plots" / "accuracy" / f"{name}.csv") as f:
            table = {r["lang"]: r for r in csv.DictReader(f)}
        assert [table[x]["labeled"] for x in ("en", "de", "ja")] == ["yes", "no", "no"]
        for x in LANGS:
            assert float(table[x]["accuracy"]) == pytest.approx(per_lang[x], abs=1e-6)
            assert int(table[x]["examples"]) == n
    s, c = metrics["models"]["student"], metrics["models"]["student-int8"]
    assert c["parameters"] == s["parameters"] and c["nonzero_parameters"] < s["parameters"]
    assert c["weights_bytes"] < s["weights_bytes"] / 3

    plots = tmp_path / "plots"
    assert sorted(p.name for p in (plots / "confusion").iterdir()) == [
        "student.csv",
        "teacher.csv",
    ]
    with open(plots / "confusion" / "student.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * n and set(rows[0]) == {"lang", "actual", "predicted"}
    assert [r["actual"] for r in rows] == [setup["labels"][g] for g in gold]
    with open(plots / "per_class" / "teacher.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["group"] for r in rows} == {"all", "labeled", "unlabeled"}
    assert sum(int(r["support"]) for r in rows if r["group"] == "all") == 3 * n
    with open(plots / "size_accuracy.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["model"] for r in rows] == ["teacher", "student", "student-int8"]

    report = tmp_path / "report"
    text = (report / "report.md").read_text()
    for fig in (
        "accuracy_by_language.png",
        "size_vs_accuracy.png",
        "confusion_teacher.png",
        "confusion_student.png",
    ):
        assert f"]({fig})" in text
        assert (report / fig).read_bytes()[:4] == b"\x89PNG"
    assert not (report / "confusion_student-int8.png").exists()
    assert "| student-int8 (compressed) |" in text
    assert "`student-int8` vs `student`: weights" in text


def test_compressed_classifier_is_close_to_its_source(setup):
    """compress + load_compressed round trip: class log-probabilities close to the float
    student's (both kernels), so accuracy moves only where the student is near a tie."""
    from pipeline.classify.inference import class_logprobs, load_classifier
    from pipeline.compress.compressed import load_compressed

    texts, _, _ = corpus_test_rows(setup)
    model, tok = load_classifier(setup["student"], "cpu", labels=setup["labels"])
    ref = class_logprobs(model, tok, texts, batch_size=8)
    for kernel in ("dequantize", "dynamic"):
        comp = load_compressed(setup["compressed"], int8_kernel=kernel)
        got = class_logprobs(comp, tok, texts, batch_size=8)
        assert got.shape == ref.shape == (len(texts), 7)
        assert float(np.abs(got - ref).max()) < 0.1, kernel


def test_default_confusion_is_every_model(setup, tmp_path):
    evaluate(setup, tmp_path, models=[("a", setup["student"]), ("b", setup["compressed"])])
    assert sorted(p.name for p in (tmp_path / "plots" / "confusion").iterdir()) == [
        "a.csv",
        "b.csv",
    ]
    # b is compressed from a, which is evaluated: it takes a's colour and is compared with it
    assert "`b` vs `a`: weights" in (tmp_path / "report" / "report.md").read_text()


# --- refusals --------------------------------------------------------------------------------


def test_missing_model_folder(setup, tmp_path):
    ghost = tmp_path / "ghost"
    with pytest.raises(InputError) as e:
        evaluate(setup, tmp_path, models=[("teacher", setup["teacher"]), ("ghost", ghost)])
    assert str(e.value) == (
        f"model 'ghost': {ghost}: no such folder (train or compress it first, or fix the "
        "--model argument)"
    )
    assert not (tmp_path / "metrics.json").exists()
    assert not (tmp_path / "report").exists()


def test_wrong_label_count(setup, tmp_path, tiny_tokenizer):
    odd = tmp_path / "odd"
    make_classifier(odd, tiny_tokenizer, ["a", "b", "c"])
    with pytest.raises(InputError) as e:
        evaluate(setup, tmp_path, models=[("odd", odd)])
    assert str(e.value) == (
        f"model 'odd' ({odd}): the classifier has 3 classes but the label set has 7 "
        f"({', '.join(setup['labels'])}); use a classifier trained on this label set"
    )


def test_other_label_names(setup, tmp_path, tiny_tokenizer):
    other = tmp_path / "other"
    toy = ["science", "travel", "politics", "sports", "health", "entertainment", "geography"]
    make_classifier(other, tiny_tokenizer, toy)
    with pytest.raises(InputError) as e:
        evaluate(setup, tmp_path, models=[("other", other)])
    assert str(e.value).startswith(f"model 'other' ({other}): the classifier's labels (science, ")


def test_causal_lm_is_refused(setup, tmp_path, tiny_tokenizer):
    from test_compress import save_student

    lm = tmp_path / "lm"
    save_student(lm, tiny_tokenizer)
    with pytest.raises(InputError) as e:
        evaluate(setup, tmp_path, models=[("lm", lm)])
    assert str(e.value) == (
        f"model 'lm' ({lm}): not a sequence classifier (architectures: LlamaForCausalLM); give "
        "a folder written by classify_teacher, classify_student or classify_compress"
    )


def test_unknown_confusion_model(setup, tmp_path):
    with pytest.raises(InputError) as e:
        evaluate(setup, tmp_path, models=[("a", setup["student"])], confusion=["kd"])
    assert str(e.value) == "--confusion kd: not one of the evaluated models (a)"


def test_no_gold_labels_in_test(setup, tmp_path):
    root = tmp_path / "corpus"
    corpus = corpus_config(write_sib_slice(root, LANGS, PER_SPLIT))
    lines = (root / "test.jsonl").read_text("utf-8").splitlines()
    rows = [json.loads(x) for x in lines]
    for r in rows:
        if r["lang"] != "en":
            r.pop("label")
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    (root / "test.jsonl").write_text(text, "utf-8")
    result = evaluate(setup, tmp_path / "out", models=[("a", setup["student"])], corpus=corpus)
    assert result["test"]["unscored"] == "de, ja"
    assert result["test"]["unscored_languages"] == 2
    assert result["test"]["examples"] == PER_SPLIT["test"]
    assert "accuracy_unlabeled" not in result["models"]["a"]


# --- the stage script ------------------------------------------------------------------------


def load_stage():
    return stage_module("classify_evaluate")


def test_stage_script_in_process(setup, tmp_path, capsys):
    stage = load_stage()
    corpus = setup["corpus"]
    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump(
            {
                "classify_evaluate": {"throughput_repeats": 1, "batch_size": 8},
                "classify_corpus": {
                    "path": corpus.path,
                    "labels": corpus.labels,
                    "languages": LANGS,
                    "labeled_languages": ["en"],
                },
            }
        )
    )
    base = ["--params", str(params), "--metrics", str(tmp_path / "m.json")]
    base += ["--plots", str(tmp_path / "plots"), "--report", str(tmp_path / "report")]
    ok = stage.main(
        [*base, "--model", f"teacher={setup['teacher']}", "--model", f"int8={setup['compressed']}"]
        + ["--confusion", "int8"]
    )
    assert ok == 0
    assert set(json.loads((tmp_path / "m.json").read_text())["models"]) == {"teacher", "int8"}
    assert (tmp_path / "report" / "confusion_int8.png").is_file()
    bad = stage.main([*base, "--model", f"ghost={tmp_path / 'nope'}"])
    assert bad == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: model 'ghost': {tmp_path / 'nope'}: no such folder (train or compress it first, "
        "or fix the --model argument)"
    )


def test_help_lists_both_sections(capsys):
    stage = load_stage()
    with pytest.raises(SystemExit) as e:
        stage.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "classify_evaluate.int8_kernel [default: 'dynamic']" in text
    assert "classify_corpus.labeled_languages" in text and "--confusion NAME" in text
