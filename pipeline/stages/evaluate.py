"""DVC stage `evaluate`: every model given, side by side on the validation split -> reports.

For each `--model NAME=PATH` (a save_pretrained folder or a compressed one): perplexity overall
and per language, KL(teacher || model) and top-1 agreement from the stored validation soft
labels, parameter count, size on disk and throughput (same batch, interleaved rounds). Writes
the metrics JSON (DVC metrics), plot tables (DVC plots) and a report folder (report.md + PNG
figures, including the training curves of every `--curves NAME=DVCLIVE_DIR`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.core.allocator import keep_freed_memory
from pipeline.core.stage_cli import load_section, run_stage, stage_parser
from pipeline.evaluate.common import parse_named
from pipeline.evaluate.evaluate import EvaluateConfig, run_evaluate


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__, [(EvaluateConfig, "evaluate")])
    parser.add_argument("--tokenized", type=Path, required=True, help="tokenized DatasetDict")
    parser.add_argument(
        "--logits", type=Path, required=True, help="logits store (its validation split is used)"
    )
    parser.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="NAME=PATH",
        help="a model to evaluate (repeat; order = order in the report)",
    )
    parser.add_argument(
        "--curves",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="a student's dvclive folder, for the training-curves figure (repeat)",
    )
    parser.add_argument("--metrics", type=Path, required=True, help="metrics JSON (DVC metrics)")
    parser.add_argument("--plots", type=Path, required=True, help="plot tables folder (DVC plots)")
    parser.add_argument(
        "--report", type=Path, required=True, help="report folder (report.md + figures)"
    )
    args = parser.parse_args(argv)

    def work() -> None:
        run_evaluate(
            load_section(args.params, EvaluateConfig, "evaluate"),
            tokenized=args.tokenized,
            logits=args.logits,
            models=parse_named(args.model, "--model"),
            curves=parse_named(args.curves, "--curves"),
            metrics=args.metrics,
            plots=args.plots,
            report_dir=args.report,
        )

    return run_stage(work)


if __name__ == "__main__":
    keep_freed_memory()  # whole-process allocator setting (see pipeline/core/allocator.py)
    sys.exit(main())
