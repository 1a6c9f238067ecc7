"""Building a store resumably in a work folder, then moving it into place: every store kind.

A capture stage (`teacher_logits`, `classify_logits`) never writes its DVC output directly. It
derives a resume key from everything that determines the store's bytes, builds the store in
`<work_dir>/<digest of the key>/<name>`, and records each finished shard in
`<work_dir>/<digest>/shards/<split>-<shard>.json` (its checksums plus whatever the stage wants
to sum later, written atomically after the shard's files). A rerun after a crash reopens the
same work store, skips every shard whose record still matches its files on disk, computes the
rest, finalizes (`pipeline.store.format.finalize_store` re-hashes every file) and moves the
finished store over the output in one rename (a copy then a rename across filesystems).

Trade-off: work started under another key is never mixed in, so changing anything in the key
restarts from scratch; the price of never producing a store whose shards disagree.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.core.atomic import partial_path, replace_dir
from pipeline.core.errors import StoreError
from pipeline.core.provenance import write_json
from pipeline.store.format import (
    ShardedLayout,
    create_store,
    read_attrs,
    shard_checksums,
)

log = logging.getLogger(__name__)


def key_digest(key: dict[str, Any]) -> str:
    """Short, stable digest of a resume key (the name of its work folder)."""
    blob = json.dumps(key, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def record_path(records: str | Path, split: str, shard: int) -> Path:
    """Where the record of one finished shard lives."""
    return Path(records) / f"{split}-{shard:06d}.json"


def read_record(records: str | Path, split: str, shard: int) -> dict[str, Any] | None:
    """A shard's record, or None if absent or unreadable (then the shard is recomputed)."""
    path = record_path(records, split, shard)
    try:
        rec = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(rec, dict) and rec.get("split") == split and rec.get("shard") == shard
    return rec if ok and isinstance(rec.get("checksums"), dict) else None


def write_record(
    records: str | Path, split: str, shard: int, checksums: dict[str, str], **extra: Any
) -> None:
    """Record a finished shard (atomically): its checksums and the stage's `extra` sums."""
    rec = {"split": split, "shard": shard, "checksums": checksums, **extra}
    write_json(record_path(records, split, shard), rec)


def open_work_store(
    kdir: Path, store: Path, spec: ShardedLayout, attrs: dict[str, Any], key: dict[str, Any]
) -> None:
    """Reuse the work store of this key, or create it (atomically: in a sibling, then renamed)."""
    if store.is_dir():
        try:
            if type(spec).from_attrs(read_attrs(store)) == spec:
                return
        except StoreError:
            pass
        shutil.rmtree(store)
    kdir.mkdir(parents=True, exist_ok=True)
    write_json(kdir / "key.json", key)
    creating = kdir / f".{store.name}.creating"
    shutil.rmtree(creating, ignore_errors=True)
    create_store(creating, spec, attrs)
    os.replace(creating, store)


def pending_shards(store: Path, records: Path, spec: ShardedLayout) -> list[tuple[str, int]]:
    """Shards without a record whose checksums match the files on disk (records that do not
    match are deleted, so a shard is never counted done on stale evidence)."""
    pending = []
    for split, shard in spec.all_shards():
        rec = read_record(records, split, shard)
        if rec is not None:
            try:
                if shard_checksums(store, spec, split, shard) == rec["checksums"]:
                    continue
            except StoreError:
                pass
            record_path(records, split, shard).unlink(missing_ok=True)
        pending.append((split, shard))
    total = len(spec.all_shards())
    if pending and len(pending) < total:
        log.info("resuming: %d of %d shards already finished", total - len(pending), total)
    return pending


def finished_records(store: Path, records: Path, spec: ShardedLayout) -> list[dict[str, Any]]:
    """Every shard's record, in canonical order; StoreError if one is missing."""
    out = []
    for split, shard in spec.all_shards():
        rec = read_record(records, split, shard)
        if rec is None:
            raise StoreError(f"{store}: shard {split}/{shard} has no record")
        out.append(rec)
    return out


@contextmanager
def keep_finished_shards(
    kdir: Path, records: Path, spec: ShardedLayout, stage: str
) -> Iterator[None]:
    """Turn a full disk into one line saying how many finished shards are kept, and where."""
    try:
        yield
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        done = sum(record_path(records, s, i).is_file() for s, i in spec.all_shards())
        raise StoreError(
            f"disk full while writing soft labels ({e}); the {done} finished shard(s) are "
            f"kept in {kdir}: free space and re-run {stage} to resume"
        ) from e


def remove_partials(store: Path) -> None:
    """Delete temporary files a killed writer may have left (never part of a finished store)."""
    for p in store.rglob("*.partial"):
        p.unlink(missing_ok=True)


def dir_bytes(path: Path) -> int:
    """Bytes of every file under `path`."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def move_into_place(store: Path, out: Path) -> None:
    """Replace `out` by the finished store: a rename, or a copy + rename across filesystems."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if os.stat(store).st_dev == os.stat(out.parent).st_dev:
        replace_dir(store, out)
    else:
        tmp = partial_path(out)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(store, tmp)
        replace_dir(tmp, out)
        shutil.rmtree(store)
