"""softlabels: train students from a stored teacher pass with the trainer you already use.

The public API (stable names; everything under `pipeline` is internal):

    import softlabels as sl

    store = sl.open_store("data/logits/teacher.zarr")          # what it is, where it came from
    store.check(tokenizer="models/teacher", tokenized="data/tokenized", vocab_size=V)
    rows = sl.SoftLabelDataset(store.path, "data/tokenized", seed=0)   # sharded IterableDataset
    loader = DataLoader(rows, batch_size=32, collate_fn=sl.Collator())
    loss_fn = sl.DistillationLoss.from_store(store.path, alpha=1.0)
    for batch in loader:
        loss = loss_fn(student(input_ids=batch["input_ids"]).logits, batch)

- `open_store`, `Store`: a store's identity and the checks against your tokenizer, tokenized
  data, vocabulary and the recorded checksums (LM stores of formats 1 and 2, classification
  stores).
- `SoftLabelDataset` (sharded across DataLoader workers and distributed ranks) and
  `SoftLabelRows` (random access): token rows with their decoded soft labels;
  `ClassificationRows`: a classification store's rows with the corpus's texts; `Collator`.
- `DistillationLoss` / `distillation_loss` (LM) and `ClassDistillationLoss`: the losses of
  our own stages, so a loss computed here equals theirs.
- `DistillationTrainer` (`softlabels.hf`, imported on first use): a Hugging Face `Trainer`
  with that loss.

docs/api.md shows a plain PyTorch loop and the Hugging Face recipe; examples/hf-trainer runs it.
"""

from __future__ import annotations

from typing import Any

from pipeline import __version__
from softlabels.classification import ClassificationRows
from softlabels.data import Collator, SoftLabelDataset, SoftLabelRows
from softlabels.loss import ClassDistillationLoss, DistillationLoss, distillation_loss
from softlabels.store import Store, open_store

__all__ = [
    "ClassDistillationLoss",
    "ClassificationRows",
    "Collator",
    "DistillationLoss",
    "DistillationTrainer",
    "SoftLabelDataset",
    "SoftLabelRows",
    "Store",
    "__version__",
    "distillation_loss",
    "open_store",
]


def __getattr__(name: str) -> Any:
    if name == "DistillationTrainer":  # imports transformers.Trainer (and accelerate): lazy
        from softlabels.hf import DistillationTrainer

        return DistillationTrainer
    raise AttributeError(f"module 'softlabels' has no attribute {name!r}")
