"""Two runs of a resumable capture stage racing for one work dir (`pipeline.store.work` lock).

`race` holds the first run inside its shard writer until the second has logged that it waits
for the lock, then lets both finish: the shared check of `teacher_logits` and `classify_logits`
that a second run waits instead of computing the store again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import pytest

WORK_LOGGER = "pipeline.store.work"


def race(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    module: Any,
    writer: str,
    run: Callable[[], Any],
) -> tuple[dict[str, Any], list[BaseException], list[tuple]]:
    """Run `run()` in two threads, the second started while the first is inside
    `module.<writer>` (the function that writes one shard; its args 2:4 name the shard).
    Returns (result of each thread by name, exceptions raised, the shards computed)."""
    real, computed = getattr(module, writer), []
    computing, waiting = threading.Event(), threading.Event()

    def held(*args: Any, **kwargs: Any) -> Any:
        computed.append(args[2:4])
        computing.set()
        waiting.wait(60)  # keep the first run busy until the second waits for its lock
        return real(*args, **kwargs)

    monkeypatch.setattr(module, writer, held)

    class OnWaiting(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "waiting for it" in record.getMessage():
                waiting.set()

    results: dict[str, Any] = {}
    errors: list[BaseException] = []

    def start(name: str) -> threading.Thread:
        def target() -> None:
            try:
                results[name] = run()
            except BaseException as e:  # reported to the caller
                errors.append(e)

        thread = threading.Thread(target=target, name=name)
        thread.start()
        return thread

    handler = OnWaiting()
    logging.getLogger(WORK_LOGGER).addHandler(handler)
    try:
        with caplog.at_level(logging.INFO, logger=WORK_LOGGER):
            first = start("first")
            assert computing.wait(60)
            second = start("second")
            first.join(120)
            second.join(120)
    finally:
        waiting.set()
        logging.getLogger(WORK_LOGGER).removeHandler(handler)
    return results, errors, computed
