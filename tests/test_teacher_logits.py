"""The teacher_logits stage: end to end on a tiny teacher, resume after SIGKILL and after a full
disk (byte-identical stores), Dask vs in-process, and the errors for bad inputs."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.capture.teacher_logits import TeacherLogitsConfig, run_teacher_logits
from pipeline.core.cluster import DaskConfig
from pipeline.core.config import from_params, load_params
from pipeline.core.errors import ConfigError, InputError, StoreError
from pipeline.store.format import read_attrs
from pipeline.store.verify import verify_store
from tests.work_race import race

REPO = Path(__file__).resolve().parents[1]
LANGS = ("en", "de", "zh")


def write_tokenized(
    path: Path,
    vocab: int,
    sizes: dict[str, int],
    seq_len: int = 16,
    seed: int = 0,
    high: int | None = None,
) -> Path:
    """A tokenize-stage-like DatasetDict: fixed-length int32 `input_ids` and `lang`."""
    import datasets

    rng = np.random.default_rng(seed)
    features = datasets.Features(
        {
            "input_ids": datasets.List(datasets.Value("int32"), length=seq_len),
            "lang": datasets.Value("string"),
        }
    )
    splits = {}
    for split, n in sizes.items():
        rows = rng.integers(0, high or vocab, (n, seq_len), dtype=np.int32)
        langs = [LANGS[i % len(LANGS)] for i in range(n)]
        splits[split] = datasets.Dataset.from_dict(
            {"input_ids": rows.tolist(), "lang": langs}, features=features
        )
    datasets.DatasetDict(splits).save_to_disk(str(path))
    return path


def small_cfg(**overrides) -> TeacherLogitsConfig:
    base = TeacherLogitsConfig(
        method="sample",
        k=8,
        batch_size=3,
        chunk_sequences=2,
        shard_chunks=2,
        head_chunk_tokens=20,
        device="cpu",
    )
    return replace(base, **overrides)


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under root, by relative path (to compare stores byte for byte)."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def run(cfg: TeacherLogitsConfig, teacher: Path, tokenized: Path, root: Path) -> dict:
    return run_teacher_logits(
        cfg,
        teacher=teacher,
        tokenized=tokenized,
        out=root / "out" / "teacher.zarr",
        metrics=root / "metrics.json",
        work_dir=root / "work",
    )


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory, tiny_tokenizer) -> Path:
    root = tmp_path_factory.mktemp("tokenized")
    return write_tokenized(root / "tok", len(tiny_tokenizer), {"train": 13, "validation": 5})


@pytest.mark.parametrize(
    ("method", "dtype", "passes"),
    [
        ("topk", "auto", "auto"),
        ("sample", "auto", "auto"),
        ("sample", "auto", "eager"),
        ("sample", "bfloat16", "auto"),
        ("topk", "auto", "fused"),
        ("sample", "auto", "fused"),
    ],
)
def test_end_to_end_store_verifies(
    tmp_path, tiny_teacher, tokenized, method, dtype, passes, caplog
) -> None:
    cfg = small_cfg(method=method, dtype=dtype, vocab_passes=passes)
    with caplog.at_level(logging.INFO, logger="pipeline.capture.teacher_logits"):
        metrics = run(cfg, tiny_teacher, tokenized, tmp_path)
    # the time split is logged: body, head, passes and write, each with its share
    (split,) = [m for m in caplog.messages if m.startswith("time split: ")]
    assert re.fullmatch(
        r"time split: body [\d.]+ s \(\d+%\), head [\d.]+ s \(\d+%\), passes [\d.]+ s "
        r"\(\d+%\), write [\d.]+ s \(\d+%\)",
        split,
    )
    out = tmp_path / "out" / "teacher.zarr"
    assert verify_store(out, tokenizer=tiny_teacher, tokenized=tokenized) == []
    attrs = read_attrs(out)
    prov = json.loads((tiny_teacher / "provenance.json").read_text())
    assert attrs["complete"] is True and attrs["method"] == method and attrs["k"] == 8
    assert attrs["teacher"]["sha256"] == prov["sha256"]
    assert attrs["tokenizer"] == prov["tokenizer"]
    # metrics: written, per language and overall, deterministic content
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert metrics["tokens"] == (13 + 5) * 16
    assert sorted(metrics["per_language"]) == sorted(LANGS)
    assert sum(v["tokens"] for v in metrics["per_language"].values()) == metrics["tokens"]
    overall = metrics["overall"]
    assert 0 < overall["covered_mass"] <= 1 and 0 < overall["top1_prob"] <= 1
    assert overall["entropy"] > 0
    assert 0 < metrics["storage"]["bytes_per_entry"] < 6
    # nothing left behind: the work folder is deleted (only its small lock file, which records
    # the finished output, stays), no partial files next to the output
    assert [p.suffix for p in (tmp_path / "work").iterdir()] == [".lock"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["teacher.zarr"]
    assert not [p for p in out.rglob("*") if p.name.endswith((".partial", ".tmp"))]


def test_store_holds_the_kernel_outputs_per_shard_stream(tmp_path, tiny_teacher, tokenized):
    """Row r of shard s is the kernel's output for that row, with shard s's sampling stream."""
    import torch

    from pipeline.capture.kernel import SoftLabelKernel, draw_uniforms, shard_generator
    from pipeline.capture.shards import load_teacher
    from pipeline.data.tokenized import load_tokenized
    from pipeline.store.format import open_split
    from pipeline.store.labels import decode_block, encode_draws

    cfg = small_cfg(batch_size=4)  # one batch per shard (shards hold 4 sequences)
    run(cfg, tiny_teacher, tokenized, tmp_path)
    arrays = open_split(tmp_path / "out" / "teacher.zarr", "train")
    ids = load_tokenized(tokenized)["train"].input_ids
    kernel = SoftLabelKernel(
        load_teacher(tiny_teacher, "cpu", "float32"), method="sample", k=8, head_chunk_tokens=20
    )
    for shard, (a, b) in ((1, (4, 8)), (3, (12, 13))):
        u = draw_uniforms(shard_generator(cfg.seed, "train", shard), (b - a) * 16, 8, cfg.sampling)
        out = kernel(torch.from_numpy(ids[a:b].astype(np.int64)), u)
        draws = out.ids.numpy()  # (n, L, k)
        enc = encode_draws(draws, out.logprobs.numpy(), ids_as="uint16", counts_as="uint8")
        for name in ("id_deltas", "extra_draws"):
            assert np.array_equal(arrays[name][a:b], enc[name])
        assert np.array_equal(arrays["entropy"][a:b], out.entropy.numpy().astype(np.float16))
        assert np.array_equal(arrays["input_ids"][a:b], ids[a:b])
        # The encoding keeps the draws: ids repeated by their counts are the sorted draws.
        dec = decode_block({name: arr[a:b] for name, arr in arrays.items()})
        stored_ids, counts = dec["ids"].reshape(-1, 8), dec["counts"].reshape(-1, 8)
        for p, row in enumerate(np.sort(draws.reshape(-1, 8), axis=1)):
            assert np.array_equal(np.repeat(stored_ids[p], counts[p]), row)


def _stage_cmd(params: Path, teacher: Path, tokenized: Path, root: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pipeline.stages.teacher_logits",
        "--params",
        str(params),
        "--teacher",
        str(teacher),
        "--tokenized",
        str(tokenized),
        "--out",
        str(root / "out" / "teacher.zarr"),
        "--metrics",
        str(root / "metrics.json"),
        "--work-dir",
        str(root / "work"),
    ]


def _write_params(path: Path, section: dict) -> Path:
    path.write_text(yaml.safe_dump({"teacher_logits": section}), "utf-8")
    return path


@pytest.mark.slow
def test_sigkill_and_rerun_gives_a_byte_identical_store(tmp_path, tiny_teacher, tiny_tokenizer):
    """Kill -9 the stage twice mid-run (after the 1st and a later shard record), re-run: the
    store is byte-identical to an uninterrupted run and has no partial files."""
    tok = write_tokenized(tmp_path / "tok", len(tiny_tokenizer), {"train": 56, "validation": 8})
    section = {
        "method": "sample",
        "k": 8,
        "batch_size": 1,
        "chunk_sequences": 1,
        "shard_chunks": 2,
        "head_chunk_tokens": 16,
        "device": "cpu",
    }
    params = _write_params(tmp_path / "params.yaml", section)
    cfg = from_params(TeacherLogitsConfig, load_params(params), "teacher_logits")
    run(cfg, tiny_teacher, tok, tmp_path / "clean")
    clean = tree_bytes(tmp_path / "clean" / "out" / "teacher.zarr")

    root = tmp_path / "killed"
    cmd = _stage_cmd(params, tiny_teacher, tok, root)
    for wait_for in (1, 6):
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if len(list((root / "work").glob("*/shards/*.json"))) >= wait_for:
                break
            time.sleep(0.005)
        assert proc.poll() is None, f"finished before the kill: {proc.stderr.read().decode()}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert not (root / "out").exists()  # the output appears only complete
        done = len(list((root / "work").glob("*/shards/*.json")))
        assert wait_for <= done < 32, done  # 28 + 4 shards
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "resuming:" in result.stderr
    resumed = tree_bytes(root / "out" / "teacher.zarr")
    assert resumed.keys() == clean.keys()
    assert [k for k in clean if clean[k] != resumed[k]] == []
    assert [p.suffix for p in (root / "work").iterdir()] == [".lock"]
    assert json.loads((root / "metrics.json").read_text()) == json.loads(
        (tmp_path / "clean" / "metrics.json").read_text()
    )


def test_disk_full_keeps_finished_shards_and_rerun_resumes(
    tmp_path, tiny_teacher, tokenized, monkeypatch
) -> None:
    """ENOSPC on the 3rd shard: a clear error, 2 shards kept; one of them is then corrupted on
    disk; the rerun recomputes it and the rest and matches an uninterrupted run byte for byte."""
    import pipeline.capture.shards as shards

    cfg = small_cfg()
    run(cfg, tiny_teacher, tokenized, tmp_path / "clean")
    clean = tree_bytes(tmp_path / "clean" / "out" / "teacher.zarr")

    real, calls = shards.write_shard, []

    def failing(*args, **kwargs):
        calls.append(args[2:4])
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(shards, "write_shard", failing)
    root = tmp_path / "full"
    with pytest.raises(StoreError) as e:
        run(cfg, tiny_teacher, tokenized, root)
    (kdir,) = (p for p in (root / "work").iterdir() if p.is_dir())
    assert str(e.value) == (
        "disk full while writing soft labels ([Errno 28] No space left on device); the 2 "
        f"finished shard(s) are kept in {kdir}: free space and re-run teacher_logits to resume"
    )
    assert not (root / "out").exists()
    monkeypatch.setattr(shards, "write_shard", real)
    shard_file = kdir / "teacher.zarr" / "train" / "id_deltas" / "c" / "1" / "0" / "0"
    shard_file.write_bytes(shard_file.read_bytes()[:-1] + b"\0")  # corrupt a recorded shard
    recomputed = []

    def counting(*args, **kwargs):
        recomputed.append(args[2:4])
        return real(*args, **kwargs)

    monkeypatch.setattr(shards, "write_shard", counting)
    run(cfg, tiny_teacher, tokenized, root)
    assert recomputed == [
        ("train", 1),
        ("train", 2),
        ("train", 3),
        ("validation", 0),
        ("validation", 1),
    ]
    assert tree_bytes(root / "out" / "teacher.zarr") == clean


@pytest.fixture(scope="module")
def clean(tmp_path_factory, tiny_teacher, tokenized) -> tuple[dict[str, bytes], dict]:
    """An uninterrupted run of small_cfg(): the store's bytes and the metrics."""
    root = tmp_path_factory.mktemp("clean")
    metrics = run(small_cfg(), tiny_teacher, tokenized, root)
    return tree_bytes(root / "out" / "teacher.zarr"), metrics


