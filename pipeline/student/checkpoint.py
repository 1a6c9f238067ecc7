"""Resumable training state, written atomically outside the DVC output.

A checkpoint is one file in `<checkpoints>/<key>/` holding the model, optimizer and scheduler
state dicts, every RNG state (torch CPU and CUDA, numpy, Python), the step (which is also the
data position: the batch order is a pure function of seed and step, see
`pipeline.student.data`), the running counters and the curves so far (`Curves.snapshot`). `key`
is a digest of everything that determines the weights (params, inputs' identities, data
layout), so a run with other params or inputs never resumes from a stale checkpoint.

Two are kept: `latest.pt` and the one before it, `previous.pt`. `save` writes the new state to a
temporary sibling and fsyncs it, renames `latest.pt` to `previous.pt`, then the temporary file
to `latest.pt` (both renames atomic), so a `kill -9` at any instant leaves a loadable
checkpoint: both old files, or `previous.pt` alone (between the renames), or the new pair.

`resume` tries `latest.pt`, then `previous.pt`. A file that cannot be used (truncated, not a
torch file, refused by `weights_only` unpickling, keys missing or of the wrong kind, curve
names outside the curves folder) or that does not fit the run (the caller's `apply` raises,
e.g. `restore` finding other tensor names or shapes) is never deleted and never blocks a rerun:
it is renamed aside to `<name>.damaged-<n>` with a WARNING naming it and the reason, and the
next candidate is tried; with none left, training starts from scratch (logged). `apply` must
check everything before it changes anything (as `restore` does); the RNG states are put back
by `resume` itself when `apply` fails. A finished run deletes its checkpoints (`remove`) but
keeps the ones set aside, for the user to inspect or delete.

Trade-offs: two files' worth of disk, and the state is loaded with `weights_only=True` (tensors
and plain data only, no code). Exceptions raised while loading or applying a candidate are all
taken to mean "unusable" (except MemoryError), so a bug in `apply` shows up as warnings and a
run from scratch, never as a silently wrong resume.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.core.curves import check_snapshot
from pipeline.core.errors import InputError, SoftlabelsError
from pipeline.core.text import printable

log = logging.getLogger(__name__)

FILE = "latest.pt"
"""The newest checkpoint of a run."""
PREVIOUS = "previous.pt"
"""The checkpoint before it (module docstring)."""
CANDIDATES = (FILE, PREVIOUS)
"""What `resume` tries, in this order."""
DAMAGED = ".damaged-"
"""Infix of a set-aside checkpoint's name: `latest.pt.damaged-1`."""
RNG_KEYS = ("torch", "cuda", "numpy", "python")
"""Keys of `rng_state`."""


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


def _fsync_dir(directory: Path) -> None:
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the renames themselves durable
    finally:
        os.close(dir_fd)


