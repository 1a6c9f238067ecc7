"""Data-parallel training (PyTorch DDP): joining a run, agreeing on errors, relaunching a stage.

A stage that trains data-parallel runs as `processes` ranks, one process each, under
`torch.distributed.run` (torchrun): gloo on CPU, NCCL on CUDA with rank r on `cuda:LOCAL_RANK`.
Two ways in, one code path:

- The stage script with `processes > 1` and no `WORLD_SIZE` in its environment (`dvc repro`, or
  the user running the script) relaunches itself: `launch` runs torch.distributed.run in-process
  (standalone rendezvous on a free local port, no restarts) with the same `-m module argv`, waits
  for every rank, and re-raises the error a rank reported, so the stage ends with one
  `error: ...` line like any other. Ranks it starts watch it and stop (SIGKILL) if it dies, so a
  `kill -9` of the stage leaves no rank running on and writing outputs.
- A torchrun started by the user: `WORLD_SIZE` is set; it must equal the `processes` param
  (`check_world`: a ConfigError naming the key otherwise).

Errors: every rank must stop when any rank cannot go on, and the error must be printed once.
Checks that read only the params and the argv (`same_on_every_rank`) give the same result on
every rank, so rank 0 reports them and the others exit quietly; they run before the process
group is initialised. Later phases (inputs, resume, each step's batch, rank 0's writes) run
under `World.agree`: an all-reduce of one flag per rank; if any rank failed, the lowest failing
rank raises its error and every other rank raises `ReportedElsewhere`, which the stage script
turns into exit status 1 without a message (`run_ranked_stage`). A rank that dies without
reporting (a bug, a signal, out of memory inside a step) is stopped by torchrun, which then
stops the others.

Trade-off: the agreement costs one tiny all-reduce (on a gloo group, also under NCCL) per
agreed phase, including one per training step.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from pipeline.core.errors import ConfigError, InputError, SoftlabelsError, StoreError, user_error
from pipeline.core.stage_cli import run_stage

T = TypeVar("T")

ERRORS_ENV = "SOFTLABELS_RANK_ERRORS"
"""Folder where a rank started by `launch` writes its error for the launcher to re-raise."""
LAUNCHER_ENV = "SOFTLABELS_LAUNCHER_PID"
"""Process id of the `launch`ing stage; its ranks stop when it is gone."""
WATCH_SECONDS = 0.2
"""How often a rank started by `launch` checks that its launcher is alive."""
ERROR_CLASSES: dict[str, type[SoftlabelsError]] = {
    cls.__name__: cls for cls in (ConfigError, InputError, StoreError)
}
"""Error classes a rank's report is re-raised as by the launcher (any other: SoftlabelsError)."""


class ReportedElsewhere(Exception):
    """This rank stops because of an error another process reports (a lower rank, rank 0, or
    the launching stage): the stage script exits 1 without printing it a second time. The text
    names the reporting rank and its error, for a library caller."""


class RankFailed(SoftlabelsError):
    """A rank of a data-parallel run died without reporting an error (a bug: its traceback is
    in the log; a signal; out of memory)."""


def launched_world_size() -> int | None:
    """The number of processes torchrun started (`WORLD_SIZE`), or None outside torchrun."""
    value = os.environ.get("WORLD_SIZE")
    return None if value is None else int(value)


def env_rank() -> int:
    """This process's rank from the environment torchrun sets (`RANK`; 0 outside torchrun)."""
    return int(os.environ.get("RANK", "0"))


def needs_launch(processes: int) -> bool:
    """True when a stage asked for `processes` > 1 runs outside torchrun: it must `launch`."""
    return processes > 1 and launched_world_size() is None


def check_world(processes: int, *, section: str) -> int:
    """The world size this process runs in, after refusing (ConfigError naming
    `section.processes`) a mismatch with torchrun's `WORLD_SIZE`, and `processes` > 1 outside
    torchrun (a library call runs one process; the stage script relaunches itself)."""
    size = launched_world_size()
    key = f"{section}.processes"
    if size is None:
        if processes > 1:
            raise ConfigError(
                f"{key}: {processes} processes need torch.distributed: run the stage script "
                f"(`python -m pipeline.stages.{section}` relaunches itself under "
                f"torch.distributed.run) or `torchrun --nproc-per-node {processes} -m "
                f"pipeline.stages.{section} ...`; a library call trains in one process"
            )
        return 1
    if size != processes:
        raise ConfigError(
            f"{key}: {processes}, but torchrun started {size} processes (WORLD_SIZE={size}); "
            f"set {key}: {size} in the params, or start torchrun with --nproc-per-node "
            f"{processes}"
        )
    return size


