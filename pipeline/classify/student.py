"""The `classify_student` stage: a small sequence classifier distilled from a classification store.

The student is a `LlamaForSequenceClassification` sized by params, with the classification
teacher's tokenizer (its vocabulary and pad token) and one output per label. It never loads the
teacher's weights for distillation: the teacher's class distributions come from the store
(`pipeline.classify.store`), matched to the corpus row by row. Loss per batch
(`pipeline.student.losses.classification_kd_loss`):

    alpha * CE(gold) + (1 - alpha) * T^2 * KL(teacher_T || student_T)

Three knobs decide what the student learns from, and so which variant it is:

- `alpha`: the weight of the gold term; 1 trains on gold labels only (no soft label is read).
- `gold_languages`: whose gold labels the CE term (and model selection) may use: `labeled`, the
  corpus's `labeled_languages` (the transfer setting), or `all` (every language that has gold
  labels: a supervised reference, not transfer).
- `rows`: which training rows are sampled: `all` rows of every language (the KD term reaches
  every language), or `gold`, only rows with a usable gold label.

The default variants (params `classify_students`): `kd` (alpha < 1, labeled, all rows: gold on
the labeled languages plus the teacher's soft labels on every row of every language), `ce`
(alpha 1, labeled, gold rows: the zero-shot baseline, trained on the labeled languages' rows
only, so its whole step budget goes to the labeled data), and `gold` (alpha 1, all, all rows:
what gold labels in every language would give).

Model selection uses dev only, and only the targets the student trains on: every `eval_every`
steps and at the end the student is scored on its *dev targets*, the gold label where the CE term
may use it (`gold_languages`) and, when soft labels are trained on (alpha < 1), the teacher's
most probable class (the store's dev split) on every other row; the best weights (the first on
ties) are the ones written. So a transfer student is never selected with gold labels of the
languages it is meant to reach without them, and it is selected on every language it learns,
not on the 99 dev rows of one labeled language (measured with a stand-in teacher: those kept
an early step 10 points worse on the other languages). Accuracy against the gold labels of
every language is logged too, for the curves and the metrics, never for selection. Test is not
read.

Resume, curves and output follow `train_student`: a checkpoint (weights, optimizer, schedule,
RNG, curves, best weights so far) every `checkpoint_every` steps in `<checkpoints>/<key>/`,
keyed by everything that determines the weights, so another config never resumes from it;
the batch order is a pure function of (seed, step) (`pipeline.classify.student_data`), so a
resumed CPU run ends with exactly the weights of an uninterrupted one. The output folder
(save_pretrained + tokenizer + `softlabels.json`) appears all at once.

Data-parallel (`processes` > 1, `pipeline.student.distributed`, as `train_student`): the stage
runs as that many ranks under torch.distributed.run (the stage script relaunches itself, or the
user starts torchrun), DDP with gloo on CPU and NCCL on CUDA. `batch_size` stays the global
batch: every step, rank r trains on its contiguous share of the rows of the very batch one
process would, padded as that whole batch is, and its loss is scaled so that DDP's gradient
average is the gradient of the global batch's loss (`ClassifyTrainer.step`), so the weights
equal a one-process run's up to float rounding. Rank 0 alone scores dev, keeps the best
weights, logs, checkpoints and writes the outputs; the other ranks wait for it. Inputs, resume,
every step's batch, each dev evaluation and rank 0's writes are agreed (`World.agree`), so an
error on any rank stops every rank. The checkpoint key leaves the number of processes out.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

import pipeline
from pipeline.classify.corpus import ClassifyCorpusConfig, LabeledCorpus, read_labeled_corpus
from pipeline.classify.inference import class_logprobs, encode, ensure_pad
from pipeline.classify.store import check_class_store
from pipeline.classify.student_data import TrainingSet, read_soft_labels
from pipeline.core.atomic import atomic_dir, check_destinations
from pipeline.core.config import require, to_dict
from pipeline.core.curves import Curves
from pipeline.core.device import torch_device
from pipeline.core.errors import ConfigError, InputError, first_line, load_errors
from pipeline.core.provenance import (
    PROVENANCE_FILE,
    files_sha256,
    read_provenance,
    tokenizer_identity,
    write_json,
)
from pipeline.core.text import printable
from pipeline.modeling.llama import check_llama_sizes, llama_config
from pipeline.modeling.optim import adamw_with_schedule, check_optimizer_params
from pipeline.store.verify import abbreviate, content_sha256
from pipeline.student import checkpoint as ckpt
from pipeline.student import distributed as dp
from pipeline.student import model as sm
from pipeline.student.data import share_bounds
from pipeline.student.distributed import World
from pipeline.student.losses import classification_kd_loss

log = logging.getLogger(__name__)

SECTION = "classify_student"
"""The params section (variants: `classify_students.<name>` overrides its keys)."""
RECORD_FILE = "softlabels.json"
"""File in the student folder recording what it was trained from."""
COSMETIC = ("checkpoint_every", "log_every", "eval_batch_size", "threads", "processes")
"""Params that do not change the written weights (left out of the checkpoint key). Not
`eval_every`: it decides which step's weights model selection keeps. `processes`: every rank
count trains the same global batches (the weights up to float rounding), and a checkpoint
resumes under another."""


@dataclass(frozen=True)
class ClassifyStudentConfig:
    """Params section `classify_student`: the student, what it learns from, the budget."""

    num_layers: int = 1
    """Transformer blocks of the student."""
    hidden_size: int = 64
    """Model width (`init: teacher_layers` needs the teacher's)."""
    num_heads: int = 2
    """Attention heads; must divide hidden_size into an even head size."""
    intermediate_size: int = 176
    """SwiGLU feed-forward width."""
    init: Literal["random", "teacher_layers"] = "random"
    """`random` (seeded), or `teacher_layers`: copy the classification teacher's token
    embeddings, final norm, every n-th layer and (same label count) its classification head;
    needs the teacher's widths and --teacher."""
    alpha: float = 0.1
    """Loss = alpha * CE(gold) + (1 - alpha) * T^2 * KL(teacher_T || student_T). 1: gold labels
    only (the store's soft labels are not read); 0: soft labels only. The weights are fixed per
    batch, not renormalised by how many of its rows have gold labels. Measured on SIB-200: 0.1
    transfers 8 points better than 0.5 (docs/classify-student.md)."""
    temperature: float = 2.0
    """Softmax temperature T of both sides of the KL term (scaled by T^2). > 1 shows the student
    the teacher's ranking of the wrong classes (1, 2 and 4 measured within half a point at
    alpha 0.1)."""
    gold_languages: Literal["labeled", "all"] = "labeled"
    """Whose gold labels the CE term and model selection use: `labeled` =
    classify_corpus.labeled_languages (cross-lingual transfer), `all` = every language's (a
    supervised reference)."""
    rows: Literal["all", "gold"] = "all"
    """Training rows sampled: `all` rows of every language, or `gold`, only rows whose gold
    label the CE term uses (with alpha 1 and gold_languages labeled: the zero-shot baseline)."""
    steps: int = 1000
    """Optimizer steps."""
    batch_size: int = 32
    """Examples per step."""
    learning_rate: float = 0.003
    """Peak AdamW learning rate, after linear warmup, then cosine decay to zero."""
    warmup_steps: int = 100
    """Steps of linear learning-rate warmup."""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices (not norms)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this."""
    max_length: int = 64
    """Tokens per example at most (longer texts are truncated on the right; the EOS the teacher's
    tokenizer appends is kept). On SIB-200 64 truncates about half the sentences yet costs half
    of 128 per step, for 1 point of dev accuracy less (docs/classify-student.md)."""
    seed: int = 0
    """Seed of the student's init and of the batch order."""
    eval_every: int = 250
    """Dev accuracy and model selection every this many steps and at the end; 0: at the end
    only."""
    eval_batch_size: int = 128
    """Examples per forward pass when scoring dev."""
    checkpoint_every: int = 250
    """Save a resumable checkpoint every this many steps (0: never)."""
    log_every: int = 25
    """Log loss parts, learning rate and examples/s to dvclive every this many steps."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto`: CUDA when available (bf16 autocast), else CPU (float32)."""
    threads: int = 1
    """CPU threads for torch; 0 keeps torch's default (all cores). A student this small gains
    little from a second thread, and on cores shared with other jobs 2 threads ran 2.6x slower
    than 1 (they wait for each other)."""
    processes: int = 1
    """Data-parallel processes (PyTorch DDP; gloo on CPU, NCCL on CUDA with one GPU each), as
    `train_student.processes`: above 1 the stage script relaunches itself under
    torch.distributed.run, or runs under a `torchrun --nproc-per-node` started with this same
    number (else an error). batch_size stays the global batch and must be a multiple of it; the
    weights equal one process's up to float rounding. Rank 0 scores dev and writes every
    output."""

    def __post_init__(self) -> None:
        s = SECTION
        check_llama_sizes(
            s,
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            num_heads=self.num_heads,
            intermediate_size=self.intermediate_size,
        )
        require(0.0 <= self.alpha <= 1.0, f"{s}.alpha", f"must be in [0, 1], got {self.alpha}")
        require(self.temperature > 0, f"{s}.temperature", f"must be > 0, got {self.temperature}")
        check_optimizer_params(s, self)
        for key in ("max_length", "eval_batch_size", "log_every", "processes"):
            value = getattr(self, key)
            require(value >= 1, f"{s}.{key}", f"must be >= 1, got {value}")
        for key in ("eval_every", "checkpoint_every", "threads"):
            value = getattr(self, key)
            require(value >= 0, f"{s}.{key}", f"must be >= 0, got {value}")
        require(
            not (self.alpha == 0.0 and self.rows == "gold"),
            f"{s}.rows",
            "gold samples the rows with gold labels, but alpha 0 never uses them; use rows: all "
            "(or alpha > 0)",
        )
        require(
            self.batch_size % self.processes == 0,
            f"{s}.batch_size",
            f"{self.batch_size} is not a multiple of {s}.processes: {self.processes} (each "
            "process trains on an equal share of every batch); use a multiple of "
            f"{self.processes}",
        )


# -- the model ---------------------------------------------------------------------------------


def _load_tokenizer(path: Path) -> Any:
    """The classification teacher's tokenizer (only its tokenizer files are read)."""
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise InputError(f"{path}: tokenizer folder not found (run `dvc repro classify_teacher`)")
    try:
        return AutoTokenizer.from_pretrained(path)
    except load_errors() as e:
        raise InputError(f"{path}: cannot load a tokenizer ({first_line(e)})") from e


def build_student(
    cfg: ClassifyStudentConfig,
    tokenizer: Any,
    labels: list[str],
    *,
    teacher: Path | None,
) -> tuple[Any, list[int] | None]:
    """A seeded `LlamaForSequenceClassification` (float32) with the tokenizer's vocabulary and
    pad id and one output per label; with `init: teacher_layers`, initialised from the teacher
    (returned: the teacher layer copied into each student layer)."""
    from transformers import AutoConfig, LlamaForSequenceClassification

    vocab = len(tokenizer)
    teacher_config = None
    if cfg.init == "teacher_layers":
        assert teacher is not None
        teacher_config = AutoConfig.from_pretrained(teacher)
        vocab = max(vocab, int(teacher_config.vocab_size))  # hub heads pad their vocabulary
    limit = int(getattr(tokenizer, "model_max_length", 0) or 0)
    config = llama_config(
        vocab_size=vocab,
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        tie_embeddings=True,  # no LM head to tie: keeps the LM layer copy off the head
        max_position_embeddings=max(cfg.max_length, limit if limit < 10**6 else 0),
        eos_id=tokenizer.eos_token_id,
        pad_id=tokenizer.pad_token_id,  # None: ensure_pad gives it the EOS id below
    )
    config.architectures = ["LlamaForSequenceClassification"]
    config.num_labels = len(labels)
    config.id2label = dict(enumerate(labels))
    config.label2id = {name: i for i, name in enumerate(labels)}
    if teacher_config is not None:  # check widths before building anything
        sm.check_layer_copy(config, teacher_config, section=SECTION)
    torch.manual_seed(cfg.seed)
    model = LlamaForSequenceClassification(config).float()
    ensure_pad(model, tokenizer, str(getattr(tokenizer, "name_or_path", "the tokenizer")))
    picked = None
    if teacher_config is not None:
        picked = sm.init_from_teacher(model, teacher, section=SECTION)
    return model, picked


# -- the loop body -----------------------------------------------------------------------------


@dataclass(frozen=True)
class StepResult:
    loss: float
    ce: float
    kd: float
    gold_rows: int
    lr: float
    grad_norm: float


class ClassifyTrainer:
    """Optimizer, schedule, step and dev scoring of one classification student.

    Data-parallel (`distribute(world)` with more than one rank): the forward and backward run
    through `DistributedDataParallel`, which averages the gradients over the ranks. Each rank's
    batch is an equal share of the global batch; the KD term is a mean over its rows, so the
    average of the shares' means is the global mean, but the CE term is a mean over the rows
    with a gold label, whose count differs between shares: each rank divides its CE sum by the
    global batch's gold rows over the world size (an all-reduce of the counts), so the averaged
    gradient is the global batch's. `self.model` stays the plain module."""

    def __init__(self, model: Any, cfg: ClassifyStudentConfig, device: torch.device) -> None:
        self.model, self.cfg, self.device = model, cfg, device
        self.world = World()
        """The ranks this trainer trains with (`distribute`); one process by default."""
        self.forward_model: torch.nn.Module = model
        """What a training step runs: `model`, or its DDP wrapper on more than one rank."""
        self.optimizer, self.scheduler = adamw_with_schedule(
            model,
            learning_rate=cfg.learning_rate,
            weight_decay=cfg.weight_decay,
            warmup_steps=cfg.warmup_steps,
            steps=cfg.steps,
        )

    def distribute(self, world: World) -> None:
        """Train data-parallel over `world` from now on (nothing changes for one process):
        wrap the model in DDP, whose construction is a collective (a broadcast of rank 0's
        weights), so every rank calls this at the same point, outside any agreed phase, after
        the ranks hold the same weights."""
        self.world = world
        if world.size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=ids
            )

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast on CUDA; nothing on CPU."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(self, batch: dict[str, torch.Tensor]) -> StepResult:
        """One optimisation step on a `TrainingSet.batch` (on several ranks: this rank's share
        of the global batch, `share`; every rank calls it)."""
        self.forward_model.train()
        b = {k: v.to(self.device) for k, v in batch.items()}
        with self.autocast():
            logits = self.forward_model(
                input_ids=b["input_ids"], attention_mask=b["attention_mask"]
            ).logits  # (B, C)
        if self.world.size > 1:
            total, ce, kd, gold_rows = self._share_loss(logits, b)
        else:
            total, parts = classification_kd_loss(
                logits,  # (B, C)
                b.get("teacher_logprobs"),  # (B, C) or None
                b["gold"],  # (B,)
                alpha=self.cfg.alpha,
                temperature=self.cfg.temperature,
            )
            ce, kd, gold_rows = float(parts["ce"]), float(parts["kd"]), int(parts["gold_rows"])
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()  # on several ranks DDP averages the gradients here
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        loss = float(total.detach())
        if self.world.size > 1:  # the global batch's: the mean of the scaled shares' losses
            loss = self.world.mean([loss])[0]
        return StepResult(
            loss=loss, ce=ce, kd=kd, gold_rows=gold_rows, lr=float(lr), grad_norm=float(norm)
        )

    def _share_loss(
        self, logits: torch.Tensor, b: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, float, float, int]:
        """This rank's loss on its share (class docstring), whose mean over the ranks is the
        global batch's loss: alpha * (CE sum / global gold rows) * world size + (1 - alpha) *
        T^2 * KL (the share's mean); and the global batch's CE, KL and gold rows."""
        alpha, t, size = self.cfg.alpha, self.cfg.temperature, self.world.size
        ce_mean, parts = classification_kd_loss(
            logits, None, b["gold"], alpha=1.0, temperature=t
        )  # (the share's CE mean, with its graph)
        local_gold = int(parts["gold_rows"])
        global_gold = int(self.world.sum([local_gold])[0])
        total = alpha * ce_mean * (local_gold * size / max(global_gold, 1))
        kd = torch.zeros(())
        if alpha < 1.0:
            kd_total, kd_parts = classification_kd_loss(
                logits, b["teacher_logprobs"], b["gold"], alpha=0.0, temperature=t
            )  # T^2 * KL, the share's mean over its rows
            total = total + (1.0 - alpha) * kd_total
            kd = kd_parts["kd"]
        ce_sum, kd_sum = self.world.sum([float(ce_mean.detach()) * local_gold, float(kd)])
        return total, ce_sum / max(global_gold, 1), kd_sum / size, global_gold

    def predict(self, tokenizer: Any, texts: list[str]) -> np.ndarray:
        """(N,) int64 predicted class of each text, through `class_logprobs` (the function the
        evaluate stage scores with, so the numbers agree)."""
        lp = class_logprobs(
            self.model,
            tokenizer,
            texts,
            batch_size=self.cfg.eval_batch_size,
            max_length=self.cfg.max_length,
            device=self.device,
        )  # (N, C)
        self.model.train()
        return lp.argmax(axis=1).astype(np.int64)

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


