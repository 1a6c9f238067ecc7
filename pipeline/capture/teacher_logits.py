"""The `teacher_logits` stage: tokenized rows -> teacher soft labels in a sharded Zarr store.

Steps: read the teacher's provenance and the tokenized splits (`pipeline.data.tokenized`); check
them against each other and against `k` before any work; derive the resume key; lock it
(`<work_dir>/<key>.lock`: a second run of the same key waits, then finishes at once if the first
put the store in place); create (or reopen) the store in `<work_dir>/<key>/`
(`pipeline.store.work`, shared with `classify_logits`); skip every shard whose record's checksums
still match its files on disk; compute the rest in-process (`pipeline.capture.shards.ShardRunner`)
or on Dask (`pipeline.capture.dask_runner`); finalize (every checksum verified again, `complete`
set); move the store into `out` (one rename on the same filesystem), delete the work folder, and
only then write the fidelity metrics.

Resume key: sha256 over everything that determines the bytes of the store: the teacher's
provenance sha256, each split's n, seq_len and input-id fingerprint, method, k, seed,
chunk_sequences, shard_chunks, batch_size, head_chunk_tokens, the resolved vocab_passes, device
type and dtype, the kernel and store format versions, each array's codecs, and the torch and
transformers versions. Work started under another key is never mixed in. Trade-off: changing
batch_size (or upgrading torch) restarts from scratch, because either may change floating-point
results in the last bit.

The output appears only complete: DVC tracks `out`, which is replaced in one rename after
verification; a run killed at any moment leaves `out` as it was and its finished shards in the
work folder for the next run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.capture.dask_runner import run_on_dask  # distributed: imported lazily
from pipeline.capture.kernel import FORMAT_VERSION, Fidelity, VocabPasses, resolve_vocab_passes
from pipeline.capture.shards import (
    CPU_STREAMS,
    Job,
    ShardRunner,
    build_kernel,
    load_teacher,
)
from pipeline.core.atomic import check_destinations
from pipeline.core.cluster import DaskConfig
from pipeline.core.config import require
from pipeline.core.device import resolve_device
from pipeline.core.errors import ConfigError, InputError
from pipeline.core.provenance import LM_TEACHER_KEYS, read_provenance
from pipeline.data.tokenized import SPLITS, TokenizedData, load_tokenized
from pipeline.store.format import FORMAT_VERSION as STORE_FORMAT_VERSION
from pipeline.store.format import (
    PER_CANDIDATE,
    Method,
    Sampling,
    SplitSpec,
    StoreSpec,
    codec_chains,
    finalize_store,
)
from pipeline.store.labels import id_dtype
from pipeline.store.work import (
    dir_bytes,
    finished_records,
    install_store,
    keep_finished_shards,
    key_digest,
    lock_work,
    open_work_store,
    pending_shards,
    remove_partials,
    write_metrics,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TeacherLogitsConfig:
    """Params section `teacher_logits`: how the teacher's soft labels are computed and stored."""

    method: Method = "sample"
    """How ids are chosen per position: the k most probable ids, or k draws with replacement
    from the teacher's distribution (unbiased; duplicates kept)."""
    k: int = 32
    """Ids per position: the top k, or k draws (stored as distinct ids + counts);
    1 <= k <= the teacher's vocabulary size."""
    sampling: Sampling = "systematic"
    """`sample`: where the k draws fall on the teacher's CDF. `systematic`: one uniform u per
    position and the points (u + j) / k, so id i is drawn floor(k p_i) or ceil(k p_i) times
    (unbiased, and ids with p_i >= 1/k always drawn); `iid`: k independent draws (multinomial
    counts, several times the variance; every store before this key). The students' quality
    at each is measured in docs/logits-store.md."""
    sample_logprobs: bool = False
    """Keep the teacher's log-probability of each drawn id (and the `tail` mass) in a sample
    store: needed for a student temperature != 1, `sample_weights: inclusion` and the store's
    mass checks; about +32 B per position at k = 32 (the store doubles). Off, the store keeps
    ids, counts and the teacher's entropy, all that sampled KD at T = 1 needs. topk stores
    always keep them."""
    seed: int = 0
    """Seed of the sampling draws (each shard derives its own stream from it)."""
    batch_size: int = 32
    """Sequences per forward pass (halved automatically after a CUDA out-of-memory error)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the teacher runs; auto picks CUDA when available."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Teacher weights/activations dtype; auto = float32 on CPU, bfloat16 on CUDA (float16 if
    the GPU lacks bfloat16). float16 is refused on CPU. The output head is always fp32."""
    chunk_sequences: int = 64
    """Sequences per Zarr chunk (the unit a reader decompresses)."""
    shard_chunks: int = 4
    """Chunks per shard file: the unit of work, writing and resume. A shard is a fixed number of
    sequences (256 by default, ~33k tokens at L = 128: seconds on a GPU, a few minutes on CPU),
    whatever the corpus size, so a killed run loses at most one shard per worker, never the
    pass; the cost is files: 4 arrays x shards (~12k files for 100M tokens, ~2.8 MB per shard on
    disk at k = 32), fine for DVC. Keep chunk_sequences x shard_chunks a multiple of batch_size
    so no batch is cut short at a shard's end."""
    head_chunk_tokens: int = 1024
    """Positions per slice of the output head: memory ~ 3 x this x vocab x 4 bytes with eager
    vocab_passes, 1 x with native (the CPU default) or fused."""
    vocab_passes: VocabPasses = "auto"
    """How the vocabulary-wide passes (normaliser, entropy, block sums, id choice) run:
    `native`, CPU only, compiled C (pipeline/capture/_passes.c, built by the install) that reads
    each row twice while it is in cache; `fused`, one torch.compile'd kernel that reads the
    logits once and writes nothing vocabulary-sized (Triton on CUDA; a C++ compiler on CPU);
    `eager`, separate torch ops; auto = fused on CUDA, native on CPU (eager where the install
    built no native passes). Labels agree to float32 rounding, so the resolved choice is part
    of the resume key."""
    dask: DaskConfig = field(default_factory=DaskConfig)
    """Distributed execution (see teacher_logits.dask.*)."""

    def __post_init__(self) -> None:
        require(self.k >= 1, "teacher_logits.k", f"must be >= 1, got {self.k}")
        for key in ("batch_size", "chunk_sequences", "shard_chunks", "head_chunk_tokens"):
            value = getattr(self, key)
            require(value >= 1, f"teacher_logits.{key}", f"must be >= 1, got {value}")


