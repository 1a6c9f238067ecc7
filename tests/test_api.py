"""The public API (`import softlabels`): store handle and checks, row datasets and their
sharding, collator, losses (equal to our own loop's), Hugging Face Trainer, and the docs'
plain PyTorch loop and the HF example script run as written."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import softlabels as sl
from pipeline.core.errors import ConfigError, StoreError
from pipeline.student.trainer import LossSettings, StudentTrainer
from tests.conftest import REPO
from tests.store_fixtures import (
    SIZES,
    K,
    V,
    build_store,
    flip_bytes,
    make_attrs,
    make_data,
    make_tokenized,
    make_tokenizer,
)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """The default project's layout: a format-2 sample store, its tokenized data, the teacher's
    tokenizer, and a tiny student saved by path."""
    root = tmp_path_factory.mktemp("api")
    identity = make_tokenizer(root / "models" / "teacher")
    data = make_data("sample")
    make_tokenized(root / "data" / "tokenized", data)
    store = root / "data" / "logits" / "teacher.zarr"
    build_store(store, data, attrs=make_attrs(data, identity, method="sample"), method="sample")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    LlamaForCausalLM(config).save_pretrained(root / "student")
    return {"root": root, "store": store, "tokenized": root / "data" / "tokenized", "data": data}


def test_open_store_reports_what_the_store_is(project):
    store = sl.open_store(project["store"])
    assert (store.task, store.method, store.k, store.vocab_size) == ("lm", "sample", K, V)
    assert store.splits == SIZES and store.format_version == 2 and store.complete
    assert store.has_logprobs is False and store.labels is None
    with pytest.raises(StoreError, match="no-such.zarr"):
        sl.open_store(project["root"] / "no-such.zarr")


def test_check_accepts_the_matching_inputs_and_names_each_mismatch(project, tmp_path):
    root = project["root"]
    store = sl.open_store(project["store"])
    assert store.check(
        tokenizer=root / "models/teacher", tokenized=project["tokenized"], vocab_size=V
    )
    with pytest.raises(StoreError, match=r"refusing to use .*teacher\.vocab_size differs"):
        store.check(vocab_size=V + 1)
    make_tokenized(tmp_path / "other", make_data("sample", seed=9))
    with pytest.raises(StoreError, match=r"dataset\.splits\.train\.fingerprint differs"):
        store.check(tokenized=tmp_path / "other")
    make_tokenizer(tmp_path / "tok", shift=3)
    with pytest.raises(StoreError, match=r"tokenizer\.sha256 differs"):
        store.check(tokenizer=tmp_path / "tok")
    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(project["store"], damaged)
    flip_bytes(next((damaged / "train" / "id_deltas").rglob("c/*/*/*")))
    with pytest.raises(StoreError, match=r"train/id_deltas/2: checksum mismatch"):
        sl.open_store(damaged).check()
    with pytest.raises(StoreError, match=r"dataset\.splits\.train\.fingerprint differs"):
        sl.SoftLabelDataset(project["store"], tmp_path / "other")


def _check_row(item: dict, data, split: str) -> int:
    """The row index of `item` (by its token ids), after checking its labels are that row's."""
    tokens = data[split][0]
    row = int(np.flatnonzero((tokens == item["input_ids"].numpy()).all(axis=1))[0])
    raw = data[split][1][row]  # (L, k) the draws
    ids, counts = item["ids"].numpy(), item["counts"].numpy()
    assert ids.shape == counts.shape == raw.shape
    for t in range(raw.shape[0]):
        got = {int(i): int(c) for i, c in zip(ids[t], counts[t], strict=True) if c > 0}
        want = dict(zip(*np.unique(raw[t], return_counts=True), strict=True))
        assert got == {int(i): int(c) for i, c in want.items()}
    assert item["entropy"].shape == (raw.shape[0],)
    return row


