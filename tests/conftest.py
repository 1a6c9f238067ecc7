"""Shared fixtures: tiny tokenizers, teachers and corpora built offline in a temp dir.

Nothing here downloads anything: tokenizers are trained on a few lines of the sample corpus in
well under a second and models are built from configs, saved with `save_pretrained` and loaded
back by path, exactly as the stages load real ones.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "corpora" / "sample"

# The suite runs on pytest-xdist workers (`-n auto --dist loadfile` in pyproject.toml): each
# worker gets an equal share of the cores for torch and for the stage processes it starts, so
# workers never oversubscribe the machine (which slows torch several-fold).
if os.environ.get("PYTEST_XDIST_WORKER"):
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    _threads = str(max(1, (os.cpu_count() or 1) // _workers))
    os.environ["OMP_NUM_THREADS"] = _threads
    os.environ["MKL_NUM_THREADS"] = _threads

FIRST = ("test_dvc_workflows.py",)
"""Modules that take minutes: scheduled first, so the other workers run everything else meanwhile
rather than waiting on them at the end."""


def pytest_collection_modifyitems(config, items) -> None:
    items.sort(key=lambda item: item.path.name not in FIRST)  # stable: order kept otherwise


def stage_module(name: str) -> ModuleType:
    """`pipeline.stages.<name>` imported in-process: its `main(argv)` runs without an
    interpreter start-up (a subprocess test is kept for what only a fresh process shows)."""
    return importlib.import_module(f"pipeline.stages.{name}")


def write_corpus(root: Path, langs: dict[str, list[str]]) -> Path:
    """A folder of <lang>.txt files, one document per line."""
    root.mkdir(parents=True, exist_ok=True)
    for lang, lines in langs.items():
        (root / f"{lang}.txt").write_text("".join(line + "\n" for line in lines), "utf-8")
    return root


def sample_lines(lang: str, n: int) -> list[str]:
    """The first `n` documents of a sample-corpus language."""
    return (SAMPLE / f"{lang}.txt").read_text("utf-8").splitlines()[:n]


def make_tokenizer(texts: list[str], vocab_size: int = 300):
    """A byte-level BPE `PreTrainedTokenizerFast` with EOS `<|endoftext|>` and a pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<pad>"
    )


def make_teacher(
    out: Path, tokenizer, *, hidden: int = 32, layers: int = 1, context: int = 256
) -> Path:
    """Save a tiny random Llama + tokenizer + provenance.json to `out`, as prepare_teacher would."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline import __version__
    from pipeline.core.provenance import (
        PROVENANCE_FILE,
        files_sha256,
        tokenizer_identity,
        write_json,
    )

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=context,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    digest, files = files_sha256(out)
    write_json(
        out / PROVENANCE_FILE,
        {
            "name": "tiny-test-teacher",
            "revision": "local",
            "sha256": digest,
            "files": files,
            "architecture": "LlamaForCausalLM",
            "vocab_size": config.vocab_size,
            "max_position_embeddings": context,
            "tokenizer": tokenizer_identity(tokenizer),
            "softlabels_version": __version__,
        },
    )
    return out


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """Three languages, 60 documents each, from the sample corpus."""
    root = tmp_path_factory.mktemp("corpus")
    return write_corpus(root, {lang: sample_lines(lang, 60) for lang in ("en", "de", "zh")})


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_corpus):
    texts = [
        line
        for p in sorted(tiny_corpus.glob("*.txt"))
        for line in p.read_text("utf-8").splitlines()
    ]
    return make_tokenizer(texts)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, tiny_tokenizer) -> Path:
    """A prepared teacher folder (tiny Llama, context 256) with provenance.json."""
    return make_teacher(tmp_path_factory.mktemp("teacher") / "teacher", tiny_tokenizer)
