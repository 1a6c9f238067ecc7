"""The tokenize stage: output contract, balancing, determinism, and bad input."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest

from pipeline.core.config import from_mapping
from pipeline.core.errors import ConfigError, InputError
from pipeline.core.provenance import ids_fingerprint
from pipeline.data.assemble import DigestSet, balance_picks
from pipeline.data.corpus import SKIP_REASONS, CorpusConfig, read_corpus
from pipeline.data.packing import pack_flat
from pipeline.data.tokenize import TextEncoder, TokenizeConfig, run_tokenize
from pipeline.data.tokenized import SPLITS, features, write_tokenized
from tests.conftest import REPO, write_corpus

LANGS = ["en", "de", "zh"]


def corpus(path: Path, **kw) -> CorpusConfig:
    return CorpusConfig(path=str(path), languages=LANGS, validation_fraction=0.1, **kw)


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def run(tmp_path, tiny_corpus, tiny_teacher, name="tok", **kw):
    cfg = TokenizeConfig(**{"seq_len": 32, "num_proc": 1, **kw})
    out, metrics = tmp_path / name, tmp_path / f"{name}.json"
    result = run_tokenize(cfg, corpus(tiny_corpus), teacher=tiny_teacher, out=out, metrics=metrics)
    return out, metrics, result


def test_output_contract(tmp_path, tiny_corpus, tiny_teacher, tiny_tokenizer):
    out, metrics, result = run(tmp_path, tiny_corpus, tiny_teacher)
    dd = datasets.load_from_disk(str(out))
    assert set(dd) == {"train", "validation"}
    for split in dd.values():
        assert split.features["input_ids"] == datasets.List(datasets.Value("int32"), length=32)
        assert split.features["lang"] == datasets.Value("string")
        assert set(split["lang"]) == set(LANGS)
    ids = np.asarray(dd["train"].data.column("input_ids").combine_chunks().values).reshape(-1, 32)
    assert ids.max() < len(tiny_tokenizer)
    assert (ids == tiny_tokenizer.eos_token_id).any()  # documents are EOS-separated
    # Metrics account for every document and token: nothing dropped silently.
    m = json.loads(metrics.read_text())
    assert m == result
    for lang in LANGS:
        st = m["languages"][lang]
        assert st["train_documents"] + st["validation_documents"] == 60
        assert (
            st["train_tokens"]
            == st["train_tokens_before_balancing"] + st["train_remainder_tokens_dropped"]
        )
        assert set(SKIP_REASONS) <= set(st)
    assert m["files_skipped"] == {"language_not_selected": 0, "not_a_language_code": 0}
    assert m["total"]["train_tokens_after_balancing"] == len(dd["train"]) * 32


def test_slices_processes_and_dask_give_identical_bytes(tmp_path, tiny_corpus, tiny_teacher):
    """The output does not depend on how the corpus is cut or who tokenizes it: one slice per
    file in this process, ~1 KB slices in 2 processes, and ~1 KB slices on a 2-worker
    LocalCluster all write the same bytes."""
    a, _, ra = run(tmp_path, tiny_corpus, tiny_teacher, name="a")
    b, _, rb = run(tmp_path, tiny_corpus, tiny_teacher, name="b", num_proc=2, slice_mb=0.001)
    dask = {"dask": {"enabled": True, "n_workers": 2}, "slice_mb": 0.001}
    cfg = from_mapping(TokenizeConfig, {"seq_len": 32, "num_proc": 1, **dask}, "tokenize")
    c = tmp_path / "c"
    rc = run_tokenize(
        cfg, corpus(tiny_corpus), teacher=tiny_teacher, out=c, metrics=tmp_path / "c.json"
    )
    assert tree_digest(a) == tree_digest(b) == tree_digest(c)
    assert ra == rb == rc


def reference_tokenize(corpus_cfg, cfg, tokenizer, out):
    """The stage's contract computed in memory, the simple way (the former implementation):
    read and split the whole corpus, tokenize, pack per language, balance, shuffle, write."""
    docs = read_corpus(corpus_cfg)
    eos = tokenizer.eos_token_id
    packed = {}
    for split in SPLITS:
        for lang in corpus_cfg.languages:
            texts = getattr(docs, split)[lang]
            ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
            values = np.array([t for d in ids for t in d], np.int32)
            lengths = np.array([len(d) for d in ids], np.int64)
            packed[split, lang] = pack_flat(values, lengths, eos, cfg.seq_len)[0]
    counts = {lang: len(packed["train", lang]) for lang in corpus_cfg.languages}
    picks = balance_picks(counts, cfg.alpha, cfg.seed)
    splits = {}
    for split in SPLITS:
        by_lang = {
            lang: packed[split, lang][picks[lang]] if split == "train" else packed[split, lang]
            for lang in corpus_cfg.languages
        }
        langs = [lang for lang in corpus_cfg.languages for _ in range(len(by_lang[lang]))]
        rows = np.concatenate([by_lang[lang] for lang in corpus_cfg.languages])
        if split == "train":
            perm = np.random.default_rng([cfg.seed, 1 << 20]).permutation(len(rows))
            rows, langs = rows[perm], [langs[i] for i in perm]
        splits[split] = (rows, langs)
    return write_tokenized(splits, out)


def test_streamed_output_equals_the_in_memory_reference(tmp_path, tiny_teacher, tiny_tokenizer):
    """Duplicates across slices and files, a BOM, a language of one document and one of two
    (whose guaranteed validation document moves between streams), records in jsonl and parquet
    mixed with .txt: the streamed stage writes exactly what the in-memory reference writes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.conftest import sample_lines

    root = tmp_path / "corpus"
    lines = {lang: sample_lines(lang, 40) for lang in ("en", "de", "zh")}
    lines["en"] = ["\ufeff" + lines["en"][0], *lines["en"][1:], *lines["en"][:5]]  # BOM + dupes
    lines["fr"] = ["un seul document"]
    lines["es"] = ["dos documentos a", "dos documentos b"]
    write_corpus(root, lines)
    recs = [{"lang": g, "text": t} for g in ("en", "sw") for t in sample_lines(g, 60)[20:]]
    recs.append({"lang": "xx", "text": "not selected"})
    with open(root / "a.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in recs[::2])
    pq.write_table(pa.Table.from_pylist(recs[1::2]), root / "b.parquet", row_group_size=7)
    ccfg = CorpusConfig(path=str(root), languages=["en", "de", "zh", "fr", "es", "sw"])
    cfg = TokenizeConfig(seq_len=16, num_proc=2, slice_mb=0.0005, seed=5)
    out = tmp_path / "o"
    result = run_tokenize(cfg, ccfg, teacher=tiny_teacher, out=out, metrics=tmp_path / "m.json")
    fingerprints = reference_tokenize(ccfg, cfg, tiny_tokenizer, tmp_path / "ref")
    assert result["fingerprints"] == fingerprints
    assert tree_digest(out) == tree_digest(tmp_path / "ref")
    assert result["languages"]["en"]["duplicate"] == 5 + 20  # in en.txt, and records 20..39
    es = result["languages"]["es"]
    assert es["train_documents"] == es["validation_documents"] == 1


def test_split_writer_writes_what_save_to_disk_writes(tmp_path):
    """`SplitWriter` (blocks in, bounded memory) against `datasets.DatasetDict.save_to_disk` of
    the same rows held in memory: the same files, byte for byte (the batching, state.json and
    dataset_info.json follow `datasets`; this fails if a `datasets` release changes them)."""
    import hashlib as hl

    import pyarrow as pa

    rng = np.random.default_rng(0)
    splits = {
        "train": (
            rng.integers(0, 500, (2345, 8), dtype=np.int32),
            list(rng.choice(["en", "zh-Hant"], 2345)),
        ),
        "validation": (rng.integers(0, 500, (7, 8), dtype=np.int32), ["de"] * 7),
    }
    write_tokenized(splits, tmp_path / "ours")
    result = {}
    for split, (rows, langs) in splits.items():
        ids = pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), 8)
        table = pa.table({"input_ids": ids, "lang": pa.array(langs, pa.string())})
        fp = hl.sha256(
            f"{ids_fingerprint(rows)}:{hl.sha256(chr(10).join(langs).encode()).hexdigest()}".encode()
        )
        result[split] = datasets.Dataset(
            table.cast(features(8).arrow_schema),
            info=datasets.DatasetInfo(features=features(8)),
            split=datasets.NamedSplit(split),
            fingerprint=fp.hexdigest()[:16],
        )
    datasets.DatasetDict(result).save_to_disk(
        str(tmp_path / "theirs"), num_shards={s: 1 for s in result}
    )
    assert tree_digest(tmp_path / "ours") == tree_digest(tmp_path / "theirs")