def test_dataset_shards_disjoint_rows_over_ranks_and_workers_with_their_labels(project):
    seen = []
    for rank in range(2):
        rows = sl.SoftLabelDataset(
            project["store"], project["tokenized"], seed=3, epochs=1, rank=rank, world_size=2
        )
        loader = DataLoader(rows, batch_size=None, num_workers=2)
        seen += [_check_row(item, project["data"], "train") for item in loader]
    assert sorted(seen) == list(range(SIZES["train"]))  # every row once, no overlap
    # Endless by default; a pure function of the seed.
    a = sl.SoftLabelDataset(project["store"], project["tokenized"], seed=3)
    b = sl.SoftLabelDataset(project["store"], project["tokenized"], seed=3)
    first = [x["input_ids"] for _, x in zip(range(25), a, strict=False)]
    again = [x["input_ids"] for _, x in zip(range(25), b, strict=False)]
    assert len(first) == 25 and all(torch.equal(x, y) for x, y in zip(first, again, strict=True))
    ordered = sl.SoftLabelDataset(
        project["store"], project["tokenized"], split="validation", epochs=1, shuffle=False
    )
    assert [_check_row(x, project["data"], "validation") for x in ordered] == [0, 1, 2]
    with pytest.raises(ValueError, match="rank must be in"):
        sl.SoftLabelDataset(project["store"], project["tokenized"], rank=2, world_size=2)


def test_rows_give_random_access_to_the_same_rows(project):
    rows = sl.SoftLabelRows(project["store"], project["tokenized"])
    assert len(rows) == SIZES["train"]
    for i in (7, 0, 9, 1, -1):
        assert _check_row(rows[i], project["data"], "train") == i % SIZES["train"]
    with pytest.raises(IndexError, match="row 10 out of range"):
        rows[10]


