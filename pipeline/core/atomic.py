"""All-or-nothing outputs: a stage's output appears complete, or not at all.

`atomic_dir(final)` yields a sibling temporary folder (`.<name>.partial-<pid>`); the caller
writes everything there; on success the old output (if any) is removed and the temporary folder
renamed into place (one `rename`, atomic on one filesystem); on any exception the temporary
folder is deleted and `final` is left as it was. Nothing half-written ever sits at `final`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def partial_path(final: str | Path) -> Path:
    """The temporary sibling used while `final` is being written."""
    final = Path(final)
    return final.with_name(f".{final.name}.partial-{os.getpid()}")


def replace_dir(src: Path, final: Path) -> None:
    """Move folder `src` to `final`, replacing whatever was there."""
    if final.is_symlink() or final.is_file():
        final.unlink()
    elif final.exists():
        shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, final)


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temporary folder that becomes `final` only if the block finishes without error."""
    final = Path(final)
    tmp = partial_path(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, final)