def test_text_encoder_gives_the_tokenizers_ids(tiny_tokenizer):
    from tests.conftest import sample_lines

    texts = [t for lang in ("en", "zh", "ar") for t in sample_lines(lang, 30)] + ["", " x "]
    encoder = TextEncoder(tiny_tokenizer)
    assert encoder._backend is not None  # the fast path is taken for a plain fast tokenizer
    assert encoder(texts) == tiny_tokenizer(texts, add_special_tokens=False)["input_ids"]

    class Custom(type(tiny_tokenizer)):  # a class that changes encoding: no fast path
        def _encode_plus(self, *args, **kwargs):
            return super()._encode_plus(*args, **kwargs)

    assert TextEncoder(Custom(tokenizer_object=tiny_tokenizer.backend_tokenizer))._backend is None


def test_balance_follows_temperature_and_keeps_total():
    out = balance_picks({"big": 900, "small": 100, "none": 0}, alpha=0.5, seed=0)
    n_big, n_small = len(out["big"]), len(out["small"])
    assert n_big + n_small == 1000 and len(out["none"]) == 0
    assert n_small / 1000 == pytest.approx(
        10 / (30 + 10), abs=1e-3
    )  # sqrt(100)/(sqrt(900)+sqrt(100))
    assert (np.bincount(out["small"]) >= 2).all()  # upsampled: every row at least twice
    assert len(np.unique(out["big"])) == n_big  # subsampled without replacement
    same = balance_picks({"big": 900, "small": 100}, alpha=1.0, seed=0)
    assert (same["big"] == np.arange(900)).all() and (same["small"] == np.arange(100)).all()


