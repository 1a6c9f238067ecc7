"""All-or-nothing outputs: a stage's output appears complete, or not at all.

`atomic_dir(final)` yields a sibling temporary folder (`.<name>.partial-<pid>`); the caller
writes everything there; on success the temporary folder replaces `final` (`replace_dir`: the
old output is renamed aside to `.<name>.old-<pid>`, the new one renamed into place, the old one
deleted; every step a `rename`, atomic on one filesystem); on any exception the temporary folder
is deleted and `final` is left as it was. Nothing half-written ever sits at `final`.

A process killed mid-write (kill -9 cannot be caught) leaves its `.<name>.partial-<pid>` (or
`.<name>.old-<pid>`) behind; `remove_stale_siblings(final)` deletes those whose process is no
longer alive, and `atomic_dir` and `pipeline.store.work` call it before writing, so the next run
cleans up after a killed one.

`check_destinations(*paths)` refuses, before any work, an output path that could not be written at
the end (a parent that is a file, a read-only or unwritable folder), so an expensive stage fails
in its first second rather than after hours of compute. A write that fails inside `atomic_dir`
(disk full mid-way) is re-raised as an OSError naming `final`, also for libraries that report
the OS error only in their text (safetensors: "... (os error 28)").
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path


def partial_path(final: str | Path) -> Path:
    """The temporary sibling used while `final` is being written."""
    final = Path(final)
    return final.with_name(f".{final.name}.partial-{os.getpid()}")


def check_destinations(*paths: str | Path) -> None:
    """Raise the OSError that writing each of `paths` would raise at the end, now: its nearest
    existing ancestor must be a folder (ENOTDIR), on a writable filesystem (EROFS), that this
    user may write into (EACCES). Folders that do not exist yet are fine (they are created)."""
    for path in paths:
        _check_destination(Path(path).absolute())


def _check_destination(path: Path) -> None:
    for parent in path.parents:
        if not parent.exists():
            continue
        if not parent.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(parent))
        if not os.access(parent, os.W_OK | os.X_OK):
            code = errno.EACCES
            with contextlib.suppress(OSError):
                if os.statvfs(parent).f_flag & os.ST_RDONLY:
                    code = errno.EROFS
            raise OSError(code, os.strerror(code), str(parent))
        return


_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def located_os_error(e: BaseException, path: str | Path) -> OSError | None:
    """`e` as an OSError naming `path`, if it is an OS error that names no file: an OSError
    without a filename, or a library error carrying "(os error N)" in its text (safetensors and
    other Rust writers); None for anything else (a bug keeps its own traceback)."""
    code = None
    if isinstance(e, OSError) and not e.filename and e.errno:
        code = e.errno
    elif not isinstance(e, OSError):
        match = _RUST_OS_ERROR.search(str(e))
        code = int(match.group(1)) if match else None
    return None if code is None else OSError(code, os.strerror(code), str(path))


def _old_path(final: Path) -> Path:
    """Where `replace_dir` parks the previous output while the new one is renamed in."""
    return final.with_name(f".{final.name}.old-{os.getpid()}")


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (a zombie counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def remove_stale_siblings(final: str | Path) -> list[Path]:
    """Delete the `.<name>.partial-<pid>` / `.<name>.old-<pid>` siblings of `final` left by a
    process that no longer runs (killed mid-write); return what was deleted. Those of live
    processes (another run writing now) and of this process are left alone."""
    final = Path(final)
    pattern = re.compile(rf"\.{re.escape(final.name)}\.(?:partial|old)-(\d+)")
    removed = []
    try:
        siblings = list(final.parent.iterdir())
    except OSError:
        return removed
    for path in siblings:
        m = pattern.fullmatch(path.name)
        if m is None or int(m.group(1)) == os.getpid() or pid_alive(int(m.group(1))):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
        removed.append(path)
    return removed


def replace_dir(src: Path, final: Path) -> None:
    """Move folder `src` to `final`, replacing whatever was there. The previous `final` is
    renamed aside first and put back if the rename of `src` fails, so `final` is never left
    half-deleted: it is the old output or the new one (absent only between two renames)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if final.is_symlink() or final.is_file():
        final.unlink()
    elif final.exists():
        old = _old_path(final)
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    try:
        os.replace(src, final)
    except BaseException:
        if old is not None:
            os.replace(old, final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temporary folder that becomes `final` only if the block finishes without error."""
    final = Path(final)
    tmp = partial_path(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(final)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        located = located_os_error(e, final)
        if located is not None:
            raise located from e
        raise
    try:
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
