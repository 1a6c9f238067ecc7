"""What every stage script shares: argv parsing with params docs in --help, and error exits.

A stage script stays thin: it declares its argv paths and params sections, then hands one call
into `pipeline/` to `run_stage`, which turns a SoftlabelsError (a problem the user can fix) into
`error: <message>` on stderr and exit status 1, without a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pipeline.core.config import describe, from_params, load_params, with_overrides
from pipeline.core.errors import SoftlabelsError, user_error
from pipeline.core.text import printable

C = TypeVar("C")


def stage_parser(doc: str | None, sections: list[tuple[type, str]]) -> argparse.ArgumentParser:
    """An ArgumentParser whose description is the script's docstring and whose epilog lists
    every key of the params sections the stage reads, with defaults and docs."""
    epilog = "\n\n".join(describe(cls, name) for cls, name in sections)
    parser = argparse.ArgumentParser(
        description=doc,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--params",
        type=Path,
        default=Path("params.yaml"),
        help="params file with the sections listed below (default: params.yaml)",
    )
    return parser


def load_section(params_path: Path, cls: type[C], section: str, overrides: str | None = None) -> C:
    """One typed config from the params file (errors name the file or `section.key`); with
    `overrides`, the keys of that section replace the section's own (see `with_overrides`)."""
    params = load_params(params_path)
    if overrides is not None:
        params = with_overrides(params, section, overrides)
    return from_params(cls, params, section)


def run_stage(work: Callable[[], Any]) -> int:
    """Run `work` with INFO logging; map SoftlabelsError, and an OSError of the user's
    filesystem (disk full, read-only, permissions; see `os_error_message`), to a one-line error
    and exit code 1. Any other exception is a bug and keeps its traceback."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        work()
    except (SoftlabelsError, OSError) as e:
        message = user_error(e)
        if message is None:
            raise
        print(f"error: {_lines(message)}", file=sys.stderr)
        return 1
    return 0


def _lines(message: str) -> str:
    """`message` with each line made printable (it may quote names read from artifacts); the
    line breaks of a multi-line message (a list of problems) are kept."""
    return "\n".join(printable(line) for line in message.split("\n"))
