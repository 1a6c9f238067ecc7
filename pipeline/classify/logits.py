"""The `classify_logits` stage: a classifier teacher's class distributions -> a classification store.

For every row of every split of the corpus (train, dev, test; all selected languages) the
teacher's exact T = 1 log-probabilities over all classes are stored (`pipeline.classify.store`).
What the teacher reads for a row depends on the row's language:

- a language of `classify_corpus.labeled_languages` (`gold`): its own text;
- any other language, `transfer: direct`: its own text (zero-shot cross-lingual transfer: the
  teacher must read a language it was not fine-tuned on);
- `transfer: parallel`: the sentence with the same `id` in `parallel_source` (a labeled
  language), whose distribution becomes the target row's soft label (cross-lingual distillation
  over parallel text, Xu & Yang 2017). A row without such a sentence (no `id`, or no source row
  with that id in the same split) falls back to `direct`, and is counted per language under
  `no_parallel_source` in the metrics: never dropped silently.

Each shard reads each distinct source text once (parallel rows of twenty languages share the
same source sentences), in batches sorted by length (`pipeline.classify.inference`).

Resumable like `teacher_logits` (`pipeline.store.work`): the store is built in
`<work_dir>/<key digest>/`, a shard at a time, each recorded with its checksums; a rerun after a
crash continues from the last finished shard and gives the same bytes; the output appears only
complete and verified, and the metrics only once it is in place. A second run of the same key
waits for the first (a lock next to the work folder) and then finishes at once. The resume key
holds everything that decides the bytes (teacher sha256, corpus fingerprint, transfer, parallel
source, batch_size, max_length, chunking, device type, dtype, torch and transformers versions).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pipeline.classify.corpus import (
    NO_ID,
    ClassifyCorpusConfig,
    LabeledCorpus,
    LabeledRows,
    read_labeled_corpus,
)
from pipeline.classify.inference import check_label_config, class_logprobs, load_classifier
from pipeline.classify.store import (
    CLASS_FORMAT_VERSION,
    ClassStoreSpec,
    row_identity,
    spec_for,
    store_attrs,
)
from pipeline.core.atomic import check_destinations
from pipeline.core.config import require
from pipeline.core.device import resolve_device
from pipeline.core.errors import ConfigError, InputError
from pipeline.core.provenance import read_provenance
from pipeline.store.format import finalize_store, write_shard_arrays
from pipeline.store.work import (
    dir_bytes,
    finished_records,
    install_store,
    keep_finished_shards,
    key_digest,
    lock_work,
    open_work_store,
    pending_shards,
    remove_partials,
    write_metrics,
    write_record,
)

log = logging.getLogger(__name__)

SECTION = "classify_logits"


@dataclass(frozen=True)
class ClassifyLogitsConfig:
    """Params section `classify_logits`: how the teacher's class distributions are captured."""

    transfer: Literal["parallel", "direct"] = "parallel"
    """Soft labels for languages without gold labels: `parallel` (the teacher reads the sentence
    with the same id in `parallel_source`) or `direct` (the teacher reads the row's own text)."""
    parallel_source: str = "en"
    """The labeled language whose sentences the teacher reads for `parallel` transfer."""
    batch_size: int = 64
    """Sentences per teacher forward pass."""
    max_length: int = 128
    """Tokens per sentence the teacher reads (longer sentences are truncated)."""
    chunk_rows: int = 1024
    """Rows per Zarr chunk (the unit a reader decompresses)."""
    shard_chunks: int = 2
    """Chunks per shard file: the unit of writing, of checksums and of resume. A fixed number of
    rows (2,048 by default) whatever the corpus size, so a killed run loses at most one shard's
    teacher work, at most 2,048 sentences, never a split. Not smaller: a shard reads each
    distinct source sentence once, so with `parallel` transfer smaller shards re-read the
    shared source sentences more often (on the default SIB-200 train split the teacher reads
    5,292 sentences with 2,048-row shards, 10,199 with 1,024-row ones)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the teacher runs: `auto` picks CUDA when torch sees a GPU."""
    threads: int = 0
    """torch CPU threads (0: torch's default)."""

    def __post_init__(self) -> None:
        s = SECTION
        require(self.batch_size >= 1, f"{s}.batch_size", f"must be >= 1, got {self.batch_size}")
        require(self.max_length >= 2, f"{s}.max_length", f"must be >= 2, got {self.max_length}")
        require(self.chunk_rows >= 1, f"{s}.chunk_rows", f"must be >= 1, got {self.chunk_rows}")
        require(
            self.shard_chunks >= 1, f"{s}.shard_chunks", f"must be >= 1, got {self.shard_chunks}"
        )
        require(self.threads >= 0, f"{s}.threads", f"must be >= 0, got {self.threads}")
        require(bool(self.parallel_source), f"{s}.parallel_source", "must not be empty")


