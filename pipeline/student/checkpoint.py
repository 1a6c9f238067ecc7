"""Resumable training state, written atomically outside the DVC output.

A checkpoint is one file, `<checkpoints>/<key>/latest.pt`, holding the model, optimizer and
scheduler state dicts, every RNG state (torch CPU and CUDA, numpy, Python), the step (which is
also the data position: the batch order is a pure function of seed and step, see
`pipeline.student.data`) and the running counters. It is written to a temporary sibling,
fsynced, then renamed over the old one, so a `kill -9` at any instant leaves either the previous
checkpoint or the new one, never a torn file. `key` is a digest of everything that determines
the weights (params, inputs' identities, data layout), so a run with other params or inputs
never resumes from a stale checkpoint. Trade-off: only the latest checkpoint is kept (one file's
worth of disk), and the state is loaded with `weights_only=True` (tensors and plain data only).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

FILE = "latest.pt"


def run_key(identity: dict[str, Any]) -> str:
    """First 16 hex digits of the sha256 of `identity` as canonical JSON."""
    blob = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def rng_state() -> dict[str, Any]:
    """Every global RNG state, as tensors and plain data (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos, has_gauss, gauss],
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def save(directory: Path, state: dict[str, Any]) -> Path:
    """Write `state` to `directory/latest.pt` atomically (temp file, fsync, rename)."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / FILE
    tmp = directory / f".{FILE}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
    return final


def load(directory: Path) -> dict[str, Any] | None:
    """The latest checkpoint in `directory`, or None if there is none yet."""
    path = directory / FILE
    if not path.is_file():
        return None
    for stale in directory.glob(f".{FILE}.tmp-*"):  # left by a killed writer
        stale.unlink(missing_ok=True)
    return torch.load(path, map_location="cpu", weights_only=True)


def remove(directory: Path) -> None:
    """Delete a finished run's checkpoints (and the parent folder if that leaves it empty)."""
    shutil.rmtree(directory, ignore_errors=True)
    with contextlib.suppress(OSError):
        directory.parent.rmdir()
