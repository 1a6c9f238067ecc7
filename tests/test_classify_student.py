"""The classify_student stage: kd/ce/gold smoke runs on a slice of SIB-200, resume with identical
weights, stores and checkpoints that must not be used, layer init, and params refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.classify.corpus import ClassifyCorpusConfig, read_labeled_corpus
from pipeline.classify.store import build_class_store
from pipeline.classify.student import (
    ClassifyStudentConfig,
    ClassifyTrainer,
    prepare,
    run_classify_student,
)
from pipeline.classify.student_data import batch_positions
from pipeline.core.config import from_params, with_overrides
from pipeline.core.errors import ConfigError, InputError, StoreError
from tests.conftest import REPO, make_tokenizer

SIB = REPO / "data" / "corpora" / "sib200"
LANGS = ["en", "de", "zh"]
TINY = dict(
    num_layers=1,
    hidden_size=16,
    num_heads=2,
    intermediate_size=32,
    steps=6,
    batch_size=8,
    warmup_steps=1,
    max_length=32,
    eval_every=3,
    checkpoint_every=2,
    log_every=2,
    threads=1,
)
VARIANTS = {
    "kd": {"alpha": 0.1, "temperature": 2.0},
    "ce": {"alpha": 1.0, "rows": "gold"},
    "gold": {"alpha": 1.0, "gold_languages": "all"},
}
TEACHER = {
    "name": "tiny-classify-teacher",
    "revision": "local",
    "sha256": "b" * 64,
    "architecture": "LlamaForSequenceClassification",
    "num_labels": 7,
}


def write_slice(root: Path, langs: list[str], per_split: dict[str, int]) -> Path:
    """The first n ids of each split of SIB-200, for `langs`, as a corpus folder."""
    root.mkdir(parents=True)
    (root / "labels.txt").write_text((SIB / "labels.txt").read_text("utf-8"), "utf-8")
    for split, n in per_split.items():
        recs = [json.loads(line) for line in (SIB / f"{split}.jsonl").open(encoding="utf-8")]
        ids = sorted({r["id"] for r in recs})[:n]
        keep = [r for r in recs if r["lang"] in langs and r["id"] in ids]
        (root / f"{split}.jsonl").write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in keep), "utf-8"
        )
    return root


def corpus_cfg(root: Path, langs: list[str] = LANGS) -> ClassifyCorpusConfig:
    return ClassifyCorpusConfig(
        path=str(root), labels=str(root / "labels.txt"), languages=langs, labeled_languages=["en"]
    )


def teacher_like(corpus, seed: int = 0) -> dict[str, np.ndarray]:
    """Log-probabilities of a noisy teacher: right about 70% of the time, never certain."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, rows in corpus.splits.items():
        z = rng.normal(size=(len(rows), len(corpus.labels))).astype(np.float32)
        z[np.arange(len(rows)), rows.label] += 2.0
        out[split] = (z - np.log(np.exp(z).sum(1, keepdims=True))).astype(np.float32)
    return out


def make_store(path: Path, corpus) -> Path:
    build_class_store(
        path,
        corpus=corpus,
        logprobs=teacher_like(corpus),
        teacher=TEACHER,
        sources={"en": "gold", "de": "direct", "zh": "parallel"},
        parallel_source="en",
        chunk_rows=16,
        shard_chunks=2,
    )
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("classify-student")
    corpus_root = write_slice(root / "corpus", LANGS, {"train": 24, "dev": 6, "test": 4})
    corpus = read_labeled_corpus(corpus_cfg(corpus_root))
    tok = make_tokenizer([t for rows in corpus.splits.values() for t in rows.text], 300)
    tok.save_pretrained(root / "tok")
    make_store(root / "classify.zarr", corpus)
    return root


def paths(env: Path, tmp: Path) -> dict:
    return dict(
        logits=env / "classify.zarr",
        tokenizer=env / "tok",
        out=tmp / "student",
        metrics=tmp / "metrics.json",
        checkpoints=tmp / "work",
        live_dir=tmp / "dvclive",
    )


