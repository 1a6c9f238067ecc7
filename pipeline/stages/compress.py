"""DVC stages `compress` and `classify_compress`: a trained student -> a compressed folder
(int8, pruned, zstd).

Prunes the smallest-magnitude weights of the transformer blocks' linear layers, quantizes the
linear layers (and, separately switchable, the embedding and output head) to int8 with one
scale per output row, and stores the weights as a zstd-compressed safetensors blob next to the
config, tokenizer and a manifest (compression.json). `pipeline.compress.compressed.load_compressed(path)`
rebuilds it on CPU in a fresh process. Sizes before and after go to the metrics file.
A causal-LM student (stage `compress`, params section `compress`) or a sequence-classification
student (stage `classify_compress`: `--section classify_compress`, the same keys); the model
class comes from the student's config.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.compress.compress import CompressConfig, run_compress
from pipeline.core.allocator import keep_freed_memory
from pipeline.core.stage_cli import load_section, run_stage, stage_parser


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__, [(CompressConfig, "compress")])
    parser.add_argument(
        "--section",
        default="compress",
        help="params section to read: compress (default) or classify_compress (same keys)",
    )
    parser.add_argument(
        "--student", type=Path, required=True, help="student folder (save_pretrained layout)"
    )
    parser.add_argument("--out", type=Path, required=True, help="output compressed model folder")
    parser.add_argument("--metrics", type=Path, required=True, help="sizes before/after (JSON)")
    args = parser.parse_args(argv)
    return run_stage(
        lambda: run_compress(
            load_section(args.params, CompressConfig, args.section),
            student=args.student,
            out=args.out,
            metrics=args.metrics,
        )
    )


if __name__ == "__main__":
    keep_freed_memory()  # whole-process allocator setting (see pipeline/core/allocator.py)
    sys.exit(main())