def save(directory: Path, state: dict[str, Any]) -> Path:
    """Write `state` to `directory/latest.pt`, keeping the one it replaces as `previous.pt`
    (temp file, fsync, two atomic renames: module docstring). Returns the new file."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / FILE
    tmp = directory / f".{FILE}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    if final.is_file():
        os.replace(final, directory / PREVIOUS)
    os.replace(tmp, final)
    _fsync_dir(directory)
    return final


def load(path: Path) -> dict[str, Any]:
    """The checkpoint in file `path`, checked for the layout every trainer saves (`step`,
    `seconds`, `trainer` {model, optimizer, scheduler}, `rng`, `curves`); raises if it cannot
    be read or lacks any of it (what does not fit the run is the caller's to check: `restore`)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as e:  # truncated, not a torch file, refused by weights_only unpickling
        raise ValueError(f"cannot be read: {_reason(e)}") from e
    if not isinstance(state, dict):
        raise ValueError(f"holds a {type(state).__name__}, not a checkpoint")
    missing = [k for k in ("step", "seconds", "trainer", "rng", "curves") if k not in state]
    if missing:
        raise ValueError(f"keys {', '.join(missing)} are missing")
    step = state["step"]
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step is {printable(repr(step))}, not a step number")
    _check_numbers(state, ("seconds",))
    trainer = state["trainer"]
    if not isinstance(trainer, dict) or not {"model", "optimizer", "scheduler"} <= set(trainer):
        raise ValueError("the trainer state lacks model, optimizer or scheduler")
    rng = state["rng"]
    if not isinstance(rng, dict) or set(rng) != set(RNG_KEYS):
        raise ValueError(f"the RNG state is not {{{', '.join(RNG_KEYS)}}}")
    check_snapshot(state["curves"])
    return state


def set_aside(path: Path) -> Path:
    """Rename an unusable checkpoint to `<name>.damaged-<n>` (the first free n) beside it."""
    n = 1
    while (aside := path.with_name(f"{path.name}{DAMAGED}{n}")).exists():
        n += 1
    os.replace(path, aside)
    return aside


def _reason(e: BaseException) -> str:
    """One printable line saying why a checkpoint was refused."""
    text = str(e)
    marker = "WeightsUnpickler error:"  # torch's long preamble suggests weights_only=False: no
    if marker in text:
        detail = next((ln for ln in text.split(marker, 1)[1].splitlines() if ln.strip()), "")
        text = f"weights-only unpickling refused it: {detail.strip()}"
    first = (text.strip().splitlines() or [""])[0]
    if len(first) > 200:
        first = first[:200] + "…"
    if isinstance(e, (ValueError, SoftlabelsError)) and first:  # the checks' own words
        return printable(first)
    return printable(f"{type(e).__name__}: {first}" if first else type(e).__name__)


def resume(directory: Path, apply: Callable[[dict[str, Any]], Any]) -> dict[str, Any] | None:
    """The newest usable checkpoint in `directory`, already applied, or None (start from
    scratch). Tries `latest.pt` then `previous.pt`: each is `load`ed and given to
    `apply(state)`, which restores the trainer and RNG states and raises, before changing
    anything, if the state does not fit the run (see `restore`). A candidate that fails either
    step is renamed aside (`set_aside`) with a WARNING naming it and why, and the next is tried;
    the RNG states are restored after a failed `apply`. Temporary files a killed writer left are
    removed. An unusable file that cannot be renamed aside is an InputError naming it."""
    for stale in directory.glob(f".{FILE}.tmp-*"):  # left by a killed writer
        stale.unlink(missing_ok=True)
    refused = []
    for name in CANDIDATES:
        path = directory / name
        if not path.is_file():
            continue
        rng_before = rng_state()
        try:
            state = load(path)
            apply(state)
        except MemoryError:
            raise
        except Exception as e:  # any failure means the file is unusable (module docstring)
            set_rng_state(rng_before)
            reason = _reason(e)
            try:
                aside = set_aside(path)
            except OSError as err:
                raise InputError(
                    f"{path}: checkpoint unusable ({reason}) and cannot be renamed aside "
                    f"({err.strerror}); delete it to start this run from scratch"
                ) from e
            log.warning("checkpoint %s is unusable (%s); set aside as %s", path, reason, aside.name)
            refused.append(path.name)
            continue
        log.info("resuming from the checkpoint at step %d (%s)", int(state["step"]), path)
        return state
    if refused:
        log.warning(
            "no usable checkpoint in %s (%s set aside): training starts from scratch",
            directory,
            ", ".join(refused),
        )
    return None


def _check_numbers(state: Mapping[str, Any], names: tuple[str, ...]) -> None:
    for name in names:
        if name not in state:
            raise ValueError(f"key {name} is missing")
        value = state[name]
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ValueError(f"{name} is {printable(repr(value))[:40]}, not a number")


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')} {tuple(value.shape)}"
    return type(value).__name__


def check_tensors(expected: Mapping[str, torch.Tensor], saved: Any, what: str) -> None:
    """ValueError unless `saved` is a state dict with exactly `expected`'s tensor names, each of
    the same shape and dtype (the device may differ)."""
    if not isinstance(saved, Mapping):
        raise ValueError(f"the {what} state is a {type(saved).__name__}, not a state dict")
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    if missing or unexpected:
        raise ValueError(
            f"the {what} state does not fit this run: missing tensors "
            f"{printable(missing[:3])}, unexpected tensors {printable(unexpected[:3])}"
        )
    for name, now in expected.items():
        old = saved[name]
        if not isinstance(old, torch.Tensor) or old.shape != now.shape or old.dtype != now.dtype:
            raise ValueError(
                f"the {what} state does not fit this run: {name} is {_describe(old)}, "
                f"this run's is {_describe(now)}"
            )


def _check_optimizer(optimizer: torch.optim.Optimizer, saved: Any) -> None:
    """ValueError unless `saved` is an optimizer state dict over parameters of this
    optimizer's groups and shapes (what `Optimizer.load_state_dict` would only partly check,
    and only after the model was loaded)."""
    groups = saved.get("param_groups") if isinstance(saved, Mapping) else None
    states = saved.get("state") if isinstance(saved, Mapping) else None
    if not isinstance(groups, list) or not isinstance(states, Mapping):
        raise ValueError("the optimizer state is not an optimizer state dict")
    sizes = [len(g["params"]) for g in optimizer.param_groups]
    saved_sizes = [
        len(g["params"]) if isinstance(g, Mapping) and isinstance(g.get("params"), list) else -1
        for g in groups
    ]
    if saved_sizes != sizes:
        raise ValueError(
            f"the optimizer state does not fit this run: parameter groups of {saved_sizes} "
            f"parameters, this run's {sizes}"
        )
    params = [p for g in optimizer.param_groups for p in g["params"]]
    by_id = dict(zip([i for g in groups for i in g["params"]], params, strict=True))
    for key, entry in states.items():
        param = by_id.get(key) if isinstance(key, int) else None
        if param is None or not isinstance(entry, Mapping):
            raise ValueError(
                f"the optimizer state has an entry {printable(repr(key))[:40]} for no parameter"
            )
        for name, value in entry.items():
            if isinstance(value, torch.Tensor) and value.ndim and value.shape != param.shape:
                raise ValueError(
                    f"the optimizer state does not fit this run: {name} of parameter {key} is "
                    f"{_describe(value)}, the parameter {_describe(param)}"
                )


def _check_like(now: Any, saved: Any, where: str) -> None:
    """ValueError unless plain data `saved` has the structure of `now`: the same public keys
    (private `_` keys compared where both have them), list lengths and kinds of values."""
    if isinstance(now, Mapping):
        if not isinstance(saved, Mapping):
            raise ValueError(f"{where} is a {type(saved).__name__}, not a map")
        for key, value in now.items():
            if key in saved:
                _check_like(value, saved[key], f"{where}.{key}")
            elif not str(key).startswith("_"):
                raise ValueError(f"{where}.{key} is missing")
    elif isinstance(now, (list, tuple)):
        if not isinstance(saved, (list, tuple)) or len(saved) != len(now):
            raise ValueError(f"{where} is not a list of {len(now)}")
        for i, (a, b) in enumerate(zip(now, saved, strict=True)):
            _check_like(a, b, f"{where}[{i}]")
    elif isinstance(now, bool) or now is None or isinstance(now, str):
        if type(saved) is not type(now):
            raise ValueError(f"{where} is a {type(saved).__name__}, not a {type(now).__name__}")
    elif isinstance(now, (int, float)):
        if not isinstance(saved, (int, float)) or isinstance(saved, bool):
            raise ValueError(f"{where} is a {type(saved).__name__}, not a number")
    elif isinstance(now, torch.Tensor) and (
        not isinstance(saved, torch.Tensor) or saved.shape != now.shape
    ):
        raise ValueError(f"{where} is {_describe(saved)}, not {_describe(now)}")


def check_fits(trainer: Any, saved: Any) -> None:
    """ValueError naming the first difference between a saved trainer state and `trainer` (with
    `model`, `optimizer`, `scheduler`, like `StudentTrainer` and `ClassifyTrainer`): model
    tensor names, shapes and dtypes, optimizer groups and state shapes, scheduler fields.
    Changes nothing."""
    if not isinstance(saved, Mapping):
        raise ValueError(f"the trainer state is a {type(saved).__name__}, not a map")
    check_tensors(trainer.model.state_dict(), saved.get("model"), "model")
    _check_optimizer(trainer.optimizer, saved.get("optimizer"))
    _check_like(trainer.scheduler.state_dict(), saved.get("scheduler"), "the scheduler state")


def restore(trainer: Any, state: dict[str, Any], *, numbers: tuple[str, ...] = ()) -> None:
    """Apply a `load`ed checkpoint to `trainer` and the global RNGs, after checking that every
    key in `numbers` (the caller's counters) holds a number and that the trainer state fits
    (`check_fits`); raises before changing the trainer if not. The usual `apply` of `resume`."""
    _check_numbers(state, numbers)
    check_fits(trainer, state["trainer"])
    set_rng_state(state["rng"])  # may still fail on a malformed state: resume restores the RNGs
    trainer.load_state_dict(state["trainer"])


def remove(directory: Path) -> None:
    """Delete a finished run's checkpoints, then its folder and the parent folder if that leaves
    them empty. Checkpoints set aside (`set_aside`) are kept: the user may want them."""
    for path in [directory / name for name in CANDIDATES] + list(directory.glob(f".{FILE}.tmp-*")):
        path.unlink(missing_ok=True)
    for folder in (directory, directory.parent):
        with contextlib.suppress(OSError):
            folder.rmdir()
