"""Benchmark: cross-lingual transfer of the classification task, measured on `test`.

Runs after `dvc repro` and reads what it built: the classification teacher
(models/classify-teacher), the students `kd`, `ce` and `gold` (models/classify-student-<name>;
`gold` is optional) and the compressed kd student (models/classify-student-compressed). It then
measures the transfer the pipeline did not run: the pipeline's store uses
`classify_logits.transfer` (`parallel` by default), so the benchmark builds a store with the
other transfer (`direct`: the teacher reads each target-language sentence itself) into a
temporary folder with the classify_logits stage's own function, and trains a kd student on it
with the classify_student stage's own function and the `kd` student's params. Every model is
then scored by the classify_evaluate stage's own code (its params section `classify_evaluate`).
Expect a few minutes on 2 CPU cores (the extra student's training dominates).

Last line, accuracies in percent on `test`: {"bench": "classify_quality", "teacher_en": ...,
"kd_en": ..., "unlabeled": {"teacher_direct": ..., "kd_parallel": ..., "kd_direct": ...,
"ce": ..., "gold": ..., "compressed": ...}, "per_language": {model: {lang: ...}}} where
`unlabeled` holds means over the languages without gold labels (teacher_direct:
the teacher reading them itself, zero-shot), `*_en` the accuracy in the first labeled language
(en by default). The line before it gives `aims`, the issue's three aims as measured (kd vs ce on the unlabeled
languages, kd vs the teacher in English, the compressed student vs kd and its weight bytes).
A model that is absent (e.g. no `gold` student) is reported as null.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline.classify.corpus import ClassifyCorpusConfig
from pipeline.classify.evaluate import ClassifyEvaluateConfig, evaluate_classifiers
from pipeline.classify.logits import ClassifyLogitsConfig, run_classify_logits
from pipeline.classify.student import ClassifyStudentConfig, run_classify_student
from pipeline.core.allocator import keep_freed_memory
from pipeline.core.config import from_params, load_params, with_overrides

TRANSFERS = ("parallel", "direct")


def pct(value: float | None) -> float | None:
    """A fraction as a percentage rounded to 0.1, None kept."""
    return None if value is None else round(100 * value, 1)


def train_other_kd(
    params: dict[str, Any], corpus_cfg: ClassifyCorpusConfig, transfer: str, args, work: Path
) -> Path:
    """A kd student trained on a store of `transfer` soft labels, both built under `work`."""
    logits_cfg = from_params(ClassifyLogitsConfig, params, "classify_logits")
    store = work / f"classify-{transfer}.zarr"
    t0 = time.perf_counter()
    run_classify_logits(
        dataclasses.replace(logits_cfg, transfer=transfer),
        corpus_cfg,
        teacher=args.teacher,
        out=store,
        metrics=work / f"classify-{transfer}.json",
        work_dir=work / "logits-partial",
        progress=False,
    )
    print(f"built the {transfer} store in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    student_params = with_overrides(params, "classify_student", "classify_students.kd")
    student_cfg = from_params(ClassifyStudentConfig, student_params, "classify_student")
    out = work / f"classify-student-kd-{transfer}"
    t0 = time.perf_counter()
    run_classify_student(
        student_cfg,
        corpus_cfg,
        logits=store,
        tokenizer=args.teacher,
        teacher=args.teacher if student_cfg.init == "teacher_layers" else None,
        out=out,
        metrics=work / f"classify-student-kd-{transfer}.json",
        checkpoints=work / "student-checkpoints",
        live_dir=work / "student-live",
        name=f"kd-{transfer}",
        progress=False,
    )
    print(f"trained kd on {transfer} labels in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return out


def main() -> None:
    keep_freed_memory()  # as the stage scripts do (see pipeline/core/allocator.py)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--teacher", type=Path, default=Path("models/classify-teacher"))
    parser.add_argument(
        "--students",
        type=Path,
        default=Path("models"),
        help="folder of classify-student-{kd,ce,gold} and classify-student-compressed",
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=None,
        help="keep the extra store and student here (default: a temporary folder, removed)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    params = load_params(args.params)
    corpus_cfg = from_params(ClassifyCorpusConfig, params, "classify_corpus")
    eval_cfg = from_params(ClassifyEvaluateConfig, params, "classify_evaluate")
    pipeline_transfer = from_params(ClassifyLogitsConfig, params, "classify_logits").transfer
    other = next(t for t in TRANSFERS if t != pipeline_transfer)
    first_labeled = corpus_cfg.labeled_languages[0]

    with tempfile.TemporaryDirectory(prefix="classify_quality-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        kd_other = train_other_kd(params, corpus_cfg, other, args, work)
        candidates = {
            "teacher": args.teacher,
            f"kd_{pipeline_transfer}": args.students / "classify-student-kd",
            f"kd_{other}": kd_other,
            "ce": args.students / "classify-student-ce",
            "gold": args.students / "classify-student-gold",
            "compressed": args.students / "classify-student-compressed",
        }
        models = [(name, path) for name, path in candidates.items() if path.is_dir()]
        missing = [name for name, path in candidates.items() if not path.is_dir()]
        if missing:
            print(f"not found, reported as null: {', '.join(missing)}", file=sys.stderr)
        t0 = time.perf_counter()
        ev = evaluate_classifiers(eval_cfg, corpus_cfg, models)
        print(
            f"evaluated {len(models)} models in {time.perf_counter() - t0:.0f} s", file=sys.stderr
        )

    results = ev.metrics["models"]

    def acc(name: str, key: str) -> float | None:
        return results[name].get(key) if name in results else None

    def in_lang(name: str, lang: str) -> float | None:
        scores = ev.scores.get(name)
        return scores.per_language[lang]["accuracy"] if scores else None

    kd = f"kd_{pipeline_transfer}"
    unlabeled = {
        "teacher_direct": pct(acc("teacher", "accuracy_unlabeled")),
        "kd_parallel": pct(acc("kd_parallel", "accuracy_unlabeled")),
        "kd_direct": pct(acc("kd_direct", "accuracy_unlabeled")),
        "ce": pct(acc("ce", "accuracy_unlabeled")),
        "gold": pct(acc("gold", "accuracy_unlabeled")),
        "compressed": pct(acc("compressed", "accuracy_unlabeled")),
    }
    teacher_en, kd_en = in_lang("teacher", first_labeled), in_lang(kd, first_labeled)
    kd_unl, ce_unl = acc(kd, "accuracy_unlabeled"), acc("ce", "accuracy_unlabeled")
    comp_unl = acc("compressed", "accuracy_unlabeled")
    aims: dict[str, Any] = {
        "kd_minus_ce_unlabeled_points": (
            None if kd_unl is None or ce_unl is None else round(100 * (kd_unl - ce_unl), 1)
        ),
        "kd_over_teacher_en": (
            None if not teacher_en or kd_en is None else round(kd_en / teacher_en, 3)
        ),
        "compressed_minus_kd_unlabeled_points": (
            None if comp_unl is None or kd_unl is None else round(100 * (comp_unl - kd_unl), 1)
        ),
        "compressed_weights_ratio": (
            round(results["compressed"]["weights_bytes"] / results[kd]["weights_bytes"], 3)
            if "compressed" in results and kd in results
            else None
        ),
    }
    result = {
        "bench": "classify_quality",
        "teacher_en": pct(teacher_en),
        "kd_en": pct(kd_en),
        "unlabeled": unlabeled,
        "per_language": {
            name: {lang: pct(v["accuracy"]) for lang, v in scores.per_language.items()}
            for name, scores in ev.scores.items()
        },
    }
    # The keys only on the last line (tools read it); the aims and the pipeline's
    # transfer on the line before, for people.
    print(json.dumps({"transfer_in_pipeline": pipeline_transfer, "aims": aims}))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
