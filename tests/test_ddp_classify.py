"""classify_student data-parallel (PyTorch DDP, gloo on CPU) through the `processes` params
switch: the stage script relaunches itself as two ranks under torch.distributed.run, which train
the weights of one process on the same global batches (gold rows spread unevenly over the
ranks' shares, soft labels on every row), and a batch the ranks cannot share evenly is refused.
Reuses the inputs of tests/test_classify_student.py."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from pipeline.classify.student import ClassifyStudentConfig
from pipeline.core.errors import ConfigError
from tests.test_classify_student import TINY, env, run, stage_argv  # noqa: F401 (env: fixture)

RUN = {**TINY, "alpha": 0.5, "batch_size": 6, "steps": 8, "eval_every": 4}
"""KD and gold CE both weigh; 6 rows of a 1-in-3 labeled corpus split 3 + 3."""
RANKS = {"OMP_NUM_THREADS": "1"}
"""Environment of the stage processes: one thread per rank on a 2-core machine."""


def weights(folder):
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def test_two_ranks_train_the_one_process_weights(env, tmp_path):  # noqa: F811
    one = run(env, tmp_path / "one", ClassifyStudentConfig(**RUN))
    two_dir = tmp_path / "two"
    two_dir.mkdir()
    argv = stage_argv(env, two_dir, {"classify_student": {**RUN, "processes": 2}})
    done = subprocess.run(
        argv, env={**os.environ, **RANKS}, capture_output=True, text=True, cwd=two_dir, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = weights(tmp_path / "one" / "student"), weights(two_dir / "student")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)
    two = json.loads((two_dir / "metrics.json").read_text())
    assert two["processes"] == 2 and "processes" not in one
    assert two["train_examples"] == one["train_examples"] == 8 * 6  # global batches
    assert two["best_step"] == one["best_step"]
    assert two["selection_accuracy"] == one["selection_accuracy"]
    assert two["final"]["loss"] == pytest.approx(one["final"]["loss"], rel=1e-4)
    assert two["final"]["ce"] == pytest.approx(one["final"]["ce"], rel=1e-4)
    assert two["final"]["kd"] == pytest.approx(one["final"]["kd"], rel=1e-4)
    record = json.loads((two_dir / "student" / "softlabels.json").read_text())
    assert record["classify_student"]["processes"] == 2
    again = json.loads((tmp_path / "one" / "student" / "softlabels.json").read_text())
    assert "processes" not in again["classify_student"]
    # Rank 0 alone wrote the curves: one row per logged step, as one process logs them.
    for curve in ("train/loss", "dev/selection"):
        rows = (two_dir / f"dvclive/plots/metrics/{curve}.tsv").read_text().splitlines()
        ref = (tmp_path / f"one/dvclive/plots/metrics/{curve}.tsv").read_text().splitlines()
        assert [r.split("\t")[0] for r in rows] == [r.split("\t")[0] for r in ref]


def test_a_batch_the_ranks_cannot_share_evenly_is_refused(env, tmp_path):  # noqa: F811
    with pytest.raises(ConfigError) as e:
        ClassifyStudentConfig(**{**RUN, "batch_size": 7, "processes": 2})
    assert str(e.value) == (
        "classify_student.batch_size: 7 is not a multiple of classify_student.processes: 2 "
        "(each process trains on an equal share of every batch); use a multiple of 2"
    )
    with pytest.raises(ConfigError, match=r"classify_student\.processes: must be >= 1, got 0"):
        ClassifyStudentConfig(**{**RUN, "processes": 0})
    # The stage script refuses it in one line, before any rank starts.
    params = {"classify_student": {**RUN, "batch_size": 7, "processes": 2}}
    bad = subprocess.run(
        stage_argv(env, tmp_path, params), capture_output=True, text=True, cwd=tmp_path
    )
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-1] == f"error: {e.value}"
    assert not (tmp_path / "student").exists()
