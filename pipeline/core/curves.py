"""Training curves with dvclive that survive a resume: the one helper every trainer logs with.

DVC deletes a stage's outputs, the curves folder included, before it re-runs the stage. So the
curves up to a checkpoint travel inside the checkpoint (`Curves.snapshot`, a few KB of TSV) and
are written back when the run resumes; rows past the resumed step (logged after the checkpoint,
before the kill) are dropped. The outputs therefore need no `persist: true`, which would disable
DVC's run cache. dvclive writes only its metric files here: its DVC integration is off (the
pipeline's dvc.yaml declares the plots; dvclive's own integration would open the DVC repository
from inside the stage, reading files the stage does not declare, and in dvclive 3.49 crashes in a
git repository without commits).

A snapshot is data read back from a file, so it is checked before anything is written
(`check_snapshot`): every name must be a relative `plots/metrics/.../*.tsv` path that stays inside
the curves folder, and every row must start with an integer step; anything else is an InputError
(the checkpoint loader then sets that checkpoint aside, `pipeline.student.checkpoint`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.core.errors import InputError
from pipeline.core.text import printable

METRICS = "plots/metrics"
"""Folder (relative to the curves folder) of dvclive's metric files: what a snapshot holds."""


def check_snapshot(saved: Any, *, source: str | None = None) -> None:
    """Refuse a `Curves.snapshot` that `Curves` must not write back: not a {name: text} map; a
    name that is absolute, has a `..`, `.` or empty part, a backslash or a control character, or
    is not a `plots/metrics/.../*.tsv` file; a data row not starting with an integer step.
    InputError naming the offending name (after `source`, e.g. the curves folder, if given)."""
    at = f"{source}: " if source else ""
    if not isinstance(saved, dict):
        raise InputError(f"{at}curves are a {type(saved).__name__}, not a map of files")
    for name, text in saved.items():
        if not isinstance(name, str) or not isinstance(text, str):
            raise InputError(f"{at}curve file '{printable(name)}' is not a name with text")
        parts = name.split("/")
        inside = (
            not {"", ".", ".."} & set(parts)  # also refuses an absolute name (leading "")
            and "\\" not in name
            and printable(name) == name  # no control or format character
            and parts[:2] == METRICS.split("/")
            and len(parts) > 2
            and name.endswith(".tsv")
        )
        if not inside:
            raise InputError(
                f"{at}curve file '{printable(name)}' is outside {METRICS}/ of the curves "
                "folder (only relative .tsv names there are written back)"
            )
        for line in text.splitlines()[1:]:
            step = line.split("\t", 1)[0]
            if not (step.isascii() and step.isdigit()):
                raise InputError(
                    f"{at}curve file '{printable(name)}' has a row without a step: "
                    f"'{printable(line[:40])}'"
                )


def _inside(directory: Path, name: str) -> Path:
    """`directory / name`, refused (InputError) if it resolves outside `directory` (e.g. through
    a symbolic link in the folder)."""
    root = directory.resolve()
    path = (directory / name).resolve()
    if not path.is_relative_to(root):
        raise InputError(
            f"{directory}: curve file '{printable(name)}' resolves outside the curves folder"
        )
    return path


class Curves:
    """dvclive metric files in `directory`, resumable at `resume_step` from `saved` (a
    `snapshot` taken into a checkpoint); `resume_step` 0 starts fresh. A snapshot that
    `check_snapshot` refuses raises InputError before any file is written."""

    def __init__(self, directory: Path, resume_step: int, saved: dict[str, str] | None) -> None:
        from dvclive import Live

        class FilesOnlyLive(Live):
            """dvclive's metric files without its DVC integration (module docstring)."""

            def _init_dvc(self) -> None:
                pass

        directory = Path(directory)
        if resume_step:
            saved = saved or {}
            check_snapshot(saved, source=str(directory))
            paths = {name: _inside(directory, name) for name in saved}
            for name, text in saved.items():
                path = paths[name]
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
            for tsv in (directory / METRICS).rglob("*.tsv"):
                lines = tsv.read_text().splitlines(keepends=True)
                keep = [ln for ln in lines[1:] if int(ln.split("\t", 1)[0]) <= resume_step]
                tsv.write_text("".join(lines[:1] + keep))
        self.directory = directory
        self.live = FilesOnlyLive(
            str(directory), resume=bool(resume_step), save_dvc_exp=False, dvcyaml=None, report=None
        )

    def log(self, step: int, values: dict[str, float]) -> None:
        """Log `values` {name: value} at `step` and refresh dvclive's summary (metrics.json)."""
        self.live.step = step
        for name, value in values.items():
            self.live.log_metric(name, value)
        self.live.make_summary()

    def snapshot(self) -> dict[str, str]:
        """{path relative to the folder: text} of every curve file (a few KB), for checkpoints."""
        root = self.directory / METRICS
        return {str(p.relative_to(self.directory)): p.read_text() for p in root.rglob("*.tsv")}

    def end(self) -> None:
        self.live.end()
