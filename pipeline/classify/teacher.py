"""Stage `classify_teacher`: the sequence classifier whose class distributions students learn.

`classify_teacher.model` is `builtin`, a local folder or a hub id:

- `builtin` reads the LM teacher folder (`--lm-teacher models/teacher`, the `prepare_teacher`
  output: a causal LM and its tokenizer) as an `AutoModelForSequenceClassification` (the same body
  with a new classification head: `LlamaForSequenceClassification` for the builtin Llama) and
  fine-tunes it on the gold labels of `classify_corpus.labeled_languages`;
- a folder or hub id of a trained `AutoModelForSequenceClassification` is used as it is
  (`finetune: false`; its classes must be the label set) or fine-tuned further (`finetune: true`);
  a base model (a causal LM, an encoder) with `finetune: true` gets a new head, like builtin.

Fine-tuning recipe (chosen by English dev accuracy of the default builtin teacher on SIB-200):
`pooling: mean` makes the last decoder layer's attention uniform (its key projection set to zero
and frozen), so the last token, where transformers' decoder classifiers read, holds the mean of
every token's value vector: mean pooling inside the standard architecture, which loads with
transformers alone. Measured: about 56% English test accuracy over three seeds, where the stock
last-token read-out reaches 34-37% whatever the learning rates, and a trainable attention
initialised uniform 44-51%. The tokenizer appends EOS to every text
(`append_eos`), so the read-out token is the same for every text. AdamW with warmup and cosine
decay (`pipeline.modeling.optim`), a larger learning rate on the new head, label smoothing and
embedding dropout; dev accuracy of the labeled languages is measured every `eval_every` steps
and the best weights are kept (model selection never looks at the test split or at languages
without gold labels).

Output (all-or-nothing): the classifier in `save_pretrained` layout with its tokenizer and
`provenance.json` (name, revision, sha256 of the files, architecture, labels, labeled languages,
dev accuracy, corpus fingerprint, the LM teacher it came from), and a metrics JSON (dev and test
accuracy per labeled language, the dev accuracy of the other languages read directly, training
loss, steps, seconds).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

import pipeline
from pipeline.classify.corpus import ClassifyCorpusConfig, LabeledCorpus, read_labeled_corpus
from pipeline.classify.inference import (
    check_label_config,
    class_logprobs,
    encode,
    ensure_pad,
    load_classifier,
    looks_like_path,
    pad_batch,
)
from pipeline.core.atomic import atomic_dir, check_destinations
from pipeline.core.config import require, to_dict
from pipeline.core.device import torch_device
from pipeline.core.errors import ConfigError, InputError, first_line, load_errors
from pipeline.core.provenance import (
    PROVENANCE_FILE,
    files_sha256,
    read_provenance,
    tokenizer_identity,
    write_json,
)
from pipeline.modeling.optim import adamw_with_schedule, check_optimizer_params
from pipeline.teacher.builtin_teacher import batch_schedule

log = logging.getLogger(__name__)

BUILTIN = "builtin"
SECTION = "classify_teacher"
HEAD_PREFIXES = ("score.", "classifier.", "classification_head.")
"""Parameter-name prefixes of the classification head in transformers' classifiers."""


