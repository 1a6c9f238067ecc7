"""Benchmark: teacher_logits-stage throughput vs the bare forward pass, on two teachers.

Per teacher, side by side in one run, on the same token rows, in the same batches, with the
same torch threads:

- forward: `model(input_ids).logits` per batch under `torch.inference_mode()`, nothing stored;
- stage: `run_teacher_logits` end to end through the real driver with the `teacher_logits` params
  (in-process): load the teacher, read and fingerprint the tokenized rows, compute, compress and
  write every shard, record, verify, finalize, write metrics, move the store into place.

The order is forward, then `--rounds` times (stage, forward); each stage run is compared with
the mean of the two forward runs either side of it, so drift in a shared machine's load affects
both sides alike, and the median round is reported (with every round's ratio: on this shared
2-core machine one forward run may take 40% longer than the next). The number of rows is
calibrated so that each run takes about `--seconds`. The time split is the stage's own ("time split: ..."
log line, `pipeline.capture.teacher_logits.log_time_split`): backbone, output-head matmul,
vocabulary-wide passes (normaliser, entropy, sampling search, coverage), encode + write,
summed over the stage's compute streams.

Teachers (`--teachers`):
- `builtin`: `models/teacher` when prepared (provenance.json present), else a randomly
  initialised Llama of the `teacher` params' architecture (1 layer, hidden 256, V = 4,096),
  batches of `teacher_logits.batch_size`;
- `wide`: a randomly initialised Llama with a head of real proportions, hidden 1,024, 2 layers,
  16 heads, SwiGLU 2,816, V = 151,936 (Qwen-family vocabularies): a config, not weights; the
  numbers depend on the shapes only. Batches of `--wide-batch-size` sequences (both sides).

`--threads 1` measures per-core efficiency; `--device cuda` runs both sides on the GPU (the
stage with the params' dtype, auto = bf16; the forward in the same dtype) and is refused with
a message where there is none.

Last line, exactly the keys issue 14 names (tools read it): {"bench": "teacher", "builtin":
{"ratio": ..., "stage_tokens_per_s": ..., "forward_tokens_per_s": ..., "bytes_per_position":
..., "time_split": {"body": s, "head": s, "passes": s, "write": s}}, "wide": {...}}. Each
teacher's line before it adds every round's ratio, the resolved vocab_passes, the batch size
and the tokens measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.capture.kernel import resolve_vocab_passes
from pipeline.capture.teacher_logits import TeacherLogitsConfig, run_teacher_logits
from pipeline.core.allocator import keep_freed_memory
from pipeline.core.config import from_params, load_params

WIDE = {
    "vocab_size": 151_936,
    "hidden_size": 1024,
    "num_layers": 2,
    "num_heads": 16,
    "intermediate_size": 2816,
}
"""The `wide` teacher: a Qwen-family head (V = 151,936) on a small body."""


def random_teacher(scratch: Path, name: str, arch: dict, seq_len: int) -> Path:
    """A randomly initialised Llama of `arch`, saved with a stand-in tokenizer and provenance
    (the stage needs both; the numbers depend on the shapes, not on the weights)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from pipeline.core.provenance import files_sha256, tokenizer_identity, write_json
    from pipeline.teacher.builtin_teacher import build_model

    vocab = int(arch["vocab_size"])
    model = build_model(
        **{k: int(arch[k]) for k in ("vocab_size", "hidden_size", "num_layers", "num_heads")},
        intermediate_size=int(arch["intermediate_size"]),
        max_position_embeddings=max(1024, seq_len),
        tie_embeddings=False,
        eos_id=0,
        pad_id=1,
        seed=0,
    )
    out = scratch / name
    model.save_pretrained(out)
    del model
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, "t1")),
        eos_token="t0",
        pad_token="t1",
    )
    digest, files = files_sha256(out)
    write_json(
        out / "provenance.json",
        {
            "name": f"benchmark-random-llama-{name}",
            "revision": "none",
            "sha256": digest,
            "files": files,
            "architecture": "LlamaForCausalLM",
            "vocab_size": vocab,
            "tokenizer": tokenizer_identity(tok),
        },
    )
    return out


