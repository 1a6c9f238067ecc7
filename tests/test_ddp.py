"""train_student data-parallel (PyTorch DDP, gloo on CPU) through the `processes` params switch:
the stage script relaunches itself as two ranks under torch.distributed.run. Two ranks train
the one-process weights; a relaunched run killed with SIGKILL stops its ranks and, resumed
under a torchrun started by hand, ends with the uninterrupted weights; an error on one rank
stops both and is printed once; the params the switch cannot serve are refused with their
exact messages. Each 2-rank run starts three interpreters that import torch and transformers
(about 20 s on two cores), which is most of these tests' time."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.core.config import from_params
from pipeline.core.errors import ConfigError
from pipeline.student.train_student import TrainStudentConfig, run_train_student
from tests.store_fixtures import build_store, flip_bytes, make_attrs, make_data, make_tokenized
from tests.store_fixtures import make_tokenizer as make_wordlevel

RUN = dict(
    num_layers=1,
    hidden_size=16,
    num_heads=2,
    intermediate_size=32,
    steps=40,
    batch_size=4,
    warmup_steps=1,
    eval_every=20,
    eval_sequences=2,
    checkpoint_every=5,
    log_every=5,
)
"""Tiny; long enough that a kill at the first checkpoint lands mid-run."""
RANKS = {"OMP_NUM_THREADS": "1"}
"""Environment of the stage processes: one thread per rank on a 2-core machine."""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tokenizer, a tokenized dataset and a sample store of it (train: 10 rows in chunks of 2)."""
    root = tmp_path_factory.mktemp("ddp")
    identity = make_wordlevel(root / "tok")
    data = make_data("sample")
    make_tokenized(root / "tokenized", data)
    build_store(
        root / "sample.zarr", data, attrs=make_attrs(data, identity, "sample"), method="sample"
    )
    return root


def stage(env: Path, tmp: Path, name: str, **params) -> list[str]:
    """The stage command with a params file of RUN plus `params`, writing `tmp/<name>...`."""
    path = tmp / f"params-{name}.yaml"
    path.write_text(yaml.safe_dump({"train_student": {**RUN, **params}}))
    argv = [sys.executable, "-m", "pipeline.stages.train_student", "--params", str(path)]
    argv += ["--tokenized", str(env / "tokenized"), "--logits", str(env / "sample.zarr")]
    argv += ["--tokenizer", str(env / "tok"), "--out", str(tmp / name)]
    argv += ["--metrics", str(tmp / f"{name}.json"), "--checkpoints", str(tmp / "work")]
    return argv + ["--live-dir", str(tmp / f"live-{name}"), "--no-progress"]


def run(argv: list[str], tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        argv, env={**os.environ, **RANKS}, capture_output=True, text=True, cwd=tmp, timeout=300
    )


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


@pytest.fixture(scope="module")
def two_ranks(env, tmp_path_factory) -> Path:
    """The folder of an uninterrupted 2-rank run of RUN (stage output `ref`)."""
    tmp = tmp_path_factory.mktemp("two-ranks")
    done = run(stage(env, tmp, "ref", processes=2), tmp)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp


def test_two_ranks_train_the_one_process_weights(env, two_ranks, tmp_path):
    one = run_train_student(
        TrainStudentConfig(**RUN),
        tokenized=env / "tokenized",
        logits=env / "sample.zarr",
        tokenizer=env / "tok",
        out=tmp_path / "one",
        metrics=tmp_path / "one.json",
        checkpoints=tmp_path / "work",
        live_dir=tmp_path / "live-one",
        progress=False,
    )
    a, b = weights(tmp_path / "one"), weights(two_ranks / "ref")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)
    two = json.loads((two_ranks / "ref.json").read_text())
    assert two["processes"] == 2 and one["processes"] == 1
    assert two["train_tokens"] == one["train_tokens"] == 40 * 4 * 8  # global batches
    assert two["validation_perplexity"] == pytest.approx(one["validation_perplexity"], rel=1e-4)
    assert two["final"]["loss"] == pytest.approx(one["final"]["loss"], rel=1e-4)
    # Rank 0 alone wrote the curves: one row per logged step, as one process logs them.
    for curve in ("train/loss", "val/perplexity"):
        rows = (two_ranks / f"live-ref/plots/metrics/{curve}.tsv").read_text().splitlines()
        again = (tmp_path / f"live-one/plots/metrics/{curve}.tsv").read_text().splitlines()
        assert [r.split("\t")[0] for r in rows] == [r.split("\t")[0] for r in again]
    record = json.loads((two_ranks / "ref" / "softlabels.json").read_text())
    assert record["train_student"]["processes"] == 2
    solo = json.loads((tmp_path / "one" / "softlabels.json").read_text())
    assert "processes" not in solo["train_student"]  # one process: the record as before
    assert not (two_ranks / "work").exists()  # rank 0 removed the checkpoints


def _children(pid: int) -> list[int]:
    """Process ids of the direct children of `pid` (Linux /proc)."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def torchrun(argv: list[str]) -> list[str]:
    """The stage command `argv` started by hand under torchrun with two processes."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return [*launcher, "--nproc-per-node", "2", "-m", *argv[2:]]