def label_sources(
    cfg: ClassifyLogitsConfig, corpus_cfg: ClassifyCorpusConfig, corpus: LabeledCorpus
) -> dict[str, str]:
    """{lang: "gold" | "direct" | "parallel"} for every selected language; ConfigError when
    `parallel` transfer has no usable source language."""
    labeled = set(corpus_cfg.labeled_languages)
    if cfg.transfer == "parallel" and any(lang not in labeled for lang in corpus.languages):
        if cfg.parallel_source not in labeled:
            raise ConfigError(
                f"{SECTION}.parallel_source: {cfg.parallel_source!r} is not one of "
                f"classify_corpus.labeled_languages {sorted(labeled)}; the source of parallel "
                "soft labels must be a language the teacher was fine-tuned on"
            )
        for split, rows in corpus.splits.items():
            if not np.any(rows.lang == cfg.parallel_source):
                raise InputError(
                    f"{corpus.files.get(split, split)}: no rows in {cfg.parallel_source!r}, the "
                    f"parallel source ({SECTION}.parallel_source); add them or use "
                    "transfer: direct"
                )
    return {lang: "gold" if lang in labeled else cfg.transfer for lang in corpus.languages}


def source_rows(
    rows: LabeledRows, sources: dict[str, str], parallel_source: str
) -> tuple[np.ndarray, Counter]:
    """(N,) index of the row whose text the teacher reads for each row, and the count per
    language of `parallel` rows that had no source sentence (they read their own text)."""
    n = len(rows)
    read = np.arange(n)
    missing: Counter = Counter()
    src = np.flatnonzero(rows.lang == parallel_source)
    by_id = {int(rows.id[i]): int(i) for i in src if rows.id[i] != NO_ID}
    for i in range(n):
        lang = str(rows.lang[i])
        if sources.get(lang) != "parallel":
            continue
        j = by_id.get(int(rows.id[i])) if rows.id[i] != NO_ID else None
        if j is None:
            missing[lang] += 1
        else:
            read[i] = j
    return read, missing


def check_teacher_labels(teacher: Path, labels: list[str]) -> None:
    """Refuse a teacher whose head does not match the label set, before any weights are read."""
    from transformers import AutoConfig

    if not (teacher / "config.json").is_file():
        raise InputError(f"{teacher / 'config.json'}: missing; run `dvc repro classify_teacher`")
    check_label_config(AutoConfig.from_pretrained(teacher), labels, str(teacher / "config.json"))


