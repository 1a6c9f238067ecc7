"""The tokenize stage's reduce step: encoded corpus slices -> the tokenized dataset, streamed.

Input: the slices' encoded documents (`pipeline.data.tokenize.iter_encoded`), fed in corpus
order. Each document is kept or counted a `duplicate` (`DigestSet`: a 128-bit digest of
(lang, text) per document seen, not the text: 16 B a document, the one structure that grows
with the corpus; two different documents sharing a digest has probability ~1e-20 for a
billion documents), assigned to train or validation by its hash score
(`pipeline.data.corpus.validation_score`), and appended, followed by EOS, to its (split, lang)
token stream: a flat int32 file on disk. The per-language guarantee of `split_documents` (one
document on each side when a language has two or more) is applied at the end by moving the one
document it names from one stream file to the other.

Packing, balancing and the shuffle then need only counts and index arrays: a stream file of T
tokens holds T // seq_len rows (`pipeline.data.packing`: the partial last row is dropped and
counted); `balance_picks` chooses training rows per language by the temperature rule; one seeded
permutation orders them. Rows are gathered from memory-mapped stream files a block at a time
and written by `SplitWriter`, so memory stays bounded by a block, not the corpus (the index
arrays cost 10 B per training row, 1/50 of the rows themselves at seq_len 128).

The result is byte for byte what the former in-memory implementation wrote (and what
`write_tokenized` writes for the same rows): same documents, same order, same rows.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.packing import with_eos
from pipeline.data.tokenized import SPLITS, SplitWriter, write_dataset_dict

GATHER_BYTES = 16 << 20
"""Bytes read from the stream files per written block (rows are gathered page by page, so a
block of short rows counts a 4 KiB page per row)."""
PAGE = 4096


class DigestSet:
    """A set of 16-byte digests in sorted numpy runs: 16 B an entry (a Python set of bytes
    costs ~5x that), batch lookups by binary search. Runs are merged like a binary counter, so
    there are O(log n) of them and each digest is copied O(log n) times in all."""

    def __init__(self) -> None:
        self._runs: list[np.ndarray] = []

    def __len__(self) -> int:
        return sum(len(r) for r in self._runs)

    def add_new(self, keys: np.ndarray) -> np.ndarray:
        """Add `keys` ((D,) 'S16'); returns (D,) bool: True where the key was not in the set
        before and is its first occurrence in `keys` (the documents to keep, in order)."""
        keys = np.asarray(keys, dtype="S16")
        new = np.zeros(len(keys), bool)
        new[np.unique(keys, return_index=True)[1]] = True
        for run in self._runs:
            pos = np.minimum(np.searchsorted(run, keys), len(run) - 1)
            new &= run[pos] != keys
        if new.any():
            self._runs.append(np.sort(keys[new]))
            while len(self._runs) > 1 and len(self._runs[-2]) <= 2 * len(self._runs[-1]):
                last = self._runs.pop()
                self._runs[-1] = np.sort(np.concatenate([self._runs[-1], last]))
        return new


@dataclass
class _Stream:
    """One (split, lang) token stream file: documents with EOS, in corpus order."""

    path: Path
    tokens: int = 0
    documents: int = 0

    def append(self, stream: np.ndarray, documents: int) -> None:
        with open(self.path, "ab") as f:
            f.write(np.ascontiguousarray(stream, dtype="<i4").tobytes())
        self.tokens += len(stream)
        self.documents += documents

    def read(self, start: int, count: int) -> np.ndarray:
        with open(self.path, "rb") as f:
            f.seek(4 * start)
            return np.fromfile(f, dtype="<i4", count=count)

    def remove(self, start: int, count: int, work: Path) -> None:
        """Drop tokens [start, start + count) (one document), copying the file in blocks."""
        tmp = work / (self.path.name + ".tmp")
        with open(self.path, "rb") as src, open(tmp, "wb") as dst:
            for lo, hi in ((0, start), (start + count, self.tokens)):
                src.seek(4 * lo)
                left = 4 * (hi - lo)
                while left > 0:
                    block = src.read(min(GATHER_BYTES, left))
                    dst.write(block)
                    left -= len(block)
        tmp.replace(self.path)
        self.tokens -= count
        self.documents -= 1


def gather(values: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """values[starts[d] : starts[d] + lengths[d]] for every d, concatenated, without a loop."""
    ends = np.cumsum(lengths)  # (D,)
    positions = np.repeat(starts - (ends - lengths), lengths) + np.arange(
        ends[-1] if len(ends) else 0
    )
    return values[positions]


class Assembler:
    """Builds the (split, lang) token streams from encoded documents and writes the dataset."""

    def __init__(
        self, work: Path, languages: list[str], validation_fraction: float, eos_id: int
    ) -> None:
        self.work = Path(work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.languages = list(languages)
        self.fraction = validation_fraction
        self.eos_id = eos_id
        self.streams = {
            (split, lang): _Stream(self.work / f"{split}-{i:04d}.i32")
            for split in SPLITS
            for i, lang in enumerate(self.languages)
        }
        for s in self.streams.values():
            s.path.write_bytes(b"")
        self.duplicates: Counter = Counter()
        self._seen = DigestSet()
        # lang -> (score, token offset, tokens incl. EOS) of the lowest-scoring training document
        # and the highest-scoring validation document: the ones `split_documents` would move.
        self._lowest: dict[str, tuple[float, int, int]] = {}
        self._highest: dict[str, tuple[float, int, int]] = {}

    def documents(self, lang: str) -> int:
        """Documents of `lang` kept so far (both splits)."""
        return sum(self.streams[(split, lang)].documents for split in SPLITS)

    def add(
        self,
        langs: list[str],
        keys: np.ndarray,
        scores: np.ndarray,
        offsets: np.ndarray,
        values: np.ndarray,
    ) -> None:
        """Append one block of encoded documents (in corpus order): language, dedupe digest,
        validation score (D,), ids as CSR offsets (D + 1,) over values."""
        new = self._seen.add_new(keys)
        groups: dict[str, list[int]] = {}
        for i, (lang, keep) in enumerate(zip(langs, new.tolist(), strict=True)):
            if keep:
                groups.setdefault(lang, []).append(i)
            else:
                self.duplicates[lang] += 1
        for lang, members in groups.items():
            idx = np.asarray(members)
            is_val = scores[idx] < self.fraction
            for split, sel in (("train", idx[~is_val]), ("validation", idx[is_val])):
                if len(sel):
                    self._append(split, lang, sel, scores, offsets, values)

    def _append(
        self,
        split: str,
        lang: str,
        sel: np.ndarray,
        scores: np.ndarray,
        offsets: np.ndarray,
        values: np.ndarray,
    ) -> None:
        stream = self.streams[(split, lang)]
        lengths = (offsets[sel + 1] - offsets[sel]).astype(np.int64)  # (d,)
        ids = gather(values, offsets[sel].astype(np.int64), lengths)
        firsts = stream.tokens + np.cumsum(lengths + 1) - (lengths + 1)  # (d,) stream offsets
        sc = scores[sel]
        if split == "train":
            j = int(np.argmin(sc))
            if lang not in self._lowest or sc[j] < self._lowest[lang][0]:
                self._lowest[lang] = (float(sc[j]), int(firsts[j]), int(lengths[j]) + 1)
        else:
            j = int(np.argmax(sc))
            if lang not in self._highest or sc[j] > self._highest[lang][0]:
                self._highest[lang] = (float(sc[j]), int(firsts[j]), int(lengths[j]) + 1)
        stream.append(with_eos(ids, lengths, self.eos_id), len(sel))

    def finish(self) -> None:
        """Give every language with two or more documents one on each side (`split_documents`'s
        rule: the lowest-scoring document goes to validation if none did, the highest-scoring
        to train if all did)."""
        for lang in self.languages:
            train, val = self.streams[("train", lang)], self.streams[("validation", lang)]
            if train.documents + val.documents < 2:
                continue
            if val.documents == 0:
                self._move(train, val, *self._lowest[lang][1:])
            elif train.documents == 0:
                self._move(val, train, *self._highest[lang][1:])

    def _move(self, src: _Stream, dst: _Stream, start: int, count: int) -> None:
        dst.append(src.read(start, count), 1)
        src.remove(start, count, self.work)

    def stats(self, seq_len: int) -> dict[str, dict[str, int]]:
        """lang -> documents, tokens (EOS included), dropped remainder tokens and rows per split."""
        out: dict[str, dict[str, int]] = {}
        for lang in self.languages:
            st = out[lang] = {}
            for split in SPLITS:
                s = self.streams[(split, lang)]
                st[f"{split}_documents"] = s.documents
                st[f"{split}_tokens"] = s.tokens
                st[f"{split}_remainder_tokens_dropped"] = s.tokens % seq_len
                st[f"{split}_sequences"] = s.tokens // seq_len
        return out

    def write(
        self, out: Path, seq_len: int, picks: dict[str, np.ndarray], seed: int
    ) -> dict[str, str]:
        """Write the dataset to folder `out`: train = the picked rows of every language (in
        `languages` order) in one seeded shuffle, validation = every row in language order.
        Returns {split: ids_fingerprint}."""
        block = max(1, GATHER_BYTES // max(4 * seq_len, PAGE))
        codes = np.concatenate(
            [np.full(len(picks[lang]), i, np.int32) for i, lang in enumerate(self.languages)]
            or [np.zeros(0, np.int32)]
        )  # (N,)
        rows = np.concatenate([picks[lang] for lang in self.languages] or [np.zeros(0, np.int64)])
        perm = np.random.default_rng([seed, 1 << 20]).permutation(len(rows))
        codes, rows = codes[perm], rows[perm]
        fingerprints = {}
        with self._writer(
            out, "train", len(rows), seq_len, np.bincount(codes, minlength=len(self.languages))
        ) as w:
            for lo in range(0, len(rows), block):
                c, r = codes[lo : lo + block], rows[lo : lo + block]
                part = np.empty((len(c), seq_len), np.int32)  # (b, L)
                for u in np.unique(c):
                    lang = self.languages[u]
                    n = self.streams[("train", lang)].tokens // seq_len
                    mm = np.memmap(
                        self.streams[("train", lang)].path, "<i4", "r", shape=(n, seq_len)
                    )
                    part[c == u] = mm[r[c == u]]
                    del mm  # unmapped: a block's pages, not the corpus, count in memory
                w.write(part, self._langs(c))
        fingerprints["train"] = w.fingerprint
        counts = np.array(
            [self.streams[("validation", lang)].tokens // seq_len for lang in self.languages]
        )
        with self._writer(out, "validation", int(counts.sum()), seq_len, counts) as w:
            for i, lang in enumerate(self.languages):
                stream = self.streams[("validation", lang)]
                for lo in range(0, int(counts[i]), block):
                    n = min(block, int(counts[i]) - lo)
                    part = stream.read(lo * seq_len, n * seq_len).reshape(n, seq_len)
                    w.write(part, self._langs(np.full(n, i, np.int32)))
        fingerprints["validation"] = w.fingerprint
        write_dataset_dict(out, SPLITS)
        return fingerprints

    def _writer(
        self, out: Path, split: str, n: int, seq_len: int, per_lang: np.ndarray
    ) -> SplitWriter:
        lang_bytes = sum(
            int(k) * len(lang.encode()) for k, lang in zip(per_lang, self.languages, strict=True)
        )
        return SplitWriter(out, split, n, seq_len, lang_bytes)

    def _langs(self, codes: np.ndarray) -> Any:
        import pyarrow as pa

        return pa.array(self.languages, pa.string()).take(pa.array(codes))


def balance_picks(counts: dict[str, int], alpha: float, seed: int) -> dict[str, np.ndarray]:
    """Training rows to keep per language, by temperature sampling (`pipeline.data.tokenize`'s
    module docstring): lang -> sorted row indices (m_l,), sum(m_l) == sum(n_l), m_l
    n_l^alpha-proportional, rounded by largest remainder so the total is exact. A language
    above its share keeps a seeded subset; one below repeats every row floor(m_l / n_l) times
    plus a seeded subset."""
    langs = [lang for lang in counts if counts[lang]]
    out = {lang: np.zeros(0, np.int64) for lang in counts if not counts[lang]}
    if not langs:
        return out
    n = np.array([counts[lang] for lang in langs], dtype=np.float64)
    weights = n**alpha
    quota = weights / weights.sum() * n.sum()
    target = np.floor(quota).astype(np.int64)
    short = int(n.sum()) - int(target.sum())
    order = np.argsort(-(quota - target), kind="stable")
    target[order[:short]] += 1
    for i, lang in enumerate(langs):
        rng = np.random.default_rng([seed, i])
        have, want = counts[lang], int(max(target[i], 1))
        repeats, extra = divmod(want, have)
        pick = np.concatenate([np.tile(np.arange(have), repeats), rng.permutation(have)[:extra]])
        out[lang] = np.sort(pick, kind="stable")
    return out
