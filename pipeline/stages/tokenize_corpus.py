"""DVC stage `tokenize`: corpus -> data/tokenized/ (a DatasetDict with train and validation).

Tokenizes every document of the selected languages with the teacher's tokenizer, packs each
language's documents into rows of `tokenize.seq_len` tokens with EOS separators, rebalances the
training rows across languages by temperature sampling (p_l ~ n_l^alpha), and writes
`input_ids` (int32, fixed length) and `lang` columns. Per-language counts (documents, tokens
before/after balancing, every skipped line by reason) go to the metrics file.

Streams: corpus files are read in slices of `tokenize.slice_mb` and tokenized in
`tokenize.num_proc` processes or on Dask (`tokenize.dask`); memory is bounded by a tokenizer
batch and a write block, not the corpus. The output does not depend on any of these three.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.core.stage_cli import load_section, run_stage, stage_parser
from pipeline.data.corpus import CorpusConfig
from pipeline.data.tokenize import TokenizeConfig, run_tokenize


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__, [(CorpusConfig, "corpus"), (TokenizeConfig, "tokenize")])
    parser.add_argument(
        "--teacher",
        type=Path,
        required=True,
        help="prepared teacher folder (its tokenizer is used)",
    )
    parser.add_argument("--out", type=Path, required=True, help="output DatasetDict folder")
    parser.add_argument("--metrics", type=Path, required=True, help="per-language counts (JSON)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    return run_stage(
        lambda: run_tokenize(
            load_section(args.params, TokenizeConfig, "tokenize"),
            load_section(args.params, CorpusConfig, "corpus"),
            teacher=args.teacher,
            out=args.out,
            metrics=args.metrics,
            progress=not args.no_progress,
        )
    )


if __name__ == "__main__":
    sys.exit(main())
