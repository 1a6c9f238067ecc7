"""DVC stage `classify_student`: classification store + corpus -> models/classify-student-<name>/.

Trains a small sequence classifier (LlamaForSequenceClassification, the classification
teacher's tokenizer) on alpha * CE(gold) + (1 - alpha) * T^2 * KL(teacher_T || student_T), the
teacher's class distributions streamed from the store (never its weights), selects the best
dev checkpoint, logs curves with dvclive, checkpoints outside the DVC output so a killed run
resumes, and writes the student with the tokenizer and softlabels.json. The corpus comes from
params `classify_corpus`; `--student NAME` applies `classify_students.NAME` to
`classify_student` (dvc.yaml's foreach trains kd, ce and gold this way).
"""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.classify.corpus import ClassifyCorpusConfig
from pipeline.classify.student import ClassifyStudentConfig, run_classify_student
from pipeline.core.allocator import keep_freed_memory
from pipeline.core.stage_cli import load_section, run_stage, stage_parser


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(
        __doc__,
        [(ClassifyCorpusConfig, "classify_corpus"), (ClassifyStudentConfig, "classify_student")],
    )
    parser.add_argument(
        "--logits", type=Path, help="classification store (Zarr); needed unless alpha is 1"
    )
    parser.add_argument(
        "--tokenizer",
        type=Path,
        required=True,
        help="the classification teacher's folder (only its tokenizer files are read)",
    )
    parser.add_argument(
        "--teacher", type=Path, help="classification teacher folder: only for init: teacher_layers"
    )
    parser.add_argument("--out", type=Path, required=True, help="output student folder")
    parser.add_argument("--metrics", type=Path, required=True, help="metrics JSON")
    parser.add_argument(
        "--checkpoints",
        type=Path,
        required=True,
        help="work folder for resumable checkpoints (outside the DVC output)",
    )
    parser.add_argument(
        "--live-dir", type=Path, default=Path("dvclive/classify-student"), help="dvclive folder"
    )
    parser.add_argument(
        "--student",
        help="train the student NAME: params section `classify_students.NAME` overrides keys "
        "of `classify_student`",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    return run_stage(
        lambda: run_classify_student(
            load_section(
                args.params,
                ClassifyStudentConfig,
                "classify_student",
                overrides=f"classify_students.{args.student}" if args.student else None,
            ),
            load_section(args.params, ClassifyCorpusConfig, "classify_corpus"),
            logits=args.logits,
            tokenizer=args.tokenizer,
            teacher=args.teacher,
            out=args.out,
            metrics=args.metrics,
            checkpoints=args.checkpoints,
            live_dir=args.live_dir,
            name=args.student,
            progress=not args.no_progress,
        )
    )


if __name__ == "__main__":
    keep_freed_memory()  # whole-process allocator setting (see pipeline/core/allocator.py)
    sys.exit(main())
