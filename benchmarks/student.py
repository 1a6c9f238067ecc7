"""Benchmark: student training throughput with stored soft labels vs the teacher live, and the
streaming loader vs the same batches held in memory, side by side in one run.

All sides train the default student (params.yaml `train_student`) on the pipeline's outputs
(`models/teacher`, `data/tokenized`, `data/logits/teacher.zarr`: run `dvc repro` first):

- offline: soft labels streamed from the store (`teacher: store`), the default stage's step;
- online: the same step with the teacher run on every batch (`teacher: live`), full vocabulary;
- memory: the offline step fed from a list of the same batches, read before timing.

Each side runs `--rounds` times, alternating, `--steps` timed steps after untimed warm-up steps:
one for every side (the first kernel calls), and for the two streaming sides as many more as
the loader needs to fill its read-ahead (`prefetch` windows of `buffer_chunks` chunks), so the
timed steps see the steady state a long training run lives in, where one window is read per
window's worth of steps, not the start-up burst. The median round counts, so a neighbour's
burst on a shared machine hits one round, not the result; the ratios are medians of per-round
ratios. Tokens are input tokens
(batch x seq_len) per second of wall time, data waiting included.

The line before the last: the median time to read, decode and check one store chunk
(`decode_ms_per_chunk`) against the student steps that chunk feeds (`steps_ms_per_chunk`).

Last line: {"bench": "student", "offline_tokens_per_s": ..., "online_tokens_per_s": ...,
"speedup": ..., "loader_ratio": ...} where loader_ratio = offline streaming / from memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from pipeline.core.allocator import keep_freed_memory
from pipeline.core.config import from_params, load_params
from pipeline.student.train_student import Setup, TrainStudentConfig, prepare


def timed(setup: Setup, batches: Iterable, steps: int, warmup: int = 1) -> float:
    """Tokens per second of `steps` training steps fed from `batches`, after `warmup` untimed."""
    it = iter(batches)
    for _ in range(warmup):
        setup.trainer.step(next(it))
    tokens = 0
    t0 = time.perf_counter()
    for _ in range(steps):
        batch = next(it)
        setup.trainer.step(batch)
        tokens += batch["input_ids"].numel()
    return tokens / (time.perf_counter() - t0)


def decode_cost(
    setup: Setup, block: int, memory_rate: float, chunks: int = 24
) -> tuple[float, float]:
    """(median ms to read, decode and check one store chunk, ms of the student steps that chunk
    feeds): `read_labels` on the first `chunks` chunks (one decompression of each array, the
    format's decoding and the value checks), against the steps over its block x seq_len tokens
    at the in-memory rate."""
    stream = setup.stream()
    n = len(stream.reader.tokens())
    times = []
    for a in range(0, min(n, chunks * block), block):
        t0 = time.perf_counter()
        stream.read_labels(a, min(a + block, n))
        times.append(time.perf_counter() - t0)
    seq_len = setup.validation.shape[1]
    step_ms = 1000 * block * seq_len / memory_rate  # the steps one chunk feeds
    return 1000 * statistics.median(times), step_ms


def main() -> None:
    keep_freed_memory()  # as the stage scripts do (see pipeline/core/allocator.py)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--teacher", type=Path, default=Path("models/teacher"))
    parser.add_argument("--tokenized", type=Path, default=Path("data/tokenized"))
    parser.add_argument("--logits", type=Path, default=Path("data/logits/teacher.zarr"))
    parser.add_argument("--steps", type=int, default=12, help="timed steps per round and side")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    cfg = from_params(TrainStudentConfig, load_params(args.params), "train_student")
    common = dict(tokenized=args.tokenized, tokenizer=args.teacher)
    offline = prepare(cfg, logits=args.logits, **common)
    block = offline.stream_args["chunk_sequences"]
    online = prepare(
        dataclasses.replace(cfg, teacher="live"),
        logits=None,
        teacher=args.teacher,
        chunk_sequences=block,
        **common,
    )
    memory = prepare(cfg, logits=args.logits, **common)
    # Steps until the read-ahead is full: `prefetch` windows of `buffer_chunks` blocks each.
    window_steps = -(-cfg.buffer_chunks * block // cfg.batch_size)
    warm = 1 + cfg.prefetch * window_steps
    rates: dict[str, list[float]] = {"offline": [], "online": [], "memory": []}
    n = args.steps + warm
    for r in range(args.rounds):
        start = r * n
        rates["offline"].append(timed(offline, offline.loader(start), args.steps, warm))
        rates["online"].append(timed(online, online.loader(start), args.steps, warm))
        it = iter(memory.loader(start + warm - 1))
        held = [next(it) for _ in range(args.steps + 1)]  # the same batches, read before timing
        del it
        rates["memory"].append(timed(memory, held, args.steps))
        print(
            f"round {r}: " + ", ".join(f"{k} {v[-1]:.0f} tok/s" for k, v in rates.items()),
            file=sys.stderr,
        )
    med = {k: statistics.median(v) for k, v in rates.items()}

    def per_round(a: str, b: str) -> float:
        """Median over rounds of a/b within each round: the two sides of one round ran seconds
        apart, so a burst on the machine shifts both or spoils one round, not the ratio."""
        return statistics.median(x / y for x, y in zip(rates[a], rates[b], strict=True))

    decode_ms, step_ms = decode_cost(offline, block, med["memory"])
    print(
        json.dumps(
            {
                "decode_ms_per_chunk": round(decode_ms, 2),
                "steps_ms_per_chunk": round(step_ms, 1),
                "decode_share_of_steps": round(decode_ms / step_ms, 4),
            }
        )
    )
    print(
        json.dumps(
            {
                "bench": "student",
                "offline_tokens_per_s": round(med["offline"], 1),
                "online_tokens_per_s": round(med["online"], 1),
                "speedup": round(per_round("offline", "online"), 3),
                "loader_ratio": round(per_round("offline", "memory"), 3),
            }
        )
    )


if __name__ == "__main__":
    main()