# -- dev scoring -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DevSet:
    """The dev split and which of its rows score what."""

    texts: list[str]
    label: np.ndarray
    """(N,) int64 gold class or -1."""
    lang: np.ndarray
    """(N,) language codes."""
    target: np.ndarray
    """(N,) int64: the student's own target on each row, what model selection scores: the gold
    label the CE term may use, else the teacher's argmax when soft labels are trained on, else
    -1 (not scored)."""
    labeled: list[str]
    """The corpus's labeled languages."""

    def score(self, pred: np.ndarray) -> dict[str, Any]:
        """Accuracies of predictions `pred` (N,): over all gold rows, per language, the mean
        over labeled and over the other languages, and on the student's targets (`selection`)."""
        has, scored = self.label >= 0, self.target >= 0
        right = (pred == self.label) & has
        per_lang = {
            str(lang): float(right[m].sum() / m.sum())
            for lang in dict.fromkeys(self.lang.tolist())
            if (m := (self.lang == lang) & has).any()
        }
        lab = [a for lang, a in per_lang.items() if lang in self.labeled]
        unl = [a for lang, a in per_lang.items() if lang not in self.labeled]
        return {
            "accuracy": float(right.sum() / max(has.sum(), 1)),
            "accuracy_labeled": float(np.mean(lab)) if lab else None,
            "accuracy_unlabeled": float(np.mean(unl)) if unl else None,
            "selection": float((pred == self.target)[scored].sum() / max(scored.sum(), 1)),
            "per_language": per_lang,
        }


