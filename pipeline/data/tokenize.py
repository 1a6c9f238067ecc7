"""The `tokenize` stage: corpus -> packed, language-balanced token rows in a DatasetDict, streamed.

Map: the corpus files are cut into slices (`pipeline.data.corpus.plan_slices`, about
`tokenize.slice_mb` each); every slice is read and its documents tokenized with the teacher's
tokenizer in batches (`encode_slice`), and written to its own Arrow file of encoded documents
(language, dedupe digest, validation score, token ids). Slices run in this process, in a pool of
`tokenize.num_proc` processes, or as Dask tasks (`tokenize.dask`, the same settings as
`teacher_logits.dask`). A slice's output depends only on the slice, so any number of processes
or workers gives the same files.

Reduce (`pipeline.data.assemble`): the encoded slices are read back in corpus order, documents
deduplicated, split into train and validation by document hash, packed per language into
`seq_len`-token rows with EOS separators, training rows rebalanced across languages by
temperature sampling, shuffled once, and written (`pipeline.data.tokenized.SplitWriter`).

Memory is bounded by a tokenizer batch (map) and a write block (reduce), not by the corpus, save
two structures that grow with it: the dedupe digests (16 B a document) and the training row
index (10 B a row). Token streams live in files next to the output while it is written.

Temperature sampling: with n_l training rows for language l, the target share is
p_l = n_l^alpha / sum_j n_j^alpha, and the total row count is kept. alpha = 1 keeps the natural
shares, alpha -> 0 makes them uniform. A language above its target is subsampled (rows chosen
without replacement); one below it is upsampled (every row repeated floor(target / n_l) times,
then the rest drawn without replacement). The trade-off: repeated rows of small languages can be
memorised; the metrics report tokens before and after so that is visible. Validation rows are
never rebalanced: they measure each language as it is.

Determinism: every random choice is seeded by `tokenize.seed`, the datasets' `_fingerprint` is
the digest of their content, and each split is one Arrow file, so the same inputs and params
give the same bytes whatever the slicing, process count or cluster, and DVC does not re-run
what follows for nothing.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import multiprocessing
import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from pipeline.core.atomic import atomic_dir, check_destinations
from pipeline.core.cluster import DaskConfig, dask_client, map_ordered
from pipeline.core.config import require
from pipeline.core.errors import ConfigError, InputError, first_line, load_errors
from pipeline.core.provenance import write_json
from pipeline.data.assemble import Assembler, balance_picks
from pipeline.data.corpus import (
    FILE_SKIP_REASONS,
    CorpusConfig,
    CorpusSlice,
    SliceReport,
    merge_reports,
    no_usable_documents,
    plan_slices,
    read_slice,
    skip_table,
    validation_score,
)
from pipeline.data.tokenized import SPLITS

log = logging.getLogger(__name__)

ENCODE_BATCH = 4096
"""Documents per tokenizer call (at most; see ENCODE_CHARS)."""
ENCODE_CHARS = 4 << 20
"""Characters per tokenizer call (at most): bounds a batch of long documents."""


@dataclass(frozen=True)
class TokenizeConfig:
    """Params section `tokenize`: how documents become fixed-length rows."""

    seq_len: int = 128
    """Tokens per packed row (the training context). At most the teacher's context length."""
    alpha: float = 0.5
    """Temperature-sampling exponent for language shares: p_l proportional to n_l^alpha.
    1 keeps natural shares; smaller values flatten them toward uniform."""
    num_proc: int = 2
    """Processes that tokenize corpus slices in parallel (1: in this process, where a fast
    tokenizer still uses every core for each batch). Does not change the output."""
    seed: int = 0
    """Seed for rebalancing draws and the training-row shuffle."""
    slice_mb: float = 32.0
    """Corpus files are read and tokenized in slices of about this many MB, the unit of work
    of a process or Dask task (memory is a tokenizer batch, whatever the slice). Does not
    change the output."""
    dask: DaskConfig = field(default_factory=DaskConfig)
    """Tokenize slices as Dask tasks (see tokenize.dask.*; the same keys as
    teacher_logits.dask). Workers must see the corpus, teacher and output folder."""

    def __post_init__(self) -> None:
        require(self.seq_len >= 2, "tokenize.seq_len", f"must be >= 2, got {self.seq_len}")
        require(0.0 < self.alpha <= 1.0, "tokenize.alpha", f"must be in (0, 1], got {self.alpha}")
        require(self.num_proc >= 1, "tokenize.num_proc", f"must be >= 1, got {self.num_proc}")
        require(self.slice_mb > 0, "tokenize.slice_mb", f"must be > 0, got {self.slice_mb}")