# -- checks and identities --------------------------------------------------------------------


def check_k(cfg: TeacherLogitsConfig, prov: dict[str, Any], teacher: Path) -> None:
    """k must be within the teacher's vocabulary (read from its provenance, before loading)."""
    vocab = int(prov["vocab_size"])
    if not 1 <= cfg.k <= vocab:
        raise ConfigError(
            f"teacher_logits.k: must be between 1 and the teacher's vocabulary size {vocab} "
            f"({teacher / 'provenance.json'}), got {cfg.k}"
        )


def check_inputs(
    cfg: TeacherLogitsConfig,
    prov: dict[str, Any],
    data: TokenizedData,
    *,
    teacher: Path,
) -> None:
    """Refuse, before any work, a k outside the vocabulary or data the teacher cannot read."""
    check_k(cfg, prov, teacher)
    vocab = int(prov["vocab_size"])
    prov_file = teacher / "provenance.json"
    tok_vocab = int(prov.get("tokenizer", {}).get("vocab_size", vocab))
    context = prov.get("max_position_embeddings")
    for split, d in data.splits.items():
        ids = d.input_ids
        if ids.size == 0:
            continue
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab:
            bad = lo if lo < 0 else hi
            raise InputError(
                f"{data.path}: split '{split}' has token id {bad}, outside the teacher's "
                f"vocabulary [0, {vocab}) ({prov_file}); the data was tokenized with another "
                "tokenizer: re-run `dvc repro tokenize` with this teacher"
            )
        if hi >= tok_vocab:
            raise InputError(
                f"{data.path}: split '{split}' has token id {hi}, outside the teacher "
                f"tokenizer's {tok_vocab} ids ({prov_file}); the data was tokenized with another "
                "tokenizer: re-run `dvc repro tokenize` with this teacher"
            )
        if context is not None and ids.shape[1] > int(context):
            raise InputError(
                f"{data.path}: split '{split}' has rows of {ids.shape[1]} tokens, longer "
                f"than the teacher's context ({context}, {prov_file}); re-tokenize with "
                f"tokenize.seq_len <= {context}"
            )