def run(env: Path, tmp: Path, cfg: ClassifyStudentConfig, **kw) -> dict:
    p = {**paths(env, tmp), **kw}
    return run_classify_student(cfg, corpus_cfg(env / "corpus"), **p, progress=False)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants_write_a_loadable_classifier_metrics_and_curves(env, tmp_path, variant):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cfg = ClassifyStudentConfig(**TINY, **VARIANTS[variant])
    result = run(env, tmp_path, cfg, name=variant)
    p = paths(env, tmp_path)
    model = AutoModelForSequenceClassification.from_pretrained(p["out"])
    tok = AutoTokenizer.from_pretrained(p["out"])
    labels = (SIB / "labels.txt").read_text().split("\n")[:7]
    assert model.config.num_labels == 7 and model.config.id2label[3] == labels[3]
    assert model.config.pad_token_id == tok.pad_token_id is not None
    assert model.config.vocab_size == len(tok)
    record = json.loads((p["out"] / "softlabels.json").read_text())
    assert record["store"]["teacher"]["name"] == "tiny-classify-teacher"
    assert record["store"]["content_sha256"] and record["labels"] == labels
    assert record["soft_labels"] is (variant == "kd")
    assert record["classify_student"]["alpha"] == cfg.alpha and record["student"] == variant
    assert json.loads(p["metrics"].read_text()) == result
    assert result["steps"] == 6 and result["train_examples"] == 48
    assert set(result["dev_accuracy_per_language"]) == set(LANGS)
    assert 0.0 <= result["dev_accuracy"] <= 1.0
    assert result["best_step"] in (3, 6)
    assert (
        result["selected_on"]
        == {
            "kd": "dev accuracy on the labeled languages' gold labels, the teacher's argmax on the "
            "other rows",
            "ce": "dev accuracy on the labeled languages' gold labels",
            "gold": "dev accuracy on every language's gold labels",
        }[variant]
    )
    per = result["dev_accuracy_per_language"]
    assert result["dev_accuracy_labeled"] == per["en"]
    assert result["dev_accuracy_unlabeled"] == pytest.approx((per["de"] + per["zh"]) / 2)
    loss_rows = (p["live_dir"] / "plots/metrics/train/loss.tsv").read_text().splitlines()
    assert [r.split("\t")[0] for r in loss_rows[1:]] == ["2", "4", "6"]
    acc_rows = (p["live_dir"] / "plots/metrics/dev/accuracy.tsv").read_text().splitlines()
    assert [r.split("\t")[0] for r in acc_rows[1:]] == ["3", "6"]
    assert not p["checkpoints"].exists()  # a finished run leaves no work files


def test_written_weights_are_the_best_dev_checkpoint(env, tmp_path):
    from transformers import AutoModelForSequenceClassification

    cfg = ClassifyStudentConfig(**{**TINY, "steps": 9}, **VARIANTS["kd"])
    seen: dict[int, dict] = {}
    original = ClassifyTrainer.predict

    def spy(self, tokenizer, texts):
        seen[self.scheduler.last_epoch] = {k: v.clone() for k, v in self.model.state_dict().items()}
        return original(self, tokenizer, texts)

    ClassifyTrainer.predict = spy
    try:
        result = run(env, tmp_path, cfg)
    finally:
        ClassifyTrainer.predict = original
    assert sorted(seen) == [3, 6, 9]
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "student")
    for name, value in model.state_dict().items():
        assert torch.equal(value, seen[result["best_step"]][name]), name


class Interrupt(Exception):
    pass


def interrupted(env, tmp, cfg, after: int, monkeypatch) -> None:
    """Run until `after` steps are done, then die as a kill would (no cleanup code runs)."""
    calls = {"n": 0}
    original = ClassifyTrainer.step

    def step(self, batch):
        if calls["n"] == after:
            raise Interrupt
        calls["n"] += 1
        return original(self, batch)

    monkeypatch.setattr(ClassifyTrainer, "step", step)
    with pytest.raises(Interrupt):
        run(env, tmp, cfg)
    monkeypatch.setattr(ClassifyTrainer, "step", original)


