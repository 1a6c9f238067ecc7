"""The one optimisation recipe both trainers use (builtin teacher, students).

AdamW (betas 0.9/0.95) with weight decay on matrices only (norm gains and biases are not
decayed: shrinking them toward zero only fights the normalisation), linear warmup to the peak
learning rate, then cosine decay to zero (`transformers.get_cosine_schedule_with_warmup`), and
the global gradient norm clipped by the caller. Keeping it in one place keeps the teacher and
students comparable and their params validated the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from pipeline.core.config import require


def check_optimizer_params(section: str, cfg: Any) -> None:
    """Range checks for the optimiser keys of a params section's config (`steps`, `batch_size`,
    `learning_rate`, `warmup_steps`, `weight_decay`, `grad_clip`); errors name `section.key`."""
    steps, batch_size, learning_rate = cfg.steps, cfg.batch_size, cfg.learning_rate
    warmup_steps, weight_decay, grad_clip = cfg.warmup_steps, cfg.weight_decay, cfg.grad_clip
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
    lr_overrides: Mapping[torch.nn.Parameter, float] | None = None,
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over `model`'s parameters (decay on ndim >= 2 only) and its warmup-cosine schedule.

    `lr_overrides` gives some parameters their own peak learning rate (e.g. a new head on a
    pretrained body); the schedule scales every group's peak alike.
    """
    from transformers import get_cosine_schedule_with_warmup

    lrs = dict(lr_overrides or {})
    decay = [p for p in model.parameters() if p.ndim >= 2 and p not in lrs]
    no_decay = [p for p in model.parameters() if p.ndim < 2 and p not in lrs]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    for lr in sorted(set(lrs.values())):
        for wd, keep in ((weight_decay, True), (0.0, False)):
            params = [p for p in model.parameters() if lrs.get(p) == lr and (p.ndim >= 2) == keep]
            if params:
                groups.append({"params": params, "lr": lr, "weight_decay": wd})
    optimizer = torch.optim.AdamW(
        groups,
        lr=learning_rate,
        betas=(0.9, 0.95),
    )
    return optimizer, get_cosine_schedule_with_warmup(optimizer, warmup_steps, steps)
