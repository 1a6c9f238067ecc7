"""The Llama configuration softlabels builds from size params (builtin teacher, scratch students).

One place decides the architecture of models trained from scratch: a `LlamaForCausalLM` with
full multi-head attention (as many key/value heads as query heads: at these sizes grouped-query
attention saves nothing worth its quality cost), EOS doubling as BOS, float32.
"""

from __future__ import annotations

from transformers import LlamaConfig

from pipeline.core.config import require


def check_llama_sizes(
    section: str, *, num_layers: int, hidden_size: int, num_heads: int, intermediate_size: int
) -> None:
    """Range checks for the size keys of a params section that builds a Llama from scratch
    (teacher, students); errors name `section.key`. Rotary embeddings need an even head size."""
    sizes = {
        "num_layers": num_layers,
        "hidden_size": hidden_size,
        "num_heads": num_heads,
        "intermediate_size": intermediate_size,
    }
    for key, value in sizes.items():
        require(value >= 1, f"{section}.{key}", f"must be >= 1, got {value}")
    require(
        hidden_size % num_heads == 0 and (hidden_size // num_heads) % 2 == 0,
        f"{section}.num_heads",
        f"must divide hidden_size ({hidden_size}) into an even head size, got {num_heads}",
    )


def llama_config(
    *,
    vocab_size: int,
    num_layers: int,
    hidden_size: int,
    num_heads: int,
    intermediate_size: int,
    tie_embeddings: bool,
    max_position_embeddings: int,
    eos_id: int | None,
    pad_id: int | None,
) -> LlamaConfig:
    """A LlamaConfig of the given size (float32, full multi-head attention, EOS as BOS)."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_embeddings,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    config.architectures = ["LlamaForCausalLM"]
    return config
