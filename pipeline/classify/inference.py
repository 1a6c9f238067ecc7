"""Loading a sequence classifier and reading its class distribution: what every classification
stage that runs a classifier (teacher, logits, student evaluation, evaluate) calls.

`load_classifier` opens an `AutoModelForSequenceClassification` (a folder written by
`save_pretrained`, or a hub id) with its tokenizer, and refuses, naming the folder: a model that is
not a trained classifier (a causal LM whose head would be initialised at random), a class count
or label names that differ from the corpus's label set, a tokenizer that cannot pad.
`class_logprobs` returns log-softmax (T = 1) class probabilities for a list of texts: batched,
sorted by length so batches carry little padding, returned in input order, without gradients,
with bf16 autocast on CUDA only (on CPU bf16 matmuls are slow and inexact).

Padding is on the right with an attention mask and the tokenizer's pad id, which Hugging Face's
last-token pooling skips; so a text's log-probabilities do not depend on the batch it lands in
(up to float rounding).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.core.errors import InputError, first_line, load_errors

_DEFAULT_LABEL = re.compile(r"^LABEL_\d+$")


def looks_like_path(name: str) -> bool:
    """True when `name` can only be a filesystem path, never a hub id (`name` or `org/name`)."""
    return name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1


def load_classifier(
    path: str | Path,
    device: str | torch.device = "cpu",
    *,
    labels: Sequence[str] | None = None,
    revision: str | None = None,
    key: str | None = None,
) -> tuple[Any, Any]:
    """(model, tokenizer) of a trained sequence classifier, in eval mode on `device`.

    `path` is a `save_pretrained` folder; with `key` (the params key that named it) it may
    also be a hub id, loaded at `revision`. With `labels`, the model
    must have `len(labels)` classes and, when its config names them (anything but transformers'
    default `LABEL_i`), these names in this order. Errors are InputError naming `key` (a params
    key such as `classify_teacher.model`) and the model, or the folder when `key` is None. A
    tokenizer without a pad token gets its EOS token as pad (and the config its id).
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    name = str(path)
    where = f"{key}: {name!r}" if key else name
    local = Path(name).expanduser()
    if (looks_like_path(name) or key is None) and not local.exists():
        raise InputError(f"{where} does not exist; give the folder of a saved classifier")
    if local.exists() and not local.is_dir():
        raise InputError(f"{where} is a file; give a folder written by save_pretrained")
    source = str(local) if local.is_dir() else name
    rev = None if local.is_dir() else revision
    try:
        config = AutoConfig.from_pretrained(source, revision=rev)
    except load_errors() as e:
        raise InputError(f"{where}: cannot load a model config: {first_line(e)}") from e
    archs = list(getattr(config, "architectures", None) or [])
    if archs and not any(a.endswith("ForSequenceClassification") for a in archs):
        raise InputError(
            f"{where} is not a sequence classifier (architectures: {', '.join(archs)}); give a "
            "folder written by the classify_teacher stage or another "
            "AutoModelForSequenceClassification"
        )
    if labels is not None:
        check_label_config(config, list(labels), where)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=rev)
        model, info = AutoModelForSequenceClassification.from_pretrained(
            source, revision=rev, output_loading_info=True
        )
    except load_errors() as e:
        raise InputError(f"{where}: cannot load the classifier: {first_line(e)}") from e
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise InputError(
            f"{where}: weights missing from the checkpoint ({', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}); it is not a trained classifier"
        )
    ensure_pad(model, tokenizer, where)
    return model.to(device).eval(), tokenizer


def check_label_config(config: Any, labels: list[str], where: str) -> None:
    """InputError unless `config` has `len(labels)` classes named `labels` (or unnamed)."""
    n = int(config.num_labels)
    if n != len(labels):
        raise InputError(
            f"{where}: the classifier has {n} classes but the label set has {len(labels)} "
            f"({', '.join(labels)}); use a classifier trained on this label set"
        )
    id2label = getattr(config, "id2label", None) or {}
    names = [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(n)]
    if not all(_DEFAULT_LABEL.match(x) for x in names) and names != labels:
        raise InputError(
            f"{where}: the classifier's labels ({', '.join(names)}) differ from the label set "
            f"({', '.join(labels)}) in names or order; use a classifier trained on this label set"
        )


def ensure_pad(model: Any, tokenizer: Any, where: str) -> None:
    """Give the tokenizer a pad token (its EOS when it has none) and the config its id."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise InputError(
                f"{where}: the tokenizer has neither a pad nor an EOS token, so texts cannot be "
                "batched; set `pad_token` in its tokenizer_config.json"
            )
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def encode(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids of each text as the classifier reads them (special tokens added, truncated)."""
    if not texts:
        return []
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, verbose=False)
    return enc["input_ids"]


def pad_batch(
    ids: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask), both (B, T) int64, T the longest sequence."""
    width = max(1, max(len(x) for x in ids))
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(ids), width), dtype=torch.long)  # (B, T)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.as_tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1
    return input_ids.to(device), mask.to(device)


@torch.inference_mode()
def class_logprobs(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    batch_size: int = 64,
    max_length: int = 128,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> np.ndarray:
    """(N, C) float32 log-probabilities (log-softmax of the logits, T = 1) of each text's class.

    Texts are tokenized with special tokens and truncated to `max_length` tokens, run in batches
    of `batch_size` sorted by length, and returned in input order. `device` defaults to the
    model's. Leaves the model in eval mode.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model.eval()
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    n_classes = int(model.config.num_labels)
    out = np.zeros((len(texts), n_classes), dtype=np.float32)  # (N, C)
    if not texts:
        return out
    ids = encode(tokenizer, texts, max_length)
    order = np.argsort([len(x) for x in ids], kind="stable")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else nullcontext()
    starts = range(0, len(order), batch_size)
    with autocast:
        for start in tqdm(starts, desc="classify", unit="batch", disable=not progress):
            idx = order[start : start + batch_size]
            input_ids, mask = pad_batch([ids[i] for i in idx], pad_id, dev)  # (B, T)
            logits = model(input_ids=input_ids, attention_mask=mask).logits.float()  # (B, C)
            out[idx] = torch.log_softmax(logits, dim=-1).cpu().numpy()
    return out