def counting_write_shard(monkeypatch) -> list[tuple[str, int]]:
    """Record every (split, shard) the stage computes and writes."""
    import pipeline.capture.shards as shards

    real, calls = shards.write_shard, []

    def counting(*args, **kwargs):
        calls.append(args[2:4])
        return real(*args, **kwargs)

    monkeypatch.setattr(shards, "write_shard", counting)
    return calls


ADVICE = {
    errno.ENOSPC: "free space on the filesystem of {folder}",
    errno.EROFS: "make {folder} writable (or choose another output path)",
}


@pytest.mark.parametrize("code", sorted(ADVICE))
def test_failed_copy_to_another_filesystem_keeps_the_finished_store(
    tmp_path, tiny_teacher, tokenized, clean, monkeypatch, code
) -> None:
    """--out on another filesystem that fills up (or is read-only) mid-copy: the partial copy is
    deleted, the previous output and the finished work store are kept, no metrics are written,
    the error is one line; the rerun moves the kept store into place without computing."""
    import pipeline.store.work as work

    clean_bytes, clean_metrics = clean
    monkeypatch.setattr(work, "same_filesystem", lambda a, b: False)
    real, copied = work.copy_file, []

    def filling(src: Path, dst: Path) -> None:
        if len(copied) == 5:
            raise OSError(code, os.strerror(code))
        real(src, dst)
        copied.append(dst)

    monkeypatch.setattr(work, "copy_file", filling)
    out = tmp_path / "out" / "teacher.zarr"
    out.mkdir(parents=True)
    (out / "previous").write_text("the previous output")
    with pytest.raises(StoreError) as e:
        run(small_cfg(), tiny_teacher, tokenized, tmp_path)
    (kdir,) = (p for p in (tmp_path / "work").iterdir() if p.is_dir())
    assert str(e.value) == (
        f"cannot put the finished store in place at {out} ([Errno {code}] {os.strerror(code)}); "
        f"the partial copy was removed and the finished store is kept in {kdir / 'teacher.zarr'}"
        f": {ADVICE[code].format(folder=out.parent)} and re-run teacher_logits (it moves the kept "
        "store into place without recomputing)"
    )
    assert len(copied) == 5 and all(".teacher.zarr.partial-" in str(p) for p in copied)
    assert [p.name for p in out.parent.iterdir()] == ["teacher.zarr"]  # no partial copy left
    assert tree_bytes(out) == {"previous": b"the previous output"}
    assert not (tmp_path / "metrics.json").exists()
    assert tree_bytes(kdir / "teacher.zarr") == clean_bytes  # finished, complete, intact

    monkeypatch.setattr(work, "copy_file", real)  # space freed; still another filesystem
    computed = counting_write_shard(monkeypatch)
    assert run(small_cfg(), tiny_teacher, tokenized, tmp_path) == clean_metrics
    assert computed == []
    assert tree_bytes(out) == clean_bytes
    assert [p.name for p in out.parent.iterdir()] == ["teacher.zarr"]
    assert json.loads((tmp_path / "metrics.json").read_text()) == clean_metrics
    assert [p.suffix for p in (tmp_path / "work").iterdir()] == [".lock"]


