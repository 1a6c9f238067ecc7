"""The `softlabels` commands: output and exit statuses (0 OK, 1 problems, 2 errors)."""

from __future__ import annotations

import json
import shutil

import pytest
from store_fixtures import (
    K,
    L,
    build_store,
    flip_bytes,
    make_attrs,
    make_data,
    make_tokenized,
    make_tokenizer,
)

from pipeline.cli import main
from tests.conftest import REPO


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "teacher.zarr"
    build_store(path)
    return path


def test_inspect_text(store, capsys):
    assert main(["inspect", str(store)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == f"logits store {store}  (format_version 2, written by softlabels 0.1.0)"
    from pipeline.store.format import read_attrs
    from pipeline.store.verify import content_sha256

    digest = content_sha256(read_attrs(store))
    assert lines[1] == (
        f"complete:   yes  (16 shard checksums recorded, content sha256 {digest[:12]}…)"
    )
    assert (
        "teacher:    tiny-teacher @ main  LlamaForCausalLM  vocab_size 50  sha256 aaaaaaaaaaaa…"
        in lines
    )
    assert "labels:     method topk  k 4  seed 0  temperature 1.0" in lines
    assert any(
        line.startswith("split train: 10 sequences x 8 positions, 3 shards") for line in lines
    )
    ids_line = next(line for line in lines if line.strip().startswith("ids "))
    assert "shape (10, 8, 4)" in ids_line and "chunks (2, 8, 4)" in ids_line
    assert "shards (4, 8, 4)" in ids_line and "files 3/3" in ids_line
    assert "blosc(zstd, 5, shuffle)" in ids_line  # a top-k store: ids byte-shuffled
    assert "blosc(zstd, 5, shuffle)" in next(line for line in lines if "logprobs " in line)
    assert lines[-1].startswith("on disk:    ") and " positions: " in lines[-1]
    assert "B per position (input_ids " in lines[-1] and "B per stored id (k = 4)" in lines[-1]


def test_inspect_json(store, capsys):
    assert main(["inspect", "--json", str(store)]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["complete"] is True and d["method"] == "topk" and d["k"] == K
    assert d["entries"] == (10 + 3) * L * K
    train = d["splits"]["train"]
    assert train["shards"] == 3
    assert train["arrays"]["logprobs"]["shards"] == [4, L, K]
    assert train["arrays"]["tail"]["shard_files"] == "3/3"
    on_disk = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
    assert d["bytes_on_disk"] == on_disk
    assert 0 < d["bytes_per_entry_ids_logprobs"] < d["bytes_per_entry_all"]


def test_inspect_escapes_control_characters_of_attribute_strings(tmp_path, capsys):
    data = make_data()
    attrs = make_attrs(data)
    attrs["teacher"]["name"] = "evil\x1b[31mred\u202e Привет"
    build_store(tmp_path / "s.zarr", data, attrs=attrs)
    assert main(["inspect", str(tmp_path / "s.zarr")]) == 0
    out = capsys.readouterr().out
    assert "teacher:    evil\\x1b[31mred\\u202e Привет @ main  LlamaForCausalLM" in out
    assert "\x1b" not in out and "\u202e" not in out
    assert main(["inspect", "--json", str(tmp_path / "s.zarr")]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\u202e" not in out
    assert json.loads(out)["teacher"]["name"] == attrs["teacher"]["name"]


def test_inspect_shows_compressors_of_a_sample_store(tmp_path, capsys):
    build_store(tmp_path / "s.zarr", method="sample")
    assert main(["inspect", "--json", str(tmp_path / "s.zarr")]) == 0
    summary = json.loads(capsys.readouterr().out)
    arrays = summary["splits"]["train"]["arrays"]
    assert {name: (a["dtype"], a["compressors"]) for name, a in arrays.items()} == {
        "input_ids": ("uint16", "zstd(level=12)"),
        "id_deltas": ("uint16", "blosc(zstd, 5, shuffle)"),
        "extra_draws": ("uint8", "transpose+blosc(zstd, 7, bitshuffle)"),
        "entropy": ("float16", "blosc(zstd, 5, shuffle)"),
    }
    assert summary["encoding"]["ids"] == "distinct_deltas_counts"
    assert summary["encoding"]["logprobs"] is False
    assert set(summary["bytes_per_position_by_array"]) == set(arrays)


def test_inspect_shows_a_format1_sample_store(tmp_path, capsys):
    build_store(tmp_path / "s.zarr", method="sample", format_version=1)
    assert main(["inspect", "--json", str(tmp_path / "s.zarr")]) == 0
    summary = json.loads(capsys.readouterr().out)
    arrays = summary["splits"]["train"]["arrays"]
    assert summary["format_version"] == 1 and summary["encoding"] is None
    assert {name: (a["dtype"], a["compressors"]) for name, a in arrays.items()} == {
        "input_ids": ("int32", "zstd(level=9)"),
        "ids": ("int32", "zstd(level=9)"),
        "logprobs": ("float16", "blosc(zstd, 5, shuffle)"),
        "tail": ("float16", "blosc(zstd, 5, shuffle)"),
    }


def test_inspect_store_in_progress(tmp_path, capsys):
    path = tmp_path / "s.zarr"
    build_store(path, order=[("train", 0)], finalize=False)
    assert main(["inspect", "--json", str(path)]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["complete"] is False
    assert d["splits"]["train"]["arrays"]["ids"]["shard_files"] == "1/3"


def test_verify_ok(store, capsys):
    assert main(["verify", str(store)]) == 0
    assert capsys.readouterr().out == f"OK: {store}\n"


def test_verify_with_tokenizer_and_tokenized(tmp_path, capsys):
    data = make_data()
    identity = make_tokenizer(tmp_path / "tok")
    make_tokenized(tmp_path / "tokenized", data)
    build_store(tmp_path / "s.zarr", data, attrs=make_attrs(data, identity))
    argv = ["verify", str(tmp_path / "s.zarr"), "--tokenizer", str(tmp_path / "tok")]
    assert main([*argv, "--tokenized", str(tmp_path / "tokenized")]) == 0
    make_tokenizer(tmp_path / "other", shift=7)
    capsys.readouterr()
    assert main(["verify", str(tmp_path / "s.zarr"), "--tokenizer", str(tmp_path / "other")]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{tmp_path / 's.zarr'}: 1 problem(s):"
    assert out[1].startswith("  - tokenizer.sha256 differs: store ")


def test_verify_corrupt_store_exits_1(store, capsys):
    flip_bytes(store / "train" / "ids" / "c" / "2" / "0" / "0")
    (store / "validation" / "tail" / "c" / "0" / "0").unlink()
    assert main(["verify", str(store)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{store}: 2 problem(s):"
    assert out[1].startswith("  - train/ids/2: checksum mismatch (recorded ")
    assert (
        out[2] == f"  - validation/tail/0: shard file missing ({store / 'validation/tail/c/0/0'})"
    )


def test_errors_exit_2_without_traceback(tmp_path, capsys):
    assert main(["verify", str(tmp_path / "nope.zarr")]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: {tmp_path / 'nope.zarr'}: no such logits store (run `dvc repro teacher_logits`, "
        "or `dvc pull` it)\n"
    )
    build_store(tmp_path / "s.zarr")
    assert main(["verify", str(tmp_path / "s.zarr"), "--tokenized", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'missing'}: cannot load a tokenized dataset")
    assert "Traceback" not in err
    assert main(["verify", str(tmp_path / "s.zarr"), "--tokenizer", str(tmp_path / "none")]) == 2
    assert capsys.readouterr().err == (
        f"error: {tmp_path / 'none'}: no such tokenizer folder (pass e.g. models/teacher)\n"
    )


def test_usage(capsys):
    assert main([]) == 2
    assert "inspect" in capsys.readouterr().err
    assert main(["verify"]) == 2  # STORE is required
    assert main(["frobnicate"]) == 2
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "inspect" in out and "verify" in out
    assert main(["verify", "--help"]) == 0
    assert "exit status: 0 OK, 1 problems found, 2 usage or input error" in capsys.readouterr().out


def test_store_with_an_array_deleted(store, capsys):
    shutil.rmtree(store / "train" / "tail")
    assert main(["verify", str(store)]) == 1
    assert capsys.readouterr().out.splitlines()[1:] == ["  - train/tail: array missing"]
    assert main(["inspect", str(store)]) == 2
    assert capsys.readouterr().err == (
        f"error: {store}: array train/tail is missing; the store is damaged (`softlabels verify` "
        "lists what else is wrong)\n"
    )


def test_stage_commands_are_listed_without_importing_the_stages():
    """`softlabels --help` lists one command per stage; building the parser imports no stage
    module (and so no torch): checked in a fresh interpreter."""
    import subprocess
    import sys

    code = (
        "import sys, contextlib, io\n"
        "from pipeline.cli import main\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        "    assert main(['--help']) == 0\n"
        "loaded = [m for m in sys.modules if m.startswith('pipeline.stages.') or m == 'torch']\n"
        "assert not loaded, loaded\n"
        "print(out.getvalue())\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 0, p.stderr
    for command in ("train-student", "teacher-logits", "tokenize-corpus", "classify-evaluate"):
        assert f"    {command}" in p.stdout
    assert "DVC stage `train_student`: logits store + tokenized data" in p.stdout


def test_stage_command_forwards_help_to_the_stage(capsys):
    assert main(["train-student", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: softlabels train-student [-h] [--params PARAMS]")
    assert "--checkpoints CHECKPOINTS" in out  # the stage's own arguments...
    assert "train_student.alpha" in out  # ...and its params epilog


def test_stage_command_usage_error_is_the_stages(capsys):
    argv = ["--params", "params.yaml", "--tokenized", "t", "--tokenizer", "tk", "--out", "o"]
    assert main(["train-student", *argv, "--metrics", "m", "--checkpoints", "c", "--bogus"]) == 2
    err = capsys.readouterr().err
    assert "softlabels train-student: error: unrecognized arguments: --bogus" in err
    assert main(["train-student"]) == 2  # its required arguments are missing
    assert "the following arguments are required: --tokenized" in capsys.readouterr().err
    assert main(["inspect", "store", "--bogus"]) == 2  # other commands still refuse extras
    assert "softlabels: error: unrecognized arguments: --bogus" in capsys.readouterr().err