def test_collator_stacks_and_pads_ragged_rows_only_with_a_pad_id():
    rows = [
        {"input_ids": torch.tensor([5, 6, 7]), "gold": 2},
        {"input_ids": torch.tensor([8]), "gold": -1},
    ]
    batch = sl.Collator(pad_id=0)(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["gold"].tolist() == [2, -1] and batch["input_ids"].dtype == torch.long
    with pytest.raises(ValueError, match=r"Collator\(pad_id=tokenizer.pad_token_id\)"):
        sl.Collator()(rows)


def test_loss_refuses_settings_the_store_cannot_serve(project):
    with pytest.raises(ConfigError, match=r"DistillationLoss\.temperature: 2\.0 needs the teacher"):
        sl.DistillationLoss.from_store(project["store"], temperature=2.0)
    with pytest.raises(ConfigError, match=r"DistillationLoss\.loss: reverse_kl"):
        sl.DistillationLoss.from_store(project["store"], loss="reverse_kl")
    with pytest.raises(ValueError, match="unknown tail"):
        sl.DistillationLoss(method="topk", tail="drop")


def test_hf_trainer_matches_our_loop_at_step_1_and_the_loss_falls(project, tmp_path):
    from transformers import AutoModelForCausalLM, TrainingArguments

    seen = {}

    class Recording(sl.DistillationTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if "batch" not in seen:
                seen["batch"] = {k: v.detach().clone() for k, v in inputs.items()}
                seen["loss"] = float(loss.detach())
            return loss

    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=8,
        per_device_train_batch_size=4,
        learning_rate=2e-2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
    )
    assert args.remove_unused_columns  # Trainer's default, which would drop the label fields
    student = AutoModelForCausalLM.from_pretrained(project["root"] / "student")
    loss = sl.DistillationLoss.from_store(project["store"], alpha=0.5)
    trainer = Recording(
        model=student,
        args=args,
        train_dataset=sl.SoftLabelDataset(project["store"], project["tokenized"], seed=0),
        distillation=loss,
    )
    trainer.train()
    # Our own loop on the same first batch, from the same initial weights.
    ours = StudentTrainer(
        AutoModelForCausalLM.from_pretrained(project["root"] / "student"),
        LossSettings(alpha=0.5, temperature=1.0, loss="kl", tail="bucket", method="sample"),
        steps=8,
        learning_rate=2e-2,
        warmup_steps=0,
        weight_decay=0.0,
        grad_clip=1.0,
        device=torch.device("cpu"),
    )
    assert ours.step(seen["batch"]).loss == pytest.approx(seen["loss"], rel=1e-6, abs=1e-6)
    with torch.no_grad():
        after = loss(student(input_ids=seen["batch"]["input_ids"]).logits, seen["batch"])
    assert float(after) < seen["loss"]
    logged = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(logged) == 8 and logged[0] == pytest.approx(seen["loss"], abs=1e-3)


def test_hf_example_script_runs_as_written(project, tmp_path):
    root = project["root"]
    out = tmp_path / "hf-student"
    run = subprocess.run(
        [
            sys.executable,
            str(REPO / "examples" / "hf-trainer" / "train.py"),
            "--store", str(project["store"]),
            "--tokenized", str(project["tokenized"]),
            "--tokenizer", str(root / "models" / "teacher"),
            "--student", str(root / "student"),
            "--out", str(out),
            "--max-steps", "4",
            "--batch-size", "4",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(json.loads((out / "distill_log.json").read_text())["loss"]) == 4
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()


def test_plain_pytorch_loop_in_the_docs_runs_as_written(project):
    doc = (REPO / "docs" / "api.md").read_text("utf-8")
    code = re.search(r"<!-- api-example: plain-pytorch -->\n```python\n(.*?)```", doc, re.S)[1]
    assert len(code.strip().splitlines()) <= 40
    run = subprocess.run(
        [sys.executable, "-c", code],
        cwd=project["root"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    first, last = map(
        float, re.search(r"step 1 loss (-?[\d.]+), step 20 loss (-?[\d.]+)", run.stdout).groups()
    )
    assert last < first


def test_classification_rows_and_loss(tmp_path):
    from pipeline.classify.corpus import read_labeled_corpus
    from tests.conftest import make_tokenizer as corpus_tokenizer
    from tests.test_classify_student import LANGS, corpus_cfg, make_store, write_slice

    root = write_slice(tmp_path / "corpus", LANGS, {"train": 6, "dev": 3, "test": 2})
    corpus = read_labeled_corpus(corpus_cfg(root))
    tok = corpus_tokenizer([t for rows in corpus.splits.values() for t in rows.text], 300)
    tok.save_pretrained(tmp_path / "tok")
    store = make_store(tmp_path / "classify.zarr", corpus)
    handle = sl.open_store(store)
    assert handle.task == "classification" and handle.labels == corpus.labels
    assert handle.check(corpus=corpus) is handle
    rows = sl.ClassificationRows(store, root, tmp_path / "tok", max_length=16)
    train = corpus.splits["train"]
    assert len(rows) == len(train)
    gold = [int(rows[i]["gold"]) for i in range(len(rows))]
    assert gold == [
        int(lab) if lang == "en" else -1 for lang, lab in zip(train.lang, train.label, strict=True)
    ]
    batch = sl.Collator(pad_id=rows.pad_id)([rows[i] for i in range(4)])
    assert batch["teacher_logprobs"].shape == (4, len(corpus.labels))
    assert batch["attention_mask"].shape == batch["input_ids"].shape
    logits = torch.zeros(4, len(corpus.labels), requires_grad=True)
    loss = sl.ClassDistillationLoss(alpha=0.5, temperature=2.0)(logits, batch)
    loss.backward()
    assert torch.isfinite(loss) and logits.grad.abs().sum() > 0
    other = write_slice(tmp_path / "other", LANGS, {"train": 5, "dev": 3, "test": 2})
    with pytest.raises(
        StoreError, match=r"classify.zarr: split 'train' has 18 rows in the store, 15 in the corpus"
    ):
        sl.ClassificationRows(store, other, tmp_path / "tok")
