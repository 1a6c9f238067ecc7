"""Fault injection: damaged stores of every kind are refused before training or scoring.

A store copied from another team may have a shard deleted, truncated or corrupted, or its
attributes edited to disagree with its arrays. Every consumer (LM student, evaluate,
classification student) must refuse it before its first step, with one line naming the shard
and what to do; values that pass the checksums but are impossible (a buggy writer) stop the
reader at the chunk, also in one line. Nothing is written for a refused run.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.core.errors import StoreError
from pipeline.store.format import SplitSpec, shard_files, write_shard
from pipeline.student.train_student import TrainStudentConfig, run_train_student
from tests.store_fixtures import (
    SPEC,
    build_store,
    make_attrs,
    make_data,
    make_tokenized,
    shard_rows,
    spec_for,
)
from tests.store_fixtures import make_tokenizer as make_wordlevel

TINY = dict(
    num_layers=1,
    hidden_size=16,
    num_heads=2,
    intermediate_size=32,
    steps=4,
    batch_size=4,
    warmup_steps=1,
    eval_every=0,
    checkpoint_every=0,
    log_every=2,
)
ADVICE = (
    "the store is damaged: pull or copy it again (`dvc pull`), or rebuild it (`dvc repro` its "
    "capture stage); `softlabels verify` lists every problem"
)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tokenizer, a tokenized dataset and a sound sample store made from it."""
    root = tmp_path_factory.mktemp("faults")
    identity = make_wordlevel(root / "tok")
    data = make_data("sample")
    make_tokenized(root / "tokenized", data)
    build_store(
        root / "good.zarr",
        data,
        attrs=make_attrs(data, identity, "sample"),
        method="sample",
        logprobs=True,  # every array a sample store can have
    )
    return root


def paths(env: Path, tmp: Path, store: Path) -> dict:
    return dict(
        tokenized=env / "tokenized",
        logits=store,
        tokenizer=env / "tok",
        out=tmp / "student",
        metrics=tmp / "metrics.json",
        checkpoints=tmp / "work",
        live_dir=tmp / "dvclive",
    )


def copy(env: Path, tmp: Path) -> Path:
    return Path(shutil.copytree(env / "good.zarr", tmp / "copy.zarr"))


def shard(store: Path, array: str, split: str = "train", index: int = 1) -> Path:
    return shard_files(store, split, index, (array,))[f"{split}/{array}/{index}"]


def truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def corrupt(file: Path) -> None:
    raw = bytearray(file.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    file.write_bytes(bytes(raw))


def edit_attrs(store: Path, **changes) -> None:
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"]["softlabels"].update(changes)
    (store / "zarr.json").write_text(json.dumps(meta))


def refuse(env: Path, tmp: Path, store: Path, *, before_training: bool = True) -> str:
    """Run the student on `store`; return its StoreError after checking that no student or
    metrics were written (and, refused before training, not even curves or checkpoints)."""
    p = paths(env, tmp, store)
    with pytest.raises(StoreError) as e:
        run_train_student(TrainStudentConfig(**TINY), **p, progress=False)
    assert not p["out"].exists() and not p["metrics"].exists()
    if before_training:
        assert not p["live_dir"].exists() and not p["checkpoints"].exists()
    return str(e.value)


@pytest.mark.parametrize("array", ["logprobs", "id_deltas", "extra_draws", "tail", "entropy"])
def test_a_deleted_shard_is_refused_before_training(env, tmp_path, array):
    store = copy(env, tmp_path)
    file = shard(store, array)
    file.unlink()
    assert refuse(env, tmp_path, store) == (
        f"{store}: refusing to train from this store: train/{array}/1: shard file missing "
        f"({file}); {ADVICE}"
    )


@pytest.mark.parametrize("damage", [truncate, corrupt], ids=["truncated", "corrupt"])
def test_damaged_bytes_are_refused_before_training(env, tmp_path, damage):
    store = copy(env, tmp_path)
    damage(shard(store, "logprobs", index=2))
    message = refuse(env, tmp_path, store)
    assert message.startswith(
        f"{store}: refusing to train from this store: train/logprobs/2: checksum mismatch"
    )
    assert message.endswith(f"the file is corrupt or truncated; {ADVICE}")


def test_attributes_edited_to_disagree_with_the_arrays_are_refused(env, tmp_path):
    store = copy(env, tmp_path)
    edit_attrs(store, k=SPEC.k // 2)
    n, seq = SPEC.split("train").n, SPEC.split("train").seq_len
    assert refuse(env, tmp_path, store) == (
        f"{store}: refusing to train from this store: train/id_deltas: shape is ({n}, {seq}, "
        f"{SPEC.k}) but the attributes imply ({n}, {seq}, {SPEC.k // 2}) (and 8 more problems); "
        f"{ADVICE}"
    )


def test_a_shard_without_a_recorded_checksum_is_refused(env, tmp_path):
    store = copy(env, tmp_path)
    meta = json.loads((store / "zarr.json").read_text())
    del meta["attributes"]["softlabels"]["shards"]["train/id_deltas/0"]
    (store / "zarr.json").write_text(json.dumps(meta))
    assert refuse(env, tmp_path, store) == (
        f"{store}: refusing to train from this store: 1 shard files have no recorded checksum "
        f"(first: train/id_deltas/0), so they cannot be trusted; {ADVICE}"
    )


def _rewrite(store: Path, split: str, index: int, edit) -> None:
    """Rewrite one shard through the writer (so its files are well-formed) with edited values,
    and record the new checksums: what a buggy writer would produce."""
    data = make_data("sample")
    spec = spec_for("sample", logprobs=True)
    rows = [a.copy() for a in shard_rows(data, split, index, spec)]
    edit(rows)
    sums = write_shard(store, spec, split, index, *rows)
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"]["softlabels"]["shards"].update(sums)
    (store / "zarr.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "what,edit",
    [
        ("logprobs not finite or > 0", lambda r: r[2].__setitem__((0, 3, 1), np.nan)),
        ("ids outside [0, 50)", lambda r: r[1].__setitem__((1, 2, 0), 60)),
        ("tail values NaN or > 0", lambda r: r[3].__setitem__((0, 0), np.nan)),
        ("entropy not finite or < 0", lambda r: r[4].__setitem__((1, 5), -np.inf)),
    ],
)
def test_impossible_values_stop_the_reader_at_their_shard(env, tmp_path, what, edit):
    store = copy(env, tmp_path)
    _rewrite(store, "train", 1, edit)
    message = refuse(env, tmp_path, store, before_training=False)
    a, b = SPEC.shards("train")[1]
    assert message.startswith(f"{store}: train shard 1 (rows {a}:")
    assert what in message and message.endswith(ADVICE)
    assert "\n" not in message


def test_the_stage_script_refuses_a_damaged_store_in_one_line(env, tmp_path):
    store = copy(env, tmp_path)
    corrupt(shard(store, "id_deltas", index=0))
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"train_student": TINY}))
    p = paths(env, tmp_path, store)
    argv = [sys.executable, "-m", "pipeline.stages.train_student", "--params", str(params)]
    for flag in ("tokenized", "logits", "tokenizer", "out", "metrics", "checkpoints"):
        argv += [f"--{flag}", str(p[flag])]
    run = subprocess.run(argv + ["--no-progress"], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"error: {store}: refusing to train from this store: train/id_deltas/0: "
    )
    assert not p["out"].exists() and not p["metrics"].exists()


def test_worker_errors_reach_the_user_as_their_own_line(env, tmp_path):
    """With DataLoader workers the reader's StoreError crosses a process boundary; the stage
    still prints only its message."""
    from pipeline.core.errors import user_message

    store = copy(env, tmp_path)
    _rewrite(store, "train", 0, lambda r: r[2].__setitem__((0, 0, 0), np.inf))
    p = paths(env, tmp_path, store)
    cfg = TrainStudentConfig(**{**TINY, "num_workers": 1})
    with pytest.raises(StoreError) as e:
        run_train_student(cfg, **p, progress=False)
    message = user_message(e.value)
    assert message.startswith(f"{store}: train shard 0 (rows 0:")
    assert "\n" not in message and message.endswith(ADVICE)


def test_evaluate_refuses_a_damaged_validation_shard(env, tmp_path):
    from pipeline.data.tokenized import load_tokenized
    from pipeline.evaluate.evaluate import check_store

    store = copy(env, tmp_path)
    truncate(shard(store, "tail", "validation", 0))
    rows = load_tokenized(env / "tokenized", ["validation"])["validation"].input_ids
    with pytest.raises(StoreError) as e:
        check_store(store, rows)
    assert str(e.value).startswith(
        f"{store}: refusing to evaluate against this store: validation/tail/0: checksum mismatch"
    )


def test_a_sound_store_passes_and_unused_splits_are_not_read(env, tmp_path):
    """The student reads only `train`: damage in `validation` is for evaluate to refuse."""
    from pipeline.store.format import StoreSpec, read_attrs
    from pipeline.store.integrity import check_integrity

    store = copy(env, tmp_path)
    attrs = read_attrs(store)
    spec = StoreSpec.from_attrs(attrs)
    check_integrity(store, spec, attrs)  # sound: no error
    shard(store, "id_deltas", "validation", 0).unlink()
    check_integrity(store, spec, attrs, ["train"])
    with pytest.raises(StoreError, match="validation/id_deltas/0: shard file missing"):
        check_integrity(store, spec, attrs, ["validation"])
    assert spec.split("train") == SplitSpec("train", 10, 8)
