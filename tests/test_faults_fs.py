"""Fault injection: the user's filesystem and damaged records give one line, never a traceback.

Disk full, read-only or permission-denied outputs, an output path under a regular file, a
teacher folder whose provenance.json is malformed or incomplete, and errors raised inside
DataLoader workers all reach the user as `error: <one line>` with exit status 1, and leave no
temporary file behind.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from pipeline.core.atomic import atomic_dir, check_destinations
from pipeline.core.errors import InputError, StoreError, user_message
from pipeline.core.provenance import LM_TEACHER_KEYS, read_provenance, write_json
from pipeline.core.stage_cli import run_stage
from tests.conftest import stage_module


def _raise(e: BaseException):
    def work() -> None:
        raise e

    return work


@pytest.mark.parametrize(
    "code,advice",
    [
        (errno.ENOSPC, "the disk is full: free space or point the output at another disk"),
        (errno.EROFS, "the filesystem is read-only: choose a writable output path"),
        (errno.EACCES, "permission denied: check the folder's permissions or choose another path"),
        (errno.ENOTDIR, "a parent of this path is a file, not a folder: choose another path"),
    ],
)
def test_filesystem_errors_are_one_line(capsys, code, advice):
    e = OSError(code, os.strerror(code), "/data/out/x.zarr")
    assert run_stage(_raise(e)) == 1
    assert capsys.readouterr().err == (f"error: /data/out/x.zarr: {os.strerror(code)}; {advice}\n")


def test_other_os_errors_keep_their_traceback():
    """An OSError that is not the user's environment (here EIO) is a problem to investigate."""
    with pytest.raises(OSError):
        run_stage(_raise(OSError(errno.EIO, "Input/output error", "/dev/sda")))


def test_an_output_under_a_regular_file_is_one_line(tmp_path, tiny_corpus, tiny_teacher, capsys):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file\n")
    params = tmp_path / "params.yaml"
    params.write_text(
        "corpus:\n"
        f"  path: {tiny_corpus}\n"
        f"  languages: [{', '.join(sorted(p.stem for p in tiny_corpus.glob('*.txt')))}]\n"
        "tokenize:\n  seq_len: 32\n  num_proc: 1\n"
    )
    argv = ["--params", str(params), "--teacher", str(tiny_teacher)]
    argv += ["--out", str(blocker / "tokenized"), "--metrics", str(tmp_path / "m.json")]
    assert stage_module("tokenize_corpus").main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {blocker}")
    assert err[-1] == (
        f"error: {blocker}: Not a directory; a parent of this path is a file, not a folder: "
        "choose another path"
    )
    assert not any("Traceback" in line for line in err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not-a-folder", "params.yaml"]


def test_destinations_are_checked_before_any_work(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    check_destinations(tmp_path / "new" / "deeper" / "out", tmp_path / "m.json")  # creatable
    with pytest.raises(NotADirectoryError) as e:
        check_destinations(tmp_path / "ok", blocker / "sub" / "out")
    assert e.value.filename == str(blocker)
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as if not ours (or as root)
    with pytest.raises(PermissionError) as e:
        check_destinations(tmp_path / "out")
    assert (e.value.errno, e.value.filename) == (errno.EACCES, str(tmp_path))


def test_a_library_disk_error_inside_atomic_dir_names_the_output(tmp_path):
    from safetensors import SafetensorError

    final = tmp_path / "model"
    message = "Error while serializing: I/O error: No space left on device (os error 28)"
    with pytest.raises(OSError) as e, atomic_dir(final) as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise SafetensorError(message)
    assert (e.value.errno, e.value.filename) == (errno.ENOSPC, str(final))
    assert list(tmp_path.iterdir()) == []  # the partial folder is gone
    with pytest.raises(OSError) as e, atomic_dir(final):
        raise OSError(errno.ENOSPC, "No space left on device")  # pyarrow: no filename
    assert e.value.filename == str(final)
    with pytest.raises(KeyError), atomic_dir(final):
        raise KeyError("a bug keeps its own exception")


def test_a_full_disk_leaves_no_temporary_metrics(tmp_path, monkeypatch):
    def full(self, *a, **k):
        Path.write_bytes(self, b"{")  # a torn first block, then the disk fills
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError):
        write_json(tmp_path / "metrics.json", {"a": 1})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "content,message",
    [
        (
            "{not json",
            "not valid JSON (Expecting property name enclosed in double quotes: "
            "line 1 column 2 (char 1)); the file is damaged",
        ),
        ("[1, 2]", "not a JSON object; the file is damaged"),
        (
            '{"name": "t", "sha256": "x", "architecture": "L", "revision": null, '
            '"vocab_size": 9, "tokenizer": {"sha256": "y", "vocab_size": 9}}',
            "key 'tokenizer.eos_id' is missing; the record is incomplete",
        ),
    ],
    ids=["malformed", "not-an-object", "incomplete"],
)
def test_a_damaged_provenance_is_one_line_naming_the_file(tmp_path, content, message):
    (tmp_path / "provenance.json").write_text(content)
    with pytest.raises(InputError) as e:
        read_provenance(tmp_path, LM_TEACHER_KEYS)
    assert str(e.value) == (
        f"{tmp_path / 'provenance.json'}: {message}: re-run the stage that wrote the folder "
        "(`dvc repro prepare_teacher`) or `dvc pull` it"
    )


def test_a_builtin_teachers_null_revision_is_not_missing(tmp_path):
    record = {
        "name": "builtin",
        "revision": None,
        "sha256": "a" * 64,
        "architecture": "LlamaForCausalLM",
        "vocab_size": 9,
        "tokenizer": {"sha256": "b" * 64, "vocab_size": 9, "eos_id": 1},
    }
    (tmp_path / "provenance.json").write_text(json.dumps(record))
    assert read_provenance(tmp_path, LM_TEACHER_KEYS) == record


def test_a_dataloader_worker_error_keeps_only_its_message():
    """torch re-raises a worker's exception with the worker traceback in its text."""
    wrapped = StoreError(
        "Caught StoreError in DataLoader worker process 0.\nOriginal Traceback (most recent "
        'call last):\n  File "x.py", line 1, in f\n    raise StoreError(m)\n'
        "pipeline.core.errors.StoreError: s.zarr: train shard 3 (rows 6:8): bad; do this\n"
    )
    assert user_message(wrapped) == "s.zarr: train shard 3 (rows 6:8): bad; do this"
    assert user_message(StoreError("plain")) == "plain"