def work_key(
    cfg: ClassifyLogitsConfig,
    prov: dict[str, Any],
    corpus: LabeledCorpus,
    sources: dict[str, str],
    device: str,
    dtype: str,
) -> dict[str, Any]:
    """Everything that determines the bytes of the store (module docstring)."""
    import torch
    import transformers

    return {
        "teacher_sha256": prov.get("sha256"),
        "corpus": corpus.fingerprint(),
        "sources": sources,
        "parallel_source": cfg.parallel_source,
        "batch_size": cfg.batch_size,
        "max_length": cfg.max_length,
        "chunk_rows": cfg.chunk_rows,
        "shard_chunks": cfg.shard_chunks,
        "device": device,
        "dtype": dtype,
        "store_format": CLASS_FORMAT_VERSION,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def run_classify_logits(
    cfg: ClassifyLogitsConfig,
    corpus_cfg: ClassifyCorpusConfig,
    *,
    teacher: str | Path,
    out: str | Path,
    metrics: str | Path,
    work_dir: str | Path,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the stage (module docstring); return the metrics written to `metrics`."""
    check_destinations(out, metrics, work_dir)  # fail now, not after the work
    import torch

    teacher, out = Path(teacher), Path(out)
    corpus = read_labeled_corpus(corpus_cfg)
    sources = label_sources(cfg, corpus_cfg, corpus)
    check_teacher_labels(teacher, corpus.labels)
    prov = read_provenance(teacher)
    device, dtype = resolve_device(cfg.device, "auto", section=SECTION)  # bf16 autocast on CUDA
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    spec = spec_for(corpus, chunk_rows=cfg.chunk_rows, shard_chunks=cfg.shard_chunks)
    key = work_key(cfg, prov, corpus, sources, device, dtype)
    kdir = Path(work_dir) / key_digest(key)
    store, records = kdir / out.name, kdir / "shards"
    teacher_attrs = {
        "name": prov.get("name"),
        "revision": prov.get("revision"),
        "sha256": prov.get("sha256"),
        "architecture": prov.get("architecture"),
        "num_labels": len(corpus.labels),
    }
    attrs = store_attrs(
        corpus,
        teacher=teacher_attrs,
        sources=sources,
        parallel_source=cfg.parallel_source if cfg.transfer == "parallel" else None,
    )
    with lock_work(kdir, out, SECTION) as lock:  # a second run of this key waits here
        done = lock.finished_output(out)
        if done is not None:  # another run of this key finished while we waited
            write_metrics(metrics, done, out, stage=SECTION)
            return done
        with keep_finished_shards(kdir, records, spec, SECTION):
            open_work_store(kdir, store, spec, attrs, key)
            pending = pending_shards(store, records, spec)
            if pending:
                model, tokenizer = load_classifier(teacher, device, labels=corpus.labels)
                _compute(
                    cfg,
                    corpus,
                    sources,
                    spec,
                    store,
                    records,
                    pending,
                    model,
                    tokenizer,
                    device,
                    progress,
                )
            recs = finished_records(store, records, spec)
            checksums = {k: v for r in recs for k, v in r["checksums"].items()}
            remove_partials(store)
            finalize_store(store, checksums, ClassStoreSpec)
            result = _metrics(cfg, corpus, sources, spec, store, recs)
        # the store into place, the work folder deleted, then the metrics
        install_store(lock, store, out, Path(metrics), result)
    log.info("wrote %s (%d rows)", out, sum(s.n for s in spec.splits))
    return result


def _compute(
    cfg: ClassifyLogitsConfig,
    corpus: LabeledCorpus,
    sources: dict[str, str],
    spec: ClassStoreSpec,
    store: Path,
    records: Path,
    pending: list[tuple[str, int]],
    model: Any,
    tokenizer: Any,
    device: str,
    progress: bool,
) -> None:
    """Compute, write and record every pending shard, with a progress bar over rows."""
    from tqdm.auto import tqdm

    total = sum(s.n for s in spec.splits)
    todo = sum(b - a for s, i in pending for a, b in [spec.shards(s)[i]])
    plan = {
        split: source_rows(rows, sources, cfg.parallel_source)
        for split, rows in corpus.splits.items()
    }
    with tqdm(
        total=total, initial=total - todo, unit="row", desc=SECTION, disable=not progress
    ) as bar:
        for split, shard in pending:
            a, b = spec.shards(split)[shard]
            rows = corpus.splits[split]
            read = plan[split][0][a:b]  # (R,) row whose text the teacher reads
            unique, inverse = np.unique(read, return_inverse=True)
            texts = [rows.text[int(i)] for i in unique]
            lp = class_logprobs(
                model,
                tokenizer,
                texts,
                batch_size=cfg.batch_size,
                max_length=cfg.max_length,
                device=device,
            )  # (U, C)
            ident = row_identity(corpus, split)
            data = {
                "logprobs": np.ascontiguousarray(lp[inverse], dtype=np.float32),  # (R, C)
                "lang": ident["lang"][a:b],
                "id": ident["id"][a:b],
                "text_hash": ident["text_hash"][a:b],
                "source_hash": np.asarray(rows.text_hash[read], dtype=np.uint64),
            }
            checksums = write_shard_arrays(store, spec, split, shard, data)
            shard_missing = Counter(
                str(rows.lang[i])
                for i in range(a, b)
                if sources.get(str(rows.lang[i])) == "parallel" and plan[split][0][i] == i
            )
            write_record(
                records,
                split,
                shard,
                checksums,
                agreement=_agreement(rows, a, b, data["logprobs"]),
                no_parallel_source=dict(shard_missing),
            )
            bar.update(b - a)


def _agreement(rows: LabeledRows, a: int, b: int, logprobs: np.ndarray) -> dict[str, list[int]]:
    """{lang: [rows whose soft label's argmax equals the gold label, rows with a gold label]}."""
    pred = logprobs.argmax(axis=1)  # (R,)
    gold = rows.label[a:b]
    out: dict[str, list[int]] = {}
    for lang, p, g in zip(rows.lang[a:b].tolist(), pred.tolist(), gold.tolist(), strict=True):
        if g < 0:
            continue
        c = out.setdefault(str(lang), [0, 0])
        c[0] += int(p == g)
        c[1] += 1
    return out


def _metrics(
    cfg: ClassifyLogitsConfig,
    corpus: LabeledCorpus,
    sources: dict[str, str],
    spec: ClassStoreSpec,
    store: Path,
    recs: list[dict[str, Any]],
) -> dict[str, Any]:
    """Label sources, rows without a parallel source, and how often the stored soft label's
    argmax equals the gold label (per split and language; unlabeled languages' mean apart)."""
    agree: dict[str, dict[str, list[int]]] = {}
    missing: dict[str, Counter] = {}
    for r in recs:
        per = agree.setdefault(r["split"], {})
        for lang, (ok, n) in r.get("agreement", {}).items():
            c = per.setdefault(lang, [0, 0])
            c[0] += ok
            c[1] += n
        missing.setdefault(r["split"], Counter()).update(r.get("no_parallel_source", {}))
    accuracy = {
        split: {lang: round(100 * ok / n, 2) for lang, (ok, n) in sorted(per.items()) if n}
        for split, per in agree.items()
    }
    unlabeled = {
        split: _mean([v for lang, v in per.items() if sources.get(lang) != "gold"])
        for split, per in accuracy.items()
    }
    rows = sum(s.n for s in spec.splits)
    total = dir_bytes(store)
    if any(missing.values()):
        log.warning(
            "rows without a parallel source (their soft labels are direct): %s",
            {s: dict(c) for s, c in missing.items() if c},
        )
    return {
        "transfer": cfg.transfer,
        "parallel_source": cfg.parallel_source if cfg.transfer == "parallel" else None,
        "sources": sources,
        "rows": {s.name: s.n for s in spec.splits},
        "no_parallel_source": {s: dict(sorted(c.items())) for s, c in missing.items()},
        "label_accuracy": accuracy,
        "label_accuracy_unlabeled_mean": unlabeled,
        "storage": {"bytes": total, "bytes_per_row": total / rows if rows else None},
    }


def _mean(values: list[float]) -> float | None:
    return round(float(np.mean(values)), 2) if values else None