def _usable_gold(cfg: ClassifyStudentConfig, rows: Any, labeled: list[str]) -> np.ndarray:
    """(N,) bool: rows whose gold label this student may train and select on."""
    if cfg.gold_languages == "all":
        return rows.label >= 0
    return rows.gold_mask(labeled)


# -- setup -------------------------------------------------------------------------------------


@dataclass
class Setup:
    """Everything a run needs, checked and built (see `prepare`)."""

    cfg: ClassifyStudentConfig
    trainer: ClassifyTrainer
    tokenizer: Any
    data: TrainingSet
    dev: DevSet
    record: dict[str, Any]
    """Provenance for softlabels.json."""
    key: str
    """Checkpoint key: digest of everything that determines the weights."""
    device: torch.device


def _check_inputs(cfg: ClassifyStudentConfig, logits: Path | None, teacher: Path | None) -> None:
    if cfg.alpha < 1.0 and logits is None:
        raise ConfigError(
            f"{SECTION}.alpha: {cfg.alpha} trains on the teacher's soft labels; pass --logits "
            "<classification store> (or set alpha: 1 for gold labels only)"
        )
    if cfg.init == "teacher_layers":
        if teacher is None:
            raise ConfigError(
                f"{SECTION}.init: teacher_layers reads the teacher's weights; pass --teacher "
                "<classification teacher folder> (and list it in the stage's deps in dvc.yaml)"
            )
        if not Path(teacher).is_dir():
            raise InputError(
                f"{teacher}: teacher folder not found (run `dvc repro classify_teacher`)"
            )


