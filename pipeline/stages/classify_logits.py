"""DVC stage `classify_logits`: classifier teacher + labeled corpus -> data/logits/classify.zarr.

Stores the teacher's exact class distribution (T = 1 log-probabilities over every class) for
every row of every split and language of the classification corpus, with the row's identity
(language, id, text hash), so students with any tokenizer can learn from it. Languages without
gold labels get their soft labels by `classify_logits.transfer`: `parallel` (the teacher reads the
same sentence in `parallel_source`) or `direct` (the teacher reads the row's own text). Resumable
shard by shard in --work-dir; the store appears at --out only complete and verified. Label
sources, rows without a parallel source, and how often the soft labels agree with gold labels go
to the metrics file.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.classify.corpus import ClassifyCorpusConfig
from pipeline.classify.logits import ClassifyLogitsConfig, run_classify_logits
from pipeline.core.allocator import keep_freed_memory
from pipeline.core.stage_cli import load_section, run_stage, stage_parser


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(
        __doc__,
        [(ClassifyCorpusConfig, "classify_corpus"), (ClassifyLogitsConfig, "classify_logits")],
    )
    parser.add_argument("--teacher", type=Path, required=True, help="classification teacher folder")
    parser.add_argument(
        "--out", type=Path, required=True, help="output classification store (.zarr)"
    )
    parser.add_argument("--metrics", type=Path, required=True, help="label-source metrics (JSON)")
    parser.add_argument(
        "--work-dir",
        type=Path,
        required=True,
        help="work-in-progress folder (outside the DVC output; resumable shards live here)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    return run_stage(
        lambda: run_classify_logits(
            load_section(args.params, ClassifyLogitsConfig, "classify_logits"),
            load_section(args.params, ClassifyCorpusConfig, "classify_corpus"),
            teacher=args.teacher,
            out=args.out,
            metrics=args.metrics,
            work_dir=args.work_dir,
            progress=not args.no_progress,
        )
    )


if __name__ == "__main__":
    keep_freed_memory()  # whole-process allocator setting (see pipeline/core/allocator.py)
    sys.exit(main())
