"""The train_student stage: a few-step smoke run per teacher source, resume after SIGKILL with
identical weights, layer init, and refusals of bad input with their exact messages."""

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
from pipeline.core.errors import ConfigError, StoreError
from pipeline.student.train_student import TrainStudentConfig, prepare, run_train_student
from tests.conftest import make_teacher
from tests.store_fixtures import V, build_store, make_attrs, make_data, make_tokenized
from tests.store_fixtures import make_tokenizer as make_wordlevel

TINY = dict(
    num_layers=1,
    hidden_size=16,
    num_heads=2,
    intermediate_size=32,
    steps=6,
    batch_size=4,
    warmup_steps=1,
    eval_every=3,
    eval_sequences=2,
    checkpoint_every=2,
    log_every=2,
)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tokenizer, a tokenized dataset, a top-k and a sample store of it, and a tiny teacher."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("train-student")
    identity = make_wordlevel(root / "tok")
    data = {m: make_data(m) for m in ("topk", "sample")}
    assert (data["topk"]["train"][0] == data["sample"]["train"][0]).all()  # same token ids
    make_tokenized(root / "tokenized", data["topk"])
    for method, d in data.items():
        build_store(
            root / f"{method}.zarr", d, attrs=make_attrs(d, identity, method), method=method
        )
    make_teacher(root / "teacher", AutoTokenizer.from_pretrained(root / "tok"), hidden=32)
    return root


def paths(env: Path, tmp: Path, store: str = "sample") -> dict:
    return dict(
        tokenized=env / "tokenized",
        logits=env / f"{store}.zarr",
        tokenizer=env / "tok",
        out=tmp / "student",
        metrics=tmp / "metrics.json",
        checkpoints=tmp / "work",
        live_dir=tmp / "dvclive",
    )


@pytest.mark.parametrize(
    "store,kw",
    [("sample", {}), ("topk", {"tail": "renorm", "alpha": 0.5, "loss": "reverse_kl"})],
)
def test_smoke_run_writes_a_loadable_student_and_curves(env, tmp_path, store, kw):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = paths(env, tmp_path, store)
    result = run_train_student(TrainStudentConfig(**TINY, **kw), **p, progress=False)
    model = AutoModelForCausalLM.from_pretrained(p["out"])
    tok = AutoTokenizer.from_pretrained(p["out"])
    assert model.config.vocab_size == V and len(tok) == V
    record = json.loads((p["out"] / "softlabels.json").read_text())
    assert record["source"] == "store" and record["method"] == store and record["k"] == 4
    assert record["teacher"] == {"name": "tiny-teacher", "revision": "main", "sha256": "a" * 64}
    assert record["dataset"]["splits"]["train"]["fingerprint"]
    assert json.loads(p["metrics"].read_text()) == result
    assert result["steps"] == 6 and result["train_tokens"] == 6 * 4 * 8
    assert 1.0 < result["validation_perplexity"] < 10 * V
    loss_rows = (p["live_dir"] / "plots/metrics/train/loss.tsv").read_text().splitlines()
    assert [r.split("\t")[0] for r in loss_rows[1:]] == ["2", "4", "6"]
    assert (p["live_dir"] / "plots/metrics/val/perplexity.tsv").is_file()
    assert not p["checkpoints"].exists()  # a finished run leaves no work files


def test_live_teacher_baseline_runs_the_same_loop(env, tmp_path):
    p = paths(env, tmp_path)
    p["logits"] = None
    cfg = TrainStudentConfig(**{**TINY, "steps": 3, "teacher": "live", "temperature": 2.0})
    result = run_train_student(cfg, **p, teacher=env / "teacher", progress=False)
    record = json.loads((p["out"] / "softlabels.json").read_text())
    assert record["source"] == "live" and record["teacher"]["name"] == "tiny-test-teacher"
    assert result["final"]["kd"] > 0


