"""The `builtin` teacher: a byte-level BPE tokenizer and a small Llama trained on CPU in minutes.

Why it exists: the pipeline must run end to end offline on a fresh machine, so the teacher can be
built from the corpus itself. It is a real (if small) language model, not a placeholder: its
validation perplexity is reported next to an add-one smoothed unigram model of the same tokens,
and students distilled from it must beat students trained on hard labels alone.

Algorithm: train a byte-level BPE tokenizer (Hugging Face `tokenizers`) on the training
documents; pack each language's tokenized documents with EOS separators into rows of `seq_len`
(`pipeline.data.packing`, the same packing as the tokenize stage); train a `LlamaForCausalLM` with
AdamW, linear warmup then cosine decay, and gradient clipping, on batches drawn from all
languages' rows in a seeded shuffle (epoch after epoch of seeded permutations).

Trade-off: a fixed step budget on two CPU cores. Compute per step is spent on the body
(layers x width^2) and on the output head (width x vocabulary); a small vocabulary makes the head
cheap and its statistics dense, at the price of more tokens per document. Everything is seeded
(tokenizer training is deterministic, torch and numpy are seeded, data order is fixed), so the
same corpus and params give the same weights on the same machine and thread count.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import (
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from pipeline.data.packing import pack_documents
from pipeline.modeling.llama import llama_config
from pipeline.modeling.optim import adamw_with_schedule

EOS_TOKEN = "<|endoftext|>"
"""End-of-document token (also used as BOS): packing puts it after every document."""
PAD_TOKEN = "<|pad|>"
"""Padding token; never appears in packed rows, but downstream batching may need one."""
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN)
"""Special tokens, in id order: EOS is id 0, PAD is id 1."""
LOGITS_BUDGET = 1 << 25
"""Most logits (batch x seq_len x vocab) held at once while evaluating (128 MiB in float32)."""


def train_tokenizer(
    texts: Iterable[str], *, vocab_size: int, max_position_embeddings: int
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` and wrap it for `transformers`.

    Byte-level: every UTF-8 byte is in the initial alphabet, so any text in any script encodes
    without unknown tokens and decodes back exactly. The result has `len() == vocab_size` (when
    the texts support that many merges), EOS/BOS = `EOS_TOKEN`, PAD = `PAD_TOKEN`, and the same
    texts and vocab_size always give the same tokenizer.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=max_position_embeddings,
    )


def pack_languages(
    tokenizer: PreTrainedTokenizerFast, docs_by_lang: dict[str, list[str]], seq_len: int
) -> dict[str, np.ndarray]:
    """Tokenize each language's documents and pack them: lang -> (N_lang, seq_len) int32 rows.

    No special tokens are added by encoding; `pack_documents` appends EOS after each document,
    exactly as the tokenize stage does, so perplexities here are comparable to the evaluate
    stage's. A language too small to fill one row gets a (0, seq_len) array.
    """
    packed = {}
    for lang, docs in docs_by_lang.items():
        ids = tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"] if docs else []
        rows, _remainder = pack_documents(ids, tokenizer.eos_token_id, seq_len)
        packed[lang] = rows  # (N_lang, L)
    return packed


def build_model(
    *,
    vocab_size: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    intermediate_size: int,
    max_position_embeddings: int,
    tie_embeddings: bool,
    eos_id: int,
    pad_id: int,
    seed: int,
) -> LlamaForCausalLM:
    """A freshly initialised `LlamaForCausalLM` (float32), the same weights for the same seed."""
    config = llama_config(
        vocab_size=vocab_size,
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_heads=num_heads,
        intermediate_size=intermediate_size,
        tie_embeddings=tie_embeddings,
        max_position_embeddings=max_position_embeddings,
        eos_id=eos_id,
        pad_id=pad_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()


def batch_schedule(n_rows: int, *, batch_size: int, steps: int, seed: int) -> np.ndarray:
    """Row indices for every step, (steps, batch_size): consecutive seeded permutations.

    Each epoch visits every row once in a fresh order, so languages are mixed within batches
    in proportion to their row counts; batches may straddle an epoch boundary.
    """
    if n_rows == 0:
        raise ValueError("no training rows")
    rng = np.random.default_rng(seed)
    need = steps * batch_size
    epochs = [rng.permutation(n_rows) for _ in range(math.ceil(need / n_rows))]
    return np.concatenate(epochs)[:need].reshape(steps, batch_size)  # (S, B)


@dataclass(frozen=True)
class TrainStats:
    """What a training run did: steps, tokens seen, wall time, and the loss at the end."""

    steps: int
    tokens: int
    seconds: float
    final_loss: float
    """Mean training loss (nats/token) over the last 10% of steps."""


def train_model(
    model: PreTrainedModel,
    rows: np.ndarray,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    warmup_steps: int,
    weight_decay: float,
    grad_clip: float,
    seed: int,
    progress: bool = True,
) -> TrainStats:
    """Train `model` in place on `rows` (N, L) for `steps` steps of next-token prediction.

    AdamW (betas 0.9/0.95; weight decay on matrices only, not on norms), linear warmup over
    `warmup_steps` then cosine decay to zero, gradient norm clipped to `grad_clip`. Batches
    follow `batch_schedule(seed)`. Runs on the model's device; shows a tqdm bar when `progress`.
    """
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    data = torch.from_numpy(np.asarray(rows, dtype=np.int64))  # (N, L)
    order = batch_schedule(len(data), batch_size=batch_size, steps=steps, seed=seed)  # (S, B)
    optimizer, scheduler = adamw_with_schedule(
        model,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        warmup_steps=warmup_steps,
        steps=steps,
    )
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="teacher", unit="step", disable=not progress)
    for step in bar:
        batch = data[order[step]].to(device)  # (B, L)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
    seconds = time.perf_counter() - start
    model.eval()
    tail = losses[-max(1, steps // 10) :]
    return TrainStats(
        steps=steps,
        tokens=steps * batch_size * data.shape[1],
        seconds=seconds,
        final_loss=float(np.mean(tail)),
    )


@dataclass(frozen=True)
class Perplexity:
    """Validation perplexity per language and overall (token-weighted), and token counts."""

    by_lang: dict[str, float]
    overall: float
    tokens: dict[str, int]
    """lang -> number of predicted tokens (rows x (seq_len - 1))."""

    def as_dict(self) -> dict[str, float]:
        """{"overall": ..., lang: ...} for the metrics file."""
        return {"overall": self.overall, **self.by_lang}


def _perplexity(nll: dict[str, float], count: dict[str, int]) -> Perplexity:
    """Turn per-language summed NLL (nats) and token counts into perplexities."""
    by_lang = {lang: math.exp(nll[lang] / count[lang]) for lang in nll if count[lang] > 0}
    total = sum(count.values())
    overall = math.exp(sum(nll.values()) / total) if total else float("nan")
    return Perplexity(by_lang=by_lang, overall=overall, tokens=dict(count))


@torch.inference_mode()
def model_perplexity(
    model: PreTrainedModel, rows_by_lang: dict[str, np.ndarray], *, batch_size: int = 32
) -> Perplexity:
    """The model's perplexity on each language's packed rows, predicting tokens 1..L-1 of a row.

    Every row is scored independently (the first token of a row has no context and is not
    predicted), the same convention as `unigram_perplexity`, so the two are comparable. Rows go
    through in batches of at most `batch_size`, fewer for a large vocabulary.
    """
    model.eval()
    device = next(model.parameters()).device
    vocab = model.get_output_embeddings().weight.shape[0]
    nll: dict[str, float] = {}
    count: dict[str, int] = {}
    for lang, rows in rows_by_lang.items():
        # Bound the (B, L, V) logits to ~LOGITS_BUDGET elements whatever the vocabulary.
        per_pass = max(1, min(batch_size, LOGITS_BUDGET // max(1, rows.shape[-1] * vocab)))
        total = 0.0
        for i in range(0, len(rows), per_pass):
            batch = torch.from_numpy(np.asarray(rows[i : i + per_pass], dtype=np.int64))
            batch = batch.to(device)  # (B, L)
            logits = model(input_ids=batch).logits[:, :-1].float()  # (B, L-1, V)
            targets = batch[:, 1:]  # (B, L-1)
            # Not `pipeline.student.losses.target_nll` (the NLL of the students and evaluate):
            # cross_entropy's float32 sum differs from it in the 7th digit, and this number is
            # recorded in the teacher's provenance.json, whose bytes a code move must not change.
            total += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
            ).item()
        nll[lang] = total
        count[lang] = int(rows.shape[0] * max(rows.shape[1] - 1, 0)) if rows.ndim == 2 else 0
    return _perplexity(nll, count)


def unigram_perplexity(
    train_rows: np.ndarray, rows_by_lang: dict[str, np.ndarray], *, vocab_size: int
) -> Perplexity:
    """Perplexity of an add-one smoothed unigram model estimated on `train_rows` (all tokens).

    p(t) = (count(t) + 1) / (total + vocab_size), one distribution for all languages; scored on
    the same targets as `model_perplexity` (tokens 1..L-1 of each validation row). It is the
    floor a language model must clear by far: it knows token frequencies and nothing else.
    """
    counts = np.bincount(np.asarray(train_rows).ravel(), minlength=vocab_size)  # (V,)
    logp = np.log(counts + 1.0) - np.log(counts.sum() + float(vocab_size))  # (V,)
    nll = {}
    count = {}
    for lang, rows in rows_by_lang.items():
        targets = np.asarray(rows)[:, 1:]  # (N, L-1)
        nll[lang] = float(-logp[targets].sum())
        count[lang] = int(targets.size)
    return _perplexity(nll, count)