@pytest.mark.slow
def test_kill_9_of_a_two_rank_run_resumes_to_the_uninterrupted_weights(env, two_ranks, tmp_path):
    """SIGKILL the stage (it relaunched itself as two ranks) once rank 0 wrote a checkpoint:
    its ranks stop by themselves. The same run started again, here by hand under torchrun,
    resumes and ends with exactly the weights of the uninterrupted run (`two_ranks`)."""
    argv = stage(env, tmp_path, "student", processes=2)
    proc = subprocess.Popen(
        argv,
        env={**os.environ, **RANKS},
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not list((tmp_path / "work").glob("*/latest.pt")) and time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before its first checkpoint"
        time.sleep(0.005)
    ranks = _children(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert len(ranks) == 2
    deadline = time.monotonic() + 10
    while any(_alive(r) for r in ranks) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(r) for r in ranks), "the ranks outlived the killed stage"
    assert not (tmp_path / "student").exists()
    shutil.rmtree(tmp_path / "live-student")  # as `dvc repro` deletes outputs before a re-run
    again = run(torchrun(argv), tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    metrics = json.loads((tmp_path / "student.json").read_text())
    assert 0 < metrics["resumed_from_step"] < RUN["steps"]
    a, b = weights(two_ranks / "ref"), weights(tmp_path / "student")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    rows = (tmp_path / "live-student/plots/metrics/train/loss.tsv").read_text().splitlines()
    assert [int(r.split("\t")[0]) for r in rows[1:]] == list(range(5, 41, 5))


def test_an_error_on_rank_0_alone_stops_both_ranks_and_is_printed_once(env, tmp_path):
    """Only rank 0 verifies the store's checksums: a damaged shard fails there alone, rank 1
    (which passed its checks) stops too instead of waiting, and the stage prints the error
    once, as its last line."""
    store = tmp_path / "damaged.zarr"
    shutil.copytree(env / "sample.zarr", store)
    flip_bytes(store / "train" / "id_deltas" / "c" / "2" / "0" / "0")
    argv = stage(env, tmp_path, "student", processes=2)
    argv[argv.index("--logits") + 1] = str(store)
    done = run(argv, tmp_path)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and done.stderr.strip().splitlines()[-1] == errors[0]
    assert errors[0].startswith(f"error: {store}: refusing to train from this store: ")
    assert "train/id_deltas/2: checksum mismatch" in errors[0]
    assert not (tmp_path / "student").exists() and not (tmp_path / "live-student").exists()


@pytest.mark.parametrize(
    "override,message",
    [
        (
            {"batch_size": 6, "processes": 4},
            "train_student.batch_size: 6 is not a multiple of train_student.processes: 4 (each "
            "process trains on an equal share of every batch); use a multiple of 4",
        ),
        ({"processes": 0}, "train_student.processes: must be >= 1, got 0"),
    ],
)
def test_params_the_switch_cannot_serve_are_refused(override, message):
    with pytest.raises(ConfigError) as e:
        from_params(TrainStudentConfig, {"train_student": override}, "train_student")
    assert str(e.value) == message


def test_the_stage_refuses_an_indivisible_batch_before_starting_ranks(env, tmp_path, capsys):
    from pipeline.stages.train_student import main

    assert main(stage(env, tmp_path, "student", processes=3)[3:]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: train_student.batch_size: 4 is not a multiple of train_student.processes: 3 "
        "(each process trains on an equal share of every batch); use a multiple of 3"
    ]
    assert not (tmp_path / "student").exists() and not (tmp_path / "live-student").exists()


def test_a_library_call_with_processes_outside_torchrun_is_refused(env, tmp_path):
    with pytest.raises(ConfigError) as e:
        run_train_student(
            TrainStudentConfig(**{**RUN, "processes": 2}),
            tokenized=env / "tokenized",
            logits=env / "sample.zarr",
            tokenizer=env / "tok",
            out=tmp_path / "student",
            metrics=tmp_path / "m.json",
            checkpoints=tmp_path / "work",
            live_dir=tmp_path / "live",
            progress=False,
        )
    assert str(e.value) == (
        "train_student.processes: 2 processes need torch.distributed: run the stage script "
        "(`python -m pipeline.stages.train_student` relaunches itself under "
        "torch.distributed.run) or `torchrun --nproc-per-node 2 -m pipeline.stages."
        "train_student ...`; a library call trains in one process"
    )
    assert not (tmp_path / "student").exists() and not (tmp_path / "live").exists()


def test_torchrun_with_another_process_count_is_refused_once(env, tmp_path, monkeypatch, capsys):
    """As a rank of a torchrun of 2 processes with processes: 1 (no process group is formed):
    rank 0 reports the mismatch, rank 1 stops without repeating it; both exit 1."""
    from pipeline.stages.train_student import main

    argv = stage(env, tmp_path, "student")[3:]  # the arguments after `python -m module`
    monkeypatch.setenv("WORLD_SIZE", "2")
    message = (
        "error: train_student.processes: 1, but torchrun started 2 processes (WORLD_SIZE=2); "
        "set train_student.processes: 2 in the params, or start torchrun with "
        "--nproc-per-node 1"
    )
    for rank, printed in (("0", [message]), ("1", [])):
        monkeypatch.setenv("RANK", rank)
        assert main(argv) == 1
        assert capsys.readouterr().err.strip().splitlines() == printed
    assert not (tmp_path / "student").exists() and not (tmp_path / "live-student").exists()


def test_more_cuda_processes_than_gpus_are_refused(monkeypatch):
    from pipeline.student.distributed import check_gpus

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError) as e:
        check_gpus(4, section="train_student")
    assert str(e.value) == (
        "train_student.processes: 4 processes on CUDA need 4 GPUs (one per process), this "
        "machine has 1; lower train_student.processes or use device: cpu"
    )
    check_gpus(1, section="train_student")  # one GPU, one process: fine
