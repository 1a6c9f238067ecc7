"""Stage `prepare_teacher`: produce the teacher folder every later stage reads.

`teacher.model` is `builtin` (train a byte-level BPE tokenizer and a small Llama on the corpus,
see `pipeline.teacher.builtin_teacher`), a local `save_pretrained` folder, or a Hugging Face hub id
(loaded with `AutoModelForCausalLM` / `AutoTokenizer` at `teacher.revision`). Either way the
output is one `save_pretrained` folder with the model, its tokenizer and `provenance.json` (name,
revision, sha256 of the weight and tokenizer files, architecture, vocab size, context length,
tokenizer identity), written all-or-nothing (`pipeline.core.atomic.atomic_dir`).

The teacher is also measured: validation perplexity per language and overall, next to an
add-one smoothed unigram model of the same tokens, goes to the metrics file. Trade-off: for a
large hub teacher this evaluation is a full forward pass over the validation split (on CUDA if
available, else CPU); `teacher.evaluate: false` skips it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

import pipeline
from pipeline.core.atomic import atomic_dir, check_destinations
from pipeline.core.config import require
from pipeline.core.errors import InputError, first_line, load_errors
from pipeline.core.provenance import PROVENANCE_FILE, files_sha256, tokenizer_identity, write_json
from pipeline.data.corpus import CorpusConfig, Documents, read_corpus
from pipeline.modeling.llama import check_llama_sizes
from pipeline.modeling.optim import check_optimizer_params
from pipeline.teacher import builtin_teacher as bt

log = logging.getLogger(__name__)

BUILTIN = "builtin"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class TeacherConfig:
    """Params section `teacher`: which teacher to use, and how to train the builtin one.

    Keys marked (builtin) only apply when `model` is `builtin`.
    """

    model: str = BUILTIN
    """`builtin` (train a small Llama on the corpus, offline, on CPU), a Hugging Face hub id
    such as `org/name`, or the path of a folder written by `save_pretrained`."""
    revision: str = "main"
    """Hub revision (branch, tag or commit) of `model`; ignored for builtin and local folders.
    The resolved commit is recorded in provenance.json."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """dtype the teacher is saved (and evaluated) in. `auto`: float32 for builtin, the
    checkpoint's own dtype for a hub or local model."""
    evaluate: bool = True
    """Measure validation perplexity of the teacher and of a unigram baseline. Set false to skip
    the forward pass over the validation split (e.g. a large hub teacher on CPU)."""
    vocab_size: int = 4096
    """(builtin) Target tokenizer vocabulary, special tokens included (at least 258: 256 byte
    symbols and EOS and PAD). Smaller makes the output head cheaper and its statistics denser."""
    hidden_size: int = 256
    """(builtin) Model width."""
    num_layers: int = 1
    """(builtin) Number of transformer blocks. At a few minutes of CPU, tokens seen matter more
    than depth (one layer beat two, three and four at equal time); add layers with steps."""
    num_heads: int = 4
    """(builtin) Attention heads; must divide hidden_size into an even head size."""
    intermediate_size: int = 688
    """(builtin) Width of the SwiGLU feed-forward layer."""
    tie_embeddings: bool = False
    """(builtin) Share the input embedding and output head weights."""
    max_position_embeddings: int = 1024
    """(builtin) Context length the model supports; the tokenize stage's seq_len must not
    exceed it. Costs nothing (rotary positions have no parameters)."""
    seq_len: int = 128
    """Tokens per packed row, for training (builtin) and for the perplexity evaluation."""
    batch_size: int = 32
    """Rows per step (builtin training) and per forward pass (evaluation)."""
    steps: int = 900
    """(builtin) Optimizer steps: the training budget. More steps make a better teacher."""
    learning_rate: float = 0.003
    """(builtin) Peak AdamW learning rate, reached after warmup, then cosine decay to zero."""
    warmup_steps: int = 90
    """(builtin) Steps of linear learning-rate warmup."""
    weight_decay: float = 0.1
    """(builtin) AdamW weight decay on weight matrices (not on norms)."""
    grad_clip: float = 1.0
    """(builtin) Clip the global gradient norm to this value."""
    seed: int = 0
    """(builtin) Seed of weight init and data order; the same seed gives the same teacher."""
    threads: int = 0
    """CPU threads for training and evaluation; 0 keeps torch's default (all cores). On cores
    shared with other jobs, 1 thread can be several times faster than threads that wait for
    each other. The same seed and thread count give the same weights."""

    def __post_init__(self) -> None:
        s = "teacher"
        require(bool(self.model.strip()), f"{s}.model", "must not be empty (use 'builtin')")
        require(bool(self.revision.strip()), f"{s}.revision", "must not be empty (use 'main')")
        require(
            self.vocab_size >= 258,
            f"{s}.vocab_size",
            f"must be >= 258 (256 byte symbols + EOS + PAD), got {self.vocab_size}",
        )
        check_llama_sizes(
            s,
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            num_heads=self.num_heads,
            intermediate_size=self.intermediate_size,
        )
        require(self.seq_len >= 2, f"{s}.seq_len", f"must be >= 2, got {self.seq_len}")
        require(
            self.max_position_embeddings >= self.seq_len,
            f"{s}.max_position_embeddings",
            f"must be >= teacher.seq_len ({self.seq_len}), got {self.max_position_embeddings}",
        )
        check_optimizer_params(s, self)
        require(
            self.threads >= 0, f"{s}.threads", f"must be >= 0 (0: all cores), got {self.threads}"
        )

    @property
    def is_builtin(self) -> bool:
        return self.model == BUILTIN