def test_resume_after_interruption_gives_identical_weights(env, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    cfg = ClassifyStudentConfig(**TINY, **VARIANTS["kd"])
    ref = run(env, tmp_path / "ref", cfg)
    interrupted(env, tmp_path, cfg, after=5, monkeypatch=monkeypatch)
    assert list((tmp_path / "work").glob("*/latest.pt")) and not (tmp_path / "student").exists()
    again = run(env, tmp_path, cfg)
    assert again["resumed_from_step"] == 4
    a = load_file(tmp_path / "ref" / "student" / "model.safetensors")
    b = load_file(tmp_path / "student" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    for key in ("dev_accuracy", "best_step", "dev_accuracy_per_language"):
        assert again[key] == ref[key]
    rows = (tmp_path / "dvclive/plots/metrics/train/loss.tsv").read_text().splitlines()
    assert [r.split("\t")[0] for r in rows[1:]] == ["2", "4", "6"]  # no duplicates


def test_a_checkpoint_of_another_config_is_set_aside(env, tmp_path, monkeypatch):
    cfg = ClassifyStudentConfig(**TINY, **VARIANTS["kd"])
    interrupted(env, tmp_path, cfg, after=3, monkeypatch=monkeypatch)
    (stale,) = (tmp_path / "work").glob("*/latest.pt")
    other = ClassifyStudentConfig(**{**TINY, "learning_rate": 0.01}, **VARIANTS["kd"])
    assert run(env, tmp_path, other)["resumed_from_step"] == 0
    assert stale.is_file()  # left for its own config
    # cosmetic params (logging, checkpoint cadence, threads) do resume
    same = ClassifyStudentConfig(**{**TINY, "log_every": 1}, **VARIANTS["kd"])
    assert run(env, tmp_path, same)["resumed_from_step"] == 2


def test_a_truncated_checkpoint_is_set_aside_and_the_previous_resumed(env, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    cfg = ClassifyStudentConfig(**TINY, **VARIANTS["kd"])
    ref = run(env, tmp_path / "ref", cfg)
    interrupted(env, tmp_path, cfg, after=5, monkeypatch=monkeypatch)
    (latest,) = (tmp_path / "work").glob("*/latest.pt")
    latest.write_bytes(latest.read_bytes()[:1000])
    again = run(env, tmp_path, cfg)
    assert again["resumed_from_step"] == 2  # previous.pt
    assert latest.with_name("latest.pt.damaged-1").is_file()  # kept, out of the way
    a = load_file(tmp_path / "ref" / "student" / "model.safetensors")
    b = load_file(tmp_path / "student" / "model.safetensors")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert again["best_step"] == ref["best_step"]


def refused(env, tmp, cfg, error, **kw) -> str:
    p = {**paths(env, tmp), **kw}
    with pytest.raises(error) as e:
        run_classify_student(cfg, corpus_cfg(env / "corpus"), **p, progress=False)
    assert not p["out"].exists() and not p["checkpoints"].exists()  # refused before any step
    assert not p["live_dir"].exists() and not p["metrics"].exists()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_a_store_of_another_label_set_is_refused(env, tmp_path):
    root = write_slice(tmp_path / "c2", LANGS, {"train": 24, "dev": 6, "test": 4})
    labels = (root / "labels.txt").read_text().split()
    (root / "labels.txt").write_text("\n".join(reversed(labels)) + "\n")
    other = read_labeled_corpus(corpus_cfg(root))
    store = make_store(tmp_path / "other.zarr", other)
    message = refused(env, tmp_path, ClassifyStudentConfig(**TINY), StoreError, logits=store)
    assert message.startswith(f"{store}: labels differ")


def test_a_store_of_another_corpus_is_refused(env, tmp_path):
    root = write_slice(tmp_path / "c2", LANGS, {"train": 20, "dev": 6, "test": 4})
    store = make_store(tmp_path / "other.zarr", read_labeled_corpus(corpus_cfg(root)))
    message = refused(env, tmp_path, ClassifyStudentConfig(**TINY), StoreError, logits=store)
    assert message.startswith(f"{store}: split 'train' has 60 rows in the store, 72 in the corpus")


def test_a_missing_store_is_refused_even_for_gold_only_students(env, tmp_path):
    missing = tmp_path / "none.zarr"
    cfg = ClassifyStudentConfig(**TINY, **VARIANTS["ce"])
    assert refused(env, tmp_path, cfg, StoreError, logits=missing).startswith(
        f"{missing}: no such classification store"
    )


def test_kd_without_a_store_is_refused_and_gold_only_needs_none(env, tmp_path):
    cfg = ClassifyStudentConfig(**TINY, **VARIANTS["kd"])
    assert refused(env, tmp_path, cfg, ConfigError, logits=None) == (
        "classify_student.alpha: 0.1 trains on the teacher's soft labels; pass --logits "
        "<classification store> (or set alpha: 1 for gold labels only)"
    )
    cfg = ClassifyStudentConfig(**{**TINY, "steps": 2, "eval_every": 0}, **VARIANTS["ce"])
    result = run(env, tmp_path, cfg, logits=None)
    assert result["soft_labels"] is False and result["best_step"] == 2


def test_ce_variant_samples_only_labeled_rows_and_gold_uses_every_label(env):
    kw = dict(logits=env / "classify.zarr", tokenizer=env / "tok")
    cc = corpus_cfg(env / "corpus")
    train = read_labeled_corpus(cc).splits["train"]
    ce = prepare(ClassifyStudentConfig(**TINY, **VARIANTS["ce"]), cc, **kw)
    assert set(train.lang[ce.data.rows]) == {"en"} and ce.data.soft is None
    assert (ce.data.gold[train.lang != "en"] == -1).all()
    gold = prepare(ClassifyStudentConfig(**TINY, **VARIANTS["gold"]), cc, **kw)
    assert len(gold.data.rows) == len(train) and (gold.data.gold == train.label).all()
    assert (gold.dev.target == gold.dev.label).all()
    kd = prepare(ClassifyStudentConfig(**TINY, **VARIANTS["kd"]), cc, **kw)
    assert len(kd.data.rows) == len(train) and kd.data.soft.shape == (len(train), 7)
    dev = read_labeled_corpus(cc).splits["dev"]
    teacher_dev = teacher_like(read_labeled_corpus(cc))["dev"].argmax(1)
    en = dev.lang == "en"
    assert (kd.dev.target[en] == dev.label[en]).all()  # gold where the student may use it
    assert (kd.dev.target[~en] == teacher_dev[~en]).all()  # the teacher's class elsewhere
    assert (ce.dev.target[~en] == -1).all() and (ce.dev.target[en] == dev.label[en]).all()
    np.testing.assert_array_equal(kd.data.soft, teacher_like(read_labeled_corpus(cc))["train"])
    batch = kd.data.batch(0, 8, 0, 1)
    assert batch["input_ids"].shape[0] == 8 and batch["teacher_logprobs"].shape == (8, 7)


def test_batch_order_is_a_pure_function_of_seed_and_step():
    n, b = 10, 4
    epoch0 = np.concatenate([batch_positions(n, b, 3, s) for s in range(5)])  # 20 positions
    assert sorted(epoch0[:10]) == list(range(10)) and sorted(epoch0[10:]) == list(range(10))
    assert (batch_positions(n, b, 3, 2) == epoch0[8:12]).all()
    assert not (batch_positions(n, b, 4, 0) == epoch0[:4]).all()


def make_classify_teacher(out: Path, tokenizer, *, hidden: int = 32) -> Path:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        pad_token_id=tokenizer.pad_token_id,
        num_labels=7,
    )
    LlamaForSequenceClassification(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_teacher_layers_init_copies_the_classification_teacher(env, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    teacher = make_classify_teacher(
        tmp_path / "teacher", AutoTokenizer.from_pretrained(env / "tok")
    )
    cfg = ClassifyStudentConfig(
        **{**TINY, "hidden_size": 32, "intermediate_size": 64}, init="teacher_layers"
    )
    kw = dict(logits=env / "classify.zarr", tokenizer=env / "tok")
    setup = prepare(cfg, corpus_cfg(env / "corpus"), **kw, teacher=teacher)
    t = AutoModelForSequenceClassification.from_pretrained(teacher).state_dict()
    s = setup.trainer.model.state_dict()
    assert setup.record["init_layers"] == [0]
    for name, value in s.items():
        assert torch.equal(value, t[name]), name  # layer 0, embeddings, norm, score head
    wrong = ClassifyStudentConfig(**TINY, init="teacher_layers")
    with pytest.raises(ConfigError) as e:
        prepare(wrong, corpus_cfg(env / "corpus"), **kw, teacher=teacher)
    assert str(e.value).startswith(
        "classify_student.init: teacher_layers needs the teacher's widths, but hidden_size 16 "
        "vs the teacher's 32"
    )
    with pytest.raises(ConfigError, match="pass --teacher"):
        prepare(cfg, corpus_cfg(env / "corpus"), **kw)


@pytest.mark.parametrize(
    "override,message",
    [
        ({"alpha": 1.5}, "classify_student.alpha: must be in [0, 1], got 1.5"),
        ({"temperature": 0}, "classify_student.temperature: must be > 0, got 0.0"),
        (
            {"rows": "some"},
            "classify_student.rows: must be one of 'all', 'gold', got 'some'",
        ),
        (
            {"alpha": 0.0, "rows": "gold"},
            "classify_student.rows: gold samples the rows with gold labels, but alpha 0 never "
            "uses them; use rows: all (or alpha > 0)",
        ),
        ({"max_length": 0}, "classify_student.max_length: must be >= 1, got 0"),
        (
            {"num_heads": 3},
            "classify_student.num_heads: must divide hidden_size (64) into an "
            "even head size, got 3",
        ),
    ],
)
def test_bad_params_are_refused(override, message):
    with pytest.raises(ConfigError) as e:
        from_params(ClassifyStudentConfig, {"classify_student": override}, "classify_student")
    assert str(e.value) == message


def test_variant_overrides_and_unknown_keys():
    params = {
        "classify_student": {"alpha": 0.5, "rows": "all"},
        "classify_students": {"ce": {"alpha": 1.0, "rows": "gold"}, "bad": {"alhpa": 1}},
    }
    merged = with_overrides(params, "classify_student", "classify_students.ce")
    cfg = from_params(ClassifyStudentConfig, merged, "classify_student")
    assert cfg.alpha == 1.0 and cfg.rows == "gold"
    with pytest.raises(ConfigError, match="classify_students.bad.alhpa: not a key"):
        with_overrides(params, "classify_student", "classify_students.bad")


def stage_argv(env: Path, tmp: Path, params: dict) -> list[str]:
    """The stage script's command line on `env`'s inputs, with `params` written for it."""
    corpus = {"path": str(env / "corpus"), "labels": str(env / "corpus/labels.txt")}
    corpus.update(languages=LANGS, labeled_languages=["en"])
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump({"classify_corpus": corpus, **params}))
    argv = [sys.executable, "-m", "pipeline.stages.classify_student", "--params", str(path)]
    for flag, value in paths(env, tmp).items():
        argv += [f"--{flag.replace('_', '-')}", str(value)]
    return argv + ["--no-progress"]


def test_stage_script_reports_errors_in_one_line(env, tmp_path):
    params = {"classify_student": {"alpha": 0.5}, "classify_students": {"bad": {"alpha": 2}}}
    argv = stage_argv(env, tmp_path, params) + ["--student", "bad"]
    bad = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-1] == (
        "error: classify_student.alpha: must be in [0, 1], got 2.0"
    )
    assert not (tmp_path / "work").exists() and not (tmp_path / "student").exists()


def test_no_labeled_train_rows_is_refused(env, tmp_path):
    cc = ClassifyCorpusConfig(
        path=str(env / "corpus"),
        labels=str(env / "corpus/labels.txt"),
        languages=LANGS,
        labeled_languages=["en"],
    )
    corpus = read_labeled_corpus(cc)
    corpus.splits["train"] = type(corpus.splits["train"])(
        **{**corpus.splits["train"].__dict__, "label": np.full(72, -1)}
    )
    with pytest.raises(InputError, match="no train row has a gold label of en"):
        prepare(
            ClassifyStudentConfig(**TINY, **VARIANTS["ce"]),
            cc,
            logits=None,
            tokenizer=env / "tok",
            corpus=corpus,
        )


@pytest.mark.slow
def test_stage_script_resumes_a_variant_after_sigkill_with_identical_weights(env, tmp_path):
    """The stage script, run as DVC runs it (`--student kd` over `classify_student`), killed with
    SIGKILL once a checkpoint exists, then run again: the weights of an uninterrupted run."""
    import os
    import signal
    import time

    from safetensors.torch import load_file

    section = {**TINY, "steps": 30, "checkpoint_every": 5, "eval_every": 10, "log_every": 5}
    section.update(alpha=1.0, temperature=1.0, gold_languages="labeled", rows="all")
    ref = run(env, tmp_path / "ref", ClassifyStudentConfig(**{**section, **VARIANTS["kd"]}))
    params = {"classify_student": section, "classify_students": {"kd": VARIANTS["kd"]}}
    argv = stage_argv(env, tmp_path, params) + ["--student", "kd"]
    p = paths(env, tmp_path)
    envvars = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, env=envvars, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(p["checkpoints"].glob("*/latest.pt")) and time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before its first checkpoint"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not p["out"].exists() and not p["metrics"].exists()
    again = subprocess.run(argv, env=envvars, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    metrics = json.loads(p["metrics"].read_text())
    assert metrics["resumed_from_step"] > 0 and metrics["student"] == "kd"
    assert metrics["alpha"] == VARIANTS["kd"]["alpha"]  # the override was applied
    a = load_file(tmp_path / "ref" / "student" / "model.safetensors")
    b = load_file(p["out"] / "model.safetensors")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert metrics["dev_accuracy"] == ref["dev_accuracy"]
