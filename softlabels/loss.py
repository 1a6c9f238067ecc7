"""The distillation losses as functions and `nn.Module`s, for batches of stored soft labels.

`DistillationLoss` (token-level, LM stores) takes the student's logits (B, L, V) on a batch's
`input_ids` (B, L) and the batch's labels as `SoftLabelDataset`/`SoftLabelRows` + `Collator`
produce them, lines positions up (logits at t predict token t + 1, store position t holds the
teacher's distribution for token t + 1: positions 0..L-2 are scored) and returns
alpha * T^2 * KD + (1 - alpha) * CE. It is the computation of the train_student stage
(`pipeline.student.trainer.batch_loss`), so its value equals our own loop's to the bit; the
estimators are described in `pipeline.student.losses`.

`ClassDistillationLoss` (classification stores) is the classify_student stage's loss:
alpha * CE(gold) + (1 - alpha) * T^2 * KL over the classes. Note the two `alpha`s: each is
its stage's params key of the same name (LM: the KD weight; classification: the gold-label
weight), so a setting moves between params.yaml and code unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor, nn

from pipeline.store.format import LEGACY_SAMPLING, read_attrs, sampling_of
from pipeline.student.losses import (
    SINGLETON_WEIGHT,
    LossParts,
    check_options,
    check_singleton_weight,
    classification_kd_loss,
)
from pipeline.student.trainer import LossSettings, batch_loss, check_loss_for_store


class DistillationLoss(nn.Module):
    """Token-level distillation from stored soft labels (module docstring).

    method: the store's (`topk` or `sample`; `from_store` reads it). alpha, temperature, loss
    (`kl` | `reverse_kl`), tail (`renorm` | `bucket` | `ignore`, top-k stores) and
    sample_weights (`empirical` | `inclusion`) and singleton_weight (sample stores) mean what
    the `train_student` params of the same names mean (docs/train-student.md); sampling is a sample store's
    attribute (`systematic` | `iid`, which the inclusion weights depend on; `from_store`
    reads it). `forward` returns the scalar loss;
    `last` keeps the detached parts (total, kd, ce) of the latest call for logging.
    """

    def __init__(
        self,
        *,
        method: str,
        alpha: float = 1.0,
        temperature: float = 1.0,
        loss: str = "kl",
        tail: str = "bucket",
        sample_weights: str = "empirical",
        sampling: str = LEGACY_SAMPLING,
        singleton_weight: float = SINGLETON_WEIGHT,
    ) -> None:
        super().__init__()
        check_options(loss=loss, tail=tail, method=method, temperature=temperature)
        if method == "sample":
            check_singleton_weight(
                singleton_weight, temperature=temperature, weights=sample_weights
            )
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.settings = LossSettings(
            alpha=alpha,
            temperature=temperature,
            loss=loss,
            tail=tail,
            method=method,
            sample_weights=sample_weights,
            sampling=sampling,
            singleton_weight=singleton_weight,
        )
        self.last: LossParts | None = None

    @classmethod
    def from_store(cls, store: str | Path, **settings: Any) -> DistillationLoss:
        """The loss for this store: its method, after refusing settings the store cannot
        serve (ConfigError: reverse_kl on a sample store; T != 1 or inclusion weights on a
        sample store without log-probabilities)."""
        attrs = read_attrs(store)
        check_loss_for_store(
            attrs,
            loss=settings.get("loss", "kl"),
            temperature=settings.get("temperature", 1.0),
            sample_weights=settings.get("sample_weights", "empirical"),
            singleton_weight=settings.get("singleton_weight", SINGLETON_WEIGHT),
            store=store,
            section="DistillationLoss",
        )
        sampling = sampling_of(attrs) or LEGACY_SAMPLING  # topk stores: not used
        return cls(method=attrs["method"], sampling=sampling, **settings)

    def forward(
        self,
        logits: Tensor,
        batch: dict[str, Tensor],
        teacher_logits: Tensor | None = None,
    ) -> Tensor:
        """logits (B, L, V) of the student on batch["input_ids"] (B, L); the batch's stored
        labels, or a live teacher's logits (B, L, V). Returns the scalar loss."""
        self.last = batch_loss(logits, batch, self.settings, teacher_logits=teacher_logits)
        return self.last.total


def distillation_loss(
    logits: Tensor, batch: dict[str, Tensor], *, method: str, **settings: Any
) -> LossParts:
    """`DistillationLoss(method=..., **settings)(logits, batch)` as a function, with its parts."""
    module = DistillationLoss(method=method, **settings)
    module(logits, batch)
    assert module.last is not None
    return module.last


class ClassDistillationLoss(nn.Module):
    """Sequence-classification distillation: alpha * CE(gold) + (1 - alpha) * T^2 * KL.

    `forward(logits (B, C), batch)` reads batch["teacher_logprobs"] (B, C) and batch["gold"]
    (B,) (-1 where a row has no usable gold label); see
    `pipeline.student.losses.classification_kd_loss`. `last` keeps the detached parts.
    """

    def __init__(self, *, alpha: float = 0.1, temperature: float = 2.0) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.alpha, self.temperature = alpha, temperature
        self.last: dict[str, Tensor] | None = None

    def forward(self, logits: Tensor, batch: dict[str, Tensor]) -> Tensor:
        total, parts = classification_kd_loss(
            logits,
            batch.get("teacher_logprobs"),
            batch["gold"].to(logits.device),
            alpha=self.alpha,
            temperature=self.temperature,
        )
        self.last = parts
        return total
