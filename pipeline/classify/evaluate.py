"""The `classify_evaluate` stage: teacher, students and compressed students side by side on test.

For every model given (`NAME=PATH`: a `save_pretrained` sequence classifier or a compressed
folder from `classify_compress`), on the `test` split of the classification corpus
(`classify_corpus`), each model reading the texts with its own tokenizer (the one saved in its
folder; compress copies it):

- accuracy and macro-F1 per language, and their means over the labeled languages (whose gold
  labels the teacher and students trained on, `classify_corpus.labeled_languages`) and over the
  unlabeled ones (reached by cross-lingual transfer), reported apart, and over all languages;
- per-class precision, recall and F1 over all test rows (and over the labeled and the unlabeled
  languages' rows apart, in the plot tables), and confusion matrices;
- parameters (and nonzero parameters), size on disk (weight files, and the whole folder);
- throughput in examples/s: one fixed batch for every model (`throughput_examples` rows spread
  evenly over the test split, so every language is in it), each model's texts tokenized once
  with its tokenizer before timing (the time is the forward pass), interleaved rounds, fastest
  round per model (`pipeline.evaluate.common.fastest_times`, as the LM evaluate times).

Definitions (numpy, unit-tested against hand-computed values): the confusion matrix counts
rows of gold class i predicted as j at [i, j]; accuracy = trace / total; per class, precision =
TP / predicted, recall = TP / gold, F1 = their harmonic mean, each 0 where its denominator is 0
(scikit-learn's `zero_division=0`); macro-F1 = the mean F1 over the classes that occur in the
gold labels or the predictions (scikit-learn's default label set). A language's rows without a
gold label (-1) are not scored; a language with none is listed as unscored.

Dev is never read here: model selection happened on dev in the teacher and student stages.
Models run on CPU in float32 (a compressed one with the `int8_kernel` chosen), all held in
memory at once so they can be timed side by side. Refusals come before any weights load, each
naming the model and its folder: a missing folder, a model that is not a sequence classifier,
a class count or label names other than the corpus's label set, a tokenizer that cannot load.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from pipeline.classify import report
from pipeline.classify.corpus import ClassifyCorpusConfig, LabeledRows, read_labeled_corpus
from pipeline.classify.inference import (
    check_label_config,
    class_logprobs,
    encode,
    ensure_pad,
    load_classifier,
    pad_batch,
)
from pipeline.compress.compressed import KERNELS, is_compressed, load_compressed
from pipeline.core.config import require
from pipeline.core.errors import InputError, first_line, load_errors
from pipeline.core.provenance import write_json
from pipeline.evaluate.common import (
    Model,
    check_model_folder,
    derived_from,
    describe_model,
    fastest_times,
)
from pipeline.modeling.tasks import model_task

log = logging.getLogger(__name__)

SECTION = "classify_evaluate"
GROUPS = ("all", "labeled", "unlabeled")
"""Row groups of the per-class tables and confusion matrices: every scored test row, the
labeled languages' rows, the unlabeled languages' rows."""


@dataclass(frozen=True)
class ClassifyEvaluateConfig:
    """Params section `classify_evaluate`: how the classifiers are scored and timed on test."""

    batch_size: int = 64
    """Texts per forward pass when scoring (sorted by length, so batches carry little padding)."""
    max_length: int = 128
    """Tokens per text at most (longer texts are truncated, as in the teacher and student
    stages: keep it equal to their `max_length`)."""
    throughput_examples: int = 64
    """Texts in the fixed batch every model is timed on (spread evenly over the test split)."""
    throughput_repeats: int = 10
    """Timed rounds (after one warm-up pass); each model's fastest round is reported."""
    threads: int = 0
    """torch intra-op threads while evaluating (0: torch's default, usually the core count)."""
    int8_kernel: Literal["dynamic", "dequantize"] = "dynamic"
    """How compressed models run: `dynamic` (int8 matrix products via torch.ao, weights stay
    int8) or `dequantize` (weights turned back to float32 at load)."""

    def __post_init__(self) -> None:
        s = SECTION
        for key in ("batch_size", "throughput_examples", "throughput_repeats"):
            value = getattr(self, key)
            require(value >= 1, f"{s}.{key}", f"must be >= 1, got {value}")
        require(self.max_length >= 2, f"{s}.max_length", f"must be >= 2, got {self.max_length}")
        require(self.threads >= 0, f"{s}.threads", f"must be >= 0, got {self.threads}")
        require(
            self.int8_kernel in KERNELS,
            f"{s}.int8_kernel",
            f"must be one of {KERNELS}, got {self.int8_kernel!r}",
        )


