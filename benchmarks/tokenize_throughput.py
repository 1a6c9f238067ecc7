"""Benchmark: tokenize-stage throughput vs the bare tokenizer, side by side in one run.

Both sides tokenize the same texts (every document of the configured corpus) in the same
process (`tokenize.num_proc = 1`, the tokenizer's own threads as configured): the bare side is
one `tokenizer(texts)` call; the stage side is `run_tokenize` end to end (read and split the
corpus, tokenize through `datasets.map`, pack, balance, shuffle, write Arrow). Each side runs
`--repeats` times, alternating, and the best time counts. Throughput is tokens of the bare
encoding per second, so the ratio is the stage's overhead and nothing else.

Uses the prepared teacher's tokenizer (`models/teacher`) when present, else trains the builtin
byte-level BPE of `teacher.vocab_size` on the corpus first (not timed).

Last line: {"bench": "tokenize", "stage_tokens_per_s": ..., "raw_tokens_per_s": ..., "ratio": ...}
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

from pipeline.core.config import from_params, load_params
from pipeline.data.corpus import CorpusConfig, read_corpus
from pipeline.data.tokenize import TokenizeConfig, load_tokenizer, run_tokenize


def teacher_dir(params: dict, corpus: CorpusConfig, scratch: Path) -> Path:
    """`models/teacher` if prepared, else a folder with the builtin tokenizer and a config."""
    prepared = Path("models/teacher")
    if (prepared / "tokenizer.json").is_file():
        return prepared
    from transformers import LlamaConfig

    from pipeline.teacher.builtin_teacher import train_tokenizer

    docs = read_corpus(corpus)
    texts = [d for lang in corpus.languages for d in docs.train[lang]]
    vocab = params.get("teacher", {}).get("vocab_size", 8192)
    tok = train_tokenizer(texts, vocab_size=vocab, max_position_embeddings=1024)
    out = scratch / "teacher"
    tok.save_pretrained(out)
    LlamaConfig(vocab_size=len(tok), max_position_embeddings=1024).save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    params = load_params(args.params)
    corpus = from_params(CorpusConfig, params, "corpus")
    cfg = dataclasses.replace(from_params(TokenizeConfig, params, "tokenize"), num_proc=1)
    with tempfile.TemporaryDirectory(prefix="bench-tokenize-") as tmp:
        scratch = Path(tmp)
        teacher = teacher_dir(params, corpus, scratch)
        tokenizer = load_tokenizer(teacher)
        docs = read_corpus(corpus)
        texts = [
            d
            for split in (docs.train, docs.validation)
            for lang in corpus.languages
            for d in split[lang]
        ]

        raw_times, stage_times, n_tokens = [], [], 0
        for i in range(args.repeats):
            t0 = time.perf_counter()
            ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
            raw_times.append(time.perf_counter() - t0)
            n_tokens = sum(len(x) for x in ids)

            t0 = time.perf_counter()
            run_tokenize(
                cfg,
                corpus,
                teacher=teacher,
                out=scratch / f"out{i}",
                metrics=scratch / f"m{i}.json",
            )
            stage_times.append(time.perf_counter() - t0)
            print(f"repeat {i}: raw {raw_times[-1]:.2f}s, stage {stage_times[-1]:.2f}s", flush=True)

    raw = n_tokens / min(raw_times)
    stage = n_tokens / min(stage_times)
    print(f"{len(texts)} documents, {n_tokens} tokens, num_proc=1")
    print(
        json.dumps(
            {
                "bench": "tokenize",
                "stage_tokens_per_s": round(stage),
                "raw_tokens_per_s": round(raw),
                "ratio": round(stage / raw, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
