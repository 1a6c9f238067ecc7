"""Classification stores for any PyTorch trainer: rows of a corpus with the teacher's classes.

A classification store (classify_logits) holds the teacher's full class distribution per row
of a labeled corpus, matched to the corpus by row identity (language, id, text hash), never
by position alone. `ClassificationRows` reads a split of the corpus, refuses a store made for
other rows, labels or texts (`pipeline.classify.store.check_class_store`, which also checks
every shard's checksum), tokenizes each text as the classification stages do
(`pipeline.classify.inference.encode`) and serves row i as
`{"input_ids": (n_i,) int64, "teacher_logprobs": (C,) float32, "gold": () int64}`, where
`gold` is the row's class if its language's gold labels may be trained on (the store's
`gold` languages, unless `labeled_languages` says otherwise), else -1. Rows are ragged: batch
them with `Collator(pad_id=rows.pad_id)`. Everything is held in memory (C floats and one
short text per row), as the classify_student stage does; shard it with any sampler.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.classify.corpus import ClassifyCorpusConfig, LabeledCorpus, read_labeled_corpus
from pipeline.classify.inference import encode
from pipeline.classify.store import check_class_store, read_class_attrs
from pipeline.classify.student_data import read_soft_labels


def gold_languages(attrs: dict[str, Any]) -> list[str]:
    """The languages whose gold labels the store's teacher was trained on (source `gold`)."""
    return [lang for lang, source in attrs["sources"].items() if source == "gold"]


def _tokenizer(tokenizer: Any) -> Any:
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(tokenizer))
    return tokenizer


class ClassificationRows(Dataset):
    """Rows of one split of a labeled corpus with the store's class distributions (module
    docstring). `corpus`: a `LabeledCorpus`, or the corpus folder (train/dev/test files), read
    with the store's languages and `labels` (default `<corpus>/labels.txt`). `tokenizer`: a
    tokenizer or the folder of the student's tokenizer."""

    def __init__(
        self,
        store: str | Path,
        corpus: LabeledCorpus | str | Path,
        tokenizer: Any,
        *,
        split: str = "train",
        max_length: int = 64,
        labels: str | Path | None = None,
        labeled_languages: list[str] | None = None,
    ) -> None:
        attrs = read_class_attrs(store)
        labeled = list(labeled_languages or gold_languages(attrs))
        if not isinstance(corpus, LabeledCorpus):
            root = Path(corpus)
            corpus = read_labeled_corpus(
                ClassifyCorpusConfig(
                    path=str(root),
                    labels=str(labels or root / "labels.txt"),
                    languages=list(attrs["languages"]),
                    labeled_languages=labeled,
                )
            )
        check_class_store(store, corpus)
        if split not in corpus.splits:
            raise ValueError(f"unknown split {split!r} (the corpus has {sorted(corpus.splits)})")
        rows = corpus.splits[split]
        tok = _tokenizer(tokenizer)
        self.labels: list[str] = list(corpus.labels)
        """Class names, in class-index order."""
        self.lang: np.ndarray = rows.lang
        """(N,) language code of each row."""
        self.pad_id: int | None = tok.pad_token_id
        """The tokenizer's padding id, for `Collator(pad_id=...)`."""
        self.input_ids = encode(tok, rows.text, max_length)
        self.soft = read_soft_labels(store, rows)  # (N, C) float32
        self.gold = np.where(rows.gold_mask(labeled), rows.label, -1).astype(np.int64)  # (N,)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": torch.tensor(self.input_ids[index], dtype=torch.long),  # (n,)
            "teacher_logprobs": torch.from_numpy(self.soft[index]),  # (C,)
            "gold": torch.tensor(self.gold[index]),  # ()
        }
