"""The `train_student` stage: a student trained from stored soft labels, streamed.

Steps: validate the params and inputs before any work (the store must be complete and made from
this tokenizer, vocabulary and token ids; see `pipeline.student.data.check_store`); build the
student (`pipeline.student.model`); stream batches of token ids and soft labels
(`pipeline.student.data`); run the explicit loop (`pipeline.student.trainer`) with dvclive
curves, a tqdm bar, validation perplexity every `eval_every` steps, and a checkpoint every
`checkpoint_every` steps outside the DVC output (`pipeline.student.checkpoint`); at the end
write the student in `save_pretrained` layout with the tokenizer and `softlabels.json` (which
store, or which live teacher, it learned from), all-or-nothing.

`teacher: live` is the online baseline: the same loop, the teacher run on every batch with the
full-vocabulary loss. It exists to measure what the precompute buys; the default pipeline uses
the store and never loads the teacher.

Resume: a killed run re-run with the same params and inputs finds its checkpoint (keyed by a
digest of both), restores weights, optimizer, schedule and RNG states, and restarts the data
stream at the saved step; on CPU it ends with exactly the weights of an uninterrupted run.

Data-parallel (`processes` > 1, `pipeline.student.distributed`): the stage runs as that many
ranks under torch.distributed.run (the stage script relaunches itself, or the user starts
torchrun), DDP with gloo on CPU and NCCL on CUDA (rank r on `cuda:LOCAL_RANK`). `batch_size`
stays the global batch: every step, rank r trains on its contiguous share of the very rows one
process would (`pipeline.student.data`), so the weights equal a one-process run's up to float
rounding. Rank 0 alone logs (curves, progress bar), checkpoints and writes the outputs; the
others wait for its writes to succeed. Params and argv are checked on every rank before the
process group exists (rank 0 reports an error); the inputs, the resume, every step's batch and
rank 0's writes are agreed, so an error on any rank stops every rank with that error. On resume
rank 0 picks the checkpoint (setting damaged ones aside) and sends it to the others; the RNG
states are the same on every rank (same seed, same draws), so rank 0's are everyone's. The
checkpoint key leaves the number of processes out: a checkpoint of one process count resumes
under another.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import pipeline
from pipeline.core.atomic import atomic_dir, check_destinations
from pipeline.core.config import require, to_dict
from pipeline.core.curves import Curves
from pipeline.core.device import torch_device
from pipeline.core.errors import ConfigError, InputError
from pipeline.core.provenance import (
    LM_TEACHER_KEYS,
    read_provenance,
    tokenizer_identity,
    write_json,
)
from pipeline.core.text import printable
from pipeline.data.tokenized import load_tokenized
from pipeline.modeling.llama import check_llama_sizes, llama_config
from pipeline.modeling.optim import check_optimizer_params
from pipeline.store.format import LEGACY_SAMPLING, read_attrs, sampling_of
from pipeline.store.verify import abbreviate, content_sha256
from pipeline.student import checkpoint as ckpt
from pipeline.student import distributed as dp
from pipeline.student import model as sm
from pipeline.student.data import SoftLabelStream, check_store, distributed_share
from pipeline.student.distributed import World
from pipeline.student.losses import SINGLETON_WEIGHT, Loss, SampleWeights, Tail
from pipeline.student.trainer import LossSettings, StudentTrainer, check_loss_for_store

log = logging.getLogger(__name__)

RECORD_FILE = "softlabels.json"
"""File in the student folder recording what it was distilled from."""
LIVE_CHUNK_SEQUENCES = 64
"""Block size of the data order when no store is read (teacher_logits' default
chunk_sequences, so a live run over the default layout sees the stored run's batches)."""
COSMETIC = (
    "log_every",
    "eval_every",
    "eval_sequences",
    "checkpoint_every",
    "prefetch",
    "processes",
)
"""Params that do not change the weights (left out of the checkpoint key). `processes`: every
process count trains on the same global batches, so only float rounding of the gradient
average differs (as with the number of CPU threads)."""


@dataclass(frozen=True)
class TrainStudentConfig:
    """Params section `train_student`: the student, the loss, and the training budget."""

    teacher: Literal["store", "live"] = "store"
    """Where the teacher's distribution comes from: `store` (the logits store, streamed) or
    `live` (run the teacher on every batch; the online baseline, needs --teacher)."""
    model: str = sm.SCRATCH
    """`scratch`: a new LlamaForCausalLM sized by the keys below, with the teacher's
    vocabulary. Otherwise a hub id or local folder of a causal LM with the same vocabulary."""
    revision: str = "main"
    """Hub revision of `model` (ignored for scratch and local folders)."""
    num_layers: int = 1
    """(scratch) Transformer blocks."""
    hidden_size: int = 64
    """(scratch) Model width."""
    num_heads: int = 2
    """(scratch) Attention heads; must divide hidden_size into an even head size."""
    intermediate_size: int = 176
    """(scratch) SwiGLU feed-forward width."""
    tie_embeddings: bool = True
    """(scratch) Share input embedding and output head (most of a small student's weights)."""
    init: Literal["random", "teacher_layers"] = "random"
    """(scratch) `random`, or `teacher_layers`: copy the teacher's embeddings and every n-th
    layer (needs equal widths, and --teacher)."""
    loss: Loss = "kl"
    """KL(teacher || student), or KL(student || teacher) (top-k stores and live only)."""
    tail: Tail = "bucket"
    """Top-k stores: mass outside the stored ids is dropped and both sides renormalised
    (`renorm`), kept as one extra class (`bucket`, exact on that partition), or its term left
    out (`ignore`). Not used by sample stores (their estimator needs no tail)."""
    sample_weights: SampleWeights = "empirical"
    """Sample stores: weigh each draw 1/k (`empirical`: cross-entropy against the draws'
    empirical distribution) or each distinct drawn id p/(1-(1-p)^k) (`inclusion`:
    Horvitz-Thompson, exact teacher probabilities for likely ids). Both are unbiased."""
    singleton_weight: float = SINGLETON_WEIGHT
    """Sample stores: weight each id drawn once keeps, as a share of its 1/k. The rest of its
    draw goes to a bucket, the ids drawn fewer than twice, where the target is the student's
    own distribution: less variance on the tail, a bias toward the student there (module
    `pipeline.student.losses`). 1: the unbiased estimator. Below 1 it needs `sample_weights:
    empirical` and temperature 1 (a sample store's run says so before it starts)."""
    temperature: float = 1.0
    """Softmax temperature T of both sides; the KD term is scaled by T^2. Sample stores hold
    draws at T = 1, reweighted for T != 1 (consistent, not unbiased): keep 1 for them."""
    alpha: float = 1.0
    """Loss = alpha * T^2 * KD + (1 - alpha) * next-token CE. 1: pure KD, 0: hard labels."""
    steps: int = 200
    """Optimizer steps."""
    batch_size: int = 32
    """Sequences per step: the global batch, split evenly over `processes`."""
    learning_rate: float = 0.003
    """Peak AdamW learning rate, after linear warmup, then cosine decay to zero."""
    warmup_steps: int = 20
    """Steps of linear learning-rate warmup."""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices (not norms)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this."""
    seed: int = 0
    """Seed of the student's init and of the data order."""
    buffer_chunks: int = 4
    """Store chunks shuffled together in memory (the shuffle buffer)."""
    num_workers: int = 0
    """DataLoader worker processes (0: read in a background thread of the training process).
    Part of the data order: a resumed run must use the same value."""
    prefetch: int = 2
    """Shuffle windows read ahead per reader."""
    eval_every: int = 25
    """Validation perplexity every this many steps (on eval_sequences rows) and at the end
    (on the whole validation split). 0: only at the end."""
    eval_sequences: int = 256
    """Validation rows for the periodic evaluation (0: all)."""
    checkpoint_every: int = 50
    """Save a resumable checkpoint every this many steps (0: never)."""
    log_every: int = 10
    """Log loss parts, learning rate and tokens/s to dvclive every this many steps."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto`: CUDA when available (bf16 autocast), else CPU (float32)."""
    processes: int = 1
    """Data-parallel processes (PyTorch DDP; gloo on CPU, NCCL on CUDA with one GPU each).
    Above 1 the stage script relaunches itself under torch.distributed.run, or runs under a
    `torchrun --nproc-per-node` started with this same number (else an error). batch_size stays
    the global batch and must be a multiple of it; the weights equal one process's up to float
    rounding, and a checkpoint resumes under any number. Rank 0 writes every output."""

    def __post_init__(self) -> None:
        s = "train_student"
        require(bool(self.model.strip()), f"{s}.model", f"must not be empty (use '{sm.SCRATCH}')")
        check_llama_sizes(
            s,
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            num_heads=self.num_heads,
            intermediate_size=self.intermediate_size,
        )
        require(self.temperature > 0, f"{s}.temperature", f"must be > 0, got {self.temperature}")
        require(0.0 <= self.alpha <= 1.0, f"{s}.alpha", f"must be in [0, 1], got {self.alpha}")
        w = self.singleton_weight
        require(0.0 <= w <= 1.0, f"{s}.singleton_weight", f"must be in [0, 1], got {w}")
        check_optimizer_params(s, self)
        require(
            self.buffer_chunks >= 1, f"{s}.buffer_chunks", f"must be >= 1, got {self.buffer_chunks}"
        )
        for key in ("num_workers", "eval_every", "eval_sequences", "checkpoint_every"):
            value = getattr(self, key)
            require(value >= 0, f"{s}.{key}", f"must be >= 0, got {value}")
        for key in ("prefetch", "log_every", "processes"):
            value = getattr(self, key)
            require(value >= 1, f"{s}.{key}", f"must be >= 1, got {value}")
        require(
            self.batch_size % self.processes == 0,
            f"{s}.batch_size",
            f"{self.batch_size} is not a multiple of {s}.processes: {self.processes} (each "
            "process trains on an equal share of every batch); use a multiple of "
            f"{self.processes}",
        )
        if self.init == "teacher_layers":
            require(
                self.model == sm.SCRATCH,
                f"{s}.init",
                f"teacher_layers initialises a scratch student; {self.model!r} keeps its own "
                "weights (use init: random)",
            )


def describe_source(record: dict[str, Any]) -> str:
    """One line naming what a student learns from (the `softlabels.json` record), so the
    stage's log alone traces a student back to its teacher pass. Control characters in the
    record's strings (read from the store's attributes) are escaped (`printable`)."""
    t = record["teacher"]
    teacher = f"teacher {t['name']} @ {t.get('revision') or '-'} (sha256 {abbreviate(t['sha256'])})"
    fps = ", ".join(
        f"{split} {abbreviate(s.get('fingerprint'))}"
        for split, s in record["dataset"]["splits"].items()
    )
    if record["source"] == "live":
        return printable(f"the live {teacher}; dataset fingerprints: {fps}")
    return printable(
        f"store {record['store']} (content sha256 {abbreviate(record['store_sha256'])}): "
        f"{teacher}, {record['method']} k={record['k']} seed={record['seed']}; "
        f"dataset fingerprints: {fps}"
    )


@dataclass
class Setup:
    """Everything a training run needs, checked and built (see `prepare`)."""

    cfg: TrainStudentConfig
    trainer: StudentTrainer
    tokenizer: Any
    record: dict[str, Any]
    """What the student learns from (store or live teacher provenance), for softlabels.json."""
    key: str
    """Checkpoint key: digest of everything that determines the weights."""
    stream_args: dict[str, Any]
    """Keyword arguments of `SoftLabelStream` (without start_step)."""
    validation: np.ndarray
    """(N_val, L) validation token ids."""
    device: torch.device

    def stream(self, start_step: int = 0) -> SoftLabelStream:
        return SoftLabelStream(**self.stream_args, start_step=start_step)

    def loader(self, start_step: int = 0) -> DataLoader:
        """The training batches from `start_step` on (endless), read ahead by workers/threads."""
        w = self.cfg.num_workers
        return DataLoader(
            self.stream(start_step),
            batch_size=None,
            num_workers=w,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=4 if w else None,
            persistent_workers=False,
        )


@dataclass(frozen=True)
class Source:
    """What the student learns from, checked against this run's inputs."""

    record: dict[str, Any]
    """Provenance of the store or the live teacher (softlabels.json, the checkpoint key)."""
    method: str | None
    """The store's method; None for a live teacher."""
    vocab_size: int
    """The teacher's vocabulary size (a scratch student's)."""
    chunk_sequences: int
    """Block size of the data order: the store's chunk, or LIVE_CHUNK_SEQUENCES."""


def prepare(
    cfg: TrainStudentConfig,
    *,
    tokenized: Path,
    logits: Path | None,
    tokenizer: Path,
    teacher: Path | None = None,
    chunk_sequences: int | None = None,
    world: World | None = None,
    device: torch.device | None = None,
) -> Setup:
    """Check every input, then build the student, trainer and data stream (no training).

    Refuses before any work: a live teacher or layer init without `teacher`; a missing,
    incomplete or incompatible store (tokenizer, vocabulary, token ids); `reverse_kl` with a
    sample store; a pretrained student whose vocabulary is not the teacher's.
    `chunk_sequences` overrides the block size of the data order (default: the store's chunk,
    or LIVE_CHUNK_SEQUENCES for a live teacher), so a live run can see a stored run's batches.
    `world`, `device`: this rank of a data-parallel run and its device, as `dp.join` gives them
    (default: one process, the device the params ask for): the stream serves this rank's share
    of each batch, and only rank 0 verifies the store's checksums (the ranks agree on its
    verdict, `run_train_student`). No collective runs here (the trainer is not yet
    data-parallel: `StudentTrainer.distribute`), so ranks can agree on its errors.

    One named step each, in this order: `_check_request`, `_load_tokenizer`, `_store_source` or
    `_live_source` (inputs checked, provenance recorded), `_build_model`, `_build_trainer`,
    `_stream_args`, `_checkpoint_key`.
    """
    world = world or World()
    requested = _check_request(cfg, logits=logits, teacher=teacher)
    device = device if device is not None else requested
    tok = _load_tokenizer(tokenizer)
    if cfg.teacher == "store":
        assert logits is not None  # _check_request
        source = _store_source(
            cfg, logits=logits, tokenized=tokenized, tok=tok, checksums=world.is_main
        )
    else:
        assert teacher is not None  # _check_request
        source = _live_source(
            cfg, teacher=teacher, tokenizer=tokenizer, tokenized=tokenized, tok=tok
        )
    validation = load_tokenized(tokenized, ["validation"])["validation"].input_ids
    model, init_layers = _build_model(
        cfg, vocab_size=source.vocab_size, tok=tok, seq_len=validation.shape[1], teacher=teacher
    )
    record = dict(source.record)
    if init_layers is not None:
        record["init_layers"] = init_layers
    model.to(device)
    trainer = _build_trainer(
        cfg,
        model,
        method=source.method,
        sampling=record.get("sampling") or LEGACY_SAMPLING,
        device=device,
        teacher=teacher,
    )
    stream_args = _stream_args(
        cfg,
        tokenized=tokenized,
        logits=logits,
        chunk_sequences=chunk_sequences or source.chunk_sequences,
        world=world,
    )
    return Setup(
        cfg=cfg,
        trainer=trainer,
        tokenizer=tok,
        record=record,
        key=_checkpoint_key(cfg, record=record, stream_args=stream_args, device=device),
        stream_args=stream_args,
        validation=validation,
        device=device,
    )


def _check_request(
    cfg: TrainStudentConfig, *, logits: Path | None, teacher: Path | None
) -> torch.device:
    """The device to train on, after refusing params that the arguments cannot serve: a live
    teacher or `init: teacher_layers` without `teacher` (or with a missing folder), a store
    run without `logits`, or `device: cuda` without a GPU."""
    why = {"live": cfg.teacher == "live", "init": cfg.init == "teacher_layers"}
    if teacher is None and any(why.values()):
        key = (
            "train_student.teacher: live runs"
            if why["live"]
            else ("train_student.init: teacher_layers reads")
        )
        raise ConfigError(
            f"{key} the teacher's weights; pass --teacher <teacher folder> (and list that "
            "folder in the stage's deps in dvc.yaml)"
        )
    if teacher is not None and not Path(teacher).is_dir():
        raise InputError(f"{teacher}: teacher folder not found (run `dvc repro prepare_teacher`)")
    if cfg.teacher == "store" and logits is None:
        raise ConfigError("train_student.teacher: store needs --logits <logits store>")
    return torch_device(cfg.device, section="train_student")


def check_launch(cfg: TrainStudentConfig, *, logits: Path | None, teacher: Path | None) -> None:
    """What the stage script checks before it starts `cfg.processes` ranks, so a request they
    could not serve fails at once, not in every rank: the arguments the params need
    (`_check_request`) and, on CUDA, one GPU per process (`dp.check_gpus`)."""
    device = _check_request(cfg, logits=logits, teacher=teacher)
    if device.type == "cuda":
        dp.check_gpus(cfg.processes, section="train_student")


def _load_tokenizer(path: Path) -> Any:
    """The teacher's tokenizer (only its files are read); InputError if absent or unusable."""
    if not Path(path).is_dir():
        raise InputError(f"{path}: tokenizer folder not found (run `dvc repro prepare_teacher`)")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot load a tokenizer: {e}") from e


def _student_vocab(cfg: TrainStudentConfig, teacher_vocab: int) -> int:
    """The student's vocabulary size: the teacher's for a scratch student, else the pretrained
    model's (compared with the teacher's by the caller)."""
    if cfg.model == sm.SCRATCH:
        return teacher_vocab
    return sm.pretrained_vocab(cfg.model, cfg.revision)


def _store_source(
    cfg: TrainStudentConfig, *, logits: Path, tokenized: Path, tok: Any, checksums: bool = True
) -> Source:
    """Learning from a logits store: refuse a store that is missing, incomplete, or made with
    another tokenizer, vocabulary or token ids (`check_store`, naming each field; with
    `checksums`, also one whose shard files fail their checksums), and `reverse_kl` on a sample
    store; record the store's provenance."""
    vocab = int(read_attrs(logits)["teacher"]["vocab_size"])  # StoreError if missing
    attrs = check_store(
        logits,
        tokenized=tokenized,
        tokenizer_identity=tokenizer_identity(tok),
        vocab_size=_student_vocab(cfg, vocab),
        checksums=checksums,
    )
    method = attrs["method"]
    check_loss_for_store(
        attrs,
        loss=cfg.loss,
        temperature=cfg.temperature,
        sample_weights=cfg.sample_weights,
        singleton_weight=cfg.singleton_weight,
        store=logits,
    )
    record = {
        "source": "store",
        "store": str(logits),
        "store_sha256": content_sha256(attrs),
        "teacher": {k: attrs["teacher"].get(k) for k in ("name", "revision", "sha256")},
        "method": method,
        "sampling": sampling_of(attrs),
        "k": attrs["k"],
        "format_version": attrs.get("format_version"),
        "seed": attrs.get("seed"),
        "temperature": attrs.get("temperature"),
        "dataset": attrs["dataset"],
        "tokenizer": attrs["tokenizer"],
    }
    return Source(
        record=record,
        method=method,
        vocab_size=vocab,
        chunk_sequences=int(attrs["chunk_sequences"]),
    )


def _live_source(
    cfg: TrainStudentConfig, *, teacher: Path, tokenizer: Path, tokenized: Path, tok: Any
) -> Source:
    """Learning from the live teacher: refuse a pretrained student with another vocabulary and
    a tokenizer that is not the teacher's; record the teacher and the training ids' fingerprint."""
    vocab = int(AutoConfig.from_pretrained(teacher).vocab_size)
    vocab_student = _student_vocab(cfg, vocab)
    if vocab_student != vocab:
        raise ConfigError(
            f"train_student.model: {cfg.model!r} has a vocabulary of {vocab_student} ids, "
            f"the teacher {vocab}; the student must share the teacher's vocabulary"
        )
    identity = tokenizer_identity(tok)
    prov = read_provenance(teacher, LM_TEACHER_KEYS)
    if prov.get("tokenizer", {}).get("sha256") != identity["sha256"]:
        raise InputError(
            f"{tokenizer}: this tokenizer is not the teacher's ({teacher}); pass the "
            "teacher's folder as the tokenizer"
        )
    train_fp = load_tokenized(tokenized, ["train"]).fingerprints()["train"]
    record = {
        "source": "live",
        "teacher": {k: prov.get(k) for k in ("name", "revision", "sha256")},
        "dataset": {"splits": {"train": {"fingerprint": train_fp}}},
        "tokenizer": identity,
    }
    return Source(
        record=record, method=None, vocab_size=vocab, chunk_sequences=LIVE_CHUNK_SEQUENCES
    )


def _build_model(
    cfg: TrainStudentConfig, *, vocab_size: int, tok: Any, seq_len: int, teacher: Path | None
) -> tuple[torch.nn.Module, list[int] | None]:
    """The student, seeded by `cfg.seed`: a scratch Llama sized by the params with the
    teacher's vocabulary (its layers copied in with `init: teacher_layers`; their indices are
    returned), or the pretrained `cfg.model`."""
    if cfg.model != sm.SCRATCH:
        torch.manual_seed(cfg.seed)
        return sm.load_pretrained(cfg.model, cfg.revision), None
    # The tokenizer's model_max_length is the teacher's context (a huge sentinel if unset).
    limit = int(getattr(tok, "model_max_length", 0) or 0)
    context = max(seq_len, limit) if limit < 10**6 else seq_len
    config = llama_config(
        vocab_size=vocab_size,
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        tie_embeddings=cfg.tie_embeddings,
        max_position_embeddings=context,
        eos_id=tok.eos_token_id,
        pad_id=tok.pad_token_id,
    )
    if cfg.init == "teacher_layers":  # check widths before building anything
        sm.check_layer_copy(config, AutoConfig.from_pretrained(teacher))
    model = sm.build_student(config, seed=cfg.seed)
    if cfg.init == "teacher_layers":
        return model, sm.init_from_teacher(model, teacher)
    return model, None


def _build_trainer(
    cfg: TrainStudentConfig,
    model: torch.nn.Module,
    *,
    method: str | None,
    sampling: str,
    device: torch.device,
    teacher: Path | None,
) -> StudentTrainer:
    """Optimizer, schedule and loss for `model`; with `teacher: live` (and alpha > 0) the
    teacher is loaded here, frozen, on `device`."""
    live_teacher = None
    if cfg.teacher == "live" and cfg.alpha > 0:
        live_teacher = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32)
        live_teacher.to(device).eval().requires_grad_(False)
    settings = LossSettings(
        alpha=cfg.alpha,
        temperature=cfg.temperature,
        loss=cfg.loss,
        tail=cfg.tail,
        method=method,
        sample_weights=cfg.sample_weights,
        sampling=sampling,
        singleton_weight=cfg.singleton_weight,
    )
    return StudentTrainer(
        model,
        settings,
        steps=cfg.steps,
        learning_rate=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        grad_clip=cfg.grad_clip,
        device=device,
        teacher=live_teacher,
    )


