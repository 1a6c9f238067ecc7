"""The `evaluate` stage: teacher, students and compressed students side by side on validation.

For every model given (`name=path`, any number) and the validation split of the tokenized
data, scored against the teacher's stored validation soft labels:

- perplexity, overall and per language: exp(mean next-token NLL), each row scored on its
  tokens 1..L-1 (the convention of the teacher's and the student's own numbers);
- KL(teacher || model) per position, from the store, estimated as the store allows (docs):
  `sample` stores hold k draws x_j ~ p_teacher, so (1/k) sum_j [log p_t(x_j) - log p_m(x_j)]
  is an unbiased estimate of the full KL (`pipeline.student.losses.sampled_kd`); `topk` stores hold the
  k most probable ids and the tail mass, so the KL is computed exactly between the two
  distributions coarsened onto the stored ids plus one "tail" class
  (`pipeline.student.losses.partition_kd`, tail=bucket), which is a lower bound of the full KL;
- top-1 agreement: the model's argmax equals the teacher's most probable stored id (exact
  for topk; for sample stores the most probable of the k draws, which misses the teacher's
  argmax only when none of the k draws hit it, (1 - p_max)^k, i.e. on flat distributions;
  without stored logprobs, the most drawn id, which can also miss it when two ids are close);
- parameter count (and nonzero parameters), size on disk (weight files, and the whole folder);
- throughput in tokens/s: one fixed batch, every model timed on it in interleaved rounds on the
  same machine in the same process, fastest round per model (rounds rotate the order, so a
  burst of load from elsewhere does not land on one model only);
- the store's top-k mass coverage, mean over positions of 1 - exp(tail) (when the store keeps
  `tail`: not in a format-2 sample store without logprobs).

Positions: position t of a row predicts token t+1, and store position t holds the teacher's
distribution for token t+1; every number uses positions 0..L-2, where a next token exists.

Before any weights are loaded, inputs are checked and refused with errors naming the model and
path: a missing model folder, a model whose tokenizer (`pipeline.core.provenance.tokenizer_identity`)
or vocabulary differs from the store's, an empty validation split, a store that is incomplete or
was made from other token ids. Trade-off: every model is held in memory at once (needed to time
them side by side); the default models take well under 100 MB.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from pipeline.compress.compressed import KERNELS, is_compressed, load_compressed
from pipeline.core.config import require
from pipeline.core.errors import InputError, StoreError, first_line, load_errors
from pipeline.core.provenance import ids_fingerprint, tokenizer_identity, write_json
from pipeline.data.tokenized import load_tokenized
from pipeline.evaluate import report
from pipeline.evaluate.common import (
    Model,
    check_model_folder,
    derived_from,
    describe_model,
    fastest_times,
)
from pipeline.store.format import StoreSpec, iter_chunks, open_split, read_attrs
from pipeline.store.integrity import check_integrity
from pipeline.store.labels import decode_block
from pipeline.store.verify import compatibility_problems, one_line, refuse
from pipeline.student.losses import partition_kd, sampled_kd, target_nll

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluateConfig:
    """Params section `evaluate`: how models are scored and timed."""

    batch_size: int = 16
    """Sequences per forward pass when scoring (bounds memory: batch x L x vocab floats)."""
    max_sequences: int = 0
    """Score only the first this many validation rows (0: all of them)."""
    throughput_sequences: int = 16
    """Rows of the fixed batch every model is timed on (the first validation rows)."""
    throughput_repeats: int = 10
    """Timed rounds (after one warm-up pass); each model's fastest round is reported."""
    threads: int = 0
    """torch intra-op threads while evaluating (0: torch's default, usually the core count)."""
    int8_kernel: Literal["dynamic", "dequantize"] = "dynamic"
    """How compressed models run: `dynamic` (int8 matrix products via torch.ao, weights stay
    int8) or `dequantize` (weights turned back to float32 at load)."""

    def __post_init__(self) -> None:
        s = "evaluate"
        for key in ("batch_size", "throughput_sequences", "throughput_repeats"):
            value = getattr(self, key)
            require(value >= 1, f"{s}.{key}", f"must be >= 1, got {value}")
        for key in ("max_sequences", "threads"):
            value = getattr(self, key)
            require(value >= 0, f"{s}.{key}", f"must be >= 0, got {value}")
        require(
            self.int8_kernel in KERNELS,
            f"{s}.int8_kernel",
            f"must be one of {KERNELS}, got {self.int8_kernel!r}",
        )