def prepare_teacher(
    cfg: TeacherConfig, corpus: CorpusConfig, *, out: Path, metrics: Path
) -> dict[str, Any]:
    """Write the teacher folder `out` (model, tokenizer, provenance.json) and `metrics` JSON.

    `out` appears complete or not at all. Returns {"provenance": ..., "metrics": ...}, the two
    records written. Raises ConfigError/InputError (naming `teacher.model` or the file) for an
    unusable model or tokenizer, InputError for a corpus too small to fill one row.
    """
    check_destinations(out, metrics)  # fail now, not after the work
    docs = read_corpus(corpus)
    threads_before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        if cfg.is_builtin:
            model, tokenizer, train_rows, stats = _train_builtin(cfg, docs)
            revision = None
        else:
            model, tokenizer, revision = load_pretrained(cfg)
            train_rows = None
            stats = None
        if cfg.dtype != "auto":
            model = model.to(DTYPES[cfg.dtype])
        record: dict[str, Any] = {
            "name": cfg.model,
            "steps": stats.steps if stats else 0,
            "train_tokens_seen": stats.tokens if stats else 0,
            "train_seconds": round(stats.seconds, 2) if stats else 0.0,
            "train_final_loss": stats.final_loss if stats else None,
        }
        if cfg.evaluate:
            record.update(_evaluate(cfg, model, tokenizer, docs, train_rows))
    finally:
        torch.set_num_threads(threads_before)

    out = Path(out)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        provenance = teacher_provenance(tmp, name=cfg.model, revision=revision)
        write_json(tmp / PROVENANCE_FILE, provenance)
    write_json(metrics, record)
    return {"provenance": provenance, "metrics": record}


def _train_builtin(
    cfg: TeacherConfig, docs: Documents
) -> tuple[Any, Any, dict[str, np.ndarray], bt.TrainStats]:
    """Tokenizer, then model, trained on the corpus's training documents (see builtin_teacher)."""
    texts = [doc for lang in docs.train for doc in docs.train[lang]]
    tokenizer = bt.train_tokenizer(
        texts, vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_position_embeddings
    )
    train_rows = bt.pack_languages(tokenizer, docs.train, cfg.seq_len)
    rows = np.concatenate([train_rows[lang] for lang in docs.train])  # (N, L)
    if len(rows) == 0:
        raise InputError(
            f"corpus.path: the training documents make fewer than {cfg.seq_len} tokens, not "
            "one row of teacher.seq_len; add documents or lower teacher.seq_len"
        )
    model = bt.build_model(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_embeddings=cfg.tie_embeddings,
        eos_id=tokenizer.eos_token_id,
        pad_id=tokenizer.pad_token_id,
        seed=cfg.seed,
    )
    log.info(
        "builtin teacher: %.2fM parameters, %d training rows of %d tokens, %d steps",
        model.num_parameters() / 1e6,
        len(rows),
        cfg.seq_len,
        cfg.steps,
    )
    stats = bt.train_model(
        model,
        rows,
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        grad_clip=cfg.grad_clip,
        seed=cfg.seed,
    )
    return model, tokenizer, train_rows, stats


def _looks_like_path(name: str) -> bool:
    """True when `name` can only be a filesystem path, never a hub id (`name` or `org/name`)."""
    return name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1