def _resolve(cfg: ClassifyStudentConfig) -> torch.device:
    return torch_device(cfg.device, section=SECTION)


def _check_request(
    cfg: ClassifyStudentConfig, logits: Path | None, teacher: Path | None
) -> torch.device:
    """The checks that read only the params and the arguments (`_check_inputs`); the device."""
    _check_inputs(cfg, logits, teacher)
    return _resolve(cfg)


def check_launch(cfg: ClassifyStudentConfig, *, logits: Path | None, teacher: Path | None) -> None:
    """What the stage script checks before it starts `cfg.processes` ranks, so a request they
    could not serve fails at once, not in every rank: the arguments the params need and, on
    CUDA, one GPU per process (`dp.check_gpus`)."""
    if _check_request(cfg, logits, teacher).type == "cuda":
        dp.check_gpus(cfg.processes, section=SECTION)


def share(batch: dict[str, torch.Tensor], world: World) -> dict[str, torch.Tensor]:
    """This rank's contiguous share of the rows of a global `TrainingSet.batch` (all of it on
    one process), padded as the whole batch is, so a row's tensors are the ones one process
    trains on."""
    if world.size == 1:
        return batch
    lo, hi = share_bounds(len(batch["gold"]), world.rank, world.size)
    return {k: v[lo:hi] for k, v in batch.items()}