def validation_rows(tokenized: Path) -> tuple[np.ndarray, list[str]]:
    """((N, L) int32 token ids, N language codes) of the validation split; InputError if empty."""
    validation = load_tokenized(tokenized, ["validation"])["validation"]  # InputError if unusable
    if len(validation) == 0:
        raise InputError(
            f"{tokenized}: the validation split has no rows; nothing to evaluate (give the "
            "corpus more text per language or raise corpus.validation_fraction, then re-run "
            "tokenize)"
        )
    return validation.input_ids, validation.langs()


def check_store(logits: Path, rows: np.ndarray) -> dict[str, Any]:
    """The store's attributes, after refusing an incomplete one, one made from other ids, or
    one whose validation arrays or shard files are damaged (`check_integrity`)."""
    attrs = read_attrs(logits)  # StoreError if missing or not a store
    if "validation" not in attrs.get("splits", {}):
        raise StoreError(f"{logits}: the store has no validation split; nothing to compare with")
    problems = compatibility_problems(
        attrs, dataset_fingerprints={"validation": ids_fingerprint(rows)}
    )
    refuse(logits, "evaluate against", problems)
    spec = StoreSpec.from_attrs(attrs)
    check_integrity(logits, spec, attrs, ["validation"], purpose="evaluate against")
    return attrs


def check_model(name: str, path: Path, attrs: dict[str, Any]) -> None:
    """Refuse a missing folder, or a model whose tokenizer or vocabulary is not the store's."""
    from transformers import AutoConfig, AutoTokenizer  # heavy: imported when a model is checked

    check_model_folder(name, path)
    where = f"model '{name}' ({path})"
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except (*load_errors(), TypeError) as e:
        raise InputError(f"{where}: cannot load its tokenizer ({first_line(e)})") from e
    problems = compatibility_problems(
        attrs, tokenizer_identity=tokenizer_identity(tok), require_complete=False
    )
    problems = [p for p in problems if p.startswith("tokenizer.")]
    if problems:
        raise InputError(
            f"{where}: its tokenizer does not match the one the validation data and soft labels "
            f"were made with: {one_line(problems)}"
        )
    try:
        config = AutoConfig.from_pretrained(str(path))
    except load_errors() as e:
        raise InputError(f"{where}: cannot load its config.json ({first_line(e)})") from e
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    teacher_vocab = attrs["teacher"]["vocab_size"]
    if int(text.vocab_size) != int(teacher_vocab):
        raise InputError(
            f"{where}: vocab_size {text.vocab_size} differs from the teacher's {teacher_vocab}; "
            "the stored ids index the teacher's vocabulary"
        )


def load_model(name: str, path: Path, int8_kernel: str) -> Model:
    """Load a `save_pretrained` folder or a compressed one (float32, eval, CPU)."""
    from transformers import AutoModelForCausalLM  # heavy: imported when a model is loaded

    if is_compressed(path):
        module = load_compressed(path, int8_kernel=int8_kernel)  # type: ignore[arg-type]
    else:
        try:
            module = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        except load_errors() as e:
            raise InputError(
                f"model '{name}' ({path}): cannot load its weights ({first_line(e)})"
            ) from e
    return describe_model(name, path, module)


@dataclass
class RowSums:
    """Per-row sums over positions 0..L-2 of one model (float64 (N,) each)."""

    nll: np.ndarray
    kl: np.ndarray
    agree: np.ndarray

    @classmethod
    def zeros(cls, n: int) -> RowSums:
        return cls(np.zeros(n), np.zeros(n), np.zeros(n))