def load_pretrained(cfg: TeacherConfig) -> tuple[Any, Any, str | None]:
    """Load (model, tokenizer, resolved revision) from a local folder or the hub, and check them.

    Refuses, naming `teacher.model`: a path that does not exist, a model that cannot be loaded,
    a tokenizer without an EOS token (packing needs it), and a model whose embedding has fewer
    rows than the tokenizer has ids. The revision is the hub commit when one was resolved,
    `teacher.revision` for a hub id otherwise, and None for a local folder.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = cfg.model
    local = Path(name).expanduser()
    if _looks_like_path(name) and not local.exists():
        raise InputError(
            f"teacher.model: {name!r} does not exist; give 'builtin', a hub id such as "
            "'org/name', or the path of a folder written by save_pretrained"
        )
    if local.exists() and not local.is_dir():
        raise InputError(f"teacher.model: {name!r} is a file; give a save_pretrained folder")
    source = str(local) if local.is_dir() else name
    revision = None if local.is_dir() else cfg.revision
    dtype: Any = "auto" if cfg.dtype == "auto" else DTYPES[cfg.dtype]
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=cfg.revision)
        model = AutoModelForCausalLM.from_pretrained(source, revision=cfg.revision, dtype=dtype)
    except load_errors() as e:
        where = "in that folder" if local.is_dir() else "on the hub or in the local hub cache"
        raise InputError(
            f"teacher.model: cannot load {name!r} (revision {cfg.revision!r}) {where}: "
            f"{first_line(e)}"
        ) from e
    if tokenizer.eos_token_id is None:
        raise InputError(
            f"teacher.model: the tokenizer of {name!r} has no EOS token; packing separates "
            "documents with EOS, so set `eos_token` in its tokenizer_config.json"
        )
    rows = model.get_input_embeddings().weight.shape[0]
    if rows < len(tokenizer):
        raise InputError(
            f"teacher.model: the embedding of {name!r} has {rows} rows but its tokenizer has "
            f"{len(tokenizer)} ids; the model and tokenizer do not belong together"
        )
    if not local.is_dir():
        revision = getattr(model.config, "_commit_hash", None) or cfg.revision
    return model, tokenizer, revision


def _evaluate(
    cfg: TeacherConfig,
    model: Any,
    tokenizer: Any,
    docs: Documents,
    train_rows: dict[str, np.ndarray] | None,
) -> dict[str, Any]:
    """Validation perplexity of the teacher and of the unigram baseline, per language."""
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and cfg.seq_len > context:
        raise InputError(
            f"teacher.seq_len: {cfg.seq_len} is longer than the context of {cfg.model!r} "
            f"(max_position_embeddings={context}); lower teacher.seq_len"
        )
    if train_rows is None:
        train_rows = bt.pack_languages(tokenizer, docs.train, cfg.seq_len)
    val_rows = bt.pack_languages(tokenizer, docs.validation, cfg.seq_len)
    if sum(len(r) for r in val_rows.values()) == 0:
        raise InputError(
            f"corpus.validation_fraction: the validation documents make fewer than "
            f"{cfg.seq_len} tokens per language; raise it or lower teacher.seq_len"
        )
    if not cfg.is_builtin and torch.cuda.is_available():
        model = model.to("cuda")
    teacher = bt.model_perplexity(model, val_rows, batch_size=cfg.batch_size)
    model.to("cpu")
    rows = np.concatenate([r for r in train_rows.values()])  # (N, L)
    unigram = bt.unigram_perplexity(rows, val_rows, vocab_size=len(tokenizer))
    log.info("validation perplexity: teacher %.1f, unigram %.1f", teacher.overall, unigram.overall)
    return {
        "perplexity": {"teacher": teacher.as_dict(), "unigram": unigram.as_dict()},
        "tokens": {
            "train": int(rows.size),
            "validation": sum(teacher.tokens.values()),
            "validation_by_lang": teacher.tokens,
        },
    }


def teacher_provenance(model_dir: Path, *, name: str, revision: str | None) -> dict[str, Any]:
    """The provenance record of a saved teacher folder, read back from its files.

    Tokenizer identity and config come from the saved files (reloaded), so they are exactly
    what downstream stages will compute when they load the folder.
    """
    from transformers import AutoConfig, AutoTokenizer

    digest, files = files_sha256(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return {
        "name": name,
        "revision": revision,
        "sha256": digest,
        "files": files,
        "architecture": (config.architectures or ["unknown"])[0],
        "vocab_size": config.vocab_size,
        "max_position_embeddings": getattr(config, "max_position_embeddings", None),
        "tokenizer": tokenizer_identity(tokenizer),
        "softlabels_version": pipeline.__version__,
    }
