"""DVC stage `train_student`: logits store + tokenized data -> models/student/ (save_pretrained).

Streams token ids and stored soft labels (never loading the teacher), trains a student with the
KD loss chosen in params (tail handling, temperature, mixing with hard-label CE), logs curves
with dvclive, checkpoints outside the DVC output so a killed run resumes, and writes the student
with the teacher's tokenizer and softlabels.json (the store it learned from). With
`train_student.teacher: live` it is the online baseline instead (needs --teacher).

With `train_student.processes: N` > 1 it trains data-parallel (PyTorch DDP): run as is (e.g. by
`dvc repro`), it relaunches itself as N ranks under torch.distributed.run with the same
arguments; or start it as `torchrun --nproc-per-node N -m pipeline.stages.train_student ...`.
Rank 0 writes every output.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.core.allocator import keep_freed_memory
from pipeline.core.stage_cli import load_section, stage_parser
from pipeline.student import distributed as dp
from pipeline.student.train_student import TrainStudentConfig, check_launch, run_train_student

MODULE = "pipeline.stages.train_student"
"""This script as a module: what a data-parallel run starts as each rank."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = stage_parser(__doc__, [(TrainStudentConfig, "train_student")])
    parser.add_argument("--tokenized", type=Path, required=True, help="tokenized DatasetDict")
    parser.add_argument("--logits", type=Path, help="logits store (Zarr); needed unless live")
    parser.add_argument(
        "--tokenizer",
        type=Path,
        required=True,
        help="folder holding the teacher's tokenizer (only tokenizer files are read)",
    )
    parser.add_argument(
        "--teacher",
        type=Path,
        help="teacher folder: only for teacher: live or init: teacher_layers",
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
        "--live-dir", type=Path, default=Path("dvclive/train_student"), help="dvclive folder"
    )
    parser.add_argument(
        "--student",
        help="train the student NAME: params section `students.NAME` overrides keys of "
        "`train_student` (dvc.yaml's foreach trains `kd` and `ce` this way)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)

    def work() -> None:
        cfg = dp.same_on_every_rank(
            lambda: load_section(
                args.params,
                TrainStudentConfig,
                "train_student",
                overrides=f"students.{args.student}" if args.student else None,
            )
        )
        if dp.needs_launch(cfg.processes):  # run this script again as cfg.processes ranks
            check_launch(cfg, logits=args.logits, teacher=args.teacher)
            dp.launch(MODULE, argv, cfg.processes, section="train_student")
            return
        run_train_student(
            cfg,
            tokenized=args.tokenized,
            logits=args.logits,
            tokenizer=args.tokenizer,
            teacher=args.teacher,
            out=args.out,
            metrics=args.metrics,
            checkpoints=args.checkpoints,
            live_dir=args.live_dir,
            progress=not args.no_progress,
        )

    return dp.run_ranked_stage(work)


if __name__ == "__main__":
    keep_freed_memory()  # whole-process allocator setting (see pipeline/core/allocator.py)
    sys.exit(main())