def load_tokenizer(teacher: str | Path) -> Any:
    """The teacher's tokenizer from a prepared model folder; InputError if absent or unusable."""
    from transformers import AutoTokenizer

    teacher = Path(teacher)
    if not teacher.is_dir():
        raise InputError(f"{teacher}: teacher folder not found (run `dvc repro prepare_teacher`)")
    try:
        tok = AutoTokenizer.from_pretrained(teacher)
    except load_errors() as e:
        raise InputError(
            f"{teacher}: cannot load a tokenizer ({first_line(e)}); a prepared teacher folder "
            "holds the tokenizer files (run `dvc repro prepare_teacher`)"
        ) from e
    if tok.eos_token_id is None:
        raise InputError(f"{teacher}: the tokenizer has no EOS token, needed to separate documents")
    return tok


def teacher_context(teacher: str | Path) -> int | None:
    """The teacher's maximum context (max_position_embeddings), or None if it has no such limit."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(teacher)
    except load_errors() as e:
        raise InputError(f"{teacher}: cannot load its config.json ({first_line(e)})") from e
    return getattr(config, "max_position_embeddings", None)


def encoded_schema() -> Any:
    """Arrow schema of an encoded slice: one row per document kept by the reader."""
    import pyarrow as pa

    return pa.schema(
        [
            ("lang", pa.string()),
            ("key", pa.binary(16)),  # dedupe digest of (lang, text)
            ("score", pa.float64()),  # validation_score(lang, text)
            ("ids", pa.list_(pa.int32())),
        ]
    )


def document_key(lang: str, text: str) -> bytes:
    """The dedupe digest of a document: 128-bit blake2b of (lang, text)."""
    return hashlib.blake2b(f"{lang}\0{text}".encode(), digest_size=16).digest()


def encode_batch(encoder: TextEncoder, langs: list[str], texts: list[str]) -> Any:
    """One record batch of encoded documents (`encoded_schema`)."""
    import pyarrow as pa

    ids = encoder(texts)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))  # (D,)
    offsets = np.zeros(len(ids) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter(itertools.chain.from_iterable(ids), np.int32, count=int(offsets[-1]))
    return pa.record_batch(
        [
            pa.array(langs, pa.string()),
            pa.array(
                [document_key(g, t) for g, t in zip(langs, texts, strict=True)], pa.binary(16)
            ),
            pa.array(
                [validation_score(g, t) for g, t in zip(langs, texts, strict=True)], pa.float64()
            ),
            pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat)),
        ],
        schema=encoded_schema(),
    )


class TextEncoder:
    """`tokenizer(texts, add_special_tokens=False)["input_ids"]`, faster where that is safe.

    For a fast tokenizer whose class does not change how `transformers` encodes (the common
    case), the ids come from its Rust backend directly (`encode_batch_fast`: no offsets, no
    `BatchEncoding`), which is what `transformers` itself calls after resetting truncation and
    padding; that is done only when the backend has neither set and the same special-token
    handling. The first `CHECK` texts of every call are also encoded through `transformers` and
    compared; any difference switches this encoder to `transformers` for good (logged).
    """

    CHECK = 4

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._backend = self._fast_backend(tokenizer)

    @staticmethod
    def _fast_backend(tokenizer: Any) -> Any:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None or backend.truncation is not None or backend.padding is not None:
            return None
        base = next((c for c in type(tokenizer).__mro__ if c.__name__ in FAST_BASES), None)
        if base is None or any(
            getattr(type(tokenizer), name) is not getattr(base, name)
            for name in ("__call__", "_encode_plus")
            if hasattr(base, name)
        ):
            return None
        if bool(getattr(backend, "encode_special_tokens", False)) != bool(
            getattr(tokenizer, "split_special_tokens", False)
        ):
            return None
        return backend

    def _reference(self, texts: list[str]) -> list[list[int]]:
        # verbose=False: documents longer than the model context are expected here (packing
        # cuts them into rows), so the "sequence length is longer" warning is noise.
        return self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]

    def __call__(self, texts: list[str]) -> list[list[int]]:
        if self._backend is None:
            return self._reference(texts)
        encode = getattr(self._backend, "encode_batch_fast", self._backend.encode_batch)
        ids = [e.ids for e in encode(texts, add_special_tokens=False)]
        if ids[: self.CHECK] != self._reference(texts[: self.CHECK]):
            log.warning("the tokenizer's backend disagrees with transformers; using transformers")
            self._backend = None
            return self._reference(texts)
        return ids


FAST_BASES = ("TokenizersBackend", "PreTrainedTokenizerFast")
"""`transformers` base classes of fast tokenizers (v5 and v4 names) whose encoding is the Rust
backend's `encode_batch`."""