def _stream_args(
    cfg: TrainStudentConfig,
    *,
    tokenized: Path,
    logits: Path | None,
    chunk_sequences: int,
    world: World,
) -> dict[str, Any]:
    """Keyword arguments of `SoftLabelStream` (without start_step): soft labels only when the
    loss uses them (a store and alpha > 0); on several ranks each rank its share of every
    global batch."""
    labels = cfg.teacher == "store" and cfg.alpha > 0
    rank, world_size = distributed_share(world.rank, world.size)
    return dict(
        tokenized=tokenized,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        chunk_sequences=chunk_sequences,
        store=logits if labels else None,
        buffer_chunks=cfg.buffer_chunks,
        num_workers=cfg.num_workers,
        prefetch=cfg.prefetch,
        rank=rank,
        world_size=world_size,
    )


def _checkpoint_key(
    cfg: TrainStudentConfig,
    *,
    record: dict[str, Any],
    stream_args: dict[str, Any],
    device: torch.device,
) -> str:
    """Digest of everything that determines the weights: the params (less COSMETIC), what the
    student learns from (not the store's path), the data order's layout, the device type and
    the softlabels version. A checkpoint is resumed only under the same key. Not the number of
    ranks: the global batches are the same under any (COSMETIC)."""
    weights_cfg = {k: v for k, v in to_dict(cfg).items() if k not in COSMETIC}
    return ckpt.run_key(
        {
            "config": weights_cfg,
            "record": {k: v for k, v in record.items() if k != "store"},
            "chunk_sequences": stream_args["chunk_sequences"],
            "device": device.type,
            "softlabels_version": pipeline.__version__,
        }
    )


