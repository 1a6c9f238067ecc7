"""The `tokenize` stage: corpus -> packed, language-balanced token rows in a DatasetDict.

Steps: read and split the corpus (`pipeline.data.corpus`; documents over
`corpus.max_doc_chars` characters are left out, counted as `too_long`); tokenize every document with the
teacher's tokenizer (`datasets.map`, batched, `num_proc` processes); pack each language's
documents into `seq_len`-token rows with EOS separators (`pipeline.data.packing`); rebalance the
training rows across languages by temperature sampling; write `train` and `validation`
(`pipeline.data.tokenized`, which owns the format and its one reader).

Temperature sampling: with n_l training rows for language l, the target share is
p_l = n_l^alpha / sum_j n_j^alpha, and the total row count is kept. alpha = 1 keeps the natural
shares, alpha -> 0 makes them uniform. A language above its target is subsampled (rows chosen
without replacement); one below it is upsampled (every row repeated floor(target / n_l) times,
then the rest drawn without replacement). The trade-off: repeated rows of small languages can be
memorised; the metrics report tokens before and after so that is visible. Validation rows are
never rebalanced: they measure each language as it is.

Determinism: every random choice is seeded by `tokenize.seed`, the datasets' `_fingerprint` is
the digest of their content (not the random id `datasets` would give an in-memory table), and
the Arrow files are written in one shard each, so the same inputs and params give the same bytes
and DVC does not re-run what follows for nothing.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.atomic import atomic_dir, check_destinations
from pipeline.core.config import require
from pipeline.core.errors import ConfigError, InputError, first_line, load_errors
from pipeline.core.provenance import write_json
from pipeline.data.corpus import FILE_SKIP_REASONS, CorpusConfig, Documents, read_corpus
from pipeline.data.packing import pack_flat
from pipeline.data.tokenized import SPLITS, write_tokenized

log = logging.getLogger(__name__)

ENCODE_BATCH = 4096
"""Documents per tokenizer call inside `datasets.map`."""


@dataclass(frozen=True)
class TokenizeConfig:
    """Params section `tokenize`: how documents become fixed-length rows."""

    seq_len: int = 128
    """Tokens per packed row (the training context). At most the teacher's context length."""
    alpha: float = 0.5
    """Temperature-sampling exponent for language shares: p_l proportional to n_l^alpha.
    1 keeps natural shares; smaller values flatten them toward uniform."""
    num_proc: int = 2
    """Processes for tokenization (`datasets.map(num_proc=...)`)."""
    seed: int = 0
    """Seed for rebalancing draws and the training-row shuffle."""

    def __post_init__(self) -> None:
        require(self.seq_len >= 2, "tokenize.seq_len", f"must be >= 2, got {self.seq_len}")
        require(0.0 < self.alpha <= 1.0, "tokenize.alpha", f"must be in (0, 1], got {self.alpha}")
        require(self.num_proc >= 1, "tokenize.num_proc", f"must be >= 1, got {self.num_proc}")


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


def encode_documents(
    docs: Documents, tokenizer: Any, num_proc: int
) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]:
    """Tokenize every document: (split, lang) -> (flat ids (T,) int32, lengths (D,) int64).

    Documents are laid out grouped by (split, lang) so each group is one contiguous slice of
    the result, read back zero-copy from Arrow (values + offsets) instead of as Python lists.
    """
    import datasets

    groups = [(s, lang) for s in SPLITS for lang in getattr(docs, s)]
    texts: list[str] = []
    bounds = [0]
    for split, lang in groups:
        texts.extend(getattr(docs, split)[lang])
        bounds.append(len(texts))

    def encode(batch: dict[str, list]) -> dict[str, list]:
        # verbose=False: documents longer than the model context are expected here (packing cuts
        # them into rows), so the tokenizer's "sequence length is longer" warning is noise.
        ids = tokenizer(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]
        return {"ids": ids}

    was_enabled = datasets.is_progress_bar_enabled()
    with tempfile.TemporaryDirectory(prefix="softlabels-tok-") as tmp:
        ds = datasets.Dataset.from_dict({"text": texts})
        ds = ds.map(
            encode,
            batched=True,
            batch_size=ENCODE_BATCH,
            num_proc=num_proc if num_proc > 1 and len(texts) >= 2 * ENCODE_BATCH else None,
            remove_columns=["text"],
            features=datasets.Features({"ids": datasets.List(datasets.Value("int32"))}),
            cache_file_name=os.path.join(tmp, "ids.arrow"),
            desc="tokenize",
            new_fingerprint="tokenize",
        )
        col = ds.data.column("ids").combine_chunks()  # ListArray over all documents
        offsets = col.offsets.to_numpy().astype(np.int64)  # (D + 1,)
        values = col.values.to_numpy(zero_copy_only=False).astype(np.int32, copy=True)
        del ds, col
    if not was_enabled:
        datasets.disable_progress_bars()
    out = {}
    for (split, lang), lo, hi in zip(groups, bounds[:-1], bounds[1:], strict=True):
        out[(split, lang)] = (values[offsets[lo] : offsets[hi]], np.diff(offsets[lo : hi + 1]))
    return out