@dataclass
class SliceResult:
    """What `encode_slice` returns to the driver (small: counts, no data)."""

    report: SliceReport
    documents: int
    tokens: int


RAYON_THREADS = "RAYON_RS_NUM_CPUS"
"""Environment variable that sets a fast tokenizer's thread count (its rayon pool), read when
the pool starts: set in worker processes so that workers x threads = cores."""

_TOKENIZERS: dict[str, TextEncoder] = {}
"""Per process: the encoder of each teacher folder used (loaded once per worker)."""


def _set_environ(env: dict[str, str]) -> None:
    """Pool worker initializer: set environment variables before anything reads them."""
    os.environ.update(env)


def _encoder(teacher: str) -> TextEncoder:
    if teacher not in _TOKENIZERS:
        _TOKENIZERS[teacher] = TextEncoder(load_tokenizer(teacher))
    return _TOKENIZERS[teacher]


def encode_slice(corpus: CorpusConfig, piece: CorpusSlice, teacher: str, path: str) -> SliceResult:
    """Read one corpus slice, tokenize its documents in batches and write them to `path` (an
    Arrow stream of `encoded_schema`, renamed into place when complete). The task of a process
    or Dask worker; memory is one batch."""
    import pyarrow as pa

    encoder = _encoder(teacher)
    report = SliceReport()
    documents = tokens = 0
    tmp = f"{path}.partial"
    with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_stream(sink, encoded_schema()) as writer:
        langs: list[str] = []
        texts: list[str] = []
        chars = 0
        for lang, text in itertools.chain(read_slice(corpus, piece, report), [(None, None)]):
            if text is not None:
                langs.append(lang)
                texts.append(text)
                chars += len(text)
            if texts and (text is None or len(texts) >= ENCODE_BATCH or chars >= ENCODE_CHARS):
                batch = encode_batch(encoder, langs, texts)
                writer.write_batch(batch)
                documents += len(texts)
                tokens += len(batch.column(3).values)
                langs, texts, chars = [], [], 0
    os.replace(tmp, path)
    return SliceResult(report, documents, tokens)