# -- metrics ------------------------------------------------------------------------------------


def confusion_matrix(gold: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) int64: [i, j] = how many rows of gold class i were predicted as class j.

    gold, pred: (N,) ints in [0, num_classes); ValueError otherwise (a bug, not user input).
    """
    gold, pred = np.asarray(gold, dtype=np.int64), np.asarray(pred, dtype=np.int64)
    if gold.shape != pred.shape or gold.ndim != 1:
        raise ValueError(f"gold and pred must be (N,) alike, got {gold.shape} and {pred.shape}")
    for name, a in (("gold", gold), ("pred", pred)):
        if a.size and (a.min() < 0 or a.max() >= num_classes):
            raise ValueError(f"{name} has class indices outside [0, {num_classes})")
    counts = np.bincount(gold * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)  # (C, C)


def accuracy(cm: np.ndarray) -> float:
    """Share of rows on the diagonal of a confusion matrix; 0.0 for an empty one."""
    total = int(cm.sum())
    return float(np.trace(cm)) / total if total else 0.0


def precision_recall_f1(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class (precision, recall, F1), each (C,) float64, from a confusion matrix
    (rows: gold, columns: predicted); 0 where a denominator is 0."""
    tp = np.diag(cm).astype(np.float64)  # (C,)
    predicted = cm.sum(axis=0).astype(np.float64)  # (C,)
    support = cm.sum(axis=1).astype(np.float64)  # (C,)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros_like(tp), where=both > 0)
    return precision, recall, f1


def macro_f1(cm: np.ndarray) -> float:
    """Mean F1 over the classes present in the gold labels or the predictions; 0.0 if none."""
    present = (cm.sum(axis=0) + cm.sum(axis=1)) > 0  # (C,)
    if not present.any():
        return 0.0
    return float(precision_recall_f1(cm)[2][present].mean())


def class_table(cm: np.ndarray, labels: list[str]) -> list[dict[str, Any]]:
    """One row per class: label, precision, recall, f1, support (gold rows of the class)."""
    precision, recall, f1 = precision_recall_f1(cm)
    support = cm.sum(axis=1)
    return [
        {
            "label": label,
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, label in enumerate(labels)
    ]


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


@dataclass
class Scores:
    """What one model's predictions on the scored test rows come to."""

    per_language: dict[str, dict[str, float]]
    """lang -> {accuracy, macro_f1, examples}, in corpus language order."""
    summary: dict[str, float]
    """accuracy / macro_f1 means over all, the labeled and the unlabeled languages
    (`accuracy`, `accuracy_labeled`, `accuracy_unlabeled`, ...; a group without languages is
    left out)."""
    confusion: dict[str, np.ndarray]
    """group (GROUPS) -> (C, C) confusion matrix of its rows (groups without rows left out)."""
    per_class: dict[str, list[dict[str, Any]]]
    """group -> `class_table` of its confusion matrix."""


def score_predictions(
    pred: np.ndarray,
    gold: np.ndarray,
    lang: np.ndarray,
    labels: list[str],
    labeled: list[str],
    unlabeled: list[str],
) -> Scores:
    """Metrics of predictions `pred` (N,) against `gold` (N,) for rows of languages `lang` (N,);
    languages are scored in the order labeled + unlabeled, those without rows skipped."""
    c = len(labels)
    per_language: dict[str, dict[str, float]] = {}
    for code in [*labeled, *unlabeled]:
        idx = np.flatnonzero(lang == code)
        if idx.size == 0:
            continue
        cm = confusion_matrix(gold[idx], pred[idx], c)
        per_language[code] = {
            "accuracy": accuracy(cm),
            "macro_f1": macro_f1(cm),
            "examples": int(idx.size),
        }
    members = {"all": [*labeled, *unlabeled], "labeled": labeled, "unlabeled": unlabeled}
    summary: dict[str, float] = {}
    for group in GROUPS:
        scored = [per_language[x] for x in members[group] if x in per_language]
        suffix = "" if group == "all" else f"_{group}"
        for key in ("accuracy", "macro_f1"):
            value = _mean([s[key] for s in scored])
            if value is not None:
                summary[key + suffix] = value
    confusion: dict[str, np.ndarray] = {}
    for group in GROUPS:
        mask = np.isin(lang, members[group])
        if mask.any():
            confusion[group] = confusion_matrix(gold[mask], pred[mask], c)
    per_class = {group: class_table(cm, labels) for group, cm in confusion.items()}
    return Scores(per_language, summary, confusion, per_class)


# -- models ---------------------------------------------------------------------------------------


def check_classifier(name: str, path: Path, labels: list[str]) -> None:
    """Refuse, before any weights load, a missing folder, a model that is not a sequence
    classifier, or one whose classes are not `labels`; errors name the model and the folder."""
    from transformers import AutoConfig  # heavy: imported when a model is checked

    check_model_folder(name, path)
    where = f"model '{name}' ({path})"
    try:
        config = AutoConfig.from_pretrained(str(path))
    except load_errors() as e:
        raise InputError(f"{where}: cannot load its config.json ({first_line(e)})") from e
    archs = list(config.architectures or [])
    if model_task(archs) != "sequence-classification":
        raise InputError(
            f"{where}: not a sequence classifier (architectures: {', '.join(archs) or 'none'}); "
            "give a folder written by classify_teacher, classify_student or classify_compress"
        )
    check_label_config(config, labels, where)


@dataclass
class Classifier:
    """A loaded model with its own tokenizer."""

    model: Model
    tokenizer: Any


def load_model(name: str, path: Path, labels: list[str], int8_kernel: str) -> Classifier:
    """Load a classifier folder or a compressed one (float32, eval, CPU) and its tokenizer."""
    from transformers import AutoTokenizer  # heavy: imported when a model is loaded

    where = f"model '{name}' ({path})"
    if is_compressed(path):
        module = load_compressed(path, int8_kernel=int8_kernel)  # type: ignore[arg-type]
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path))
        except (*load_errors(), TypeError) as e:
            raise InputError(f"{where}: cannot load its tokenizer ({first_line(e)})") from e
        ensure_pad(module, tokenizer, where)
    else:
        module, tokenizer = load_classifier(path, "cpu", labels=labels)
        module = module.float()
    return Classifier(describe_model(name, path, module), tokenizer)