def test_stored_and_live_runs_see_the_same_batches(env, tmp_path):
    stored = prepare(TrainStudentConfig(**TINY), **_prep(env, "sample"))
    live = prepare(
        TrainStudentConfig(**TINY, teacher="live"),
        **{**_prep(env, "sample"), "logits": None},
        teacher=env / "teacher",
        chunk_sequences=2,
    )
    a, b = iter(stored.stream()), iter(live.stream())
    for _ in range(4):
        assert torch.equal(next(a)["input_ids"], next(b)["input_ids"])


def _prep(env: Path, store: str) -> dict:
    return dict(tokenized=env / "tokenized", logits=env / f"{store}.zarr", tokenizer=env / "tok")


def test_teacher_layers_init_copies_embeddings_and_layers(env):
    from transformers import AutoModelForCausalLM

    cfg = TrainStudentConfig(
        **{**TINY, "hidden_size": 32, "intermediate_size": 64, "tie_embeddings": False},
        init="teacher_layers",
    )
    setup = prepare(cfg, **_prep(env, "sample"), teacher=env / "teacher")
    teacher = AutoModelForCausalLM.from_pretrained(env / "teacher")
    student = setup.trainer.model
    for (name, a), b in zip(
        student.state_dict().items(), teacher.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    assert setup.record["init_layers"] == [0]


def test_teacher_layers_with_other_widths_is_refused(env):
    cfg = TrainStudentConfig(**TINY, init="teacher_layers")
    with pytest.raises(ConfigError) as e:
        prepare(cfg, **_prep(env, "sample"), teacher=env / "teacher")
    assert str(e.value) == (
        "train_student.init: teacher_layers needs the teacher's widths, but hidden_size 16 vs "
        "the teacher's 32, intermediate_size 32 vs the teacher's 64; set the student's sizes "
        "to the teacher's or use init: random"
    )


@pytest.mark.parametrize(
    "override,message",
    [
        ({"loss": "js"}, "train_student.loss: must be one of 'kl', 'reverse_kl', got 'js'"),
        (
            {"tail": "drop"},
            "train_student.tail: must be one of 'renorm', 'bucket', 'ignore', got 'drop'",
        ),
        ({"alpha": 1.5}, "train_student.alpha: must be in [0, 1], got 1.5"),
        ({"alpha": -0.1}, "train_student.alpha: must be in [0, 1], got -0.1"),
        ({"temperature": 0}, "train_student.temperature: must be > 0, got 0.0"),
        ({"temperature": -1.0}, "train_student.temperature: must be > 0, got -1.0"),
    ],
)
def test_bad_params_are_refused(override, message):
    with pytest.raises(ConfigError) as e:
        from_params(TrainStudentConfig, {"train_student": override}, "train_student")
    assert str(e.value) == message


def refused(env, tmp_path, cfg, error=ConfigError, **kw) -> str:
    p = {**paths(env, tmp_path), **kw}
    with pytest.raises(error) as e:
        run_train_student(cfg, **p, progress=False)
    assert not p["out"].exists() and not p["checkpoints"].exists()  # refused before any work
    assert not p["live_dir"].exists()
    return str(e.value)


def test_missing_store_is_refused(env, tmp_path):
    missing = tmp_path / "none.zarr"
    assert refused(env, tmp_path, TrainStudentConfig(**TINY), StoreError, logits=missing) == (
        f"{missing}: no such logits store (run `dvc repro teacher_logits`, or `dvc pull` it)"
    )


def test_student_vocab_unlike_the_store_is_refused(env, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "other-student"
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    ).save_pretrained(other)
    cfg = TrainStudentConfig(**TINY, model=str(other))
    assert refused(env, tmp_path, cfg, StoreError) == (
        f"{env / 'sample.zarr'}: refusing to train from this logits store: "
        f"teacher.vocab_size differs: store {V} vs yours 64; the stored ids index the "
        "teacher's vocabulary — use a student with the teacher's vocabulary size or re-run "
        "teacher_logits with a matching teacher"
    )


def test_reverse_kl_on_a_sample_store_is_refused(env, tmp_path):
    cfg = TrainStudentConfig(**TINY, loss="reverse_kl")
    assert refused(env, tmp_path, cfg) == (
        "train_student.loss: reverse_kl needs the teacher's probability wherever the student "
        f"puts mass, but {env / 'sample.zarr'} is a 'sample' store (draws only); use loss: kl, "
        "or a topk store"
    )


def test_live_without_a_teacher_is_refused(env, tmp_path):
    cfg = TrainStudentConfig(**TINY, teacher="live")
    assert refused(env, tmp_path, cfg) == (
        "train_student.teacher: live runs the teacher's weights; pass --teacher <teacher "
        "folder> (and list that folder in the stage's deps in dvc.yaml)"
    )


def test_stage_script_prints_the_error_and_exits_1(env, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"train_student": {"alpha": 2}}))
    p = paths(env, tmp_path)
    argv = [sys.executable, "-m", "pipeline.stages.train_student", "--params", str(params)]
    for flag in ("tokenized", "logits", "tokenizer", "out", "metrics", "checkpoints"):
        argv += [f"--{flag}", str(p[flag])]
    run = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1] == (
        "error: train_student.alpha: must be in [0, 1], got 2.0"
    )


