"""Tiny, hermetic inputs for the classification task's tests: a slice of the bundled SIB-200
corpus, a tiny random sequence classifier saved like `classify_teacher` saves one, and configs."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import REPO

SIB200 = REPO / "data" / "corpora" / "sib200"
LANGS = ["de", "en", "ja"]


def write_sib_slice(
    root: Path, langs: list[str] = LANGS, per_split: dict[str, int] | None = None
) -> Path:
    """Copy the first rows per language of each SIB-200 split (and labels.txt) into `root`."""
    per_split = per_split or {"train": 24, "dev": 8, "test": 8}
    root.mkdir(parents=True, exist_ok=True)
    for split, n in per_split.items():
        kept: dict[str, int] = {}
        lines = []
        with open(SIB200 / f"{split}.jsonl", encoding="utf-8") as f:
            for line in f:
                rec = json.loads(line)
                if rec["lang"] in langs and kept.get(rec["lang"], 0) < n:
                    kept[rec["lang"]] = kept.get(rec["lang"], 0) + 1
                    lines.append(line)
        (root / f"{split}.jsonl").write_text("".join(lines), encoding="utf-8")
    (root / "labels.txt").write_text((SIB200 / "labels.txt").read_text("utf-8"), "utf-8")
    return root


def corpus_config(root: Path, langs: list[str] = LANGS, labeled: list[str] | None = None):
    """A ClassifyCorpusConfig over a slice written by `write_sib_slice`."""
    from pipeline.classify.corpus import ClassifyCorpusConfig

    return ClassifyCorpusConfig(
        path=str(root),
        labels=str(root / "labels.txt"),
        languages=list(langs),
        labeled_languages=labeled or ["en"],
    )


def labels_of(root: Path) -> list[str]:
    return (root / "labels.txt").read_text("utf-8").split()


def make_classifier(
    out: Path, tokenizer, labels: list[str], *, hidden: int = 32, seed: int = 0
) -> Path:
    """Save a tiny random LlamaForSequenceClassification + tokenizer + provenance.json."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from pipeline.core.provenance import PROVENANCE_FILE, files_sha256, write_json

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    model = LlamaForSequenceClassification(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    digest, files = files_sha256(out)
    write_json(
        out / PROVENANCE_FILE,
        {
            "name": "tiny-test-classifier",
            "revision": "local",
            "sha256": digest,
            "files": files,
            "architecture": "LlamaForSequenceClassification",
            "num_labels": len(labels),
            "labels": labels,
        },
    )
    return out
