"""DVC stage `classify_student`: classification store + corpus -> models/classify-student-<name>/.

Trains a small sequence classifier (LlamaForSequenceClassification, the classification
teacher's tokenizer) on alpha * CE(gold) + (1 - alpha) * T^2 * KL(teacher_T || student_T), the
teacher's class distributions streamed from the store (never its weights), selects the best
dev checkpoint, logs curves with dvclive, checkpoints outside the DVC output so a killed run
resumes, and writes the student with the tokenizer and softlabels.json. The corpus comes from
params `classify_corpus`; `--student NAME` applies `classify_students.NAME` to
`classify_student` (dvc.yaml's foreach trains kd, ce and gold this way).

With `classify_student.processes: N` > 1 it trains data-parallel (PyTorch DDP), as
`train_student` does: run as is (e.g. by `dvc repro`), it relaunches itself as N ranks under
torch.distributed.run with the same arguments; or start it as `torchrun --nproc-per-node N -m
pipeline.stages.classify_student ...`. Rank 0 writes every output.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.classify.corpus import ClassifyCorpusConfig
from pipeline.classify.student import ClassifyStudentConfig, check_launch, run_classify_student
from pipeline.core.allocator import keep_freed_memory
from pipeline.core.stage_cli import load_section, stage_parser
from pipeline.student import distributed as dp

MODULE = "pipeline.stages.classify_student"
"""This script as a module: what a data-parallel run starts as each rank."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
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

    def work() -> None:
        cfg, corpus_cfg = dp.same_on_every_rank(
            lambda: (
                load_section(
                    args.params,
                    ClassifyStudentConfig,
                    "classify_student",
                    overrides=f"classify_students.{args.student}" if args.student else None,
                ),
                load_section(args.params, ClassifyCorpusConfig, "classify_corpus"),
            )
        )
        if dp.needs_launch(cfg.processes):  # run this script again as cfg.processes ranks
            check_launch(cfg, logits=args.logits, teacher=args.teacher)
            dp.launch(MODULE, argv, cfg.processes, section="classify_student")
            return
        run_classify_student(
            cfg,
            corpus_cfg,
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

    return dp.run_ranked_stage(work)


if __name__ == "__main__":
    keep_freed_memory()  # whole-process allocator setting (see pipeline/core/allocator.py)
    sys.exit(main())