@torch.inference_mode()
def score_batch(
    module: nn.Module,
    inp: torch.Tensor,
    labels: dict[str, torch.Tensor],
    method: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-row sums of (NLL, KL(teacher || model), top-1 agreement) over positions 0..L-2.

    inp (b, L) int64; labels: the store's decoded labels of these rows
    (`pipeline.store.labels.decode_block`): ids (b, L, k) and, as the store has them,
    logprobs (b, L, k), tail (b, L), counts (b, L, k), entropy (b, L). The teacher's top-1 is
    the most probable stored id, or, in a sample store without logprobs, the most drawn one.
    """
    z = module(input_ids=inp).logits[:, :-1].float()  # (b, L-1, V)
    lse = torch.logsumexp(z, dim=-1)  # (b, L-1)
    nll = target_nll(z, inp[:, 1:], lse)  # (b, L-1)
    cut = {name: t[:, :-1] for name, t in labels.items()}  # positions 0..L-2
    ids = cut["ids"].long()  # (b, L-1, k)
    lp = cut["logprobs"].float() if "logprobs" in cut else None  # (b, L-1, k)
    if method == "sample":
        kl = sampled_kd(
            z, ids, lp, counts=cut.get("counts"), entropy=cut.get("entropy"), lse=lse
        )  # (b, L-1) unbiased
    else:
        kl = partition_kd(z, ids, lp, cut["tail"], tail="bucket", lse=lse)  # lower bound
    score = lp if lp is not None else cut["counts"].float()  # (b, L-1, k)
    teacher_top = ids.gather(-1, score.argmax(-1, keepdim=True)).squeeze(-1)  # (b, L-1)
    agree = (z.argmax(-1) == teacher_top).double()  # (b, L-1)
    return (
        nll.double().sum(-1).numpy(),
        kl.double().sum(-1).numpy(),
        agree.sum(-1).numpy(),
    )


def score_models(
    models: list[Model], rows: np.ndarray, logits: Path, method: str, batch_size: int
) -> tuple[dict[str, RowSums], float | None]:
    """Score every model on every row (store chunks read once); return sums and the mean
    coverage of the stored ids' mass (None when the store keeps no `tail`)."""
    n = len(rows)
    sums = {m.name: RowSums.zeros(n) for m in models}
    coverage_sum, coverage_count = 0.0, 0
    for first, chunk in iter_chunks(open_split(logits, "validation"), 0, n):
        labels = decode_block(chunk)
        if "tail" in labels:
            tail_np = labels["tail"][:, :-1].astype(np.float64)  # (c, L-1)
            coverage_sum += float((1.0 - np.exp(tail_np)).sum())
            coverage_count += tail_np.size
        for a in range(0, len(labels["ids"]), batch_size):
            b = min(a + batch_size, len(labels["ids"]))
            lo, hi = first + a, first + b
            inp = torch.from_numpy(rows[lo:hi].astype(np.int64))  # (b, L)
            batch = {name: torch.from_numpy(x[a:b]) for name, x in labels.items()}
            for m in models:
                nll, kl, agree = score_batch(m.module, inp, batch, method)
                s = sums[m.name]
                s.nll[lo:hi], s.kl[lo:hi], s.agree[lo:hi] = nll, kl, agree
    return sums, (coverage_sum / coverage_count if coverage_count else None)


@torch.inference_mode()
def measure_throughput(
    models: list[Model], batch: np.ndarray, throughput_repeats: int
) -> dict[str, float]:
    """Tokens/s of each model on the same batch: one warm-up, then `throughput_repeats` interleaved,
    order-rotated rounds; each model's fastest round (load from other processes only ever adds
    time, so the minimum is the least noisy estimate of what the model itself costs)."""
    inp = torch.from_numpy(batch.astype(np.int64))  # (B, L)
    calls = {m.name: (lambda module=m.module: module(input_ids=inp)) for m in models}
    return {name: inp.numel() / t for name, t in fastest_times(calls, throughput_repeats).items()}


def aggregate(
    sums: RowSums, langs: list[str], positions_per_row: int
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """(overall, per-language) perplexity, mean KL and top-1 agreement from per-row sums."""

    def summary(idx: np.ndarray) -> dict[str, float]:
        count = len(idx) * positions_per_row
        return {
            "perplexity": math.exp(sums.nll[idx].sum() / count),
            "kl_teacher_model": float(sums.kl[idx].sum() / count),
            "top1_agreement": float(sums.agree[idx].sum() / count),
            "tokens": int(count),
        }

    lang_arr = np.asarray(langs)
    overall = summary(np.arange(len(langs)))
    per_lang = {lang: summary(np.flatnonzero(lang_arr == lang)) for lang in sorted(set(langs))}
    return overall, per_lang


def run_evaluate(
    cfg: EvaluateConfig,
    *,
    tokenized: Path,
    logits: Path,
    models: list[tuple[str, Path]],
    metrics: Path,
    plots: Path,
    report_dir: Path,
    curves: list[tuple[str, Path]] | None = None,
) -> dict[str, Any]:
    """Run the stage (module docstring): write metrics JSON, plot tables and the report."""
    if not models:
        raise InputError("no models to evaluate: pass --model NAME=PATH at least once")
    for name, path in models:  # cheapest refusals first, before reading any data
        check_model_folder(name, Path(path))
    rows, langs = validation_rows(tokenized)
    attrs = check_store(logits, rows)
    n = min(cfg.max_sequences or len(rows), len(rows))
    rows, langs = rows[:n], langs[:n]
    for name, path in models:
        check_model(name, Path(path), attrs)
    for name, path in curves or []:
        if not Path(path).is_dir():
            raise InputError(
                f"--curves {name}={path}: no such dvclive folder (train that student first)"
            )
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    loaded = [load_model(name, Path(path), cfg.int8_kernel) for name, path in models]
    method = attrs["method"]
    log.info("scoring %d models on %d validation rows (%s store)", len(loaded), len(rows), method)
    t0 = time.perf_counter()
    sums, coverage = score_models(loaded, rows, logits, method, cfg.batch_size)
    log.info("scored in %.1f s; timing throughput", time.perf_counter() - t0)
    speed = measure_throughput(loaded, rows[: cfg.throughput_sequences], cfg.throughput_repeats)
    positions = rows.shape[1] - 1
    results: dict[str, Any] = {}
    per_language: dict[str, dict[str, dict[str, float]]] = {}
    for m in loaded:
        overall, per_lang = aggregate(sums[m.name], langs, positions)
        overall.pop("tokens")
        results[m.name] = {
            **overall,
            "parameters": m.parameters,
            "nonzero_parameters": m.nonzero_parameters,
            "weights_bytes": m.weights_bytes,
            "size_bytes": m.size_bytes,
            "tokens_per_s": speed[m.name],
        }
        per_language[m.name] = per_lang
    result = {
        "models": results,
        "store": {
            "method": method,
            "k": int(attrs["k"]),
            "topk_mass_coverage": coverage,
            "kl_estimator": "unbiased over k draws" if method == "sample" else "stored ids + tail",
        },
        "validation": {
            "sequences": int(len(rows)),
            "seq_len": int(rows.shape[1]),
            "positions": int(len(rows) * positions),
            "languages": len(set(langs)),
        },
        "throughput": {
            "batch_sequences": int(min(cfg.throughput_sequences, len(rows))),
            "repeats": cfg.throughput_repeats,
            "threads": torch.get_num_threads(),
            "int8_kernel": cfg.int8_kernel,
        },
    }
    write_json(metrics, result)
    compressed = {m.name for m in loaded if m.compressed}
    derived = derived_from(loaded)  # compressed model -> the model it was made from
    report.write_plot_tables(plots, results, per_language)
    report.write_report(
        report_dir,
        result,
        per_language,
        compressed=compressed,
        derived=derived,
        curves=report.read_curves(curves or []),
    )
    return result