def prepare(
    cfg: ClassifyStudentConfig,
    corpus_cfg: ClassifyCorpusConfig,
    *,
    logits: Path | None,
    tokenizer: Path,
    teacher: Path | None = None,
    corpus: LabeledCorpus | None = None,
    device: torch.device | None = None,
) -> Setup:
    """Check every input, then build the student, trainer and data (no training).

    Refuses before any work: soft labels wanted without a store; layer init without a teacher;
    a store that does not match the corpus (other label set, rows, texts; incomplete or damaged:
    `check_class_store`, run whenever a store is given); no training row to sample.
    `device`: this rank's, as `dp.join` gives it (default: the one the params ask for).
    """
    _check_inputs(cfg, logits, teacher)
    corpus = corpus if corpus is not None else read_labeled_corpus(corpus_cfg)
    attrs = check_class_store(logits, corpus) if logits is not None else None
    device = device if device is not None else _resolve(cfg)
    tok = _load_tokenizer(tokenizer)
    labeled = list(corpus_cfg.labeled_languages)
    train = corpus.splits["train"]
    usable = _usable_gold(cfg, train, labeled)
    gold = np.where(usable, train.label, -1).astype(np.int64)
    rows = np.flatnonzero(usable) if cfg.rows == "gold" else np.arange(len(train))
    if len(rows) == 0 or (cfg.alpha > 0 and not usable.any()):
        raise InputError(
            f"{corpus_cfg.path}: no train row has a gold label of "
            f"{'any language' if cfg.gold_languages == 'all' else ', '.join(labeled)}; "
            f"check classify_corpus.labeled_languages or set {SECTION}.alpha: 0"
        )
    soft = read_soft_labels(logits, train) if cfg.alpha < 1.0 and logits is not None else None
    data = TrainingSet(
        input_ids=encode(tok, train.text, cfg.max_length),
        gold=gold,
        soft=soft,
        rows=rows,
    )
    dev_rows = corpus.splits["dev"]
    target = np.where(_usable_gold(cfg, dev_rows, labeled), dev_rows.label, -1)
    if soft is not None:  # the teacher's class where no usable gold label
        teacher_dev = read_soft_labels(logits, dev_rows).argmax(axis=1)
        target = np.where(target >= 0, target, teacher_dev)
    dev = DevSet(
        texts=dev_rows.text,
        label=dev_rows.label,
        lang=dev_rows.lang,
        target=target.astype(np.int64),
        labeled=labeled,
    )
    if not (dev.target >= 0).any():
        raise InputError(
            f"{corpus_cfg.path}: no dev row has a gold label the student may select on "
            f"({cfg.gold_languages} languages); add labeled dev rows"
        )
    model, picked = build_student(cfg, tok, corpus.labels, teacher=teacher)
    model.to(device)
    record: dict[str, Any] = {
        "task": "classification",
        "labels": list(corpus.labels),
        "labeled_languages": labeled,
        "corpus": {"path": corpus_cfg.path, "fingerprint": corpus.fingerprint()},
        "tokenizer": tokenizer_identity(tok),
        "soft_labels": soft is not None,
        "init": cfg.init,
    }
    if attrs is not None:
        record["store"] = {
            "path": str(logits),
            "content_sha256": content_sha256(attrs),
            "teacher": attrs["teacher"],
            "sources": attrs["sources"],
            "parallel_source": attrs.get("parallel_source"),
        }
    if picked is not None:
        assert teacher is not None
        prov = read_provenance(teacher) if (Path(teacher) / PROVENANCE_FILE).is_file() else {}
        record["init_teacher"] = {
            "path": str(teacher),
            "name": prov.get("name"),
            "revision": prov.get("revision"),
            "sha256": prov.get("sha256") or files_sha256(teacher)[0],
        }
        record["init_layers"] = picked
    weights_cfg = {k: v for k, v in to_dict(cfg).items() if k not in COSMETIC}
    key = ckpt.run_key(
        {
            "config": weights_cfg,
            "labels": record["labels"],
            "labeled_languages": labeled,
            "corpus": corpus.fingerprint(),
            "tokenizer": record["tokenizer"]["sha256"],
            "store": content_sha256(attrs) if soft is not None else None,  # not the path
            "init_teacher": record.get("init_teacher", {}).get("sha256"),
            "device": device.type,
            "softlabels_version": pipeline.__version__,
        }
    )
    trainer = ClassifyTrainer(model, cfg, device)
    return Setup(cfg, trainer, tok, data, dev, record, key, device)


