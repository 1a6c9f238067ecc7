"""DVC stage `prepare_teacher`: params -> models/teacher/ (save_pretrained layout + tokenizer).

With `teacher.model: builtin`, trains a byte-level BPE tokenizer and a small Llama on the
corpus's training documents (CPU, minutes); otherwise loads a hub id or local folder. Writes
provenance.json next to the model, and validation perplexity of the teacher and of a unigram
baseline, per language, to the metrics file.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.core.allocator import keep_freed_memory
from pipeline.core.stage_cli import load_section, run_stage, stage_parser
from pipeline.data.corpus import CorpusConfig
from pipeline.teacher.prepare_teacher import TeacherConfig, prepare_teacher


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__, [(TeacherConfig, "teacher"), (CorpusConfig, "corpus")])
    parser.add_argument("--out", type=Path, required=True, help="output teacher folder")
    parser.add_argument(
        "--metrics", type=Path, required=True, help="perplexities and training stats (JSON)"
    )
    args = parser.parse_args(argv)

    def work() -> None:
        result = prepare_teacher(
            load_section(args.params, TeacherConfig, "teacher"),
            load_section(args.params, CorpusConfig, "corpus"),
            out=args.out,
            metrics=args.metrics,
        )
        ppl = result["metrics"].get("perplexity")
        summary = f"teacher {result['provenance']['name']} -> {args.out}"
        if ppl:
            summary += (
                f": validation perplexity {ppl['teacher']['overall']:.1f} "
                f"(unigram {ppl['unigram']['overall']:.1f})"
            )
        print(summary)

    return run_stage(work)


if __name__ == "__main__":
    keep_freed_memory()  # whole-process allocator setting (see pipeline/core/allocator.py)
    sys.exit(main())
