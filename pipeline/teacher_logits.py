"""The `teacher_logits` stage: tokenized rows -> teacher soft labels in a sharded Zarr store.

Steps: read the teacher's provenance and the tokenized splits; check them against each other and
against `k` before any work; derive the resume key; create (or reopen) the store in
`<work_dir>/<key>/`; skip every shard whose record's checksums still match its files on disk;
compute the rest in-process (`logits_shards.ShardRunner`) or on Dask (`logits_dask`); finalize
(every checksum verified again, `complete` set); write the fidelity metrics; move the store into
`out` (one rename on the same filesystem) and delete the work folder.

Resume key: sha256 over everything that determines the bytes of the store: the teacher's
provenance sha256, each split's n, seq_len and input-id fingerprint, method, k, seed,
chunk_sequences, shard_chunks, batch_size, head_chunk_tokens, the resolved device type and
dtype, the kernel and store format versions, and the torch and transformers versions. Work
started under another key is never mixed in. Trade-off: changing batch_size (or upgrading torch)
restarts from scratch, because either may change floating-point results in the last bit.

The output appears only complete: DVC tracks `out`, which is replaced in one rename after
verification; a run killed at any moment leaves `out` as it was and its finished shards in the
work folder for the next run.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.atomic import partial_path, replace_dir
from pipeline.config import require
from pipeline.errors import ConfigError, InputError, StoreError
from pipeline.logits_dask import DaskSetup, run_on_dask  # distributed: imported lazily
from pipeline.logits_shards import (
    CPU_STREAMS,
    SPLITS,
    Job,
    ShardRunner,
    TokenizedSplit,
    build_kernel,
    load_teacher,
    load_tokenized,
    read_record,
    record_path,
)
from pipeline.provenance import ids_fingerprint, read_provenance, write_json
from pipeline.softlabels import FORMAT_VERSION, Fidelity
from pipeline.store import (
    ARRAYS,
    SplitSpec,
    StoreSpec,
    create_store,
    finalize_store,
    read_attrs,
    shard_checksums,
)
from pipeline.store import FORMAT_VERSION as STORE_FORMAT_VERSION

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DaskConfig:
    """Params section `teacher_logits.dask`: optional distributed execution."""

    enabled: bool = False
    """Run shards as Dask tasks instead of in this process."""
    scheduler_address: str | None = None
    """Address of a running scheduler (e.g. tcp://host:8786); null starts a local cluster."""
    n_workers: int = 2
    """Worker processes of the local cluster (CPU; with CUDA, one worker per visible GPU)."""

    def __post_init__(self) -> None:
        require(
            self.n_workers >= 1,
            "teacher_logits.dask.n_workers",
            f"must be >= 1, got {self.n_workers}",
        )


@dataclass(frozen=True)
class TeacherLogitsConfig:
    """Params section `teacher_logits`: how the teacher's soft labels are computed and stored."""

    method: Literal["topk", "sample"] = "sample"
    """How ids are chosen per position: the k most probable ids, or k draws with replacement
    from the teacher's distribution (unbiased; duplicates kept)."""
    k: int = 32
    """Stored (id, logprob) pairs per position; 1 <= k <= the teacher's vocabulary size."""
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
    shard_chunks: int = 128
    """Chunks per shard file (the unit of work, writing and resume)."""
    head_chunk_tokens: int = 1024
    """Positions per slice of the output head: memory ~ 3 x this x vocab x 4 bytes."""
    dask: DaskConfig = field(default_factory=DaskConfig)
    """Distributed execution (see teacher_logits.dask.*)."""

    def __post_init__(self) -> None:
        require(self.k >= 1, "teacher_logits.k", f"must be >= 1, got {self.k}")
        for key in ("batch_size", "chunk_sequences", "shard_chunks", "head_chunk_tokens"):
            value = getattr(self, key)
            require(value >= 1, f"teacher_logits.{key}", f"must be >= 1, got {value}")


# -- checks and identities --------------------------------------------------------------------


def resolve_device(device: str, dtype: str) -> tuple[str, str]:
    """("cpu" | "cuda", "float32" | "bfloat16" | "float16") for the configured values."""
    import torch

    cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise ConfigError(
            "teacher_logits.device: cuda requested but no CUDA device is available to torch; "
            "use auto or cpu"
        )
    dev = "cuda" if device == "cuda" or (device == "auto" and cuda) else "cpu"
    if dtype == "auto":
        if dev == "cpu":
            dtype = "float32"
        else:
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if dev == "cpu" and dtype == "float16":
        raise ConfigError(
            "teacher_logits.dtype: float16 is not supported on CPU (slow or missing kernels); "
            "use float32 or bfloat16, or run on CUDA"
        )
    return dev, dtype


def check_k(cfg: TeacherLogitsConfig, prov: dict[str, Any], teacher_dir: Path) -> None:
    """k must be within the teacher's vocabulary (read from its provenance, before loading)."""
    vocab = int(prov["vocab_size"])
    if not 1 <= cfg.k <= vocab:
        raise ConfigError(
            f"teacher_logits.k: must be between 1 and the teacher's vocabulary size {vocab} "
            f"({teacher_dir / 'provenance.json'}), got {cfg.k}"
        )


def check_inputs(
    cfg: TeacherLogitsConfig,
    prov: dict[str, Any],
    data: dict[str, TokenizedSplit],
    *,
    teacher_dir: Path,
    tokenized_dir: Path,
) -> None:
    """Refuse, before any work, a k outside the vocabulary or data the teacher cannot read."""
    check_k(cfg, prov, teacher_dir)
    vocab = int(prov["vocab_size"])
    prov_file = teacher_dir / "provenance.json"
    tok_vocab = int(prov.get("tokenizer", {}).get("vocab_size", vocab))
    context = prov.get("max_position_embeddings")
    for split, d in data.items():
        ids = d.input_ids
        if ids.size == 0:
            continue
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab:
            bad = lo if lo < 0 else hi
            raise InputError(
                f"{tokenized_dir}: split '{split}' has token id {bad}, outside the teacher's "
                f"vocabulary [0, {vocab}) ({prov_file}); the data was tokenized with another "
                "tokenizer: re-run `dvc repro tokenize` with this teacher"
            )
        if hi >= tok_vocab:
            raise InputError(
                f"{tokenized_dir}: split '{split}' has token id {hi}, outside the teacher "
                f"tokenizer's {tok_vocab} ids ({prov_file}); the data was tokenized with another "
                "tokenizer: re-run `dvc repro tokenize` with this teacher"
            )
        if context is not None and ids.shape[1] > int(context):
            raise InputError(
                f"{tokenized_dir}: split '{split}' has rows of {ids.shape[1]} tokens, longer "
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
    }


def work_key(
    cfg: TeacherLogitsConfig,
    prov: dict[str, Any],
    fingerprints: dict[str, dict[str, Any]],
    device: str,
    dtype: str,
) -> dict[str, Any]:
    """Everything that determines the store's bytes (module docstring), as plain data."""
    import torch
    import transformers

    return {
        "softlabels_format": FORMAT_VERSION,
        "store_format": STORE_FORMAT_VERSION,
        "teacher_sha256": prov["sha256"],
        "splits": fingerprints,
        "method": cfg.method,
        "k": cfg.k,
        "seed": cfg.seed,
        "chunk_sequences": cfg.chunk_sequences,
        "shard_chunks": cfg.shard_chunks,
        "batch_size": cfg.batch_size,
        "head_chunk_tokens": cfg.head_chunk_tokens,
        "device": device,
        "dtype": dtype,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def key_digest(key: dict[str, Any]) -> str:
    blob = json.dumps(key, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


# -- the run ----------------------------------------------------------------------------------


def run_teacher_logits(
    cfg: TeacherLogitsConfig,
    *,
    teacher_dir: str | Path,
    tokenized_dir: str | Path,
    out: str | Path,
    metrics: str | Path,
    work_dir: str | Path,
) -> dict[str, Any]:
    """Run the stage (module docstring); return the metrics written to `metrics`."""
    teacher_dir, tokenized_dir, out = Path(teacher_dir), Path(tokenized_dir), Path(out)
    prov = read_provenance(teacher_dir)
    check_k(cfg, prov, teacher_dir)  # before reading the data
    device, dtype = resolve_device(cfg.device, cfg.dtype)
    data = load_tokenized(tokenized_dir)
    check_inputs(cfg, prov, data, teacher_dir=teacher_dir, tokenized_dir=tokenized_dir)
    fingerprints = {
        s: {
            "n": int(d.input_ids.shape[0]),
            "seq_len": int(d.input_ids.shape[1]),
            "fingerprint": ids_fingerprint(d.input_ids),
        }
        for s, d in data.items()
    }
    spec = StoreSpec(
        tuple(SplitSpec(s, f["n"], f["seq_len"]) for s, f in fingerprints.items()),
        cfg.k,
        cfg.chunk_sequences,
        cfg.shard_chunks,
    )
    key = work_key(cfg, prov, fingerprints, device, dtype)
    kdir = Path(work_dir) / key_digest(key)
    store, records = kdir / out.name, kdir / "shards"
    job = Job(
        str(teacher_dir),
        str(tokenized_dir),
        str(store),
        str(records),
        spec,
        cfg.method,
        cfg.k,
        cfg.seed,
        cfg.batch_size,
        cfg.head_chunk_tokens,
        device,
        dtype,
    )
    try:
        _open_store(kdir, store, spec, store_attrs(cfg, prov, fingerprints), key)
        pending = _pending_shards(job)
        _compute(cfg, job, data, pending)
        checksums: dict[str, str] = {}
        fidelity = Fidelity()
        for split, shard in spec.all_shards():
            rec = read_record(records, split, shard)
            if rec is None:  # pragma: no cover - _compute raises first
                raise StoreError(f"{store}: shard {split}/{shard} has no record")
            checksums.update(rec["checksums"])
            fidelity.merge(Fidelity(rec["fidelity"]))
        _remove_partials(store)
        finalize_store(store, checksums)  # re-hashes every shard file against the records
        result = _metrics(cfg, spec, store, fidelity, device, dtype)
        write_json(metrics, result)
        _move_into_place(store, out)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            done = sum(record_path(records, s, i).is_file() for s, i in spec.all_shards())
            raise StoreError(
                f"disk full while writing soft labels ({e}); the {done} finished shard(s) are "
                f"kept in {kdir}: free space and re-run teacher_logits to resume"
            ) from e
        raise
    shutil.rmtree(kdir, ignore_errors=True)
    log.info("wrote %s (%d tokens)", out, result["tokens"])
    return result


def _open_store(
    kdir: Path, store: Path, spec: StoreSpec, attrs: dict[str, Any], key: dict[str, Any]
) -> None:
    """Reuse the work store of this key, or create it (atomically: in a sibling, then renamed)."""
    if store.is_dir():
        try:
            if StoreSpec.from_attrs(read_attrs(store)) == spec:
                return
        except StoreError:
            pass
        shutil.rmtree(store)
    kdir.mkdir(parents=True, exist_ok=True)
    write_json(kdir / "key.json", key)
    creating = kdir / f".{store.name}.creating"
    shutil.rmtree(creating, ignore_errors=True)
    create_store(creating, spec, attrs)
    os.replace(creating, store)


def _pending_shards(job: Job) -> list[tuple[str, int]]:
    """Shards without a record whose checksums match the files on disk (records that do not
    match are deleted, so a shard is never counted done on stale evidence)."""
    pending = []
    for split, shard in job.spec.all_shards():
        rec = read_record(job.records, split, shard)
        if rec is not None:
            try:
                if shard_checksums(job.store, job.spec, split, shard) == rec["checksums"]:
                    continue
            except StoreError:
                pass
            record_path(job.records, split, shard).unlink(missing_ok=True)
        pending.append((split, shard))
    total = len(job.spec.all_shards())
    if pending and len(pending) < total:
        log.info("resuming: %d of %d shards already finished", total - len(pending), total)
    return pending


def _compute(
    cfg: TeacherLogitsConfig,
    job: Job,
    data: dict[str, TokenizedSplit],
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
            setup = DaskSetup(cfg.dask.scheduler_address, cfg.dask.n_workers)
            run_on_dask(job, pending, setup, bar.update)
        else:
            import torch

            model = load_teacher(job.teacher_dir, job.device, job.dtype)
            kernel = build_kernel(model, job)
            streams = CPU_STREAMS if torch.get_num_threads() >= CPU_STREAMS else 1
            runner = ShardRunner(kernel, job, data, progress=bar.update, streams=streams)
            runner.run(pending)
    seconds = time.perf_counter() - started
    log.info("computed %d tokens in %.1f s (%.0f tokens/s)", todo, seconds, todo / seconds)


def _remove_partials(store: Path) -> None:
    """Delete temporary files a killed writer may have left (never part of a finished store)."""
    for p in store.rglob("*.partial"):
        p.unlink(missing_ok=True)


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


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
    total = _dir_bytes(store)
    pair_bytes = sum(
        _dir_bytes(store / s.name / a)
        for s in spec.splits
        for a in ARRAYS
        if a in ("ids", "logprobs")
    )
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
            "bytes_per_entry": pair_bytes / entries if entries else None,
            "raw_bytes_per_entry": 6,
        },
    }


def _move_into_place(store: Path, out: Path) -> None:
    """Replace `out` by the finished store: a rename, or a copy + rename across filesystems."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if os.stat(store).st_dev == os.stat(out.parent).st_dev:
        replace_dir(store, out)
    else:
        tmp = partial_path(out)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(store, tmp)
        replace_dir(tmp, out)
        shutil.rmtree(store)