def test_seq_len_longer_than_teacher_context(tmp_path, tiny_corpus, tiny_teacher):
    with pytest.raises(
        ConfigError,
        match=r"^tokenize.seq_len: 512 is longer than the teacher's context \(max_position_embeddings=256 in .*config.json\); use at most 256$",
    ):
        run_tokenize(
            TokenizeConfig(seq_len=512),
            corpus(tiny_corpus),
            teacher=tiny_teacher,
            out=tmp_path / "o",
            metrics=tmp_path / "m.json",
        )


def test_missing_teacher(tmp_path, tiny_corpus):
    with pytest.raises(
        InputError, match=r"nope: teacher folder not found \(run `dvc repro prepare_teacher`\)"
    ):
        run_tokenize(
            TokenizeConfig(),
            corpus(tiny_corpus),
            teacher=tmp_path / "nope",
            out=tmp_path / "o",
            metrics=tmp_path / "m.json",
        )


def test_failure_leaves_no_output_that_looks_complete(tmp_path, tiny_teacher):
    (tmp_path / "c").mkdir()
    for lang in LANGS:
        (tmp_path / "c" / f"{lang}.txt").write_text("short\nlines\n")
    out = tmp_path / "o"
    with pytest.raises(InputError, match="the train split is empty"):
        run_tokenize(
            TokenizeConfig(seq_len=64),
            corpus(tmp_path / "c"),
            teacher=tiny_teacher,
            out=out,
            metrics=tmp_path / "m.json",
        )
    assert not out.exists() and not list(tmp_path.glob(".o.partial*"))