def test_partial_copy_of_a_killed_run_is_removed_by_the_next_run(
    tmp_path, tiny_teacher, tokenized
) -> None:
    """A `.teacher.zarr.partial-<pid>` whose process is gone (killed mid-copy) is deleted; one
    of a live process (another run copying now) is left alone."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                          capture_output=True, text=True)  # fmt: skip
    stale = tmp_path / "out" / f".teacher.zarr.partial-{int(gone.stdout)}"
    (stale / "train").mkdir(parents=True)
    (stale / "train" / "ids").write_bytes(b"\0" * 4096)
    live = tmp_path / "out" / f".teacher.zarr.partial-{os.getppid()}"
    live.mkdir()
    run(small_cfg(), tiny_teacher, tokenized, tmp_path)
    assert not stale.exists() and live.is_dir()


def test_metrics_are_written_only_once_the_store_is_in_place(
    tmp_path, tiny_teacher, tokenized, clean, monkeypatch
) -> None:
    """When the metrics are written the store is in place and complete; if writing them fails,
    one line says so, and the rerun writes them without computing anything."""
    import pipeline.store.work as work

    clean_bytes, clean_metrics = clean
    out, metrics = tmp_path / "out" / "teacher.zarr", tmp_path / "metrics.json"
    real, seen = work.write_json, []

    def full_disk(path, data) -> None:
        if Path(path) == metrics:
            seen.append(read_attrs(out)["complete"])
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(work, "write_json", full_disk)
    with pytest.raises(StoreError) as e:
        run(small_cfg(), tiny_teacher, tokenized, tmp_path)
    assert seen == [True]
    assert str(e.value) == (
        f"{out} is in place and complete, but writing its metrics to {metrics} failed ([Errno 28] "
        f"No space left on device): free space on the filesystem of {tmp_path} and re-run "
        "teacher_logits (it finds the store in place and writes only the metrics)"
    )
    assert not metrics.exists() and tree_bytes(out) == clean_bytes

    monkeypatch.setattr(work, "write_json", real)
    computed = counting_write_shard(monkeypatch)
    assert run(small_cfg(), tiny_teacher, tokenized, tmp_path) == clean_metrics
    assert computed == []
    assert json.loads(metrics.read_text()) == clean_metrics


def test_two_concurrent_runs_compute_the_store_once(
    tmp_path, tiny_teacher, tokenized, clean, monkeypatch, caplog
) -> None:
    """Two runs on the same work dir: the second waits for the first (one line naming its pid),
    then finds the store in place and finishes without computing. Both succeed, every shard is
    computed once, and the store and metrics are those of a single run."""
    import pipeline.capture.shards as shards

    clean_bytes, clean_metrics = clean
    results, errors, computed = race(
        monkeypatch,
        caplog,
        shards,
        "write_shard",
        lambda: run(small_cfg(), tiny_teacher, tokenized, tmp_path),
    )
    assert errors == []
    assert results == {"first": clean_metrics, "second": clean_metrics}
    assert sorted(computed) == sorted(set(computed)) and len(computed) == 6  # each shard once
    out = tmp_path / "out" / "teacher.zarr"
    assert tree_bytes(out) == clean_bytes
    (lock,) = (tmp_path / "work").iterdir()
    kdir = lock.with_suffix("")
    assert [m for m in caplog.messages if "waiting" in m] == [
        f"another teacher_logits run (pid {os.getpid()}) is computing this store in {kdir}; "
        "waiting for it"
    ]
    assert (
        f"{out} is already in place, computed by another run of teacher_logits with the same "
        "key; not recomputing"
    ) in caplog.messages


def test_the_work_lock_names_its_holder_and_is_released_when_it_is_killed(tmp_path, caplog) -> None:
    """Another process holds the lock; this one logs its pid and waits; kill -9 of the holder
    releases the lock (the OS drops it) and this one gets it."""

    from pipeline.store.work import lock_work

    kdir, out = tmp_path / "work" / "0123abcd", tmp_path / "out" / "teacher.zarr"
    code = (
        "import time\nfrom pathlib import Path\nfrom pipeline.store.work import lock_work\n"
        f"with lock_work(Path({str(kdir)!r}), Path({str(out)!r}), 'teacher_logits'):\n"
        "    print('locked', flush=True)\n    time.sleep(120)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True
    )

    class KillOnWaiting(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "waiting for it" in record.getMessage():
                os.kill(holder.pid, signal.SIGKILL)

    handler = KillOnWaiting()
    logging.getLogger("pipeline.store.work").addHandler(handler)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with (
            caplog.at_level(logging.INFO, logger="pipeline.store.work"),
            lock_work(kdir, out, "teacher_logits") as lock,
        ):
            assert lock.previous == {"pid": holder.pid}
    finally:
        logging.getLogger("pipeline.store.work").removeHandler(handler)
        holder.kill()
        holder.wait()
    assert holder.returncode == -signal.SIGKILL
    assert caplog.messages == [
        f"another teacher_logits run (pid {holder.pid}) is computing this store in {kdir}; "
        "waiting for it"
    ]


@pytest.mark.slow
@pytest.mark.parametrize("passes", ["auto", "fused"])
def test_dask_local_cluster_is_byte_identical_to_in_process(
    tmp_path, tiny_teacher, tokenized, passes
):
    """Also with fused passes: each worker compiles the kernel itself, in a worker thread, and
    gets the in-process bits."""
    cfg = small_cfg(vocab_passes=passes)  # sample: every shard draws from its own seeded stream
    run(cfg, tiny_teacher, tokenized, tmp_path / "local")
    dask_cfg = replace(cfg, dask=DaskConfig(enabled=True, n_workers=2))
    metrics = run(dask_cfg, tiny_teacher, tokenized, tmp_path / "dask")
    local = tree_bytes(tmp_path / "local" / "out" / "teacher.zarr")
    assert tree_bytes(tmp_path / "dask" / "out" / "teacher.zarr") == local
    assert metrics == json.loads((tmp_path / "local" / "metrics.json").read_text())


# -- bad inputs --------------------------------------------------------------------------------


def test_token_ids_outside_the_teacher_vocabulary(tmp_path, tiny_teacher, tiny_tokenizer):
    vocab = len(tiny_tokenizer)
    tok = write_tokenized(tmp_path / "tok", vocab, {"train": 4, "validation": 2}, high=vocab + 50)
    with pytest.raises(InputError) as e:
        run(small_cfg(), tiny_teacher, tok, tmp_path)
    bad = max(int(r.max()) for r in _ids(tok))
    assert str(e.value) == (
        f"{tok}: split 'train' has token id {bad}, outside the teacher's vocabulary "
        f"[0, {vocab}) ({tiny_teacher / 'provenance.json'}); the data was tokenized with another "
        "tokenizer: re-run `dvc repro tokenize` with this teacher"
    )
    assert not (tmp_path / "work").exists()


def _ids(tok: Path) -> list[np.ndarray]:
    from pipeline.data.tokenized import load_tokenized

    return [s.input_ids for s in load_tokenized(tok).splits.values()]


@pytest.mark.parametrize("passes", ["native", "eager"])
def test_a_teacher_with_non_finite_logits_is_refused(tmp_path, tiny_tokenizer, passes) -> None:
    """A teacher whose logits hold NaN (here: one token's embedding row is NaN, as broken
    weights or a half-precision overflow give) is an error naming the first bad sequence, not
    a store of garbage labels: no store appears, the shard is not recorded, the shard before it
    stays recorded."""
    from transformers import AutoModelForCausalLM

    from pipeline.core.provenance import PROVENANCE_FILE, files_sha256, write_json
    from pipeline.data.tokenized import write_tokenized as write_rows
    from tests.conftest import make_teacher

    teacher = make_teacher(tmp_path / "teacher", tiny_tokenizer)
    vocab = len(tiny_tokenizer)
    probe = {i * 7919 % vocab for i in range(8)}  # check_split's probe must stay finite
    bad = next(t for t in range(vocab - 1, 0, -1) if t not in probe)
    model = AutoModelForCausalLM.from_pretrained(teacher)
    with torch.no_grad():
        model.get_input_embeddings().weight[bad] = float("nan")
    model.save_pretrained(teacher)
    prov = json.loads((teacher / PROVENANCE_FILE).read_text())
    prov["sha256"], prov["files"] = files_sha256(teacher)
    write_json(teacher / PROVENANCE_FILE, prov)
    rng = np.random.default_rng(0)
    train = rng.integers(0, bad, (6, 16), dtype=np.int32)
    train[4, 9] = bad
    validation = rng.integers(0, bad, (2, 16), dtype=np.int32)
    tok = tmp_path / "tok"
    write_rows({"train": (train, ["en"] * 6), "validation": (validation, ["de"] * 2)}, tok)
    with pytest.raises(InputError) as e:
        run(small_cfg(vocab_passes=passes), teacher, tok, tmp_path)
    assert re.fullmatch(
        r"teacher_logits: the teacher's logits are not finite \(NaN or infinite\) in split "
        r"'train', sequence 4, position \d+ \(\d+ positions in this batch\); check the "
        r"teacher's weights, or run it in float32 \(teacher_logits.dtype\) if half precision "
        r"overflows",
        str(e.value),
    ), str(e.value)
    assert not (tmp_path / "out" / "teacher.zarr").exists()
    records = [json.loads(p.read_text()) for p in (tmp_path / "work").rglob("*.json")]
    done = {(r.get("split"), r.get("shard")) for r in records}
    assert ("train", 0) in done and ("train", 1) not in done  # what was computed is kept


@pytest.mark.parametrize("excess", [1, 10_000])
def test_k_larger_than_the_vocabulary(tmp_path, tiny_teacher, tokenized, tiny_tokenizer, excess):
    vocab = len(tiny_tokenizer)
    k = vocab + excess
    with pytest.raises(ConfigError) as e:
        run(small_cfg(k=k), tiny_teacher, tokenized, tmp_path)
    assert str(e.value) == (
        f"teacher_logits.k: must be between 1 and the teacher's vocabulary size {vocab} "
        f"({tiny_teacher / 'provenance.json'}), got {k}"
    )


def test_k_below_one_is_refused_by_the_params_check() -> None:
    with pytest.raises(ConfigError) as e:
        from_params(TeacherLogitsConfig, {"teacher_logits": {"k": 0}}, "teacher_logits")
    assert str(e.value) == "teacher_logits.k: must be >= 1, got 0"


def test_missing_split(tmp_path, tiny_teacher, tiny_tokenizer) -> None:
    tok = write_tokenized(tmp_path / "tok", len(tiny_tokenizer), {"train": 4})
    with pytest.raises(InputError) as e:
        run(small_cfg(), tiny_teacher, tok, tmp_path)
    assert str(e.value) == (
        f"{tok}: split 'validation' is missing (found: train); re-run `dvc repro tokenize`"
    )


def test_rows_longer_than_the_teacher_context(tmp_path, tiny_teacher, tiny_tokenizer) -> None:
    tok = write_tokenized(
        tmp_path / "tok", len(tiny_tokenizer), {"train": 2, "validation": 1}, seq_len=300
    )
    with pytest.raises(InputError) as e:
        run(small_cfg(), tiny_teacher, tok, tmp_path)
    assert str(e.value) == (
        f"{tok}: split 'train' has rows of 300 tokens, longer than the teacher's context (256, "
        f"{tiny_teacher / 'provenance.json'}); re-tokenize with tokenize.seq_len <= 256"
    )


def test_float16_on_cpu_and_missing_cuda_are_refused(tmp_path, tiny_teacher, tokenized) -> None:
    import torch

    with pytest.raises(ConfigError) as e:
        run(small_cfg(dtype="float16"), tiny_teacher, tokenized, tmp_path)
    assert str(e.value) == (
        "teacher_logits.dtype: float16 is not supported on CPU (slow or missing kernels); "
        "use float32 or bfloat16, or run on CUDA"
    )
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError) as e:
            run(small_cfg(device="cuda"), tiny_teacher, tokenized, tmp_path)
        assert str(e.value) == (
            "teacher_logits.device: cuda requested but no CUDA device is available to torch; "
            "use auto or cpu"
        )


def test_stage_script_reports_errors_and_prints_params_help(tmp_path, tiny_teacher, tokenized):
    params = _write_params(tmp_path / "params.yaml", {"k": 0})
    cmd = _stage_cmd(params, tiny_teacher, tokenized, tmp_path)
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error: teacher_logits.k: must be >= 1, got 0"
    )
    helped = subprocess.run(cmd[:3] + ["--help"], capture_output=True, text=True, timeout=60)
    assert "teacher_logits.head_chunk_tokens [default: 1024]" in helped.stdout
    assert "teacher_logits.dask.n_workers [default: 2]" in helped.stdout


def test_repository_params_section_parses() -> None:
    cfg = from_params(TeacherLogitsConfig, load_params(REPO / "params.yaml"), "teacher_logits")
    assert cfg.method in ("topk", "sample") and cfg.k >= 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the bench would run")
def test_teacher_benchmark_refuses_cuda_without_a_gpu_instead_of_faking_it() -> None:
    run = subprocess.run(
        [sys.executable, "benchmarks/teacher.py", "--device", "cuda"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 2 and "no CUDA device on this machine" in run.stderr
    assert "{" not in run.stdout  # no JSON line: nothing measured, nothing faked