def balance(rows: dict[str, np.ndarray], alpha: float, seed: int) -> dict[str, np.ndarray]:
    """Resample each language's rows to its temperature share (see module docstring).

    rows: lang -> (n_l, L). Returns lang -> (m_l, L) with sum(m_l) == sum(n_l); m_l is
    n_l^alpha-proportional, rounded by largest remainder so the total is exact.
    """
    langs = [lang for lang in rows if len(rows[lang])]
    n = np.array([len(rows[lang]) for lang in langs], dtype=np.float64)
    if not langs:
        return dict(rows)
    weights = n**alpha
    quota = weights / weights.sum() * n.sum()
    target = np.floor(quota).astype(np.int64)
    short = int(n.sum()) - int(target.sum())
    order = np.argsort(-(quota - target), kind="stable")
    target[order[:short]] += 1
    out = {lang: rows[lang] for lang in rows if not len(rows[lang])}
    for i, lang in enumerate(langs):
        rng = np.random.default_rng([seed, i])
        have, want = len(rows[lang]), int(max(target[i], 1))
        repeats, extra = divmod(want, have)
        pick = np.concatenate([np.tile(np.arange(have), repeats), rng.permutation(have)[:extra]])
        out[lang] = rows[lang][np.sort(pick, kind="stable")]
    return out


def build_splits(
    encoded: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]],
    languages: list[str],
    cfg: TokenizeConfig,
    eos_id: int,
) -> tuple[dict[str, tuple[np.ndarray, list[str]]], dict[str, dict[str, int]]]:
    """Pack, balance and shuffle: split -> ((N, L) int32 rows, per-row lang) and per-lang counts."""
    stats: dict[str, dict[str, int]] = {lang: {} for lang in languages}
    packed: dict[str, dict[str, np.ndarray]] = {s: {} for s in SPLITS}
    for split in SPLITS:
        for lang in languages:
            values, lengths = encoded[(split, lang)]
            rows, remainder = pack_flat(values, lengths, eos_id, cfg.seq_len)
            packed[split][lang] = rows
            st = stats[lang]
            st[f"{split}_documents"] = int(len(lengths))
            st[f"{split}_tokens"] = int(values.size + len(lengths))  # EOS included
            st[f"{split}_remainder_tokens_dropped"] = int(remainder)
            st[f"{split}_sequences"] = int(len(rows))
    balanced = balance(packed["train"], cfg.alpha, cfg.seed)
    for lang in languages:
        stats[lang]["train_tokens_before_balancing"] = int(packed["train"][lang].size)
        stats[lang]["train_tokens_after_balancing"] = int(balanced[lang].size)
        stats[lang]["train_sequences"] = int(len(balanced[lang]))
    splits = {}
    for split, by_lang in (("train", balanced), ("validation", packed["validation"])):
        langs = [lang for lang in languages for _ in range(len(by_lang[lang]))]
        empty = np.zeros((0, cfg.seq_len), np.int32)
        rows = np.concatenate([by_lang[lang] for lang in languages] or [empty])
        if split == "train":  # one seeded shuffle so consumers can stream chunks in order
            perm = np.random.default_rng([cfg.seed, 1 << 20]).permutation(len(rows))
            rows, langs = rows[perm], [langs[i] for i in perm]
        splits[split] = (np.ascontiguousarray(rows, dtype=np.int32), langs)
    return splits, stats


def run_tokenize(
    cfg: TokenizeConfig, corpus: CorpusConfig, *, teacher: Path, out: Path, metrics: Path
) -> dict[str, Any]:
    """Run the stage: write the DatasetDict to `out` (atomically) and metrics JSON; return them."""
    check_destinations(out, metrics)  # fail now, not after the work
    tokenizer = load_tokenizer(teacher)
    context = teacher_context(teacher)
    if context is not None and cfg.seq_len > context:
        raise ConfigError(
            f"tokenize.seq_len: {cfg.seq_len} is longer than the teacher's context "
            f"(max_position_embeddings={context} in {Path(teacher) / 'config.json'}); "
            f"use at most {context}"
        )
    docs = read_corpus(corpus)
    for lang, reasons in docs.skipped.items():
        if reasons.get("too_long"):
            log.warning(
                "%s: %d document(s) longer than corpus.max_doc_chars=%d skipped (too_long)",
                lang,
                reasons["too_long"],
                corpus.max_doc_chars,
            )
    encoded = encode_documents(docs, tokenizer, cfg.num_proc)
    splits, per_lang = build_splits(encoded, corpus.languages, cfg, tokenizer.eos_token_id)
    for split, (rows, _) in splits.items():
        if not len(rows):
            raise InputError(
                f"{corpus.path}: the {split} split is empty: fewer than tokenize.seq_len="
                f"{cfg.seq_len} tokens per language; add text, lower tokenize.seq_len, or raise "
                "corpus.validation_fraction"
            )
    for lang, st in per_lang.items():
        st.update(docs.skipped.get(lang, {}))
        for split in SPLITS:
            if st[f"{split}_sequences"] == 0:
                log.warning("%s: no %s rows (fewer than %d tokens)", lang, split, cfg.seq_len)
    with atomic_dir(out) as tmp:
        fingerprints = write_tokenized(splits, tmp)
    totals: dict[str, int] = {}
    for st in per_lang.values():
        for key, v in st.items():
            totals[key] = totals.get(key, 0) + v
    skipped_elsewhere = {
        lang: reasons for lang, reasons in docs.skipped.items() if lang not in per_lang
    }
    result = {
        "seq_len": cfg.seq_len,
        "total": totals,
        "languages": per_lang,
        "skipped_other_languages": skipped_elsewhere,
        "files_skipped": {r: len(docs.files_skipped.get(r, [])) for r in FILE_SKIP_REASONS},
        "fingerprints": fingerprints,
    }
    write_json(metrics, result)
    return result