@torch.inference_mode()
def measure_throughput(
    classifiers: list[Classifier], texts: list[str], max_length: int, throughput_repeats: int
) -> dict[str, float]:
    """Examples/s of each model on the same texts, tokenized once per model before timing
    (right-padded to the longest, as `class_logprobs` pads); fastest of `throughput_repeats` rounds."""
    calls = {}
    for clf in classifiers:
        ids = encode(clf.tokenizer, texts, max_length)
        input_ids, mask = pad_batch(ids, clf.tokenizer.pad_token_id)  # (B, T) each
        module = clf.model.module
        calls[clf.model.name] = lambda m=module, x=input_ids, a=mask: m(
            input_ids=x, attention_mask=a
        )
    return {name: len(texts) / t for name, t in fastest_times(calls, throughput_repeats).items()}


def throughput_rows(n: int, k: int) -> np.ndarray:
    """Indices of min(k, n) rows spread evenly over 0..n-1 (first and last included)."""
    return np.unique(np.linspace(0, n - 1, num=min(k, n)).round().astype(np.int64))


# -- the stage ------------------------------------------------------------------------------------


@dataclass
class Evaluation:
    """Everything the stage measured: the metrics JSON and what the plots and report draw."""

    labels: list[str]
    labeled: list[str]
    """Labeled languages with scored test rows, in `classify_corpus.labeled_languages` order."""
    unlabeled: list[str]
    """Other languages with scored test rows, in `classify_corpus.languages` order."""
    gold: np.ndarray
    """(N,) gold class of each scored test row."""
    lang: np.ndarray
    """(N,) language of each scored test row."""
    predictions: dict[str, np.ndarray]
    """model -> (N,) predicted class of each scored test row."""
    scores: dict[str, Scores]
    metrics: dict[str, Any]
    """What goes to the metrics JSON (`models`, `test`, `throughput`)."""
    compressed: set[str] = field(default_factory=set)
    derived: dict[str, str] = field(default_factory=dict)
    """Compressed model -> the evaluated model it was made from."""


def scored_test_rows(test: LabeledRows) -> np.ndarray:
    """Indices of the test rows that have a gold label; InputError if there are none."""
    idx = np.flatnonzero(test.label >= 0)
    if idx.size == 0:
        raise InputError(
            "classify_corpus.path: the test split has no gold labels; nothing to score (give "
            "test records a `label`)"
        )
    return idx


