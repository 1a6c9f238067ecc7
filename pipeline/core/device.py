"""Choosing the device and compute dtype a stage runs on: one rule for every stage.

`device: auto` picks CUDA when torch sees a GPU, else the CPU; `dtype: auto` is float32 on CPU
and bfloat16 on CUDA (float16 on GPUs without bf16). float16 on CPU is refused (slow or missing
kernels), as is `cuda` on a machine without one; each error names the stage's params key.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.core.errors import ConfigError

if TYPE_CHECKING:
    import torch


def resolve_device(device: str, dtype: str, *, section: str) -> tuple[str, str]:
    """("cpu" | "cuda", "float32" | "bfloat16" | "float16") for the configured values of
    `<section>.device` and `<section>.dtype`."""
    import torch

    cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise ConfigError(
            f"{section}.device: cuda requested but no CUDA device is available to torch; "
            "use auto or cpu"
        )
    dev = "cuda" if device == "cuda" or (device == "auto" and cuda) else "cpu"
    if dtype == "auto":
        if dev == "cpu":
            dtype = "float32"
        else:
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if dev == "cpu" and dtype == "float16":
        raise ConfigError(
            f"{section}.dtype: float16 is not supported on CPU (slow or missing kernels); "
            "use float32 or bfloat16, or run on CUDA"
        )
    return dev, dtype


def torch_device(device: str, *, section: str) -> torch.device:
    """The torch device for `<section>.device` (auto | cpu | cuda), for stages whose compute
    dtype is not a param: the same rule and errors as `resolve_device`."""
    import torch

    return torch.device(resolve_device(device, "auto", section=section)[0])