def store_attrs(
    cfg: TeacherLogitsConfig, prov: dict[str, Any], fingerprints: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """The provenance attributes of the store (see store.REQUIRED_ATTRS)."""
    return {
        "teacher": {key: prov[key] for key in ("name", "revision", "sha256", "architecture")}
        | {"vocab_size": int(prov["vocab_size"])},
        "tokenizer": {key: prov["tokenizer"][key] for key in ("sha256", "vocab_size", "eos_id")},
        "dataset": {"splits": fingerprints},
        "method": cfg.method,
        "seed": cfg.seed,
        "temperature": 1.0,
    } | ({"sampling": cfg.sampling} if cfg.method == "sample" else {})


def store_spec(
    cfg: TeacherLogitsConfig, prov: dict[str, Any], fingerprints: dict[str, dict[str, Any]]
) -> StoreSpec:
    """The layout and encoding of the store this run writes (format `STORE_FORMAT_VERSION`):
    ids as narrow as the teacher's vocabulary allows, input ids as the tokenizer's."""
    return StoreSpec(
        tuple(SplitSpec(s, f["n"], f["seq_len"]) for s, f in fingerprints.items()),
        cfg.k,
        cfg.chunk_sequences,
        cfg.shard_chunks,
        method=cfg.method,
        format_version=STORE_FORMAT_VERSION,
        id_dtype=id_dtype(int(prov["vocab_size"])),
        input_dtype=id_dtype(int(prov["tokenizer"]["vocab_size"])),
        logprobs=cfg.method == "topk" or cfg.sample_logprobs,
    )


def work_key(
    cfg: TeacherLogitsConfig,
    prov: dict[str, Any],
    fingerprints: dict[str, dict[str, Any]],
    spec: StoreSpec,
    device: str,
    dtype: str,
    vocab_passes: str,
) -> dict[str, Any]:
    """Everything that determines the store's bytes (module docstring), as plain data;
    `spec` the run's `store_spec`, `vocab_passes` resolved (`resolve_vocab_passes`)."""
    import torch
    import transformers

    return {
        "softlabels_format": FORMAT_VERSION,
        "store_format": STORE_FORMAT_VERSION,
        "codecs": codec_chains(spec),
        "teacher_sha256": prov["sha256"],
        "splits": fingerprints,
        "method": cfg.method,
        "k": cfg.k,
        "sample_logprobs": cfg.sample_logprobs,
        "sampling": cfg.sampling,
        "seed": cfg.seed,
        "chunk_sequences": cfg.chunk_sequences,
        "shard_chunks": cfg.shard_chunks,
        "batch_size": cfg.batch_size,
        "head_chunk_tokens": cfg.head_chunk_tokens,
        "vocab_passes": vocab_passes,
        "device": device,
        "dtype": dtype,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


# -- the run ----------------------------------------------------------------------------------


def run_teacher_logits(
    cfg: TeacherLogitsConfig,
    *,
    teacher: str | Path,
    tokenized: str | Path,
    out: str | Path,
    metrics: str | Path,
    work_dir: str | Path,
) -> dict[str, Any]:
    """Run the stage (module docstring); return the metrics written to `metrics`."""
    check_destinations(out, metrics, work_dir)  # fail now, not after the work
    teacher, out = Path(teacher), Path(out)
    prov = read_provenance(teacher, LM_TEACHER_KEYS)
    check_k(cfg, prov, teacher)  # before reading the data
    device, dtype = resolve_device(cfg.device, cfg.dtype, section="teacher_logits")
    data = load_tokenized(tokenized)
    check_inputs(cfg, prov, data, teacher=teacher)
    ids_fps = data.fingerprints()
    fingerprints = {
        s: {"n": len(d), "seq_len": d.seq_len, "fingerprint": ids_fps[s]}
        for s, d in data.splits.items()
    }
    spec = store_spec(cfg, prov, fingerprints)
    vocab_passes = resolve_vocab_passes(cfg.vocab_passes, device)
    key = work_key(cfg, prov, fingerprints, spec, device, dtype, vocab_passes)
    kdir = Path(work_dir) / key_digest(key)
    store, records = kdir / out.name, kdir / "shards"
    job = Job(
        teacher=str(teacher),
        tokenized=str(data.path),
        store=str(store),
        records=str(records),
        spec=spec,
        method=cfg.method,
        k=cfg.k,
        seed=cfg.seed,
        sampling=cfg.sampling,
        batch_size=cfg.batch_size,
        head_chunk_tokens=cfg.head_chunk_tokens,
        vocab_passes=vocab_passes,
        device=device,
        dtype=dtype,
    )
    with lock_work(kdir, out, "teacher_logits") as lock:  # a second run waits here
        done = lock.finished_output(out)
        if done is not None:  # another run of this key finished while we waited
            write_metrics(metrics, done, out, stage="teacher_logits")
            return done
        with keep_finished_shards(kdir, records, spec, "teacher_logits"):
            open_work_store(kdir, store, spec, store_attrs(cfg, prov, fingerprints), key)
            pending = pending_shards(store, records, spec)
            _compute(cfg, job, data, pending)
            recs = finished_records(store, records, spec)
            checksums = {k: v for r in recs for k, v in r["checksums"].items()}
            fidelity = Fidelity()
            for rec in recs:
                fidelity.merge(Fidelity(rec["fidelity"]))
            log_time_split(recs)
            remove_partials(store)
            finalize_store(store, checksums)  # re-hashes every shard file against the records
            result = _metrics(cfg, spec, store, fidelity, device, dtype)
        # the store into place, the work folder deleted, then the metrics
        install_store(lock, store, out, Path(metrics), result)
    log.info("wrote %s (%d tokens)", out, result["tokens"])
    return result


def log_time_split(records: list[dict[str, Any]]) -> dict[str, float]:
    """Log (and return) where the compute went, summed over the shards this run computed:
    backbone, output head, vocabulary-wide passes (`pipeline.capture.kernel.PHASES`) and
    encode + write. Seconds of every compute stream and worker add up, so on several streams
    the sum exceeds the wall time; the shares are what matter. Kept out of the metrics file,
    which stays a pure function of the store."""
    total: dict[str, float] = {}
    for rec in records:
        for phase, seconds in rec.get("seconds", {}).items():  # absent in older records
            total[phase] = total.get(phase, 0.0) + seconds
    whole = sum(total.values())
    if whole > 0:
        log.info(
            "time split: %s",
            ", ".join(f"{p} {s:.2f} s ({100 * s / whole:.0f}%)" for p, s in total.items()),
        )
    return total


def _compute(
    cfg: TeacherLogitsConfig,
    job: Job,
    data: TokenizedData,
    pending: list[tuple[str, int]],
) -> None:
    """Compute and record every pending shard, with a progress bar over tokens."""
    from tqdm.auto import tqdm

    spec = job.spec
    tokens = {
        (s, i): (b - a) * spec.split(s).seq_len
        for s in SPLITS
        if s in spec.split_names()
        for i, (a, b) in enumerate(spec.shards(s))
    }
    total = sum(tokens.values())
    todo = sum(tokens[p] for p in pending)
    if not pending:
        return
    started = time.perf_counter()
    with tqdm(
        total=total, initial=total - todo, unit="tok", unit_scale=True, desc="teacher_logits"
    ) as bar:
        if cfg.dask.enabled:
            run_on_dask(job, pending, cfg.dask, bar.update)
        else:
            import torch

            model = load_teacher(job.teacher, job.device, job.dtype)
            kernel = build_kernel(model, job)
            streams = CPU_STREAMS if torch.get_num_threads() >= CPU_STREAMS else 1
            runner = ShardRunner(kernel, job, data, progress=bar.update, streams=streams)
            runner.run(pending)
    seconds = time.perf_counter() - started
    log.info("computed %d tokens in %.1f s (%.0f tokens/s)", todo, seconds, todo / seconds)


def _metrics(
    cfg: TeacherLogitsConfig,
    spec: StoreSpec,
    store: Path,
    fidelity: Fidelity,
    device: str,
    dtype: str,
) -> dict[str, Any]:
    """Fidelity per language and overall, and storage cost (deterministic for a given store)."""
    tokens = sum(s.n * s.seq_len for s in spec.splits)
    entries = tokens * spec.k
    total = dir_bytes(store)
    by_array = {a: sum(dir_bytes(store / s.name / a) for s in spec.splits) for a in spec.ARRAYS}
    pair_bytes = sum(b for a, b in by_array.items() if a in PER_CANDIDATE)
    return {
        "method": cfg.method,
        "k": cfg.k,
        "device": device,
        "dtype": dtype,
        "tokens": tokens,
        **fidelity.report(),
        "storage": {
            "bytes": total,
            "bytes_per_token": total / tokens if tokens else None,
            "bytes_per_token_by_array": {
                a: round(b / tokens, 4) if tokens else None for a, b in by_array.items()
            },
            "bytes_per_entry": pair_bytes / entries if entries else None,
            "format_version": spec.format_version,
        },
    }
