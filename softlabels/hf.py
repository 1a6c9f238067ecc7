"""Hugging Face `Trainer` from a logits store: `DistillationTrainer`.

A `transformers.Trainer` whose loss is the store's distillation loss (`DistillationLoss` for
LM stores, `ClassDistillationLoss` for classification stores) instead of the model's own:
every optimiser, schedule, logging, checkpointing and launcher feature of `Trainer` stays.
Give it a row dataset (`SoftLabelDataset`, `SoftLabelRows` or `ClassificationRows`) and the
loss; it collates with `Collator` unless told otherwise. Any `AutoModelForCausalLM` with the
teacher's vocabulary trains from an LM store (any `AutoModelForSequenceClassification` with
the store's labels from a classification store).

What it sets, and why:
- `remove_unused_columns` off: the label fields are not arguments of the model's forward and
  `Trainer` would otherwise drop them before the loss sees them (a warning says so).
- the loss is a per-batch mean, so `Trainer` divides it by the gradient-accumulation steps
  (`loss_is_scaled_for_ga = False`).
- a `SoftLabelDataset` is read by one process: under several processes `Trainer`'s
  accelerate reads an iterable dataset on rank 0 and dispatches the batches, so the dataset
  is switched to share 0 of 1 (`with_ranks(0, 1)`), which covers the whole split.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn
from transformers import Trainer

from softlabels.data import Collator, SoftLabelDataset
from softlabels.loss import ClassDistillationLoss, DistillationLoss

log = logging.getLogger(__name__)


class DistillationTrainer(Trainer):
    """`Trainer(model, args, train_dataset=..., distillation=DistillationLoss(...))` (module
    docstring). The latest batch's loss parts are in `distillation.last`."""

    def __init__(
        self,
        *args: Any,
        distillation: DistillationLoss | ClassDistillationLoss,
        **kwargs: Any,
    ) -> None:
        if not isinstance(distillation, (DistillationLoss, ClassDistillationLoss)):
            raise TypeError("distillation must be a DistillationLoss or ClassDistillationLoss")
        data = kwargs.get("train_dataset")
        if isinstance(data, SoftLabelDataset) and data.world_size != 1:
            kwargs["train_dataset"] = data.with_ranks(0, 1)
        kwargs.setdefault("data_collator", Collator(pad_id=getattr(data, "pad_id", None)))
        super().__init__(*args, **kwargs)
        if self.args.remove_unused_columns:  # read when the dataloaders are built, later
            log.warning(
                "DistillationTrainer: setting TrainingArguments.remove_unused_columns=False "
                "(the soft-label fields are not model arguments and must reach the loss)"
            )
            self.args.remove_unused_columns = False
        self.distillation = distillation
        self.loss_is_scaled_for_ga = False  # a per-batch mean: Trainer divides by GA steps

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        """The distillation loss of `inputs` (a collated batch) under `model`."""
        forward = {"input_ids": inputs["input_ids"]}
        if "attention_mask" in inputs:
            forward["attention_mask"] = inputs["attention_mask"]
        outputs = model(**forward)
        loss = self.distillation(outputs.logits, inputs)
        return (loss, outputs) if return_outputs else loss
