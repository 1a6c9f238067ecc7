"""classify_logits and the classification store: exact distributions, parallel vs direct sources,
resume, and every way a consumer must refuse a store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.classify.corpus import read_labeled_corpus
from pipeline.classify.inference import class_logprobs, load_classifier
from pipeline.classify.logits import ClassifyLogitsConfig, run_classify_logits
from pipeline.classify.store import (
    check_class_store,
    iter_class_chunks,
    read_class_attrs,
    read_class_split,
)
from pipeline.core.errors import ConfigError, InputError, StoreError
from pipeline.store.format import shard_files
from tests.classify_fixtures import corpus_config, labels_of, make_classifier, write_sib_slice
from tests.conftest import make_tokenizer
from tests.work_race import race

CFG = ClassifyLogitsConfig(batch_size=8, chunk_rows=8, shard_chunks=2)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("classify")
    corpus_dir = write_sib_slice(root / "corpus")
    ccfg = corpus_config(corpus_dir)
    corpus = read_labeled_corpus(ccfg)
    tok = make_tokenizer([t for r in corpus.splits.values() for t in r.text], vocab_size=300)
    teacher = make_classifier(root / "teacher", tok, labels_of(corpus_dir))
    store = root / "classify.zarr"
    metrics = run_classify_logits(
        CFG,
        ccfg,
        teacher=teacher,
        out=store,
        metrics=root / "m.json",
        work_dir=root / "work",
        progress=False,
    )
    return root, ccfg, corpus, teacher, store, metrics


def test_store_holds_exact_distributions_from_the_right_source(world):
    root, ccfg, corpus, teacher, store, metrics = world
    attrs = check_class_store(store, corpus)
    assert attrs["complete"] and attrs["labels"] == corpus.labels
    assert attrs["sources"] == {"de": "parallel", "en": "gold", "ja": "parallel"}
    model, tok = load_classifier(teacher, "cpu")
    for split, rows in corpus.splits.items():
        got = read_class_split(store, split)
        own = class_logprobs(model, tok, rows.text, batch_size=8)  # (N, C)
        en = {int(i): k for k, i in enumerate(rows.id) if rows.lang[k] == "en"}
        for k in range(len(rows)):
            src = k if rows.lang[k] == "en" else en[int(rows.id[k])]
            np.testing.assert_allclose(got["logprobs"][k], own[src], atol=1e-5)
            assert got["source_hash"][k] == rows.text_hash[src]
        np.testing.assert_allclose(np.exp(got["logprobs"]).sum(1), 1, atol=1e-5)
        assert (got["text_hash"] == rows.text_hash).all()
    assert metrics["no_parallel_source"] == {"train": {}, "dev": {}, "test": {}}
    assert json.loads((root / "m.json").read_text())["sources"]["de"] == "parallel"


def test_direct_transfer_reads_each_rows_own_text(world, tmp_path):
    root, ccfg, corpus, teacher, _, _ = world
    out = tmp_path / "direct.zarr"
    cfg = ClassifyLogitsConfig(transfer="direct", batch_size=8, chunk_rows=8, shard_chunks=2)
    run_classify_logits(
        cfg, ccfg, teacher=teacher, out=out, metrics=tmp_path / "m.json",
        work_dir=tmp_path / "w", progress=False,
    )  # fmt: skip
    got = read_class_split(out, "dev")
    assert (got["source_hash"] == corpus.splits["dev"].text_hash).all()
    assert read_class_attrs(out)["sources"]["ja"] == "direct"


def test_rows_without_a_parallel_source_are_counted(world, tmp_path):
    root, ccfg, _, teacher, _, _ = world
    corpus_dir = shutil.copytree(Path(ccfg.path), tmp_path / "c")
    lines = (corpus_dir / "dev.jsonl").read_text("utf-8").splitlines(keepends=True)
    first_en = next(i for i, x in enumerate(lines) if json.loads(x)["lang"] == "en")
    dropped = json.loads(lines.pop(first_en))["id"]
    (corpus_dir / "dev.jsonl").write_text("".join(lines), "utf-8")
    m = run_classify_logits(
        CFG, corpus_config(corpus_dir), teacher=teacher, out=tmp_path / "s.zarr",
        metrics=tmp_path / "m.json", work_dir=tmp_path / "w", progress=False,
    )  # fmt: skip
    assert m["no_parallel_source"]["dev"] == {"de": 1, "ja": 1}, dropped


def test_a_killed_run_resumes_to_the_same_bytes(world, tmp_path, monkeypatch):
    root, ccfg, _, teacher, store, _ = world
    import pipeline.classify.logits as mod

    real, calls = mod.write_shard_arrays, []

    def dying(*a, **k):
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(mod, "write_shard_arrays", dying)
    out, work = tmp_path / "s.zarr", tmp_path / "w"
    kw = dict(teacher=teacher, out=out, metrics=tmp_path / "m.json", work_dir=work, progress=False)
    with pytest.raises(KeyboardInterrupt):
        run_classify_logits(CFG, ccfg, **kw)
    assert not out.exists() and not (tmp_path / "m.json").exists()
    monkeypatch.setattr(mod, "write_shard_arrays", lambda *a, **k: calls.append(2) or real(*a, **k))
    run_classify_logits(CFG, ccfg, **kw)
    assert calls.count(1) == 3 and 2 in calls
    files = sorted(p.relative_to(store) for p in store.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    for f in files:
        assert (store / f).read_bytes() == (out / f).read_bytes(), f
    assert [p.suffix for p in work.iterdir()] == [".lock"]  # the work folder itself is gone


def _same_files(a: Path, b: Path) -> None:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_two_concurrent_runs_compute_the_store_once(world, tmp_path, monkeypatch, caplog):
    """A second run of the same key waits for the first, then finds the store in place and
    finishes without computing: every shard computed once, the same store and metrics."""
    import pipeline.classify.logits as mod

    root, ccfg, _, teacher, store, metrics = world
    out = tmp_path / "s.zarr"
    kw = dict(teacher=teacher, out=out, metrics=tmp_path / "m.json", work_dir=tmp_path / "w")
    results, errors, computed = race(
        monkeypatch,
        caplog,
        mod,
        "write_shard_arrays",
        lambda: run_classify_logits(CFG, ccfg, progress=False, **kw),
    )
    assert errors == []
    assert results == {"first": metrics, "second": metrics}
    assert len(computed) == len(set(computed)) == len(store_shards(store))  # each shard once
    _same_files(store, out)
    assert sum("another classify_logits run (pid" in m for m in caplog.messages) == 1
    assert sum("computed by another run of classify_logits" in m for m in caplog.messages) == 1


def store_shards(store: Path) -> list[tuple[str, int]]:
    from pipeline.classify.store import ClassStoreSpec
    from pipeline.store.format import read_attrs

    return ClassStoreSpec.from_attrs(read_attrs(store)).all_shards()


def test_metrics_are_written_only_once_the_store_is_in_place(world, tmp_path, monkeypatch):
    """When the metrics are written the store is in place and complete; if writing them fails,
    one line says so, and the rerun writes them without computing anything."""
    import pipeline.classify.logits as mod
    import pipeline.store.work as work

    root, ccfg, _, teacher, store, metrics = world
    out, mpath = tmp_path / "s.zarr", tmp_path / "m.json"
    real, seen = work.write_json, []

    def read_only(path, data) -> None:
        if Path(path) == mpath:
            seen.append(read_class_attrs(out)["complete"])
            raise PermissionError(13, "Permission denied", str(path))
        real(path, data)

    monkeypatch.setattr(work, "write_json", read_only)
    kw = dict(teacher=teacher, out=out, metrics=mpath, work_dir=tmp_path / "w", progress=False)
    with pytest.raises(StoreError) as e:
        run_classify_logits(CFG, ccfg, **kw)
    assert seen == [True]
    assert str(e.value) == (
        f"{out} is in place and complete, but writing its metrics to {mpath} failed ([Errno 13] "
        f"Permission denied: '{mpath}'): make {tmp_path} writable (or choose another output "
        "path) and re-run classify_logits (it finds the store in place and writes only the "
        "metrics)"
    )
    assert not mpath.exists()
    monkeypatch.setattr(work, "write_json", real)
    monkeypatch.setattr(mod, "write_shard_arrays", None)  # nothing may be computed
    assert run_classify_logits(CFG, ccfg, **kw) == metrics
    assert json.loads(mpath.read_text()) == metrics
    _same_files(store, out)


def test_teacher_with_another_head_size_is_refused(world, tmp_path):
    root, ccfg, corpus, _, _, _ = world
    tok = make_tokenizer(corpus.splits["dev"].text, vocab_size=280)
    bad = make_classifier(tmp_path / "t5", tok, corpus.labels[:5])
    with pytest.raises(InputError, match="5 classes but the label set has 7"):
        run_classify_logits(
            CFG, ccfg, teacher=bad, out=tmp_path / "s.zarr", metrics=tmp_path / "m.json",
            work_dir=tmp_path / "w", progress=False,
        )  # fmt: skip
    assert not (tmp_path / "s.zarr").exists()


def test_parallel_source_must_be_a_labeled_language(world, tmp_path):
    root, ccfg, _, teacher, _, _ = world
    cfg = ClassifyLogitsConfig(parallel_source="de", chunk_rows=8)
    with pytest.raises(ConfigError, match=r"classify_logits.parallel_source: 'de' is not one of"):
        run_classify_logits(
            cfg, ccfg, teacher=teacher, out=tmp_path / "s.zarr", metrics=tmp_path / "m.json",
            work_dir=tmp_path / "w", progress=False,
        )  # fmt: skip


def test_consumer_refuses_another_corpus_naming_the_row(world, tmp_path):
    root, ccfg, _, _, store, _ = world
    corpus_dir = shutil.copytree(Path(ccfg.path), tmp_path / "c")
    lines = (corpus_dir / "train.jsonl").read_text("utf-8").splitlines(keepends=True)
    rec = json.loads(lines[5])
    rec["text"] += " (edited)"
    lines[5] = json.dumps(rec, ensure_ascii=False) + "\n"
    (corpus_dir / "train.jsonl").write_text("".join(lines), "utf-8")
    other = read_labeled_corpus(corpus_config(corpus_dir))
    with pytest.raises(StoreError, match=rf"train row 5 \(lang={rec['lang']}, id={rec['id']}\)"):
        check_class_store(store, other)


def test_consumer_refuses_another_label_set(world, tmp_path):
    root, ccfg, _, _, store, _ = world
    corpus_dir = shutil.copytree(Path(ccfg.path), tmp_path / "c")
    labels = labels_of(corpus_dir)
    (corpus_dir / "labels.txt").write_text("\n".join(labels[::-1]) + "\n", "utf-8")
    with pytest.raises(StoreError, match="labels differ"):
        check_class_store(store, read_labeled_corpus(corpus_config(corpus_dir)))


def test_consumer_refuses_a_damaged_or_incomplete_store(world, tmp_path):
    root, ccfg, corpus, _, store, _ = world
    damaged = shutil.copytree(store, tmp_path / "d.zarr")
    f = shard_files(damaged, "train", 1, ("logprobs",))["train/logprobs/1"]
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match=r"train/logprobs/1: checksum mismatch .*damaged"):
        check_class_store(damaged, corpus)
    f.unlink()
    with pytest.raises(StoreError, match="shard file missing"):
        check_class_store(damaged, corpus)
    incomplete = shutil.copytree(store, tmp_path / "i.zarr")
    meta = json.loads((incomplete / "zarr.json").read_text())
    meta["attributes"]["softlabels"]["complete"] = False
    (incomplete / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="not complete"):
        check_class_store(incomplete, corpus)


def test_an_lm_store_is_not_a_classification_store(tmp_path):
    from tests.store_fixtures import build_store

    build_store(tmp_path / "lm.zarr")
    with pytest.raises(StoreError, match="not a classification store"):
        read_class_attrs(tmp_path / "lm.zarr")


def test_streaming_refuses_values_that_are_not_distributions(world, tmp_path):
    root, ccfg, corpus, _, store, _ = world
    # Rewrite one shard with a NaN row through the writer, so checksums still match.
    from pipeline.classify.store import ClassStoreSpec
    from pipeline.store.format import read_attrs, write_shard_arrays

    copy = shutil.copytree(store, tmp_path / "n.zarr")
    spec = ClassStoreSpec.from_attrs(read_attrs(copy))
    a, b = spec.shards("dev")[0]
    data = {k: v[a:b].copy() for k, v in read_class_split(copy, "dev").items()}
    data["logprobs"][2] = np.nan
    write_shard_arrays(copy, spec, "dev", 0, data)
    with pytest.raises(StoreError, match=r"dev row 2: logprobs are not a distribution"):
        list(iter_class_chunks(copy, "dev"))


def test_cli_inspects_and_verifies_a_classification_store(world, tmp_path, capsys):
    from pipeline.cli import main

    root, ccfg, corpus, _, store, _ = world
    assert main(["inspect", str(store)]) == 0
    out = capsys.readouterr().out
    assert "classification store" in out and "parallel: de ja" in out and "gold: en" in out
    params = tmp_path / "params.yaml"
    import yaml

    params.write_text(yaml.safe_dump({"classify_corpus": {
        "path": ccfg.path, "labels": ccfg.labels, "languages": ccfg.languages,
        "labeled_languages": ccfg.labeled_languages,
    }}))  # fmt: skip
    assert main(["verify", str(store), "--params", str(params)]) == 0
    assert "OK" in capsys.readouterr().out
    damaged = shutil.copytree(store, tmp_path / "d.zarr")
    f = shard_files(damaged, "dev", 0, ("id",))["dev/id/0"]
    f.write_bytes(f.read_bytes()[:-3])
    assert main(["verify", str(damaged)]) == 1
    assert "dev/id/0: checksum mismatch" in capsys.readouterr().out
    assert main(["verify", str(store), "--tokenizer", str(tmp_path)]) == 2
