"""The Llama configuration softlabels builds from size params (builtin teacher, scratch students).

One place decides the architecture of models trained from scratch: a `LlamaForCausalLM` with
full multi-head attention (as many key/value heads as query heads: at these sizes grouped-query
attention saves nothing worth its quality cost), EOS doubling as BOS, float32.
"""

from __future__ import annotations

from transformers import LlamaConfig


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
