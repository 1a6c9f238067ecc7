"""Test-only: record the files every stage process opens, to check dvc.yaml against reality.

`tests/test_dvc_workflows.py` puts this folder first on PYTHONPATH and sets SOFTLABELS_READ_TRACE
to a JSONL file before running `dvc repro`; Python then imports this module at start-up in every
process (DVC's own too). An audit hook (PEP 578) sees every `open` made from Python (builtins,
`os.open`, `io.open_code` for imports); at exit, a process started as
`python -m pipeline.stages.<name>` (its sys.argv[0] is then .../pipeline/stages/<name>.py)
appends {"argv", "cwd", "pipeline_dir", "reads", "writes"} to the trace (`pipeline_dir`: where
that process imported the library from: the working directory's pipeline/, an editable checkout
or site-packages). Extension modules, which load without an `open`, count as read once
imported. Opens made by native code (pyarrow's memory maps, safetensors) are invisible,
so a folder counts as read when any file inside it is.
Without SOFTLABELS_READ_TRACE this module does nothing.
"""

from __future__ import annotations

import atexit
import json
import os
import sys

_TRACE = os.environ.get("SOFTLABELS_READ_TRACE")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _install(trace: str) -> None:
    reads: set[str] = set()
    writes: set[str] = set()

    def hook(event: str, args: tuple) -> None:
        if event != "open" or not args:
            return
        path = args[0]
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if not isinstance(path, str):
            return  # a file descriptor: the open that made it was recorded
        mode = args[1] if len(args) > 1 else None
        flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
        if mode is None and not os.path.isabs(path):
            return  # os.open relative to a dir_fd the event does not carry (shutil.rmtree)
        if isinstance(mode, str):
            writing = any(c in mode for c in "wax+")
        else:
            writing = bool(flags & _WRITE_FLAGS)
        (writes if writing else reads).add(os.path.abspath(path))

    def dump() -> None:
        script = sys.argv[0] if sys.argv else ""
        folder = os.path.dirname(os.path.abspath(script))
        parent, name = os.path.split(folder)
        if name != "stages" or os.path.basename(parent) != "pipeline":
            return
        lib = getattr(sys.modules.get("pipeline"), "__file__", None)
        for module in list(sys.modules.values()):  # extension modules load by dlopen, not open
            path = getattr(module, "__file__", None) or ""
            if path.endswith((".so", ".pyd")):
                reads.add(os.path.abspath(path))
        record = {
            "argv": sys.argv,
            "cwd": os.getcwd(),
            "pipeline_dir": os.path.dirname(os.path.abspath(lib)) if lib else None,
            "reads": sorted(reads),
            "writes": sorted(writes),
        }
        with open(trace, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    sys.addaudithook(hook)
    atexit.register(dump)


if _TRACE:
    _install(_TRACE)