def evaluate_classifiers(
    cfg: ClassifyEvaluateConfig,
    corpus_cfg: ClassifyCorpusConfig,
    models: list[tuple[str, Path]],
) -> Evaluation:
    """Score and time every model on the test split (module docstring); write nothing."""
    if not models:
        raise InputError("no models to evaluate: pass --model NAME=PATH at least once")
    for name, path in models:  # cheapest refusals first, before reading any data
        check_model_folder(name, Path(path))
    corpus = read_labeled_corpus(corpus_cfg)
    labels = corpus.labels
    test = corpus.splits["test"]
    idx = scored_test_rows(test)
    gold, lang = test.label[idx], np.asarray(test.lang)[idx]
    texts = [test.text[i] for i in idx]
    present = set(lang.tolist())
    labeled = [x for x in corpus_cfg.labeled_languages if x in present]
    unlabeled = [
        x for x in corpus.languages if x in present and x not in corpus_cfg.labeled_languages
    ]
    unscored = [x for x in corpus.languages if x not in present]
    if unscored:
        log.warning("test rows without gold labels in %s: not scored", ", ".join(unscored))
    for name, path in models:
        check_classifier(name, Path(path), labels)
    threads_before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        loaded = [load_model(name, Path(path), labels, cfg.int8_kernel) for name, path in models]
        predictions: dict[str, np.ndarray] = {}
        for clf in loaded:
            t0 = time.perf_counter()
            logprobs = class_logprobs(  # (N, C)
                clf.model.module,
                clf.tokenizer,
                texts,
                batch_size=cfg.batch_size,
                max_length=cfg.max_length,
                device="cpu",
            )
            predictions[clf.model.name] = logprobs.argmax(axis=1)
            seconds = time.perf_counter() - t0
            log.info("scored %s on %d test rows in %.1f s", clf.model.name, len(texts), seconds)
        batch = [texts[i] for i in throughput_rows(len(texts), cfg.throughput_examples)]
        speed = measure_throughput(loaded, batch, cfg.max_length, cfg.throughput_repeats)
        threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads_before)
    scores = {
        name: score_predictions(pred, gold, lang, labels, labeled, unlabeled)
        for name, pred in predictions.items()
    }
    results: dict[str, Any] = {}
    for clf in loaded:
        m = clf.model
        results[m.name] = {
            **scores[m.name].summary,
            "parameters": m.parameters,
            "nonzero_parameters": m.nonzero_parameters,
            "weights_bytes": m.weights_bytes,
            "size_bytes": m.size_bytes,
            "examples_per_s": speed[m.name],
        }
    counts = np.bincount(gold, minlength=len(labels))
    metrics = {
        "models": results,
        "test": {
            "examples": int(len(gold)),
            "languages": len(labeled) + len(unlabeled),
            "labeled_languages": len(labeled),
            "unlabeled_languages": len(unlabeled),
            "unscored_languages": len(unscored),
            "labeled": ", ".join(labeled),
            "unscored": ", ".join(unscored),
            "classes": len(labels),
            "chance_accuracy": 1.0 / len(labels),
            "majority_class_accuracy": float(counts.max() / counts.sum()),
            "corpus_fingerprint": corpus.fingerprint(),
        },
        "throughput": {
            "batch_examples": len(batch),
            "max_length": cfg.max_length,
            "repeats": cfg.throughput_repeats,
            "threads": threads,
            "int8_kernel": cfg.int8_kernel,
        },
    }
    models_ = [clf.model for clf in loaded]
    return Evaluation(
        labels=labels,
        labeled=labeled,
        unlabeled=unlabeled,
        gold=gold,
        lang=lang,
        predictions=predictions,
        scores=scores,
        metrics=metrics,
        compressed={m.name for m in models_ if m.compressed},
        derived=derived_from(models_),
    )


def run_classify_evaluate(
    cfg: ClassifyEvaluateConfig,
    corpus_cfg: ClassifyCorpusConfig,
    *,
    models: list[tuple[str, Path]],
    metrics: Path,
    plots: Path,
    report_dir: Path,
    confusion: list[str] | None = None,
) -> dict[str, Any]:
    """Run the stage (module docstring): write the metrics JSON, the plot tables and the report
    (confusion matrices of the models named in `confusion`, every model when None); return the
    metrics."""
    names = [name for name, _ in models]
    wanted = names if confusion is None else list(confusion)
    for name in wanted:
        if name not in names:
            raise InputError(
                f"--confusion {name}: not one of the evaluated models ({', '.join(names)})"
            )
    ev = evaluate_classifiers(cfg, corpus_cfg, models)
    write_json(metrics, ev.metrics)
    report.write_plot_tables(plots, ev, confusion=wanted)
    report.write_report(report_dir, ev, confusion=wanted)
    return ev.metrics