def run_train_student(
    cfg: TrainStudentConfig,
    *,
    tokenized: Path,
    logits: Path | None,
    tokenizer: Path,
    out: Path,
    metrics: Path,
    checkpoints: Path,
    live_dir: Path,
    teacher: Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the stage (module docstring) in this process; return the metrics rank 0 writes to
    `metrics` (every rank returns them).

    With `cfg.processes` 1 this is the whole run. Above 1 this process must be one rank of a
    torchrun with as many processes (the stage script starts one: `pipeline.stages.
    train_student`); otherwise a ConfigError naming `train_student.processes`."""
    device = dp.same_on_every_rank(lambda: _check_request(cfg, logits=logits, teacher=teacher))
    world, device = dp.join(cfg.processes, device, section="train_student")
    try:
        return _train(
            cfg,
            world=world,
            device=device,
            tokenized=tokenized,
            logits=logits,
            tokenizer=tokenizer,
            out=out,
            metrics=metrics,
            checkpoints=checkpoints,
            live_dir=live_dir,
            teacher=teacher,
            progress=progress,
        )
    finally:
        world.close()


def _train(
    cfg: TrainStudentConfig,
    *,
    world: World,
    device: torch.device,
    tokenized: Path,
    logits: Path | None,
    tokenizer: Path,
    out: Path,
    metrics: Path,
    checkpoints: Path,
    live_dir: Path,
    teacher: Path | None,
    progress: bool,
) -> dict[str, Any]:
    """The run of `run_train_student` on this rank of `world` (every rank calls it)."""

    def checked_setup() -> Setup:
        if world.is_main:  # the only writer: fail now, not after the work
            check_destinations(out, metrics, checkpoints, live_dir)
        return prepare(
            cfg,
            tokenized=tokenized,
            logits=logits,
            tokenizer=tokenizer,
            teacher=teacher,
            world=world,
            device=device,
        )

    setup = world.agree(checked_setup)
    trainer = setup.trainer
    n_params = sum(p.numel() for p in trainer.model.parameters())
    log.info("student: %d parameters on %s (processes: %d)", n_params, setup.device, world.size)
    log.info("learning from %s", describe_source(setup.record))
    work = Path(checkpoints) / setup.key
    state = _resume(world, work, trainer)
    trainer.distribute(world)  # DDP, now that every rank holds the same weights
    start, tokens_done, train_seconds = 0, 0, 0.0
    if state is not None:
        start, tokens_done = int(state["step"]), int(state["tokens"])
        train_seconds = float(state["seconds"])
    seq_len = setup.validation.shape[1]
    saved_curves = state.get("curves") if state else None
    curves = world.on_main(lambda: Curves(Path(live_dir), start, saved_curves))

    def log_curves(step: int, values: dict[str, float]) -> None:
        world.on_main(lambda: curves.log(step, values))

    def save_checkpoint(step: int) -> None:
        world.on_main(
            lambda: ckpt.save(
                work,
                {
                    "step": step,
                    "tokens": tokens_done,
                    "seconds": train_seconds,
                    "trainer": trainer.state_dict(),
                    "rng": ckpt.rng_state(),
                    "curves": curves.snapshot(),
                },
            )
        )

    eval_rows = setup.validation[: cfg.eval_sequences or None]
    bar = tqdm(
        total=cfg.steps,
        initial=start,
        desc="student",
        unit="step",
        disable=not (progress and world.is_main),
    )
    last: Any = None
    window_tokens, window_time = 0, 0.0
    loader = iter(setup.loader(start))
    try:
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            batch = world.agree(partial(next, loader))  # a reading error stops every rank
            last = trainer.step(batch)
            dt = time.perf_counter() - t0
            n_tok = batch["input_ids"].numel() * world.size  # the global batch's tokens
            tokens_done += n_tok
            train_seconds += dt
            window_tokens += n_tok
            window_time += dt
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                log_curves(
                    done,
                    {
                        "train/loss": last.loss,
                        "train/kd": last.kd,
                        "train/ce": last.ce,
                        "train/lr": last.lr,
                        "train/tokens_per_s": window_tokens / max(window_time, 1e-9),
                    },
                )
                window_tokens, window_time = 0, 0.0
            if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
                ppl = trainer.perplexity(eval_rows, batch_size=cfg.batch_size)
                log_curves(done, {"val/perplexity": ppl})
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
                save_checkpoint(done)
            bar.update(1)
            bar.set_postfix(loss=f"{last.loss:.3f}", ce=f"{last.ce:.3f}", lr=f"{last.lr:.1e}")
    finally:
        bar.close()
        del loader
    ppl = trainer.perplexity(setup.validation, batch_size=cfg.batch_size)
    result = {
        "validation_perplexity": ppl,
        "steps": cfg.steps,
        "resumed_from_step": start,
        "parameters": n_params,
        "train_tokens": tokens_done,
        "train_seconds": train_seconds,
        "train_tokens_per_s": tokens_done / max(train_seconds, 1e-9),
        "final": dataclasses.asdict(last) if last is not None else None,
        "seq_len": seq_len,
        "source": setup.record["source"],
        "method": setup.record.get("method"),
        "k": setup.record.get("k"),
        "processes": world.size,
    }

    def write_outputs() -> None:
        curves.log(cfg.steps, {"val/perplexity": ppl})
        curves.end()
        record = {
            **setup.record,
            "train_student": dp.recorded_params(cfg),
            "softlabels_version": pipeline.__version__,
        }
        with atomic_dir(out) as tmp:
            trainer.model.save_pretrained(tmp)
            setup.tokenizer.save_pretrained(tmp)
            write_json(tmp / RECORD_FILE, record)
        write_json(metrics, result)
        ckpt.remove(work)

    world.on_main(write_outputs)  # every rank waits for rank 0's writes to succeed
    log.info("validation perplexity %.2f; student written to %s", ppl, out)
    return result


def _resume(world: World, work: Path, trainer: StudentTrainer) -> dict[str, Any] | None:
    """The checkpoint this run resumes from, applied on every rank (None: from scratch).
    Rank 0 picks it (`ckpt.resume`: latest, else previous; unusable ones set aside) and sends
    it to the other ranks, which apply it too; any failure is agreed (`World.agree`)."""

    def apply(state: dict[str, Any]) -> None:
        ckpt.restore(trainer, state, numbers=("tokens",))

    return dp.resume_on_main(world, lambda: ckpt.resume(work, apply), apply)
