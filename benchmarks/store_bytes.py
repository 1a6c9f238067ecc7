"""Benchmark: bytes per position of a `sample` logits store, format 1 vs format 2, side by side.

For each source, the same teacher outputs (k draws per position with their log-probabilities,
`tail`, the teacher's entropy) are written twice with `pipeline.store.format.write_shard`, once
as format 1 (k raw int32 ids + float16 logprobs) and once as format 2 (the default
`teacher_logits` store: distinct ids + counts + entropy, ids as narrow as the vocabulary
allows); each store is then measured on disk, whole (every array, every zarr.json):

- `default`: the default run's teacher (`models/teacher`) on the default run's validation
  split (`data/tokenized`), through the stage's own kernel with the stage's params
  (`teacher_logits`: method, k, seed, per-shard sampling streams), so the format-2 store is,
  byte for byte, the validation half of what `dvc repro` writes (run `dvc repro
  prepare_teacher tokenize` first);
- `32000`, `151936`, `262144`: the project's synthetic teacher (docs/logits-store.md) at that
  vocabulary size: per position 64 distinct candidate ids from a Zipf(1.1) unigram over V,
  with logits `sharpness * sorted Gumbel noise`, sharpness ~ U(0.5, 4), a head mass ~
  Beta(8, 2), the rest spread over the whole vocabulary by the unigram; draws, their exact
  log-probabilities and the exact entropy follow from that mixture. The k draws are placed on
  the mixture's CDF as `teacher_logits.sampling` says (systematic by default), like the stage's.

Also reported, on the line before the last: `format2_logprobs`, format 2 with
`sample_logprobs: true` (what keeping the log-probabilities costs), and whether the aims hold
(default <= 32 B, V = 151,936 <= 40 B). About 40 s on 2 cores.

Last line: {"bench": "store_bytes", "bytes_per_position": {"default": {"format1": ...,
"format2": ...}, "32000": {...}, "151936": {...}, "262144": {...}}, "by_array": {...}, "k": ...}
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.core.config import load_params
from pipeline.store.format import SplitSpec, StoreSpec, create_store, finalize_store, write_shard
from pipeline.store.labels import id_dtype

SYNTHETIC_VOCABS = (32_000, 151_936, 262_144)
HEAD = 64
"""Distinct candidate ids per position of the synthetic teacher."""


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def synthetic_outputs(
    vocab: int, n: int, seq_len: int, k: int, seed: int, sampling: str = "systematic"
) -> dict[str, np.ndarray]:
    """The synthetic teacher's draws (n, L, k), logprobs, tail and entropy (module docstring),
    placed on its CDF (the head block, then the unigram) as `sampling` says."""
    rng = np.random.default_rng([seed, vocab])
    p_count = n * seq_len
    unigram = 1.0 / np.arange(1, vocab + 1) ** 1.1
    unigram /= unigram.sum()
    cdf = np.cumsum(unigram)
    cdf[-1] = 1.0
    perm = rng.permutation(vocab)  # frequent ids anywhere in the id range, as in a real tokenizer
    h_unigram = float(-(unigram * np.log(unigram)).sum())

    def from_unigram(size) -> np.ndarray:
        return perm[np.searchsorted(cdf, rng.random(size), side="right").clip(max=vocab - 1)]

    # 64 distinct head ids per position: the first distinct ones of a few hundred unigram draws.
    pool = from_unigram((p_count, 4 * HEAD))  # (P, 256)
    head = np.empty((p_count, HEAD), np.int64)
    for i in range(p_count):
        _, first = np.unique(pool[i], return_index=True)
        ids = pool[i][np.sort(first)][:HEAD]
        while len(ids) < HEAD:  # rare: top up with ids not yet present
            extra = rng.integers(0, vocab, HEAD - len(ids))
            ids = np.concatenate([ids, np.setdiff1d(extra, ids)])[:HEAD]
        head[i] = ids
    sharp = rng.uniform(0.5, 4.0, (p_count, 1))
    logits = sharp * -np.sort(-rng.gumbel(size=(p_count, HEAD)), axis=1)  # (P, 64) descending
    soft = np.exp(logits - logits.max(1, keepdims=True))
    soft /= soft.sum(1, keepdims=True)
    mass = rng.beta(8, 2, (p_count, 1))
    u_of = np.empty(vocab)
    u_of[perm] = unigram  # unigram probability by id
    p_head = mass * soft + (1 - mass) * u_of[head]  # (P, 64) exact p of the head ids
    # Draws: points x on [0, 1), k per position (iid, or (u + j) / k); x < mass falls in the
    # head (by the head's own CDF), the rest in the unigram.
    if sampling == "systematic":
        x = (rng.random((p_count, 1)) + np.arange(k)) / k  # (P, k)
    else:
        x = rng.random((p_count, k))
    pick_head = x < mass
    in_head_x = np.minimum(x / mass, 1 - 1e-12)  # position inside the head block
    which = (in_head_x[:, :, None] > np.cumsum(soft, 1)[:, None, :]).sum(-1).clip(max=HEAD - 1)
    in_uni = np.clip((x - mass) / (1 - mass), 0, 1 - 1e-12)  # position inside the unigram
    uni = perm[np.searchsorted(cdf, in_uni, side="right").clip(max=vocab - 1)]
    drawn = np.where(pick_head, np.take_along_axis(head, which, 1), uni)
    in_head = drawn[:, :, None] == head[:, None, :]  # (P, k, 64)
    p_drawn = np.where(
        in_head.any(-1), (in_head * p_head[:, None, :]).sum(-1), (1 - mass) * u_of[drawn]
    )
    # Exact entropy: head terms, plus the unigram part outside the head.
    rest = 1 - mass[:, 0]  # (P,) unigram share r; outside the head p_i = r u_i
    u_head = u_of[head]  # (P, 64)
    sum_all = np.log(rest) - h_unigram  # sum over all i of u_i log(r u_i)
    sum_head = (u_head * np.log(rest[:, None] * u_head)).sum(1)  # the same over the head ids
    outside = -rest * (sum_all - sum_head)  # -sum outside the head of p_i log p_i
    entropy = -(p_head * np.log(p_head)).sum(1) + outside
    distinct_mass = np.zeros(p_count)
    for i in range(p_count):  # tail: mass not covered by the distinct drawn ids
        ids, first = np.unique(drawn[i], return_index=True)
        distinct_mass[i] = p_drawn[i][first].sum()
    tail = np.log1p(-np.minimum(distinct_mass, 1 - 1e-7))
    order = np.argsort(-p_drawn, axis=1, kind="stable")  # format 1 keeps draws by logprob
    return {
        "input_ids": rng.integers(0, vocab, (n, seq_len)).astype(np.int32),
        "ids": np.take_along_axis(drawn, order, 1).reshape(n, seq_len, k).astype(np.int32),
        "logprobs": np.log(np.take_along_axis(p_drawn, order, 1))
        .reshape(n, seq_len, k)
        .astype(np.float16),
        "tail": tail.reshape(n, seq_len).astype(np.float16),
        "entropy": entropy.reshape(n, seq_len).astype(np.float16),
    }


def default_outputs(params: dict, teacher: Path, tokenized: Path) -> tuple[dict, int, int]:
    """The stage's kernel outputs on the default run's validation split: (outputs, vocab,
    tokenizer vocab)."""
    import torch

    from pipeline.capture.kernel import SoftLabelKernel, draw_uniforms, shard_generator
    from pipeline.capture.shards import load_teacher
    from pipeline.core.provenance import LM_TEACHER_KEYS, read_provenance
    from pipeline.data.tokenized import load_tokenized

    cfg = params["teacher_logits"]
    prov = read_provenance(teacher, LM_TEACHER_KEYS)
    rows = load_tokenized(tokenized, ["validation"])["validation"].input_ids  # (N, L)
    n, seq_len = rows.shape
    k = int(cfg["k"])
    kernel = SoftLabelKernel(
        load_teacher(teacher, "cpu", "float32"),
        method="sample",
        k=k,
        head_chunk_tokens=int(cfg["head_chunk_tokens"]),
    )
    shard_rows = int(cfg["chunk_sequences"]) * int(cfg["shard_chunks"])
    batch = int(cfg["batch_size"])
    out = {name: [] for name in ("ids", "logprobs", "tail", "entropy")}
    for shard, start in enumerate(range(0, n, shard_rows)):
        stop = min(start + shard_rows, n)
        gen = shard_generator(int(cfg["seed"]), "validation", shard)
        for a in range(start, stop, batch):
            b = min(a + batch, stop)
            u = draw_uniforms(gen, (b - a) * seq_len, k, cfg.get("sampling", "iid"))
            labels = kernel(torch.from_numpy(rows[a:b].astype(np.int64)), u)
            out["ids"].append(labels.ids.numpy().astype(np.int32))
            out["logprobs"].append(labels.logprobs.numpy())
            out["tail"].append(labels.tail.numpy())
            out["entropy"].append(labels.entropy.numpy().astype(np.float16))
    data = {name: np.concatenate(parts) for name, parts in out.items()}
    data["input_ids"] = np.ascontiguousarray(rows, dtype=np.int32)
    return data, int(prov["vocab_size"]), int(prov["tokenizer"]["vocab_size"])


def measure(
    data: dict[str, np.ndarray],
    vocab: int,
    tok_vocab: int,
    chunk_sequences: int,
    shard_chunks: int,
    work: Path,
) -> dict[str, dict]:
    """Write `data` as format 1, format 2 and format 2 with logprobs; bytes per position of the
    whole store and per array."""
    n, seq_len, k = data["ids"].shape
    positions = n * seq_len
    variants = {
        "format1": dict(format_version=1, logprobs=True),
        "format2": dict(format_version=2, logprobs=False),
        "format2_logprobs": dict(format_version=2, logprobs=True),
    }
    result = {}
    for name, kw in variants.items():
        narrow = kw["format_version"] >= 2
        spec = StoreSpec(
            (SplitSpec("validation", n, seq_len),),
            k,
            chunk_sequences,
            shard_chunks,
            method="sample",
            id_dtype=id_dtype(vocab) if narrow else "int32",
            input_dtype=id_dtype(tok_vocab) if narrow else "int32",
            **kw,
        )
        attrs = {
            "teacher": {
                "name": "bench",
                "revision": None,
                "sha256": "0" * 64,
                "architecture": "bench",
                "vocab_size": vocab,
            },
            "tokenizer": {"sha256": "0" * 64, "vocab_size": tok_vocab, "eos_id": 0},
            "dataset": {"splits": {"validation": {"n": n, "seq_len": seq_len, "fingerprint": "0"}}},
            "method": "sample",
            "seed": 0,
            "temperature": 1.0,
        }
        path = work / f"{name}.zarr"
        create_store(path, spec, attrs)
        sums: dict[str, str] = {}
        t0 = time.perf_counter()
        for shard, (a, b) in enumerate(spec.shards("validation")):
            sums.update(
                write_shard(
                    path,
                    spec,
                    "validation",
                    shard,
                    data["input_ids"][a:b],
                    data["ids"][a:b],
                    data["logprobs"][a:b],
                    data["tail"][a:b],
                    data["entropy"][a:b] if spec.compact else None,
                )
            )
        seconds = time.perf_counter() - t0
        finalize_store(path, sums)
        result[name] = {
            "bytes_per_position": round(dir_bytes(path) / positions, 2),
            "by_array": {
                a: round(dir_bytes(path / "validation" / a) / positions, 2) for a in spec.ARRAYS
            },
            "write_positions_per_s": round(positions / seconds),
        }
        shutil.rmtree(path)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--teacher", type=Path, default=Path("models/teacher"))
    parser.add_argument("--tokenized", type=Path, default=Path("data/tokenized"))
    parser.add_argument(
        "--sequences", type=int, default=256, help="synthetic sequences per vocabulary size"
    )
    args = parser.parse_args()
    params = load_params(args.params)
    cfg = params["teacher_logits"]
    k, chunks, shard_chunks = int(cfg["k"]), int(cfg["chunk_sequences"]), int(cfg["shard_chunks"])
    sources = {}
    t0 = time.perf_counter()
    data, vocab, tok_vocab = default_outputs(params, args.teacher, args.tokenized)
    with tempfile.TemporaryDirectory(prefix="store-bytes-") as tmp:
        sources["default"] = measure(data, vocab, tok_vocab, chunks, shard_chunks, Path(tmp))
        for v in SYNTHETIC_VOCABS:
            data = synthetic_outputs(
                v,
                args.sequences,
                128,
                k,
                seed=int(cfg["seed"]),
                sampling=cfg.get("sampling", "iid"),
            )
            sources[str(v)] = measure(data, v, v, chunks, shard_chunks, Path(tmp))
    for name, r in sources.items():
        print(
            f"{name:>8}: format 1 {r['format1']['bytes_per_position']:6.2f} B/position, "
            f"format 2 {r['format2']['bytes_per_position']:6.2f} "
            f"(with logprobs {r['format2_logprobs']['bytes_per_position']:6.2f}); "
            f"format 2 by array {r['format2']['by_array']}; "
            f"writes {r['format2']['write_positions_per_s']:,} positions/s"
        )
    print(f"seconds: {time.perf_counter() - t0:.1f}")
    print(
        json.dumps(
            {
                "format2_logprobs": {
                    name: r["format2_logprobs"]["bytes_per_position"] for name, r in sources.items()
                },
                "aims": {
                    "default_le_32": sources["default"]["format2"]["bytes_per_position"] <= 32,
                    "151936_le_40": sources["151936"]["format2"]["bytes_per_position"] <= 40,
                },
            }
        )
    )
    print(
        json.dumps(
            {
                "bench": "store_bytes",
                "bytes_per_position": {
                    name: {f: r[f]["bytes_per_position"] for f in ("format1", "format2")}
                    for name, r in sources.items()
                },
                "by_array": {
                    name: {f: r[f]["by_array"] for f in ("format1", "format2")}
                    for name, r in sources.items()
                },
                "k": k,
            }
        )
    )


if __name__ == "__main__":
    main()