@dataclass(frozen=True)
class ClassifyTeacherConfig:
    """Params section `classify_teacher`: which classifier teaches, and how it is fine-tuned.

    The fine-tuning keys apply to `builtin` and to a model with `finetune: true`.
    """

    model: str = BUILTIN
    """`builtin` (the LM teacher given as --lm-teacher, with a new classification head
    fine-tuned on the gold labels), a Hugging Face hub id such as `org/name`, or the path of a
    folder written by `save_pretrained` (an AutoModelForSequenceClassification, or with
    `finetune: true` any model transformers can load as one)."""
    revision: str = "main"
    """Hub revision (branch, tag or commit) of `model`; ignored for builtin and local folders."""
    finetune: bool = True
    """Fine-tune a hub or local `model` on the gold labels (builtin is always fine-tuned). With
    false the model is used as it is and must already classify into the label set."""
    pooling: Literal["mean", "last"] = "mean"
    """How a new head reads the text. `mean`: the last layer's attention is made uniform (key
    projection zeroed and frozen), so the last token averages every token: mean pooling in the
    standard architecture (needs a Llama-like decoder with `self_attn.k_proj`). `last`:
    transformers' own read-out of the last token's state. Leaves an existing classifier's
    attention as it is."""
    append_eos: bool = True
    """Make the tokenizer append its EOS token to every text (saved with the classifier, so
    every stage reads texts the same way): the token the head reads is then the same for every
    text. Ignored when the tokenizer already adds special tokens or pads with EOS."""
    steps: int = 150
    """Optimizer steps of fine-tuning (about 7 epochs of the 701 English SIB-200 sentences at
    batch 32; the dev curve flattens by then)."""
    batch_size: int = 32
    """Labeled texts per step."""
    learning_rate: float = 0.003
    """Peak AdamW learning rate of the body, after warmup, then cosine decay to zero."""
    head_learning_rate: float = 0.01
    """Peak learning rate of a new classification head (randomly initialised, so it moves
    faster than the pretrained body)."""
    warmup_steps: int = 15
    """Steps of linear learning-rate warmup."""
    weight_decay: float = 0.1
    """AdamW weight decay on weight matrices (not on norms)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value."""
    label_smoothing: float = 0.1
    """Label smoothing of the cross-entropy (0: none). Also keeps the teacher's distributions
    from collapsing to one-hot, so they carry more for students to learn."""
    dropout: float = 0.1
    """Dropout on the token embeddings while fine-tuning (training only: the saved model is
    unchanged)."""
    max_length: int = 128
    """Tokens per text at most (longer texts are truncated), for training and prediction."""
    eval_every: int = 25
    """Measure dev accuracy of the labeled languages every this many steps (and after the last);
    the best weights are kept."""
    eval_batch_size: int = 64
    """Texts per forward pass when predicting."""
    seed: int = 0
    """Seed of the head's initialisation, dropout and data order."""
    threads: int = 1
    """CPU threads; 0 keeps torch's default (all cores). On 2 cores shared with other jobs,
    1 thread fine-tuned the default builtin teacher in 68 s where 2 threads took 246 s
    (waiting for each other); raise it on a machine of your own."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to fine-tune and predict: `auto` uses CUDA when available, else CPU."""

    def __post_init__(self) -> None:
        s = SECTION
        require(bool(self.model.strip()), f"{s}.model", "must not be empty (use 'builtin')")
        require(bool(self.revision.strip()), f"{s}.revision", "must not be empty (use 'main')")
        check_optimizer_params(s, self)
        require(
            0.0 < self.head_learning_rate < 1.0,
            f"{s}.head_learning_rate",
            f"must be in (0, 1), got {self.head_learning_rate}",
        )
        require(
            0.0 <= self.label_smoothing < 1.0,
            f"{s}.label_smoothing",
            f"must be in [0, 1), got {self.label_smoothing}",
        )
        require(0.0 <= self.dropout < 1.0, f"{s}.dropout", f"must be in [0, 1), got {self.dropout}")
        for key in ("max_length", "eval_every", "eval_batch_size"):
            value = getattr(self, key)
            require(value >= 1, f"{s}.{key}", f"must be >= 1, got {value}")
        require(
            self.threads >= 0, f"{s}.threads", f"must be >= 0 (0: all cores), got {self.threads}"
        )

    @property
    def is_builtin(self) -> bool:
        return self.model == BUILTIN


@dataclass(frozen=True)
class FinetuneStats:
    """What fine-tuning did: steps, wall time, the loss at the end and the dev curve."""

    steps: int
    seconds: float
    final_loss: float
    """Mean training loss over the last 10% of steps."""
    best_step: int
    """Step whose weights were kept (highest dev accuracy; the earliest on ties)."""
    best_dev_accuracy: float
    curve: list[dict[str, float]]
    """[{step, dev_accuracy, train_loss}] at every evaluation."""


