"""One optimisation step of the student, and its validation perplexity: the explicit loop body.

`StudentTrainer.step(batch)` moves a batch to the device, runs the student (bf16 autocast on
CUDA, float32 on CPU), gets the teacher's side either from the batch (stored soft labels) or
from a live teacher forward pass (full vocabulary, no gradient), and applies
`pipeline.student.losses.distillation_loss`, then AdamW with gradient clipping and a warmup + cosine
learning-rate schedule. Positions: the student's logits at position t predict token t+1, and
store position t holds the teacher's distribution for token t+1; the loss uses positions
0..L-2 for both KD and CE, so every term has a real next token.

It is shared by the stage (`pipeline.student.train_student`) and the benchmarks, which feed it batches
from the streaming loader or from memory, so both measure the same step.

Data-parallel (`distribute(world)` with more than one rank, `pipeline.student.distributed`):
the forward and backward run through `DistributedDataParallel`, which averages the gradients
over the ranks during backward. Each rank's batch is an equal share of the global batch and the
loss is a mean over its positions (fixed-length rows, no padding), so the averaged gradient is
the gradient of the global batch's mean loss: clipping, AdamW and the schedule then do on every
rank exactly what one process does, and the weights stay equal across ranks. The loss parts a
step reports are averaged over the ranks (the global batch's), and `perplexity` splits the rows
over the ranks and sums their NLL, so both give one process's numbers up to float rounding.
`self.model` stays the plain module (its state dict and `save_pretrained` carry no DDP prefix).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.core.errors import ConfigError
from pipeline.modeling.optim import adamw_with_schedule
from pipeline.store.format import LEGACY_SAMPLING
from pipeline.store.labels import has_logprobs
from pipeline.student.data import share_bounds
from pipeline.student.distributed import World
from pipeline.student.losses import SINGLETON_WEIGHT, LossParts, distillation_loss, target_nll

LOSS_ARGS = {
    "ids": "ids",
    "counts": "counts",
    "logprobs": "logprobs",
    "tail": "tail_logmass",
    "entropy": "entropy",
}
"""Decoded store label (`pipeline.store.labels.decode_block`) -> `distillation_loss` argument."""


@dataclass(frozen=True, kw_only=True)
class LossSettings:
    """What the loss needs besides the batch (validated by the stage config; the fields are
    the `train_student` params of the same names, plus the store's `method`)."""

    alpha: float
    temperature: float
    loss: str
    tail: str
    method: str | None
    """Store method ('topk' or 'sample'); None with a live teacher or alpha = 0."""
    sample_weights: str = "empirical"
    """Estimator for sample stores (`pipeline.student.losses.SAMPLE_WEIGHTS`)."""
    sampling: str = LEGACY_SAMPLING
    """A sample store's `sampling` attribute (`pipeline.store.format.sampling_of`): the
    inclusion weights depend on it."""
    singleton_weight: float = SINGLETON_WEIGHT
    """Sample stores: weight an id drawn once keeps (`pipeline.student.losses.sampled_kd`)."""


def check_loss_for_store(
    attrs: dict[str, Any],
    *,
    loss: str,
    temperature: float,
    sample_weights: str,
    store: str | Path,
    singleton_weight: float,
    section: str = "train_student",
) -> None:
    """Refuse (ConfigError naming `section.key`, the store and what to do) loss settings a
    store with these attributes cannot serve: `reverse_kl` on a sample store (draws say nothing
    of the teacher where the student puts mass), T != 1 or `inclusion` weights on a sample
    store that keeps no log-probabilities (format 2 written without `sample_logprobs`), and a
    `singleton_weight` below 1 with either (it shrinks the empirical estimator at T = 1)."""
    if attrs["method"] != "sample":
        return
    if loss == "reverse_kl":
        raise ConfigError(
            f"{section}.loss: reverse_kl needs the teacher's probability wherever the "
            f"student puts mass, but {store} is a 'sample' store (draws only); use loss: "
            "kl, or a topk store"
        )
    for key, value, ok in (
        ("temperature", temperature, 1.0),
        ("sample_weights", sample_weights, "empirical"),
    ):
        if value != ok and not has_logprobs(attrs):
            raise ConfigError(
                f"{section}.{key}: {value!r} needs the teacher's log-probabilities, "
                f"but {store} keeps ids and counts only (written with "
                f"teacher_logits.sample_logprobs: false); use {key}: {ok!r}, or re-run "
                "teacher_logits with sample_logprobs: true"
            )
        if value != ok and singleton_weight != 1.0:
            raise ConfigError(
                f"{section}.singleton_weight: {singleton_weight} shrinks the empirical "
                f"estimator at temperature 1, but {key} is {value!r}; set "
                f"singleton_weight: 1, or {key}: {ok!r}"
            )


def batch_loss(
    logits: torch.Tensor,
    batch: dict[str, torch.Tensor],
    settings: LossSettings,
    *,
    teacher_logits: torch.Tensor | None = None,
) -> LossParts:
    """The distillation loss of a batch of whole rows, as every trainer computes it.

    logits (B, L, V) are the student's on `batch["input_ids"]` (B, L); the batch holds the
    rows' stored labels as the readers decode them (`LOSS_ARGS`: ids, counts, logprobs
    (B, L, k); tail, entropy (B, L)), or the live teacher's `teacher_logits` (B, L, V) are
    given. Logits at position t predict token t + 1, and store position t holds the teacher's
    distribution for token t + 1: positions 0..L-2 are scored, so every term has a real next
    token. Labels are used only when alpha > 0. The one place that lines rows, labels and
    the loss up: our loop, the Hugging Face Trainer recipe and the public `DistillationLoss`
    call it, so their losses agree to the bit.
    """
    inp = batch["input_ids"]
    targets = inp[:, 1:].long()  # (B, L-1)
    kw: dict[str, Any] = {}
    if settings.alpha > 0 and teacher_logits is not None:
        kw["teacher_logits"] = teacher_logits[:, :-1]  # (B, L-1, V)
    elif settings.alpha > 0:
        kw["method"] = settings.method
        for name, arg in LOSS_ARGS.items():  # ids, counts, logprobs (B, L-1, k); tail (B, L-1)
            if name in batch:
                kw[arg] = batch[name].to(logits.device)[:, :-1]
    return distillation_loss(
        logits[:, :-1],  # (B, L-1, V)
        targets.to(logits.device),
        alpha=settings.alpha,
        temperature=settings.temperature,
        loss=settings.loss,
        tail=settings.tail,
        sample_weights=settings.sample_weights,
        sampling=settings.sampling,
        singleton_weight=settings.singleton_weight,
        **kw,
    )


@dataclass(frozen=True)
class StepResult:
    loss: float
    kd: float
    ce: float
    lr: float
    grad_norm: float


class StudentTrainer:
    """Optimizer, schedule and step for one student (see module docstring)."""

    def __init__(
        self,
        model: torch.nn.Module,
        settings: LossSettings,
        *,
        steps: int,
        learning_rate: float,
        warmup_steps: int,
        weight_decay: float,
        grad_clip: float,
        device: torch.device,
        teacher: torch.nn.Module | None = None,
    ) -> None:
        self.model, self.settings, self.device = model, settings, device
        self.teacher, self.grad_clip = teacher, grad_clip
        self.world = World()
        """The ranks this trainer trains with (`distribute`); one process by default."""
        self.forward_model: torch.nn.Module = model
        """What a training step runs: `model`, or its DDP wrapper on more than one rank."""
        self.optimizer, self.scheduler = adamw_with_schedule(
            model,
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            steps=steps,
        )

    def distribute(self, world: World) -> None:
        """Train data-parallel over `world` from now on (nothing changes for one process):
        wrap the model in DDP, whose construction is a collective (a broadcast of rank 0's
        weights), so every rank calls this at the same point, outside any agreed phase
        (`World.agree`), after the ranks hold the same weights."""
        self.world = world
        if world.size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=ids
            )

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast on CUDA; nothing on CPU (bf16 matmuls there are slow and inexact)."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(self, batch: dict[str, torch.Tensor]) -> StepResult:
        """One optimisation step on a batch from `pipeline.student.data.SoftLabelStream` (on
        several ranks: this rank's share of the global batch; every rank calls it)."""
        self.forward_model.train()
        nb = self.device.type == "cuda"
        batch = {name: t.to(self.device, non_blocking=nb) for name, t in batch.items()}
        teacher_logits = None
        if self.settings.alpha > 0 and self.teacher is not None:
            inp = batch["input_ids"].long()  # (B, L)
            with torch.no_grad(), self.autocast():
                teacher_logits = self.teacher(input_ids=inp).logits  # (B, L, V)
        with self.autocast():
            logits = self.forward_model(input_ids=batch["input_ids"].long()).logits  # (B, L, V)
        parts = batch_loss(logits, batch, self.settings, teacher_logits=teacher_logits)
        self.optimizer.zero_grad(set_to_none=True)
        parts.total.backward()  # on several ranks DDP averages the gradients here
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        loss, kd, ce = float(parts.total.detach()), float(parts.kd), float(parts.ce)
        if self.world.size > 1:  # the global batch's: the mean of equal shares' means
            loss, kd, ce = self.world.mean([loss, kd, ce])
        return StepResult(loss=loss, kd=kd, ce=ce, lr=float(lr), grad_norm=float(norm))

    @torch.inference_mode()
    def perplexity(self, rows: np.ndarray, *, batch_size: int) -> float:
        """exp(mean NLL) of the student predicting tokens 1..L-1 of each row of `rows` (N, L).

        Every row is scored independently, the convention of the teacher's and the evaluate
        stage's perplexities, so the numbers are comparable. On several ranks every rank must
        call it: each scores its share of every `batch_size` rows (`share_bounds`) and the
        NLL sums are added up over the ranks, so all return the same number.
        """
        self.model.eval()
        total, count = 0.0, 0
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            lo, hi = share_bounds(len(chunk), self.world.rank, self.world.size)
            if lo == hi:
                continue
            inp = torch.from_numpy(np.asarray(chunk[lo:hi], dtype=np.int64))
            inp = inp.to(self.device)  # (b, L)
            with self.autocast():
                logits = self.model(input_ids=inp).logits[:, :-1]  # (b, L-1, V)
            nll = target_nll(logits, inp[:, 1:])  # (b, L-1)
            total += float(nll.double().sum())
            count += nll.numel()
        if self.world.size > 1:
            total, summed = self.world.sum([total, count])
            count = int(summed)
        self.model.train()
        return math.exp(total / count) if count else float("nan")

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
