"""DVC stage `compress`: a trained student -> models/student-compressed/ (int8, pruned, zstd).

Prunes the smallest-magnitude weights of the transformer blocks' linear layers, quantizes the
linear layers (and, separately switchable, the embedding and output head) to int8 with one
scale per output row, and stores the weights as a zstd-compressed safetensors blob next to the
config, tokenizer and a manifest (compression.json). `pipeline.compressed.load_compressed(path)`
rebuilds it on CPU in a fresh process. Sizes before and after go to the metrics file.
"""

from __future__ import annotations

import os
import sys

# Run as `python stages/compress.py`, this folder is sys.path[0], and its tokenize.py would
# shadow the standard library's `tokenize` module (imported by `logging`, `inspect`, ...).
if sys.path and sys.path[0] == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]

from pathlib import Path  # noqa: E402

from pipeline.allocator import keep_freed_memory  # noqa: E402
from pipeline.compress import CompressConfig, run_compress  # noqa: E402
from pipeline.stage_cli import load_section, run_stage, stage_parser  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__, [(CompressConfig, "compress")])
    parser.add_argument(
        "--student", type=Path, required=True, help="student folder (save_pretrained layout)"
    )
    parser.add_argument("--out", type=Path, required=True, help="output compressed model folder")
    parser.add_argument("--metrics", type=Path, required=True, help="sizes before/after (JSON)")
    args = parser.parse_args(argv)
    return run_stage(
        lambda: run_compress(
            load_section(args.params, CompressConfig, "compress"),
            student=args.student,
            out=args.out,
            metrics=args.metrics,
        )
    )


if __name__ == "__main__":
    keep_freed_memory()  # whole-process allocator setting (see pipeline/allocator.py)
    sys.exit(main())
