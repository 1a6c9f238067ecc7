"""Building the student: a fresh Llama sized by params, or an existing causal LM, and its init.

Two sources. `model: scratch` builds a `LlamaForCausalLM` (layers, width, heads, MLP width from
params) whose vocabulary is the teacher's, so stored ids index its logits directly. Anything
else is a hub id or a local folder loaded with `from_pretrained`; its vocabulary must equal the
teacher's (checked from its config before any weights are read).

Initialisation of a scratch student: `random` (the model's own init, seeded), or
`teacher_layers` (DistilBERT, Sanh et al. 2019): copy the token embeddings, the final norm, the
output head when neither model ties it, and every n-th teacher layer (n = teacher layers //
student layers, starting at layer 0). Copying needs identical widths (hidden, MLP, heads, key-
value heads) and a Llama teacher; the trade-off is that the student's width is then fixed by
the teacher's, and only depth can be reduced.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from pipeline.core.errors import ConfigError, InputError
from pipeline.modeling.tasks import auto_model_class, model_task

log = logging.getLogger(__name__)

SCRATCH = "scratch"
"""`train_student.model` value that builds a new Llama from the size params."""

_WIDTHS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")


def pretrained_vocab(model: str, revision: str) -> int:
    """Vocabulary size of an existing model from its config alone (no weights are read)."""
    try:
        config = AutoConfig.from_pretrained(model, revision=revision)
    except (OSError, ValueError) as e:
        raise InputError(
            f"train_student.model: cannot load a model config from {model!r} ({e}); give a hub "
            f"id, a local folder, or '{SCRATCH}'"
        ) from e
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.vocab_size)


def build_student(config: LlamaConfig, *, seed: int) -> LlamaForCausalLM:
    """A freshly initialised student (float32); the same weights for the same seed."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()


def load_pretrained(model: str, revision: str) -> Any:
    """An existing causal LM in float32 (the training loop uses autocast for lower precision)."""
    return AutoModelForCausalLM.from_pretrained(model, revision=revision, dtype=torch.float32)


def check_layer_copy(student: LlamaConfig, teacher: Any, *, section: str = "train_student") -> None:
    """Raise ConfigError (naming `<section>.init` / `<section>.num_layers`) unless
    `init: teacher_layers` can copy layers from `teacher`'s config."""
    if getattr(teacher, "model_type", None) != "llama":
        raise ConfigError(
            f"{section}.init: teacher_layers copies Llama layers, but the teacher is a "
            f"{getattr(teacher, 'model_type', '?')!r} model; use init: random"
        )
    differ = [
        f"{key} {getattr(student, key)} vs the teacher's {getattr(teacher, key)}"
        for key in _WIDTHS
        if getattr(student, key) != getattr(teacher, key)
    ]
    if student.vocab_size != teacher.vocab_size:
        differ.append(f"vocab_size {student.vocab_size} vs the teacher's {teacher.vocab_size}")
    if differ:
        raise ConfigError(
            f"{section}.init: teacher_layers needs the teacher's widths, but "
            + ", ".join(differ)
            + "; set the student's sizes to the teacher's or use init: random"
        )
    if student.num_hidden_layers > teacher.num_hidden_layers:
        raise ConfigError(
            f"{section}.num_layers: {student.num_hidden_layers} is more than the teacher's "
            f"{teacher.num_hidden_layers} layers; init: teacher_layers can only drop layers"
        )


def init_from_teacher(
    student: Any, teacher_dir: str | Path, *, section: str = "train_student"
) -> list[int]:
    """Copy embeddings, final norm, every n-th layer and the head where both models have one of
    the same kind and shape (a causal LM's `lm_head` if both are untied; a sequence classifier's
    `score`); return the teacher layer copied into each student layer. The teacher is loaded with
    the class its config names (`pipeline.modeling.tasks`), so either task's teacher works."""
    teacher_config = AutoConfig.from_pretrained(teacher_dir)
    check_layer_copy(student.config, teacher_config, section=section)
    model_class = auto_model_class(model_task(teacher_config.architectures))
    teacher = model_class.from_pretrained(teacher_dir, dtype=torch.float32)
    n = teacher_config.num_hidden_layers // student.config.num_hidden_layers
    picked = [i * n for i in range(student.config.num_hidden_layers)]
    with torch.no_grad():
        s, t = student.model, teacher.model
        s.embed_tokens.load_state_dict(t.embed_tokens.state_dict())
        s.norm.load_state_dict(t.norm.state_dict())
        for dst, src in zip(s.layers, picked, strict=True):
            dst.load_state_dict(t.layers[src].state_dict())
        if hasattr(student, "lm_head") and hasattr(teacher, "lm_head"):
            untied = not student.config.tie_word_embeddings
            if untied and not teacher_config.tie_word_embeddings:
                student.lm_head.load_state_dict(teacher.lm_head.state_dict())
            elif untied:  # the teacher's head is its embedding matrix
                student.lm_head.weight.copy_(t.embed_tokens.weight)
        elif (
            hasattr(student, "score")
            and hasattr(teacher, "score")
            and student.score.weight.shape == teacher.score.weight.shape
        ):
            student.score.load_state_dict(teacher.score.state_dict())
    log.info("student initialised from teacher layers %s of %s", picked, teacher_dir)
    return picked