def check_gpus(processes: int, *, section: str) -> None:
    """Refuse (ConfigError naming `section.processes`) more CUDA processes on this machine
    (torchrun's `LOCAL_WORLD_SIZE`, else `processes`) than it has GPUs: one GPU per rank."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", processes))
    have = torch.cuda.device_count()
    if local > have:
        raise ConfigError(
            f"{section}.processes: {local} processes on CUDA need {local} GPUs (one per "
            f"process), this machine has {have}; lower {section}.processes or use device: cpu"
        )


def same_on_every_rank(fn: Callable[[], T]) -> T:
    """`fn()`, a step whose outcome is the same on every rank (it reads the params, the argv
    and torchrun's environment, or checks that paths exist): a SoftlabelsError it raises is
    raised on every rank alike, so rank 0 reports it and every other rank raises
    ReportedElsewhere instead (exit 1, nothing printed). Run before the process group exists,
    so nothing can wait on a rank that stopped."""
    try:
        return fn()
    except SoftlabelsError as e:
        rank = env_rank()
        if rank != 0:
            raise ReportedElsewhere(f"rank 0 reports: {user_error(e)}") from e
        raise


@dataclass
class World:
    """This process's place in a data-parallel run; the default is a single process, where
    every method is a plain call (`agree(fn)` is `fn()`)."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1
    group: Any = None
    """Process group of the CPU collectives (agreement, objects, metrics): the default group
    under gloo, a gloo group of every rank under NCCL."""
    owns_group: bool = False
    """Whether `join` initialised the process group (and `close` destroys it)."""

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs, checkpoints and writes the outputs."""
        return self.rank == 0

    def agree(self, fn: Callable[[], T]) -> T:
        """`fn()` on every rank, then agree on the outcome (module docstring): if `fn` raised
        on any rank, the lowest such rank raises its error and every other rank raises
        ReportedElsewhere naming it. Every rank must call `agree` at the same point, and `fn`
        must run no collective (a rank that failed before it would leave the others waiting
        in it)."""
        if self.size == 1:
            return fn()
        result: Any = None
        error: Exception | None = None
        try:
            result = fn()
        except Exception as e:  # agreed below; KeyboardInterrupt and the like stop at once
            error = e
        failed = torch.zeros(self.size, dtype=torch.int32)
        failed[self.rank] = int(error is not None)
        dist.all_reduce(failed, group=self.group)
        ranks = failed.nonzero().flatten().tolist()
        if not ranks:
            return result
        first = int(ranks[0])
        note = [_describe(error) if self.rank == first else None]
        dist.broadcast_object_list(note, src=first, group=self.group)
        if self.rank == first:
            assert error is not None
            raise error
        raise ReportedElsewhere(f"rank {first} reports: {note[0]}")

    def on_main(self, fn: Callable[[], T]) -> T | None:
        """`fn()` on rank 0 only (None elsewhere), agreed (`agree`): an error there stops every
        rank."""
        return self.agree(lambda: fn() if self.is_main else None)

    def broadcast(self, value: T) -> T:
        """Rank 0's `value` on every rank (pickled over the CPU group)."""
        if self.size == 1:
            return value
        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sums of `values` over the ranks, in float64."""
        if self.size == 1:
            return [float(v) for v in values]
        total = torch.tensor([float(v) for v in values], dtype=torch.float64)
        dist.all_reduce(total, group=self.group)
        return total.tolist()

    def mean(self, values: Sequence[float]) -> list[float]:
        """Element-wise means of `values` over the ranks (every rank weighs the same)."""
        return [v / self.size for v in self.sum(values)]

    def close(self) -> None:
        """Leave the run: destroy the process group if `join` initialised it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def join(processes: int, device: torch.device, *, section: str) -> tuple[World, torch.device]:
    """This process's `World` and its device: the single process when `processes` is 1
    outside torchrun; under torchrun (after `check_world` and, on CUDA, `check_gpus`, reported
    by rank 0 only: `same_on_every_rank`) the process group is initialised (gloo on CPU, NCCL on
    CUDA with this rank on `cuda:LOCAL_RANK`), or the caller's is used if it has initialised
    one, and ranks other than 0 log warnings only (their INFO lines would repeat rank 0's).
    Close the world with `World.close`."""

    def checked() -> int:
        size = check_world(processes, section=section)
        if device.type == "cuda" and size > 1:
            check_gpus(size, section=section)
        return size

    size = same_on_every_rank(checked)
    if size == 1:
        return World(), device
    rank, local_rank = env_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    owns = not dist.is_initialized()
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        if owns:
            dist.init_process_group(backend="nccl", device_id=device)
    elif owns:
        dist.init_process_group(backend="gloo")
    group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    world = World(rank=rank, local_rank=local_rank, size=size, group=group, owns_group=owns)
    return world, device


def resume_on_main(
    world: World, pick: Callable[[], T | None], apply: Callable[[T], None]
) -> T | None:
    """The checkpoint a run resumes from, applied on every rank (None: from scratch): rank 0
    picks it (`pick`, e.g. `checkpoint.resume`, which applies what it picks on rank 0) and sends
    it to the other ranks, which `apply` it too; any failure is agreed (`World.agree`)."""
    state = world.on_main(pick)
    if world.size == 1:
        return state
    state = world.broadcast(state)
    world.agree(lambda: apply(state) if state is not None and not world.is_main else None)
    return state


def _describe(error: BaseException | None) -> str:
    """One line naming an error: the user's message for a SoftlabelsError or a user OSError,
    else the type and first line (a bug: the failing rank prints its traceback)."""
    if error is None:
        return "no error"
    message = user_error(error)
    if message is not None:
        return message
    text = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


# -- the stage side: relaunching under torch.distributed.run, and each rank's exit -------------


def launch(module: str, argv: Sequence[str], processes: int, *, section: str) -> None:
    """Run `python -m module *argv` as `processes` ranks of one data-parallel run on this
    machine under torch.distributed.run (standalone rendezvous: a free local port; no
    restarts; torchrun sets OMP_NUM_THREADS=1 unless it is set) and wait for every rank.
    Returns when all exited 0. Otherwise raises the error the lowest reporting rank wrote
    (`run_ranked_stage`), as ConfigError, InputError or StoreError with its message, or
    RankFailed saying how each failed rank ended when none reported one."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    with tempfile.TemporaryDirectory(prefix="softlabels-ranks-") as errors:
        env = {ERRORS_ENV: errors, LAUNCHER_ENV: str(os.getpid())}
        before = {name: os.environ.get(name) for name in env}
        os.environ.update(env)  # inherited by the ranks
        args = ["--standalone", "--nproc-per-node", str(processes), "--max-restarts", "0"]
        try:
            torchrun.main([*args, "--module", module, *argv])
        except ChildFailedError as e:
            raise _launch_error(Path(errors), e, processes, section) from None
        finally:
            for name, value in before.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def _launch_error(errors: Path, failure: Any, processes: int, section: str) -> SoftlabelsError:
    """The error to raise for a failed launch (`failure`: torchrun's ChildFailedError): the
    lowest rank's report, else RankFailed listing how each failed rank ended."""
    reports = []
    for path in errors.glob("rank-*.json"):
        try:
            reports.append(json.loads(path.read_text("utf-8")))
        except (OSError, ValueError):
            continue  # a rank killed while writing: the others' reports still stand
    if reports:
        first = min(reports, key=lambda r: int(r["rank"]))
        return ERROR_CLASSES.get(first["type"], SoftlabelsError)(first["message"])
    ended = ", ".join(
        f"rank {rank} {_ending(info.exitcode)}" for rank, info in sorted(failure.failures.items())
    )
    return RankFailed(
        f"{section}: {processes} processes, none reported an error but {ended} (a bug's "
        "traceback, or what stopped a rank, is in the log above)"
    )


def _ending(code: int | None) -> str:
    """How a process ended, from its exit code (negative: killed by that signal)."""
    if code is not None and code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def run_ranked_stage(work: Callable[[], Any]) -> int:
    """`run_stage(work)` (exit status 0, or 1 with `error: <message>`) for a stage whose
    process may be one rank of several: ReportedElsewhere exits 1 without a message; a rank
    started by `launch` writes its error (a SoftlabelsError or a user OSError) for the launcher
    to print instead of printing it, and stops if the launcher dies (SIGKILL to itself)."""
    _watch_launcher()
    try:
        return run_stage(lambda: _reporting(work))
    except ReportedElsewhere:
        return 1


def _reporting(work: Callable[[], T]) -> T:
    """`work()`; in a rank started by `launch`, a user error is written to the launcher's
    error folder and raised as ReportedElsewhere (the launcher prints it once)."""
    try:
        return work()
    except ReportedElsewhere:
        raise
    except (SoftlabelsError, OSError) as e:
        folder, rank = os.environ.get(ERRORS_ENV), os.environ.get("RANK")
        message = user_error(e)
        if folder is None or rank is None or message is None:
            raise
        report = {"rank": int(rank), "type": type(e).__name__, "message": message}
        path = Path(folder) / f"rank-{rank}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(report), "utf-8")
        os.replace(tmp, path)  # the launcher never reads half a report
        raise ReportedElsewhere(f"reported to the launcher: {message}") from e


def _watch_launcher() -> None:
    """In a rank started by `launch`: a daemon thread that SIGKILLs this process as soon as
    the launcher is no longer its parent (the stage was killed), every WATCH_SECONDS."""
    launcher = os.environ.get(LAUNCHER_ENV)
    if launcher is None or "RANK" not in os.environ:
        return
    pid = int(launcher)

    def watch() -> None:
        while os.getppid() == pid:
            time.sleep(WATCH_SECONDS)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="softlabels-launcher-watch", daemon=True).start()


def recorded_params(cfg: Any) -> dict[str, Any]:
    """A trainer's params as its `softlabels.json` records them: every key, except `processes`
    when it is 1 (a one-process run records what it did before the key existed, so its output
    folder is byte-for-byte the same; a data-parallel run says how many processes trained it)."""
    params = dataclasses.asdict(cfg)
    if params.get("processes") == 1:
        del params["processes"]
    return params
