"""DVC stage `classify_teacher`: params + labeled corpus -> models/classify-teacher/.

With `classify_teacher.model: builtin`, reads the LM teacher (--lm-teacher, the prepare_teacher
output) as a sequence classifier with a new head and fine-tunes it on the gold labels of
`classify_corpus.labeled_languages`, keeping the weights best on their dev rows; otherwise loads
a hub id or local folder (fine-tuned the same way with `finetune: true`). Writes the classifier
(save_pretrained layout + tokenizer + provenance.json) all-or-nothing, and dev/test accuracy per
labeled language, dev accuracy of the other languages read directly, and training stats to the
metrics file.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.classify.corpus import ClassifyCorpusConfig
from pipeline.classify.teacher import ClassifyTeacherConfig, prepare_classify_teacher
from pipeline.core.allocator import keep_freed_memory
from pipeline.core.stage_cli import load_section, run_stage, stage_parser


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(
        __doc__,
        [(ClassifyTeacherConfig, "classify_teacher"), (ClassifyCorpusConfig, "classify_corpus")],
    )
    parser.add_argument(
        "--lm-teacher",
        type=Path,
        default=None,
        help="LM teacher folder (prepare_teacher output); needed by `model: builtin`",
    )
    parser.add_argument("--out", type=Path, required=True, help="output classifier folder")
    parser.add_argument(
        "--metrics", type=Path, required=True, help="accuracies and training stats (JSON)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)

    return run_stage(
        lambda: prepare_classify_teacher(
            load_section(args.params, ClassifyTeacherConfig, "classify_teacher"),
            load_section(args.params, ClassifyCorpusConfig, "classify_corpus"),
            lm_teacher=args.lm_teacher,
            out=args.out,
            metrics=args.metrics,
            progress=not args.no_progress,
        )
    )


if __name__ == "__main__":
    keep_freed_memory()  # whole-process allocator setting (see pipeline/core/allocator.py)
    sys.exit(main())