def test_stage_script_help_and_error_exit(tmp_path):
    help_text = subprocess.run(
        [sys.executable, "-m", "pipeline.stages.tokenize_corpus", "--help"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    ).stdout
    assert "tokenize.alpha" in help_text and "corpus.languages" in help_text
    params = tmp_path / "params.yaml"
    params.write_text("corpus: {languages: [en]}\ntokenize: {seq_lenn: 3}\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.stages.tokenize_corpus",
            "--params",
            str(params),
            "--teacher",
            "x",
            "--out",
            str(tmp_path / "o"),
            "--metrics",
            str(tmp_path / "m.json"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        "error: tokenize.seq_lenn: unknown key (known: alpha, dask, num_proc, seed, seq_len, "
        "slice_mb); "
        "did you mean 'tokenize.seq_len'?"
    )


def test_junk_lines_and_files_are_counted_not_tokenized(tmp_path, tiny_corpus, tiny_teacher):
    lines = {lang: (tiny_corpus / f"{lang}.txt").read_text("utf-8").splitlines() for lang in LANGS}
    junk = ["\x00\x00\x00", "\u200b\u200c\u200d", "\x01\x7f\x85 \u2060\ufeff"]
    cap = max(len(line) for doc_lines in lines.values() for line in doc_lines)
    long_line = "x" * (cap + 1)
    lines["en"] = lines["en"][:30] + junk + [long_line] + lines["en"][30:]
    root = write_corpus(tmp_path / "c", {**lines, "fr": ["bonjour"]})
    (root / "notes.txt").write_text("not a corpus file\n")
    (root / "manifest.json").write_text("{}")  # not a data file: not counted
    cfg = TokenizeConfig(seq_len=32, num_proc=1)
    out, metrics = tmp_path / "o", tmp_path / "m.json"
    ccfg = corpus(root, max_doc_chars=cap)
    result = run_tokenize(cfg, ccfg, teacher=tiny_teacher, out=out, metrics=metrics)
    en = result["languages"]["en"]
    assert en["no_visible_text"] == 3 and en["too_long"] == 1
    assert en["train_documents"] + en["validation_documents"] == 60  # the rest is kept
    assert result["total"]["no_visible_text"] == 3 and result["total"]["too_long"] == 1
    assert result["files_skipped"] == {"language_not_selected": 1, "not_a_language_code": 1}
    # Same rows as the clean corpus: the junk never reached the tokenizer.
    _, _, clean = run(tmp_path, tiny_corpus, tiny_teacher, name="clean")
    assert result["fingerprints"] == clean["fingerprints"]


@pytest.mark.parametrize("value", [0, -5])
def test_max_doc_chars_error_names_the_key(value):
    with pytest.raises(ConfigError, match=rf"^corpus.max_doc_chars: must be >= 1 .*got {value}$"):
        CorpusConfig(languages=["en"], max_doc_chars=value)


def test_digest_set_keeps_first_occurrences_like_a_python_set():
    rng = np.random.default_rng(0)
    pool = rng.bytes(16 * 300)
    universe = [pool[i : i + 16] for i in range(0, len(pool), 16)] + [
        b"\0" * 16,
        b"ab" + b"\0" * 14,
    ]
    seen, ours = set(), DigestSet()
    for _ in range(40):
        batch = [universe[i] for i in rng.integers(0, len(universe), rng.integers(0, 50))]
        expected = []
        for key in batch:
            expected.append(key not in seen)
            seen.add(key)
        got = ours.add_new(np.array(batch, dtype="S16")) if batch else np.zeros(0, bool)
        assert got.tolist() == expected
    assert len(ours) == len(seen)


def test_bad_line_in_a_worker_slice_is_one_error_and_nothing_is_left(tmp_path, tiny_teacher):
    from tests.conftest import sample_lines

    root = write_corpus(tmp_path / "c", {lang: sample_lines(lang, 60) for lang in LANGS})
    with open(root / "de.txt", "ab") as f:
        f.write(b"kaputt \xff\n")
    out = tmp_path / "o"
    cfg = TokenizeConfig(seq_len=32, num_proc=2, slice_mb=0.001)
    with pytest.raises(InputError, match=r"de.txt:61: invalid UTF-8 at byte 7 of the line"):
        run_tokenize(cfg, corpus(root), teacher=tiny_teacher, out=out, metrics=tmp_path / "m.json")
    assert not out.exists() and not list(tmp_path.glob(".o.*"))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"dask": {"n_workers": 0}}, r"^tokenize.dask.n_workers: must be >= 1, got 0$"),
        ({"slice_mb": 0}, r"^tokenize.slice_mb: must be > 0, got 0"),
        (
            {"dask": {"workers": 2}},
            r"^tokenize.dask.workers: unknown key .*did you mean 'tokenize.dask.n_workers'\?$",
        ),
    ],
)
def test_scale_param_errors_name_the_key(values, message):
    with pytest.raises(ConfigError, match=message):
        from_mapping(TokenizeConfig, values, "tokenize")
