"""DVC stage `classify_evaluate`: every classifier given, side by side on the test split -> reports.

For each `--model NAME=PATH` (a save_pretrained sequence classifier or a compressed one), each
reading the texts with its own tokenizer: accuracy and macro-F1 per language, means over the
labeled and the unlabeled languages apart, per-class precision and recall, confusion matrices
(of the `--confusion` models), parameter count, size on disk and throughput (same batch,
interleaved rounds). Writes the metrics JSON (DVC metrics), plot tables (DVC plots) and a report
folder (report.md + PNG figures). Reads the `test` split only (never dev).
"""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.classify.corpus import ClassifyCorpusConfig
from pipeline.classify.evaluate import ClassifyEvaluateConfig, run_classify_evaluate
from pipeline.core.allocator import keep_freed_memory
from pipeline.core.stage_cli import load_section, run_stage, stage_parser
from pipeline.evaluate.common import parse_named


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(
        __doc__,
        [(ClassifyEvaluateConfig, "classify_evaluate"), (ClassifyCorpusConfig, "classify_corpus")],
    )
    parser.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="NAME=PATH",
        help="a classifier to evaluate (repeat; order = order in the report)",
    )
    parser.add_argument(
        "--confusion",
        action="append",
        metavar="NAME",
        help="a --model NAME whose confusion matrix to draw and tabulate (repeat; default: all)",
    )
    parser.add_argument("--metrics", type=Path, required=True, help="metrics JSON (DVC metrics)")
    parser.add_argument("--plots", type=Path, required=True, help="plot tables folder (DVC plots)")
    parser.add_argument(
        "--report", type=Path, required=True, help="report folder (report.md + figures)"
    )
    args = parser.parse_args(argv)

    def work() -> None:
        run_classify_evaluate(
            load_section(args.params, ClassifyEvaluateConfig, "classify_evaluate"),
            load_section(args.params, ClassifyCorpusConfig, "classify_corpus"),
            models=parse_named(args.model, "--model"),
            confusion=args.confusion,
            metrics=args.metrics,
            plots=args.plots,
            report_dir=args.report,
        )

    return run_stage(work)


if __name__ == "__main__":
    keep_freed_memory()  # whole-process allocator setting (see pipeline/core/allocator.py)
    sys.exit(main())