@dataclass
class Base:
    """The classifier to start from, and what fine-tuning must know about it."""

    model: Any
    tokenizer: Any
    revision: str | None
    """Hub revision resolved for provenance (None for builtin and local folders)."""
    base: dict[str, Any] | None
    """Identity of the LM teacher a builtin classifier was built from (None otherwise)."""
    head: set[str]
    """Names of the classification head's parameters (trained at `head_learning_rate`)."""
    frozen: set[str]
    """Names of parameters fine-tuning must not change (the zeroed keys of `pooling: mean`)."""
    pooling: str
    """`mean` or `last` for a new head; `kept` for an existing classifier's own read-out."""


def prepare_classify_teacher(
    cfg: ClassifyTeacherConfig,
    corpus_cfg: ClassifyCorpusConfig,
    *,
    lm_teacher: Path | None,
    out: Path,
    metrics: Path,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the classifier folder `out` (model, tokenizer, provenance.json) and `metrics` JSON.

    `out` appears complete or not at all. Returns {"provenance": ..., "metrics": ...}, the two
    records written. Raises ConfigError/InputError naming the key or folder for a missing LM
    teacher (builtin), an unloadable model, or a classifier whose classes are not the label set.
    """
    check_destinations(out, metrics)  # fail now, not after the work
    corpus = read_labeled_corpus(corpus_cfg)
    device = torch_device(cfg.device, section=SECTION)
    threads_before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        start = load_base(cfg, corpus.labels, lm_teacher)
        model, tokenizer = start.model.to(device), start.tokenizer
        stats = None
        if cfg.is_builtin or cfg.finetune:
            stats = finetune(start, corpus, cfg, corpus_cfg, progress=progress)
        scores = score(model, tokenizer, corpus, cfg, corpus_cfg)
    finally:
        torch.set_num_threads(threads_before)

    record: dict[str, Any] = {
        "name": cfg.model,
        "pooling": start.pooling,
        "labeled_languages": list(corpus_cfg.labeled_languages),
        "train_rows": int(corpus.splits["train"].gold_mask(corpus_cfg.labeled_languages).sum()),
        "steps": stats.steps if stats else 0,
        "train_seconds": round(stats.seconds, 2) if stats else 0.0,
        "train_final_loss": stats.final_loss if stats else None,
        "best_step": stats.best_step if stats else None,
        "dev_curve": stats.curve if stats else [],
        "config": to_dict(cfg),
        **scores,
    }
    model.to("cpu")
    out = Path(out)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        digest, files = files_sha256(tmp)
        config = model.config
        provenance = {
            "name": cfg.model,
            "revision": start.revision,
            "sha256": digest,
            "files": files,
            "architecture": (config.architectures or [type(model).__name__])[0],
            "num_labels": int(config.num_labels),
            "labels": list(corpus.labels),
            "labeled_languages": list(corpus_cfg.labeled_languages),
            "dev_accuracy": scores["dev_accuracy"]["labeled"],
            "corpus": {"fingerprint": corpus.fingerprint(), "path": corpus_cfg.path},
            "base": start.base,
            "finetuned": stats is not None,
            "pooling": start.pooling,
            "tokenizer": tokenizer_identity(tokenizer),
            "softlabels_version": pipeline.__version__,
        }
        write_json(tmp / PROVENANCE_FILE, provenance)
    write_json(metrics, record)
    return {"provenance": provenance, "metrics": record}


def load_base(cfg: ClassifyTeacherConfig, labels: list[str], lm_teacher: Path | None) -> Base:
    """The classifier to start from (see the module docstring), checked against the label set.

    With `finetune: false` the model is loaded by `load_classifier` (strict: a trained
    classifier of this label set). Otherwise a model without a classification head gets a new
    one of `len(labels)` classes, read as `cfg.pooling` says; a classifier whose classes differ
    from the label set is refused. Errors name `classify_teacher.model` or `--lm-teacher`.
    """
    key = f"{SECTION}.model"
    local = Path(cfg.model).expanduser()
    if not cfg.is_builtin and looks_like_path(cfg.model) and not local.exists():
        raise InputError(
            f"{key}: {cfg.model!r} does not exist; give 'builtin', a hub id such as "
            "'org/name', or the path of a folder written by save_pretrained"
        )
    if not cfg.is_builtin and not cfg.finetune:
        model, tokenizer = load_classifier(cfg.model, labels=labels, revision=cfg.revision, key=key)
        return Base(model, tokenizer, _revision(cfg, model), None, set(), set(), "kept")

    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    base = None
    if cfg.is_builtin:
        if lm_teacher is None:
            raise ConfigError(
                f"{key}: builtin fine-tunes the LM teacher; pass --lm-teacher models/teacher"
            )
        lm_teacher = Path(lm_teacher)
        if not lm_teacher.is_dir():
            raise InputError(
                f"--lm-teacher {lm_teacher}: no such folder (run `dvc repro prepare_teacher`)"
            )
        prov = read_provenance(lm_teacher)
        base = {k: prov.get(k) for k in ("name", "revision", "sha256", "architecture")}
        source, rev, where = str(lm_teacher), None, f"--lm-teacher {lm_teacher}"
    else:
        source = str(local) if local.is_dir() else cfg.model
        rev = None if local.is_dir() else cfg.revision
        where = f"{key}: {cfg.model!r}"
    try:
        config = AutoConfig.from_pretrained(source, revision=rev)
    except load_errors() as e:
        raise InputError(f"{where}: cannot load a model config: {first_line(e)}") from e
    archs = list(getattr(config, "architectures", None) or [])
    if any(a.endswith("ForSequenceClassification") for a in archs):
        check_label_config(config, labels, where)
    torch.manual_seed(cfg.seed)  # the new head's initialisation
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=rev)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # a new head is expected: no load report
        try:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                source,
                revision=rev,
                output_loading_info=True,
                dtype=torch.float32,
                num_labels=len(labels),
                id2label=dict(enumerate(labels)),
                label2id={name: i for i, name in enumerate(labels)},
            )
        finally:
            hf_logging.set_verbosity(verbosity)
    except load_errors() as e:
        raise InputError(f"{where}: cannot load as a sequence classifier: {first_line(e)}") from e
    missing = set(info.get("missing_keys") or [])
    names = {n for n, _ in model.named_parameters()}
    body_missing = sorted(n for n in missing if not n.startswith(HEAD_PREFIXES))
    if body_missing:
        raise InputError(
            f"{where}: the checkpoint lacks body weights ({', '.join(body_missing[:3])}); it "
            "cannot be read as a sequence classifier"
        )
    new_head = bool(missing & names)
    head = (missing & names) or {n for n in names if n.startswith(HEAD_PREFIXES)}
    model.config.architectures = [type(model).__name__]
    ensure_pad(model, tokenizer, where)
    if cfg.append_eos:
        append_eos(tokenizer)
    frozen: set[str] = set()
    pooling = cfg.pooling if new_head else "kept"
    if pooling == "mean":
        frozen = uniform_last_attention(model)
    model.eval()
    revision = None if base is not None else _revision(cfg, model)
    return Base(model, tokenizer, revision, base, head, frozen, pooling)


def uniform_last_attention(model: Any) -> set[str]:
    """Zero the last decoder layer's key projection; return its parameter names (to freeze).

    With every key zero, every attention score is zero and the softmax is uniform over the
    positions the causal and padding masks allow: the last token's attention output is the mean
    of the value vectors of the whole text. Rotary embeddings rotate a zero key to zero, so
    this holds for Llama-like decoders (Llama, Mistral, Qwen, ...). ConfigError naming
    `classify_teacher.pooling` for a model without `layers.<i>.self_attn.k_proj`.
    """
    keys = [
        (name, module)
        for name, module in model.named_modules()
        if name.endswith("self_attn.k_proj") and ".layers." in f".{name}"
    ]
    if not keys:
        raise ConfigError(
            f"{SECTION}.pooling: 'mean' needs a Llama-like decoder (layers with self_attn.k_proj); "
            f"{type(model).__name__} has none, so use 'last'"
        )
    name, k_proj = max(keys, key=lambda item: int(item[0].split(".layers.")[-1].split(".")[0]))
    with torch.no_grad():
        for p in k_proj.parameters():
            p.zero_()
    return {f"{name}.{n}" for n, _ in k_proj.named_parameters()}


def append_eos(tokenizer: Any) -> bool:
    """Make a fast tokenizer append EOS to every text, if it adds no special tokens already.

    Returns whether it did. Skipped (False) for a tokenizer that already adds special tokens,
    has no EOS, is not a fast tokenizer, or pads with EOS (the head would then skip it).
    """
    from tokenizers import processors

    eos, eos_id = tokenizer.eos_token, tokenizer.eos_token_id
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if eos is None or backend is None or eos_id == tokenizer.pad_token_id:
        return False
    probe = "a"
    if tokenizer(probe)["input_ids"] != tokenizer(probe, add_special_tokens=False)["input_ids"]:
        return False
    backend.post_processor = processors.TemplateProcessing(
        single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, eos_id)]
    )
    return tokenizer(probe)["input_ids"][-1] == eos_id


def finetune(
    start: Base,
    corpus: LabeledCorpus,
    cfg: ClassifyTeacherConfig,
    corpus_cfg: ClassifyCorpusConfig,
    *,
    progress: bool = True,
) -> FinetuneStats:
    """Fine-tune `start.model` in place on the gold train rows; keep the weights best on dev.

    Batches follow `batch_schedule(seed)` over the gold rows of the labeled languages; the head
    parameters get `head_learning_rate`, the others `learning_rate`, `start.frozen` none; dev
    accuracy of the labeled languages is measured every `eval_every` steps and after the last,
    and the best weights (earliest on ties) are loaded back at the end.
    """
    model, tokenizer = start.model, start.tokenizer
    labeled = corpus_cfg.labeled_languages
    train = corpus.splits["train"]
    mask = train.gold_mask(labeled)
    texts = [t for t, m in zip(train.text, mask, strict=True) if m]
    gold = torch.from_numpy(train.label[mask])  # (N,)
    if len(texts) == 0:
        raise InputError(
            f"{corpus.files.get('train')}: no gold-labeled train rows for "
            f"{', '.join(labeled)}; add labels or change classify_corpus.labeled_languages"
        )
    dev = corpus.splits["dev"]
    dev_mask = dev.gold_mask(labeled)
    dev_texts = [t for t, m in zip(dev.text, dev_mask, strict=True) if m]
    dev_gold = dev.label[dev_mask]  # (M,)
    ids = encode(tokenizer, texts, cfg.max_length)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id

    torch.manual_seed(cfg.seed)
    order = batch_schedule(len(texts), batch_size=cfg.batch_size, steps=cfg.steps, seed=cfg.seed)
    optimizer, scheduler = _optimizer(model, cfg, start.head)
    hook = None
    if cfg.dropout > 0:
        hook = model.get_input_embeddings().register_forward_hook(
            lambda mod, _inp, emb: torch.nn.functional.dropout(emb, cfg.dropout, mod.training)
        )
    for name, p in model.named_parameters():
        p.requires_grad_(name not in start.frozen)
    losses: list[float] = []
    curve: list[dict[str, float]] = []
    best = (-1.0, 0, None)
    t0 = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc="classify teacher", unit="step", disable=not progress)
    try:
        for step in bar:
            model.train()
            idx = order[step]
            input_ids, attn = pad_batch([ids[i] for i in idx], pad_id, device)  # (B, T)
            logits = model(input_ids=input_ids, attention_mask=attn).logits.float()  # (B, C)
            loss = torch.nn.functional.cross_entropy(
                logits, gold[idx].to(device), label_smoothing=cfg.label_smoothing
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            done = step + 1
            if done % cfg.eval_every == 0 or done == cfg.steps:
                acc = _accuracy(model, tokenizer, dev_texts, dev_gold, cfg)
                recent = float(np.mean(losses[-cfg.eval_every :]))
                curve.append({"step": done, "dev_accuracy": acc, "train_loss": recent})
                if acc > best[0]:
                    state = {
                        k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()
                    }
                    best = (acc, done, state)
                bar.set_postfix(loss=f"{recent:.3f}", dev=f"{acc:.3f}", best=f"{best[0]:.3f}")
    finally:
        if hook is not None:
            hook.remove()
        for p in model.parameters():
            p.requires_grad_(True)
    seconds = time.perf_counter() - t0
    model.load_state_dict(best[2])
    model.eval()
    log.info(
        "classify teacher: %d steps in %.0fs, best dev accuracy %.3f at step %d",
        cfg.steps,
        seconds,
        best[0],
        best[1],
    )
    return FinetuneStats(
        steps=cfg.steps,
        seconds=seconds,
        final_loss=float(np.mean(losses[-max(1, cfg.steps // 10) :])),
        best_step=best[1],
        best_dev_accuracy=best[0],
        curve=curve,
    )


def score(
    model: Any,
    tokenizer: Any,
    corpus: LabeledCorpus,
    cfg: ClassifyTeacherConfig,
    corpus_cfg: ClassifyCorpusConfig,
) -> dict[str, Any]:
    """Accuracy on dev and test per labeled language (plus `labeled`, all of them pooled), and
    on dev per other language read directly (rows with a label only)."""
    labeled = list(corpus_cfg.labeled_languages)
    result: dict[str, Any] = {}
    for split in ("dev", "test"):
        rows = corpus.splits[split]
        keep = rows.label >= 0
        if split == "test":
            keep &= np.isin(rows.lang, labeled)
        texts = [t for t, k in zip(rows.text, keep, strict=True) if k]
        pred = class_logprobs(
            model, tokenizer, texts, batch_size=cfg.eval_batch_size, max_length=cfg.max_length
        ).argmax(-1)  # (M,)
        hit = pred == rows.label[keep]
        langs = rows.lang[keep]
        in_labeled = np.isin(langs, labeled)
        by_lang = {lang: float(hit[langs == lang].mean()) for lang in labeled}
        result[f"{split}_accuracy"] = {"labeled": float(hit[in_labeled].mean()), **by_lang}
        if split == "dev":
            others = [lang for lang in corpus_cfg.languages if lang not in labeled]
            result["dev_accuracy_direct"] = {
                lang: float(hit[langs == lang].mean()) for lang in others if (langs == lang).any()
            }
    log.info(
        "classify teacher accuracy on the labeled languages: dev %.3f, test %.3f",
        result["dev_accuracy"]["labeled"],
        result["test_accuracy"]["labeled"],
    )
    return result


def _accuracy(
    model: Any, tokenizer: Any, texts: list[str], gold: np.ndarray, cfg: ClassifyTeacherConfig
) -> float:
    lp = class_logprobs(
        model, tokenizer, texts, batch_size=cfg.eval_batch_size, max_length=cfg.max_length
    )  # (M, C)
    return float((lp.argmax(-1) == gold).mean()) if len(texts) else 0.0


def _optimizer(
    model: Any, cfg: ClassifyTeacherConfig, head: set[str]
) -> tuple[torch.optim.Optimizer, Any]:
    """The shared AdamW + warmup/cosine recipe, the head's parameters at `head_learning_rate`."""
    optimizer, scheduler = adamw_with_schedule(
        model,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_steps,
        steps=cfg.steps,
        lr_overrides={p: cfg.head_learning_rate for n, p in model.named_parameters() if n in head},
    )
    return optimizer, scheduler


def _revision(cfg: ClassifyTeacherConfig, model: Any) -> str | None:
    if Path(cfg.model).expanduser().is_dir():
        return None
    return getattr(model.config, "_commit_hash", None) or cfg.revision
