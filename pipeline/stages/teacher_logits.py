"""DVC stage `teacher_logits`: tokenized rows -> data/logits/teacher.zarr (teacher soft labels).

Runs the teacher over every row of the tokenized `train` and `validation` splits (CUDA when
available, else CPU; in-process or on Dask) and stores, per position, k token ids (top-k or
sampled) with their log-probabilities and the log of the uncovered tail mass, shard by shard.
Resumable: work in progress lives in --work-dir, keyed by everything that determines the result;
a rerun after a crash continues from the finished shards and writes a byte-identical store, which
appears at --out only when complete and verified. Fidelity (covered mass, entropy, top-1
probability per language) and storage cost go to the metrics file.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.capture.teacher_logits import TeacherLogitsConfig, run_teacher_logits
from pipeline.core.allocator import keep_freed_memory
from pipeline.core.stage_cli import load_section, run_stage, stage_parser


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__, [(TeacherLogitsConfig, "teacher_logits")])
    parser.add_argument("--teacher", type=Path, required=True, help="prepared teacher folder")
    parser.add_argument(
        "--tokenized", type=Path, required=True, help="tokenized DatasetDict folder"
    )
    parser.add_argument("--out", type=Path, required=True, help="output logits store (.zarr)")
    parser.add_argument("--metrics", type=Path, required=True, help="fidelity metrics (JSON)")
    parser.add_argument(
        "--work-dir",
        type=Path,
        required=True,
        help="work-in-progress folder (outside the DVC output; resumable shards live here)",
    )
    args = parser.parse_args(argv)
    return run_stage(
        lambda: run_teacher_logits(
            load_section(args.params, TeacherLogitsConfig, "teacher_logits"),
            teacher=args.teacher,
            tokenized=args.tokenized,
            out=args.out,
            metrics=args.metrics,
            work_dir=args.work_dir,
        )
    )


if __name__ == "__main__":
    keep_freed_memory()  # whole-process allocator setting (see pipeline/core/allocator.py)
    sys.exit(main())