def describe_source(record: dict[str, Any]) -> str:
    """One line naming what the student learns from, for the stage's log (control characters of
    the store's attribute strings escaped: `printable`)."""
    store = record.get("store")
    if not record.get("soft_labels") or store is None:
        return f"gold labels only (corpus {abbreviate(record['corpus']['fingerprint'])})"
    t = store["teacher"]
    return printable(
        f"store {store['path']} (content sha256 {abbreviate(store['content_sha256'])}): teacher "
        f"{t.get('name')} @ {t.get('revision') or '-'} (sha256 {abbreviate(t.get('sha256'))}); "
        f"corpus {abbreviate(record['corpus']['fingerprint'])}"
    )


# -- the stage ---------------------------------------------------------------------------------


def run_classify_student(
    cfg: ClassifyStudentConfig,
    corpus_cfg: ClassifyCorpusConfig,
    *,
    logits: Path | None,
    tokenizer: Path,
    out: Path,
    metrics: Path,
    checkpoints: Path,
    live_dir: Path,
    teacher: Path | None = None,
    name: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the stage (module docstring) in this process; return the metrics rank 0 writes to
    `metrics` (every rank returns them).

    With `cfg.processes` 1 this is the whole run. Above 1 this process must be one rank of a
    torchrun with as many processes (the stage script starts one: `pipeline.stages.
    classify_student`); otherwise a ConfigError naming `classify_student.processes`."""
    device = dp.same_on_every_rank(lambda: _check_request(cfg, logits, teacher))
    world, device = dp.join(cfg.processes, device, section=SECTION)
    threads_before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(
            cfg,
            corpus_cfg,
            world=world,
            device=device,
            logits=logits,
            tokenizer=tokenizer,
            out=Path(out),
            metrics=Path(metrics),
            checkpoints=Path(checkpoints),
            live_dir=Path(live_dir),
            teacher=teacher,
            name=name,
            progress=progress,
        )
    finally:
        torch.set_num_threads(threads_before)
        world.close()


def _run(
    cfg: ClassifyStudentConfig,
    corpus_cfg: ClassifyCorpusConfig,
    *,
    world: World,
    device: torch.device,
    logits: Path | None,
    tokenizer: Path,
    out: Path,
    metrics: Path,
    checkpoints: Path,
    live_dir: Path,
    teacher: Path | None,
    name: str | None,
    progress: bool,
) -> dict[str, Any]:
    """The run of `run_classify_student` on this rank of `world` (every rank calls it)."""
    from tqdm.auto import tqdm

    def checked_setup() -> Setup:
        if world.is_main:  # the only writer: fail now, not after the work
            check_destinations(out, metrics, checkpoints, live_dir)
        return prepare(
            cfg, corpus_cfg, logits=logits, tokenizer=tokenizer, teacher=teacher, device=device
        )

    setup = world.agree(checked_setup)
    trainer, data, dev = setup.trainer, setup.data, setup.dev
    pad_id = int(setup.tokenizer.pad_token_id)
    n_params = sum(p.numel() for p in trainer.model.parameters())
    log.info("classify student %s: %d parameters on %s", name or "-", n_params, setup.device)
    if world.size > 1:
        log.info("data-parallel: %d processes", world.size)
    log.info("learning from %s", describe_source(setup.record))
    work = checkpoints / setup.key

    def apply(state: dict[str, Any]) -> None:
        _restore(trainer, state)

    state = dp.resume_on_main(world, lambda: ckpt.resume(work, apply), apply)
    trainer.distribute(world)  # DDP, now that every rank holds the same weights
    start, examples, seconds = 0, 0, 0.0
    best: dict[str, Any] = {"selection": -1.0, "step": 0, "scores": None, "weights": None}
    clock = {"eval": 0.0}  # seconds spent scoring dev
    if state is not None:
        start, examples, seconds = int(state["step"]), int(state["examples"]), state["seconds"]
        best, clock["eval"] = state["best"], float(state["eval_seconds"])
    saved_curves = state.get("curves") if state else None
    curves = world.on_main(lambda: Curves(live_dir, start, saved_curves))

    def evaluate(step: int) -> None:  # rank 0 only: it alone keeps the best weights
        t0 = time.perf_counter()
        scores = dev.score(trainer.predict(setup.tokenizer, dev.texts))
        clock["eval"] += time.perf_counter() - t0
        curves.log(
            step,
            {f"dev/{k}": v for k, v in scores.items() if k != "per_language" and v is not None},
        )
        if scores["selection"] > best["selection"]:
            weights = {k: v.detach().cpu().clone() for k, v in trainer.model.state_dict().items()}
            best.update(selection=scores["selection"], step=step, scores=scores, weights=weights)

    def save_checkpoint(step: int, examples: int, seconds: float) -> None:
        world.on_main(  # rank 0 only: it alone holds the curves and the best weights
            lambda: ckpt.save(
                work,
                {
                    "step": step,
                    "examples": examples,
                    "seconds": seconds,
                    "trainer": trainer.state_dict(),
                    "rng": ckpt.rng_state(),
                    "curves": curves.snapshot(),
                    "best": best,
                    "eval_seconds": clock["eval"],
                },
            )
        )

    bar = tqdm(
        total=cfg.steps,
        initial=start,
        desc="classify student",
        unit="step",
        disable=not (progress and world.is_main),
    )
    last: StepResult | None = None
    window_examples, window_time = 0, 0.0
    try:
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            batch = world.agree(  # a failure on any rank stops every rank
                lambda: share(data.batch(step, cfg.batch_size, cfg.seed, pad_id), world)  # noqa: B023
            )
            last = trainer.step(batch)
            dt = time.perf_counter() - t0
            examples += cfg.batch_size
            seconds += dt
            window_examples += cfg.batch_size
            window_time += dt
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                values = {
                    "train/loss": last.loss,
                    "train/ce": last.ce,
                    "train/kd": last.kd,
                    "train/lr": last.lr,
                    "train/examples_per_s": window_examples / max(window_time, 1e-9),
                }
                world.on_main(lambda: curves.log(done, values))  # noqa: B023
                window_examples, window_time = 0, 0.0
            if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps:
                world.on_main(lambda: evaluate(done))  # noqa: B023
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
                save_checkpoint(done, examples, seconds)
            bar.update(1)
            bar.set_postfix(loss=f"{last.loss:.3f}", dev=f"{max(best['selection'], 0):.3f}")
    finally:
        bar.close()

    def write_outputs() -> dict[str, Any]:  # rank 0 only
        curves.end()
        trainer.model.load_state_dict(best["weights"])
        scores = best["scores"]
        record = {
            **setup.record,
            "student": name,
            "selection": {
                "on": _selection_rule(cfg),
                "step": best["step"],
                "accuracy": best["selection"],
            },
            SECTION: dp.recorded_params(cfg),
            "classify_corpus": to_dict(corpus_cfg),
            "softlabels_version": pipeline.__version__,
        }
        with atomic_dir(out) as tmp:
            trainer.model.save_pretrained(tmp)
            setup.tokenizer.save_pretrained(tmp)
            write_json(tmp / RECORD_FILE, record)
        result = {
            "student": name,
            "dev_accuracy": scores["accuracy"],
            "dev_accuracy_labeled": scores["accuracy_labeled"],
            "dev_accuracy_unlabeled": scores["accuracy_unlabeled"],
            "dev_accuracy_per_language": scores["per_language"],
            "selection_accuracy": best["selection"],
            "selected_on": _selection_rule(cfg),
            "best_step": best["step"],
            "steps": cfg.steps,
            "resumed_from_step": start,
            "parameters": n_params,
            "train_examples": examples,
            "train_seconds": seconds,
            "train_examples_per_s": examples / max(seconds, 1e-9),
            "eval_seconds": clock["eval"],
            "final": None
            if last is None
            else {"loss": last.loss, "ce": last.ce, "kd": last.kd, "lr": last.lr},
            "alpha": cfg.alpha,
            "temperature": cfg.temperature,
            "gold_languages": cfg.gold_languages,
            "rows": cfg.rows,
            "soft_labels": bool(setup.record.get("soft_labels")),
        }
        if world.size > 1:  # a one-process run's metrics stay as they were
            result["processes"] = world.size
        write_json(metrics, result)
        ckpt.remove(work)
        log.info(
            "dev accuracy %.3f (labeled %s, unlabeled %s) at step %d; student written to %s",
            scores["accuracy"],
            _fmt(scores["accuracy_labeled"]),
            _fmt(scores["accuracy_unlabeled"]),
            best["step"],
            out,
        )
        return result

    # every rank waits for rank 0's writes to succeed, and returns its metrics
    return world.broadcast(world.on_main(write_outputs))


def _restore(trainer: ClassifyTrainer, state: dict[str, Any]) -> None:
    """`resume`'s apply: `ckpt.restore` after checking this stage's own keys (the counters, and
    the best weights so far, which must fit the model); raises before changing anything."""
    best = state.get("best")
    if (
        not isinstance(best, dict)
        or not isinstance(best.get("step"), int)
        or not isinstance(best.get("selection"), (int, float))
        or not isinstance(best.get("scores"), (dict, type(None)))
    ):
        raise ValueError("the best-so-far record (best) is malformed")
    if best.get("weights") is not None:
        ckpt.check_tensors(trainer.model.state_dict(), best["weights"], "best weights")
    ckpt.restore(trainer, state, numbers=("examples", "eval_seconds"))


def _selection_rule(cfg: ClassifyStudentConfig) -> str:
    """How model selection scored dev, in words (metrics and softlabels.json)."""
    gold = "every language's" if cfg.gold_languages == "all" else "the labeled languages'"
    teacher = ", the teacher's argmax on the other rows" if cfg.alpha < 1 else ""
    return f"dev accuracy on {gold} gold labels{teacher}"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