def _stage(env: Path, tmp: Path, params: Path, name: str) -> list[str]:
    p = paths(env, tmp)
    argv = [sys.executable, "-m", "pipeline.stages.train_student", "--params", str(params)]
    for flag in ("tokenized", "logits", "tokenizer"):
        argv += [f"--{flag}", str(p[flag])]
    argv += ["--out", str(tmp / name), "--metrics", str(tmp / f"{name}.json")]
    argv += ["--checkpoints", str(tmp / "work"), "--live-dir", str(tmp / f"live-{name}")]
    return argv + ["--no-progress"]


@pytest.mark.slow
def test_resume_after_sigkill_ends_with_identical_weights(env, tmp_path):
    from safetensors.torch import load_file

    params = tmp_path / "params.yaml"
    section = {**TINY, "steps": 30, "checkpoint_every": 5, "eval_every": 0, "log_every": 5}
    params.write_text(yaml.safe_dump({"train_student": section}))
    envvars = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = subprocess.run(_stage(env, tmp_path, params, "ref"), env=envvars, capture_output=True)
    assert ref.returncode == 0, ref.stderr.decode()[-2000:]
    # Kill -9 as soon as a checkpoint exists, then run the same command again.
    proc = subprocess.Popen(
        _stage(env, tmp_path, params, "student"),
        env=envvars,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not list((tmp_path / "work").glob("*/latest.pt")) and time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before its first checkpoint"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (tmp_path / "student").exists()
    shutil.rmtree(tmp_path / "live-student")  # as `dvc repro` deletes outputs before a re-run
    again = subprocess.run(
        _stage(env, tmp_path, params, "student"), env=envvars, capture_output=True
    )
    assert again.returncode == 0, again.stderr.decode()[-2000:]
    metrics = json.loads((tmp_path / "student.json").read_text())
    assert metrics["resumed_from_step"] > 0
    a = load_file(tmp_path / "ref" / "model.safetensors")
    b = load_file(tmp_path / "student" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    rows = (tmp_path / "live-student/plots/metrics/train/loss.tsv").read_text().splitlines()
    steps = [int(r.split("\t")[0]) for r in rows[1:]]
    assert steps == list(range(5, 31, 5))  # curves continue without duplicates


# -- damaged checkpoints: set aside, never a traceback, never a blocked rerun -------------------


class Interrupt(Exception):
    pass


def interrupted(env: Path, tmp: Path, cfg: TrainStudentConfig, after: int, monkeypatch) -> Path:
    """Run until `after` steps are done, then die as a kill would; return the checkpoint folder."""
    from pipeline.student.trainer import StudentTrainer

    calls = {"n": 0}
    original = StudentTrainer.step

    def step(self, batch):
        if calls["n"] == after:
            raise Interrupt
        calls["n"] += 1
        return original(self, batch)

    monkeypatch.setattr(StudentTrainer, "step", step)
    with pytest.raises(Interrupt):
        run_train_student(cfg, **paths(env, tmp), progress=False)
    monkeypatch.setattr(StudentTrainer, "step", original)
    (work,) = (tmp / "work").iterdir()
    return work


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory) -> dict:
    """The weights of an uninterrupted TINY run on the sample store."""
    from safetensors.torch import load_file

    tmp = tmp_path_factory.mktemp("reference")
    run_train_student(TrainStudentConfig(**TINY), **paths(env, tmp), progress=False)
    return load_file(tmp / "student" / "model.safetensors")


def same_weights(reference: dict, folder: Path) -> None:
    from safetensors.torch import load_file

    got = load_file(folder / "model.safetensors")
    assert got.keys() == reference.keys()
    for name in got:
        assert torch.equal(got[name], reference[name]), name


def test_truncated_latest_is_set_aside_and_the_previous_resumed(
    env, tmp_path, monkeypatch, caplog, reference
):
    work = interrupted(env, tmp_path, TrainStudentConfig(**TINY), after=5, monkeypatch=monkeypatch)
    assert torch.load(work / "previous.pt", weights_only=True)["step"] == 2
    latest = work / "latest.pt"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    with caplog.at_level("WARNING", logger="pipeline.student.checkpoint"):
        result = run_train_student(
            TrainStudentConfig(**TINY), **paths(env, tmp_path), progress=False
        )
    assert result["resumed_from_step"] == 2
    same_weights(reference, tmp_path / "student")
    aside = work / "latest.pt.damaged-1"
    assert aside.is_file() and not latest.exists()  # kept for the user, not in the way
    (warning,) = caplog.records
    assert warning.levelname == "WARNING"
    assert warning.getMessage().startswith(f"checkpoint {latest} is unusable (cannot be read: ")
    assert warning.getMessage().endswith("; set aside as latest.pt.damaged-1")


def test_no_usable_checkpoint_trains_from_scratch(env, tmp_path, monkeypatch, caplog, reference):
    work = interrupted(env, tmp_path, TrainStudentConfig(**TINY), after=5, monkeypatch=monkeypatch)
    (work / "latest.pt").write_bytes(b"")
    (work / "previous.pt").write_bytes(b"not a torch file at all")
    with caplog.at_level("WARNING", logger="pipeline.student.checkpoint"):
        result = run_train_student(
            TrainStudentConfig(**TINY), **paths(env, tmp_path), progress=False
        )
    assert result["resumed_from_step"] == 0
    same_weights(reference, tmp_path / "student")
    assert sorted(p.name for p in work.iterdir()) == [
        "latest.pt.damaged-1",
        "previous.pt.damaged-1",
    ]
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3 and all(r.levelname == "WARNING" for r in caplog.records)
    assert messages[-1] == (
        f"no usable checkpoint in {work} (latest.pt, previous.pt set aside): training starts "
        "from scratch"
    )


def test_a_checkpoint_of_another_shape_in_the_key_folder_is_set_aside(
    env, tmp_path, monkeypatch, caplog, reference
):
    """A state whose tensors do not fit the model (as a code change under the same key would
    leave) is refused before anything is loaded: the run from scratch is exactly a fresh one."""
    wide = TrainStudentConfig(**{**TINY, "hidden_size": 32, "intermediate_size": 64})
    other = interrupted(env, tmp_path / "wide", wide, after=3, monkeypatch=monkeypatch)
    key = prepare(TrainStudentConfig(**TINY), **_prep(env, "sample")).key
    work = tmp_path / "work" / key
    work.mkdir(parents=True)
    shutil.copyfile(other / "latest.pt", work / "latest.pt")
    with caplog.at_level("WARNING", logger="pipeline.student.checkpoint"):
        result = run_train_student(
            TrainStudentConfig(**TINY), **paths(env, tmp_path), progress=False
        )
    assert result["resumed_from_step"] == 0
    same_weights(reference, tmp_path / "student")
    assert (work / "latest.pt.damaged-1").is_file()
    first = caplog.records[0].getMessage()
    assert first == (
        f"checkpoint {work / 'latest.pt'} is unusable (the model state does not fit this run: "
        "model.embed_tokens.weight is float32 (50, 32), this run's is float32 (50, 16)); set "
        "aside as latest.pt.damaged-1"
    )


@pytest.mark.parametrize(
    "name", ["../../escaped.tsv", "/tmp/escaped.tsv", "plots/metrics/../x.tsv"]
)
def test_a_checkpoint_with_curve_names_outside_the_folder_is_refused(
    env, tmp_path, monkeypatch, caplog, name
):
    work = interrupted(env, tmp_path, TrainStudentConfig(**TINY), after=5, monkeypatch=monkeypatch)
    state = torch.load(work / "latest.pt", weights_only=True)
    state["curves"] = {**state["curves"], name: "step\ttrain/loss\n2\t1.0\n"}
    torch.save(state, work / "latest.pt")
    shutil.rmtree(tmp_path / "dvclive")  # as `dvc repro` deletes outputs before a re-run
    with caplog.at_level("WARNING", logger="pipeline.student.checkpoint"):
        result = run_train_student(
            TrainStudentConfig(**TINY), **paths(env, tmp_path), progress=False
        )
    assert result["resumed_from_step"] == 2  # the previous checkpoint, whose names are fine
    assert caplog.records[0].getMessage() == (
        f"checkpoint {work / 'latest.pt'} is unusable (curve file '{name}' is outside "
        "plots/metrics/ of the curves folder (only relative .tsv names there are written "
        "back)); set aside as latest.pt.damaged-1"
    )
    assert not (tmp_path.parent / "escaped.tsv").exists() and not Path("/tmp/escaped.tsv").exists()
    assert not (tmp_path / "dvclive" / "x.tsv").exists()


def test_curves_refuse_a_snapshot_naming_a_file_outside(tmp_path):
    from pipeline.core.curves import Curves
    from pipeline.core.errors import InputError

    with pytest.raises(InputError) as e:
        Curves(tmp_path / "live", 2, {"plots/metrics/../../../x.tsv": "step\tv\n"})
    assert str(e.value) == (
        f"{tmp_path / 'live'}: curve file 'plots/metrics/../../../x.tsv' is outside "
        "plots/metrics/ of the curves folder (only relative .tsv names there are written back)"
    )
    assert not (tmp_path / "live").exists()


def test_save_keeps_the_previous_checkpoint_and_a_kill_between_renames_resumes_it(tmp_path):
    from pipeline.student import checkpoint as ckpt

    for step in (2, 4):
        ckpt.save(tmp_path, {"step": step})
    assert torch.load(tmp_path / "latest.pt", weights_only=True) == {"step": 4}
    assert torch.load(tmp_path / "previous.pt", weights_only=True) == {"step": 2}
    # A kill between the two renames of the next save: previous.pt and a temp file only.
    (tmp_path / "latest.pt").replace(tmp_path / "previous.pt")
    (tmp_path / ".latest.pt.tmp-123").write_bytes(b"partial")
    seen = []
    state = {
        "step": 4,
        "seconds": 1.0,
        "trainer": {"model": {}, "optimizer": {}, "scheduler": {}},
        "rng": ckpt.rng_state(),
        "curves": {},
    }
    torch.save(state, tmp_path / "previous.pt")
    assert ckpt.resume(tmp_path, seen.append)["step"] == 4
    assert len(seen) == 1 and not (tmp_path / ".latest.pt.tmp-123").exists()
    ckpt.remove(tmp_path / "key")  # nothing there: no error


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_a_gpu_is_refused_before_any_work(tmp_path) -> None:
    """The student stages resolve `device` with the one rule of pipeline.core.device: the same
    message as teacher_logits, naming the stage's key, before a rank is started."""
    from pipeline.classify.student import ClassifyStudentConfig
    from pipeline.classify.student import _resolve as classify_device
    from pipeline.student.train_student import check_launch

    with pytest.raises(ConfigError) as e:
        check_launch(TrainStudentConfig(device="cuda"), logits=tmp_path / "l.zarr", teacher=None)
    assert str(e.value) == (
        "train_student.device: cuda requested but no CUDA device is available to torch; "
        "use auto or cpu"
    )
    with pytest.raises(ConfigError, match=r"^classify_student\.device: cuda requested"):
        classify_device(ClassifyStudentConfig(device="cuda"))
    assert check_launch(TrainStudentConfig(), logits=tmp_path / "l.zarr", teacher=None) is None


def test_singleton_weight_below_one_needs_its_estimator_on_a_sample_store() -> None:
    """`singleton_weight` < 1 shrinks the empirical estimator at T = 1: on a sample store that
    keeps logprobs, T != 1 or inclusion weights with it is a ConfigError naming the key; top-k
    stores ignore it, and a store without logprobs says first what it lacks."""
    from pipeline.student.trainer import check_loss_for_store

    with_lp = {"method": "sample", "dtypes": {"ids": "int32", "logprobs": "float16"}}
    kw = dict(loss="kl", store="s.zarr", singleton_weight=0.5)
    with pytest.raises(ConfigError) as e:
        check_loss_for_store(with_lp, temperature=2.0, sample_weights="empirical", **kw)
    assert str(e.value) == (
        "train_student.singleton_weight: 0.5 shrinks the empirical estimator at temperature 1, "
        "but temperature is 2.0; set singleton_weight: 1, or temperature: 1.0"
    )
    with pytest.raises(ConfigError, match=r"but sample_weights is 'inclusion'; set"):
        check_loss_for_store(with_lp, temperature=1.0, sample_weights="inclusion", **kw)
    for ok in (
        dict(temperature=2.0, sample_weights="inclusion", singleton_weight=1.0),
        dict(temperature=1.0, sample_weights="empirical", singleton_weight=0.5),
    ):
        check_loss_for_store(with_lp, loss="kl", store="s.zarr", **ok)
    topk = {"method": "topk", "dtypes": with_lp["dtypes"]}
    check_loss_for_store(topk, temperature=2.0, sample_weights="empirical", **kw)
    without = {"method": "sample", "dtypes": {"id_deltas": "uint16"}}
    with pytest.raises(ConfigError, match=r"^train_student\.temperature: 2\.0 needs the teacher"):
        check_loss_for_store(without, temperature=2.0, sample_weights="empirical", **kw)
    with pytest.raises(ConfigError, match=r"^train_student\.singleton_weight: must be in \[0, 1\]"):
        TrainStudentConfig(singleton_weight=1.5)


def test_a_converted_format1_store_trains_the_same_student(env, tmp_path) -> None:
    """A format-1 sample store and its format-2 conversion (`softlabels convert`) give the
    same student: the same draws, so the same gradients, whichever `singleton_weight`."""
    from pipeline.store.convert import convert_store

    data = make_data("sample")
    attrs = make_attrs(data, make_wordlevel(tmp_path / "tok"), "sample")
    build_store(tmp_path / "f1.zarr", data, attrs=attrs, method="sample", format_version=1)
    convert_store(tmp_path / "f1.zarr", tmp_path / "f2.zarr", progress=False)
    for weight in (0.5, 1.0):
        results = []
        for store in ("f1", "f2"):
            p = paths(env, tmp_path / f"{store}-{weight}")
            p["logits"] = tmp_path / f"{store}.zarr"
            cfg = TrainStudentConfig(**{**TINY, "checkpoint_every": 0, "singleton_weight": weight})
            results.append(run_train_student(cfg, **p, progress=False))
        f1, f2 = results
        assert f2["validation_perplexity"] == pytest.approx(f1["validation_perplexity"], rel=1e-5)
        assert f2["final"]["ce"] == pytest.approx(f1["final"]["ce"], rel=1e-5)
