"""Which kind of model a folder holds, and the `transformers` Auto class that loads it.

Both tasks' models are Hugging Face `save_pretrained` folders whose `config.json` records the
class in `architectures`: a `*ForSequenceClassification` class is a sequence classifier, anything
else a causal LM (what the pipeline handled before classifiers, so a config without
`architectures` still loads as before). Compress, evaluate and the students' layer copy ask here.
"""

from __future__ import annotations

from typing import Any, Literal

Task = Literal["causal-lm", "sequence-classification"]
"""What a model folder holds, as `model_task` tells it from the class names in `architectures`."""


def model_task(architectures: list[str] | tuple[str, ...] | None) -> Task:
    """`sequence-classification` when a class name ends in `ForSequenceClassification` (the
    `architectures` a `save_pretrained` config records, or `[type(model).__name__]`), else
    `causal-lm`."""
    names = architectures or []
    if any(name.endswith("ForSequenceClassification") for name in names):
        return "sequence-classification"
    return "causal-lm"


def auto_model_class(task: Task) -> Any:
    """The `transformers` Auto class that loads a model of `task`."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if task == "sequence-classification":
        return AutoModelForSequenceClassification
    return AutoModelForCausalLM