def iter_encoded(
    path: str | Path,
) -> Iterator[tuple[list[str], np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """The record batches of an encoded slice as (langs, keys (D,) 'S16', scores (D,),
    offsets (D + 1,), values): one batch in memory at a time."""
    import pyarrow as pa

    with pa.OSFile(str(path), "rb") as src:
        for batch in pa.ipc.open_stream(src):
            keys, ids = batch.column(1), batch.column(3)
            yield (
                batch.column(0).to_pylist(),
                np.frombuffer(keys.buffers()[1], "S16", len(keys), 16 * keys.offset),
                batch.column(2).to_numpy(),
                ids.offsets.to_numpy(),
                ids.values.to_numpy(),
            )


def encode_corpus(
    cfg: TokenizeConfig,
    corpus: CorpusConfig,
    slices: list[CorpusSlice],
    teacher: Path,
    paths: list[Path],
    progress: bool = True,
) -> list[SliceReport]:
    """Run `encode_slice` for every slice (here, in a process pool, or on Dask), writing
    `paths`; return the slices' reports in slice order."""
    args = [
        (corpus, piece, str(teacher), str(path)) for piece, path in zip(slices, paths, strict=True)
    ]
    results: list[SliceResult | None] = [None] * len(args)
    bar = tqdm(total=len(args), unit="slice", desc="tokenize", disable=not progress or None)
    tokens = 0

    def done(i: int, result: SliceResult) -> None:
        nonlocal tokens
        results[i] = result
        tokens += result.tokens
        bar.set_postfix(tokens=tokens, refresh=False)
        bar.update()

    with bar:
        if cfg.dask.enabled:
            # One slice at a time per worker; the tokenizer's own threads (rayon) share the
            # worker's cores: cores // n_workers each on a local cluster.
            cores = max(1, (os.cpu_count() or 1) // cfg.dask.n_workers)
            env = {RAYON_THREADS: str(cores)}
            with dask_client(cfg.dask, env=env) as (client, _):
                map_ordered(client, encode_slice, args, done)
        elif cfg.num_proc > 1 and len(args) > 1:
            workers = min(cfg.num_proc, len(args))
            cores = max(1, (os.cpu_count() or 1) // workers)
            pool = ProcessPoolExecutor(
                workers,
                mp_context=multiprocessing.get_context("fork"),  # no re-import of __main__
                initializer=_set_environ,
                initargs=({RAYON_THREADS: str(cores)},),
            )
            try:
                futures = [pool.submit(encode_slice, *a) for a in args]
                for i, fut in enumerate(futures):
                    done(i, fut.result())
            finally:  # on an error, slices not started are dropped, not waited for
                pool.shutdown(cancel_futures=True)
        else:
            for i, a in enumerate(args):
                done(i, encode_slice(*a))
    return [r.report for r in results if r is not None]


def run_tokenize(
    cfg: TokenizeConfig,
    corpus: CorpusConfig,
    *,
    teacher: Path,
    out: Path,
    metrics: Path,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the stage: write the DatasetDict to `out` (atomically) and metrics JSON; return them."""
    check_destinations(out, metrics)  # fail now, not after the work
    teacher = Path(teacher).absolute()
    tokenizer = load_tokenizer(teacher)
    _TOKENIZERS[str(teacher)] = TextEncoder(tokenizer)
    context = teacher_context(teacher)
    if context is not None and cfg.seq_len > context:
        raise ConfigError(
            f"tokenize.seq_len: {cfg.seq_len} is longer than the teacher's context "
            f"(max_position_embeddings={context} in {Path(teacher) / 'config.json'}); "
            f"use at most {context}"
        )
    plan = plan_slices(corpus, max(1, int(cfg.slice_mb * (1 << 20))))
    with atomic_dir(out) as tmp:
        work = tmp / ".work"
        work.mkdir()
        paths = [work / f"slice-{i:06d}.arrow" for i in range(len(plan.slices))]
        clock = [time.perf_counter()]
        reports = encode_corpus(cfg, corpus, plan.slices, teacher, paths, progress)
        clock.append(time.perf_counter())
        skipped, other, sources = merge_reports(corpus, plan, reports)
        asm = Assembler(
            work / "streams", corpus.languages, corpus.validation_fraction, tokenizer.eos_token_id
        )
        for path in tqdm(paths, unit="slice", desc="assemble", disable=not progress or None):
            for block in iter_encoded(path):
                asm.add(*block)
            path.unlink()  # its documents are in the streams now
        for lang in corpus.languages:
            skipped[lang]["duplicate"] += asm.duplicates[lang]
            if asm.documents(lang) == 0:
                raise no_usable_documents(lang, sources[lang], skipped[lang])
        asm.finish()
        clock.append(time.perf_counter())
        per_lang = asm.stats(cfg.seq_len)
        picks = balance_picks(
            {lang: per_lang[lang]["train_sequences"] for lang in corpus.languages},
            cfg.alpha,
            cfg.seed,
        )
        for lang in corpus.languages:
            st = per_lang[lang]
            st["train_tokens_before_balancing"] = st["train_sequences"] * cfg.seq_len
            st["train_tokens_after_balancing"] = len(picks[lang]) * cfg.seq_len
            st["train_sequences"] = len(picks[lang])
        for split in SPLITS:
            if not sum(st[f"{split}_sequences"] for st in per_lang.values()):
                raise InputError(
                    f"{corpus.path}: the {split} split is empty: fewer than tokenize.seq_len="
                    f"{cfg.seq_len} tokens per language; add text, lower tokenize.seq_len, or raise "
                    "corpus.validation_fraction"
                )
        table = skip_table(corpus, skipped, other)
        for lang, reasons in table.items():
            if reasons.get("too_long") and lang in per_lang:
                log.warning(
                    "%s: %d document(s) longer than corpus.max_doc_chars=%d skipped (too_long)",
                    lang,
                    reasons["too_long"],
                    corpus.max_doc_chars,
                )
        for lang, st in per_lang.items():
            st.update(table[lang])
            for split in SPLITS:
                if st[f"{split}_sequences"] == 0:
                    log.warning("%s: no %s rows (fewer than %d tokens)", lang, split, cfg.seq_len)
        fingerprints = asm.write(tmp, cfg.seq_len, picks, cfg.seed)
        clock.append(time.perf_counter())
        shutil.rmtree(work)
    log.info(
        "tokenize: %d slice(s) encoded in %.1f s, assembled in %.1f s, written in %.1f s",
        len(plan.slices),
        *np.diff(clock),
    )
    totals: dict[str, int] = {}
    for st in per_lang.values():
        for key, v in st.items():
            totals[key] = totals.get(key, 0) + v
    result = {
        "seq_len": cfg.seq_len,
        "total": totals,
        "languages": per_lang,
        "skipped_other_languages": {lang: r for lang, r in table.items() if lang not in per_lang},
        "files_skipped": {r: len(plan.files_skipped.get(r, [])) for r in FILE_SKIP_REASONS},
        "fingerprints": fingerprints,
    }
    write_json(metrics, result)
    return result
