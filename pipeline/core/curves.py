"""Training curves with dvclive that survive a resume: the one helper every trainer logs with.

DVC deletes a stage's outputs, the curves folder included, before it re-runs the stage. So the
curves up to a checkpoint travel inside the checkpoint (`Curves.snapshot`, a few KB of TSV) and
are written back when the run resumes; rows past the resumed step (logged after the checkpoint,
before the kill) are dropped. The outputs therefore need no `persist: true`, which would disable
DVC's run cache. dvclive writes only its metric files here: its DVC integration is off (the
pipeline's dvc.yaml declares the plots; dvclive's own integration would open the DVC repository
from inside the stage, reading files the stage does not declare, and in dvclive 3.49 crashes in a
git repository without commits).
"""

from __future__ import annotations

from pathlib import Path


class Curves:
    """dvclive metric files in `directory`, resumable at `resume_step` from `saved` (a
    `snapshot` taken into a checkpoint); `resume_step` 0 starts fresh."""

    def __init__(self, directory: Path, resume_step: int, saved: dict[str, str] | None) -> None:
        from dvclive import Live

        class FilesOnlyLive(Live):
            """dvclive's metric files without its DVC integration (module docstring)."""

            def _init_dvc(self) -> None:
                pass

        directory = Path(directory)
        if resume_step:
            for name, text in (saved or {}).items():
                path = directory / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
            for tsv in (directory / "plots" / "metrics").rglob("*.tsv"):
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
        root = self.directory / "plots" / "metrics"
        return {str(p.relative_to(self.directory)): p.read_text() for p in root.rglob("*.tsv")}

    def end(self) -> None:
        self.live.end()