def builtin_teacher(params: dict, scratch: Path, seq_len: int) -> Path:
    """`models/teacher` if prepared, else a random Llama of the `teacher` params' shapes."""
    prepared = Path("models/teacher")
    if (prepared / "provenance.json").is_file():
        return prepared
    return random_teacher(scratch, "builtin", params["teacher"], seq_len)


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
    device = next(model.parameters()).device
    start = time.perf_counter()
    with torch.inference_mode():
        for a in range(0, len(rows), batch):
            inp = torch.from_numpy(rows[a : a + batch].astype(np.int64)).to(device)
            logits = model(inp).logits
            del logits  # nothing is kept: the bare forward pass
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


class _StageLog(logging.Handler):
    """Picks the driver's compute-loop seconds and its time split from its log lines."""

    compute: float | None = None
    split: dict[str, float] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        m = re.match(r"computed \d+ tokens in ([\d.]+) s", message)
        if m:
            self.compute = float(m.group(1))
        if message.startswith("time split: "):
            self.split = {
                name: float(sec)
                for name, sec in re.findall(
                    r"(\w+) ([\d.]+) s", message.removeprefix("time split: ")
                )
            }


def measure(
    name: str,
    teacher: Path,
    cfg: TeacherLogitsConfig,
    seq_len: int,
    seconds: float,
    scratch: Path,
    rounds: int,
) -> dict:
    """Forward, then `rounds` times stage, forward, on the same rows; the teacher's result
    dict (the median round's figures, and every round's ratio)."""
    from pipeline.capture.shards import load_teacher, torch_dtype

    batch = cfg.batch_size
    device = "cuda" if cfg.device == "cuda" else "cpu"
    dtype = "float32" if device == "cpu" else ("bfloat16" if cfg.dtype == "auto" else cfg.dtype)
    model = load_teacher(teacher, device, dtype)
    assert next(model.parameters()).dtype == torch_dtype(dtype)
    vocab = model.get_output_embeddings().weight.shape[0]
    rng = np.random.default_rng(0)
    probe = rng.integers(0, vocab, (3 * batch, seq_len), dtype=np.int32)
    forward_seconds(model, probe[:batch], batch)  # warm-up
    per_batch = forward_seconds(model, probe[batch:], batch) / 2
    n_batches = max(4, round(seconds / per_batch))
    rows = rng.integers(0, vocab, (n_batches * batch, seq_len), dtype=np.int32)
    train, validation = rows[batch:], rows[:batch]
    work = scratch / f"{name}-run"
    write_rows(work / "tokenized", train, validation)
    tokens = rows.size
    print(
        f"[{name}] teacher {teacher} (vocab {vocab}), {n_batches} batches of {batch} x "
        f"{seq_len} tokens = {tokens} tokens; {cfg.method} k={cfg.k}, {device} {dtype}, "
        f"torch threads {torch.get_num_threads()}",
        flush=True,
    )
    everything = np.concatenate([train, validation])
    forwards = [forward_seconds(model, everything, batch)]
    print(f"[{name}] forward #1: {forwards[0]:.2f} s ({tokens / forwards[0]:.0f} tokens/s)")
    stages = []
    for i in range(rounds):
        stages.append(stage_run(name, teacher, cfg, work / f"round{i}", tokens))
        forwards.append(forward_seconds(model, everything, batch))
        print(
            f"[{name}] forward #{i + 2}: {forwards[-1]:.2f} s "
            f"({tokens / forwards[-1]:.0f} tokens/s)",
            flush=True,
        )
    # each stage run against the mean of the forward runs either side of it
    ratios = [
        (tokens / st["seconds"]) / (tokens / ((forwards[i] + forwards[i + 1]) / 2))
        for i, st in enumerate(stages)
    ]
    mid = sorted(range(rounds), key=lambda i: ratios[i])[rounds // 2]  # the median round
    forward_tps = tokens / ((forwards[mid] + forwards[mid + 1]) / 2)
    return {
        "ratio": round(ratios[mid], 3),
        "ratio_rounds": [round(r, 3) for r in ratios],
        "stage_tokens_per_s": round(tokens / stages[mid]["seconds"], 1),
        "forward_tokens_per_s": round(forward_tps, 1),
        "bytes_per_position": round(stages[mid]["metrics"]["storage"]["bytes_per_token"], 2),
        "time_split": {k: round(v, 2) for k, v in (stages[mid]["split"] or {}).items()},
        "vocab_passes": resolve_vocab_passes(cfg.vocab_passes, device),
        "batch_size": batch,
        "tokens": tokens,
    }


def stage_run(name: str, teacher: Path, cfg: TeacherLogitsConfig, work: Path, tokens: int) -> dict:
    """One end-to-end stage run into `work` (reading `work.parent / "tokenized"`): seconds,
    metrics and the stage's logged time split."""
    handler = _StageLog()
    stage_log = logging.getLogger("pipeline.capture.teacher_logits")
    stage_log.addHandler(handler)
    stage_log.setLevel(logging.INFO)
    start = time.perf_counter()
    try:
        metrics = run_teacher_logits(
            cfg,
            teacher=teacher,
            tokenized=work.parent / "tokenized",
            out=work / "out" / "teacher.zarr",
            metrics=work / "metrics.json",
            work_dir=work / "work",
        )
    finally:
        stage_log.removeHandler(handler)
    seconds = time.perf_counter() - start
    print(
        f"[{name}] stage: {seconds:.2f} s end to end ({tokens / seconds:.0f} tokens/s); compute "
        f"loop {handler.compute} s; time split {handler.split}",
        flush=True,
    )
    return {"seconds": seconds, "metrics": metrics, "split": handler.split}


SUMMARY = (
    "ratio",
    "stage_tokens_per_s",
    "forward_tokens_per_s",
    "bytes_per_position",
    "time_split",
)
"""The keys of a teacher's entry in the last line."""


def _summary(measured: dict) -> dict:
    return {key: measured[key] for key in SUMMARY}


def main() -> None:
    keep_freed_memory()  # as the stage scripts do (see pipeline/core/allocator.py)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--seconds", type=float, default=10.0, help="target time per run")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="stage runs, each between two forward runs; the median round is reported "
        "(a shared 2-core machine's speed drifts by tens of percent within minutes)",
    )
    parser.add_argument(
        "--teachers", nargs="+", choices=("builtin", "wide"), default=["builtin", "wide"]
    )
    parser.add_argument(
        "--wide-batch-size", type=int, default=8, help="sequences per batch for `wide`"
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads for both sides (default: torch's default, all cores)",
    )
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device on this machine; nothing measured", file=sys.stderr)
        sys.exit(2)
    if args.threads:
        torch.set_num_threads(args.threads)
    params = load_params(args.params)
    base = from_params(TeacherLogitsConfig, params, "teacher_logits")
    base = dataclasses.replace(base, device=args.device)
    seq_len = int(params.get("tokenize", {}).get("seq_len", 128))
    result: dict = {"bench": "teacher"}
    with tempfile.TemporaryDirectory(prefix="bench-teacher-") as tmp:
        scratch = Path(tmp)
        for name in args.teachers:
            if name == "builtin":
                teacher, cfg = builtin_teacher(params, scratch, seq_len), base
            else:
                teacher = random_teacher(scratch, "wide", WIDE, seq_len)
                cfg = dataclasses.replace(base, batch_size=args.wide_batch_size)
            result[name] = measure(name, teacher, cfg, seq_len, args.seconds, scratch, args.rounds)
            print(json.dumps({name: result[name]}), flush=True)
    print(json.dumps({k: v if k == "bench" else _summary(v) for k, v in result.items()}))


if __name__ == "__main__":
    main()
