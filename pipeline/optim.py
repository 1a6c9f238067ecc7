"""The one optimisation recipe both trainers use (builtin teacher, students).

AdamW (betas 0.9/0.95) with weight decay on matrices only (norm gains and biases are not
decayed: shrinking them toward zero only fights the normalisation), linear warmup to the peak
learning rate, then cosine decay to zero (`transformers.get_cosine_schedule_with_warmup`), and
the global gradient norm clipped by the caller. Keeping it in one place keeps the teacher and
students comparable and their params validated the same way.
"""

from __future__ import annotations

import torch

from pipeline.config import require


def check_optimizer_params(
    section: str,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    warmup_steps: int,
    weight_decay: float,
    grad_clip: float,
) -> None:
    """Range checks for the optimiser keys of a params section; errors name `section.key`."""
    require(steps >= 1, f"{section}.steps", f"must be >= 1, got {steps}")
    require(batch_size >= 1, f"{section}.batch_size", f"must be >= 1, got {batch_size}")
    require(
        0.0 < learning_rate < 1.0,
        f"{section}.learning_rate",
        f"must be in (0, 1), got {learning_rate}",
    )
    require(
        0 <= warmup_steps < steps,
        f"{section}.warmup_steps",
        f"must be >= 0 and < {section}.steps ({steps}), got {warmup_steps}",
    )
    require(weight_decay >= 0, f"{section}.weight_decay", f"must be >= 0, got {weight_decay}")
    require(grad_clip > 0, f"{section}.grad_clip", f"must be > 0, got {grad_clip}")


def adamw_with_schedule(
    model: torch.nn.Module,
    *,
    learning_rate: float,
    weight_decay: float,
    warmup_steps: int,
    steps: int,
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over `model`'s parameters (decay on ndim >= 2 only) and its warmup-cosine schedule."""
    from transformers import get_cosine_schedule_with_warmup

    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=learning_rate,
        betas=(0.9, 0.95),
    )
    return optimizer, get_cosine_schedule_with_warmup(optimizer, warmup_steps, steps)
