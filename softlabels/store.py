"""Open a logits store and check it against what you will train with.

`open_store(path)` reads a store's attributes (LM token-level stores of formats 1 and 2, and
classification stores) into a `Store`: what it is (task, method, k, vocabulary, splits,
format) and where it came from (teacher, tokenizer, dataset fingerprints). `Store.check`
refuses, with one StoreError naming every differing field and what to do, a store that is
incomplete, made with another tokenizer or vocabulary, or from other token ids, and (by
default) one whose shard files do not match their recorded checksums. `Store.verify` is the
full audit of `softlabels verify` (every value decoded and range-checked), as a list of
problems.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.classify.store import check_class_store, is_class_store, verify_class_store
from pipeline.core.provenance import tokenizer_identity
from pipeline.store.format import read_attrs
from pipeline.store.labels import has_logprobs
from pipeline.store.verify import load_tokenizer_identity, verify_store
from pipeline.student.data import check_store


@dataclass(frozen=True)
class Store:
    """A logits store's identity (read-only; nothing is decoded until asked)."""

    path: Path
    attrs: dict[str, Any]
    """The store's `softlabels` attributes (docs/logits-store.md)."""

    @property
    def task(self) -> str:
        """`lm` (token-level soft labels) or `classification` (class distributions per row)."""
        return "classification" if is_class_store(self.attrs) else "lm"

    @property
    def format_version(self) -> int:
        return int(self.attrs["format_version"])

    @property
    def complete(self) -> bool:
        return self.attrs.get("complete") is True

    @property
    def splits(self) -> dict[str, int]:
        """Split name -> number of rows (sequences for LM stores, examples otherwise)."""
        return {name: int(s["n"]) for name, s in self.attrs["splits"].items()}

    @property
    def method(self) -> str | None:
        """`topk` or `sample` (LM stores); None for classification stores."""
        return self.attrs.get("method") if self.task == "lm" else None

    @property
    def k(self) -> int | None:
        """Ids per position (LM stores)."""
        return int(self.attrs["k"]) if self.task == "lm" else None

    @property
    def vocab_size(self) -> int | None:
        """The teacher's vocabulary size (LM stores): the student's must equal it."""
        return int(self.attrs["teacher"]["vocab_size"]) if self.task == "lm" else None

    @property
    def has_logprobs(self) -> bool:
        """Whether the teacher's log-probabilities are kept (needed for T != 1 on sample
        stores); classification stores always keep their full distributions."""
        return self.task == "classification" or has_logprobs(self.attrs)

    @property
    def labels(self) -> list[str] | None:
        """Class names in class-index order (classification stores)."""
        return list(self.attrs["labels"]) if self.task == "classification" else None

    def check(
        self,
        *,
        tokenizer: Any = None,
        tokenized: str | Path | None = None,
        vocab_size: int | None = None,
        corpus: Any = None,
        checksums: bool = True,
    ) -> Store:
        """Refuse (StoreError, one line naming every problem and what to do) a store this
        consumer must not train on; return self when it is usable.

        LM stores: complete and readable by this release; `tokenizer` (a tokenizer, or its
        folder) the teacher's; `tokenized` (the tokenize stage's DatasetDict folder) the token
        ids the store was computed from, split by split; `vocab_size` (your student's) the
        teacher's; with `checksums`, every shard file of every split matches its sha256.
        Classification stores: `corpus` (a `pipeline.classify.corpus.LabeledCorpus`) is
        compared row by row (`check_class_store`, checksums included).
        """
        if self.task == "classification":
            if corpus is None:
                raise ValueError("checking a classification store needs corpus=LabeledCorpus")
            check_class_store(self.path, corpus)
            return self
        if isinstance(tokenizer, (str, Path)):
            identity = load_tokenizer_identity(tokenizer)
        else:
            identity = None if tokenizer is None else tokenizer_identity(tokenizer)
        check_store(
            self.path,
            tokenized=tokenized,
            tokenizer_identity=identity,
            vocab_size=vocab_size,
            splits=list(self.splits),
            purpose="use",
            checksums=checksums,
        )
        return self

    def verify(self, *, tokenizer: str | Path | None = None, tokenized: Any = None) -> list[str]:
        """Every problem `softlabels verify` finds (all values decoded); [] when none."""
        if self.task == "classification":
            return verify_class_store(self.path, tokenized)
        return verify_store(self.path, tokenizer=tokenizer, tokenized=tokenized)


def open_store(path: str | Path) -> Store:
    """The store at `path` (StoreError if it is missing or not a softlabels store)."""
    return Store(Path(path), read_attrs(path))
