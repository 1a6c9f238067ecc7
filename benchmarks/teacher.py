"""Benchmark: teacher_logits-stage throughput vs the bare forward pass, side by side in one run.

Both sides run the same teacher on the same token rows, in batches of `teacher_logits.batch_size`
sequences of `tokenize.seq_len` tokens, in this process with torch's default threads:

- forward: `model(input_ids).logits` per batch under `torch.inference_mode()`, nothing stored;
- stage: `run_teacher_logits` end to end through the real driver with the `teacher_logits` params
  (in-process): load the teacher, read and fingerprint the tokenized rows, compute, compress and
  write every shard, record, verify, finalize, write metrics, move the store into place.

`--threads 1` measures per-core efficiency (the stage then computes in one stream, as a Dask
worker does). The order is forward, stage, forward; the forward throughput is the mean of its two runs, so
drift in a shared machine's load affects both sides alike. The number of rows is calibrated so
that each side takes about `--seconds`. Uses `models/teacher` when prepared (provenance.json
present), else a randomly initialised Llama of the `teacher` params' architecture (the numbers
depend on the architecture, not on the weights).

Last line: {"bench": "teacher", "stage_tokens_per_s": ..., "forward_tokens_per_s": ...,
"ratio": ..., "bytes_per_entry": ...}
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.capture.teacher_logits import TeacherLogitsConfig, run_teacher_logits
from pipeline.core.allocator import keep_freed_memory
from pipeline.core.config import from_params, load_params


def default_teacher(params: dict, scratch: Path) -> Path:
    """`models/teacher` if prepared, else a random Llama of the configured architecture."""
    prepared = Path("models/teacher")
    if (prepared / "provenance.json").is_file():
        return prepared
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from pipeline.core.provenance import files_sha256, tokenizer_identity, write_json
    from pipeline.teacher.builtin_teacher import build_model

    t = params["teacher"]
    vocab = int(t["vocab_size"])
    model = build_model(
        vocab_size=vocab,
        hidden_size=t["hidden_size"],
        num_layers=t["num_layers"],
        num_heads=t["num_heads"],
        intermediate_size=t["intermediate_size"],
        max_position_embeddings=max(1024, t["seq_len"]),
        tie_embeddings=False,
        eos_id=0,
        pad_id=1,
        seed=0,
    )
    out = scratch / "teacher"
    model.save_pretrained(out)
    # a stand-in tokenizer of the same vocabulary size, only for the provenance record
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, "t1")),
        eos_token="t0",
        pad_token="t1",
    )
    digest, files = files_sha256(out)
    write_json(
        out / "provenance.json",
        {
            "name": "benchmark-random-llama",
            "revision": "none",
            "sha256": digest,
            "files": files,
            "architecture": "LlamaForCausalLM",
            "vocab_size": vocab,
            "tokenizer": tokenizer_identity(tok),
        },
    )
    return out


def write_rows(path: Path, train: np.ndarray, validation: np.ndarray) -> None:
    from pipeline.data.tokenized import write_tokenized

    write_tokenized(
        {
            name: (np.ascontiguousarray(rows, np.int32), ["en"] * len(rows))
            for name, rows in (("train", train), ("validation", validation))
        },
        path,
    )


def forward_seconds(model: torch.nn.Module, rows: np.ndarray, batch: int) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        for a in range(0, len(rows), batch):
            logits = model(torch.from_numpy(rows[a : a + batch].astype(np.int64))).logits
            del logits  # nothing is kept: the bare forward pass
    return time.perf_counter() - start


class _ComputeLog(logging.Handler):
    """Picks the driver's 'computed N tokens in S s' line (the compute loop alone)."""

    seconds: float | None = None

    def emit(self, record: logging.LogRecord) -> None:
        m = re.match(r"computed \d+ tokens in ([\d.]+) s", record.getMessage())
        if m:
            self.seconds = float(m.group(1))


def main() -> None:
    keep_freed_memory()  # as the stage scripts do (see pipeline/core/allocator.py)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--seconds", type=float, default=25.0, help="target time per side")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads for both sides (default: torch's default, all cores)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    params = load_params(args.params)
    cfg = from_params(TeacherLogitsConfig, params, "teacher_logits")
    seq_len = int(params.get("tokenize", {}).get("seq_len", 128))
    batch = cfg.batch_size
    with tempfile.TemporaryDirectory(prefix="bench-teacher-") as tmp:
        scratch = Path(tmp)
        teacher = default_teacher(params, scratch)
        from pipeline.capture.shards import load_teacher

        model = load_teacher(teacher, "cpu", "float32")
        vocab = model.get_output_embeddings().weight.shape[0]
        rng = np.random.default_rng(0)
        probe = rng.integers(0, vocab, (3 * batch, seq_len), dtype=np.int32)
        forward_seconds(model, probe[:batch], batch)  # warm-up
        per_batch = forward_seconds(model, probe[batch:], batch) / 2
        n_batches = max(4, round(args.seconds / per_batch))
        rows = rng.integers(0, vocab, (n_batches * batch, seq_len), dtype=np.int32)
        train, validation = rows[batch:], rows[:batch]
        write_rows(scratch / "tokenized", train, validation)
        tokens = rows.size
        print(
            f"teacher {teacher} (vocab {vocab}), {n_batches} batches of {batch} x {seq_len} "
            f"tokens = {tokens} tokens; {cfg.method} k={cfg.k}, "
            f"torch threads {torch.get_num_threads()}",
            flush=True,
        )

        f1 = forward_seconds(model, np.concatenate([train, validation]), batch)
        print(f"forward #1: {f1:.2f} s ({tokens / f1:.0f} tokens/s)", flush=True)
        handler = _ComputeLog()
        logging.getLogger("pipeline.capture.teacher_logits").addHandler(handler)
        logging.getLogger("pipeline.capture.teacher_logits").setLevel(logging.INFO)
        start = time.perf_counter()
        metrics = run_teacher_logits(
            cfg,
            teacher=teacher,
            tokenized=scratch / "tokenized",
            out=scratch / "out" / "teacher.zarr",
            metrics=scratch / "metrics.json",
            work_dir=scratch / "work",
        )
        stage = time.perf_counter() - start
        compute = handler.seconds or float("nan")
        print(
            f"stage: {stage:.2f} s end to end ({tokens / stage:.0f} tokens/s); compute loop "
            f"{compute:.2f} s ({tokens / compute:.0f} tokens/s)",
            flush=True,
        )
        f2 = forward_seconds(model, np.concatenate([train, validation]), batch)
        print(f"forward #2: {f2:.2f} s ({tokens / f2:.0f} tokens/s)", flush=True)
    forward_tps = tokens / ((f1 + f2) / 2)
    stage_tps = tokens / stage
    print(
        json.dumps(
            {
                "bench": "teacher",
                "stage_tokens_per_s": round(stage_tps, 1),
                "forward_tokens_per_s": round(forward_tps, 1),
                "ratio": round(stage_tps / forward_tps, 3),
                "bytes_per_entry": round(metrics["storage"]["bytes_per_entry"], 3),
            }
        )
    )


if __name__ == "__main__":
    main()
