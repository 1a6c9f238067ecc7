"""Building a store resumably in a work folder, then moving it into place: every store kind.

A capture stage (`teacher_logits`, `classify_logits`) never writes its DVC output directly. It
derives a resume key from everything that determines the store's bytes, locks the key
(`lock_work`), builds the store in `<work_dir>/<digest of the key>/<name>`, and records each
finished shard in `<work_dir>/<digest>/shards/<split>-<shard>.json` (its checksums plus whatever
the stage wants to sum later, written atomically after the shard's files). A rerun after a crash
reopens the same work store, skips every shard whose record still matches its files on disk,
computes the rest, finalizes (`pipeline.store.format.finalize_store` re-hashes every file) and
`install_store` moves the finished store over the output in one rename (across filesystems: a
copy to a hidden sibling, then a rename; a failed copy is deleted and the finished store kept),
deletes the work folder and only then writes the metrics.

Concurrency: `<work_dir>/<digest>.lock` (next to the work folder, not in it, so it outlives the
folder's deletion) is held with an exclusive `flock` for the whole run. A second run of the same
key logs who holds it and waits; the OS releases the lock when the holder exits, however it
exits (kill -9 included). The file also records the holder's pid (for that message) and, once a
run has put its store in place, which output it wrote (path, sha256 of its `zarr.json`) and the
metrics: a run that gets the lock and finds that output still in place finishes at once
instead of computing it again.

Trade-off: work started under another key is never mixed in, so changing anything in the key
restarts from scratch; the price of never producing a store whose shards disagree.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.atomic import partial_path, remove_stale_siblings, replace_dir
from pipeline.core.errors import StoreError
from pipeline.core.provenance import sha256_file, write_json
from pipeline.store.format import (
    ShardedLayout,
    create_store,
    read_attrs,
    read_attrs_any_version,
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


def same_filesystem(a: Path, b: Path) -> bool:
    """Whether a rename can move `a` into folder `b` (both on one filesystem)."""
    return os.stat(a).st_dev == os.stat(b).st_dev


def copy_file(src: Path, dst: Path) -> None:
    """Copy one file's bytes (the unit `copy_tree` stops at on the first error)."""
    shutil.copyfile(src, dst)


def copy_tree(src: Path, dst: Path) -> None:
    """Copy folder `src` to a new folder `dst`, stopping at the first error (unlike
    `shutil.copytree`, which tries every remaining file on a full disk and then raises a list)."""
    dst.mkdir()
    for root, dirs, files in os.walk(src):
        here = dst / Path(root).relative_to(src)
        for name in sorted(dirs):
            (here / name).mkdir()
        for name in sorted(files):
            copy_file(Path(root) / name, here / name)


def _advice(e: OSError, folder: Path) -> str:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"free space on the filesystem of {folder}"
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"make {folder} writable (or choose another output path)"
    return f"fix the cause at {folder}"


def move_into_place(store: Path, out: Path, *, stage: str) -> None:
    """Replace `out` by the finished store: a rename, or across filesystems a copy to the hidden
    sibling `.<name>.partial-<pid>` and a rename. On any error the partial copy is deleted,
    `out` is left as it was, the finished store stays where it is, and an OSError becomes one
    StoreError line saying where the store is kept and what to do."""
    tmp = partial_path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_siblings(out)  # copies left by a killed run
        if same_filesystem(store, out.parent):
            replace_dir(store, out)
            return
        shutil.rmtree(tmp, ignore_errors=True)
        copy_tree(store, tmp)
        replace_dir(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, OSError):
            raise
        partial = (
            f"the partial copy {tmp} could not be removed (delete it)"
            if tmp.exists()
            else "the partial copy was removed"
        )
        raise StoreError(
            f"cannot put the finished store in place at {out} ({e}); {partial} and the finished "
            f"store is kept in {store}: {_advice(e, out.parent)} and re-run {stage} (it moves "
            "the kept store into place without recomputing)"
        ) from e
    shutil.rmtree(store, ignore_errors=True)


def write_metrics(metrics: Path, result: dict[str, Any], out: Path, *, stage: str) -> None:
    """Write the metrics of a store already in place; an OSError becomes one StoreError line."""
    metrics = Path(metrics)
    try:
        write_json(metrics, result)
    except OSError as e:
        with contextlib.suppress(OSError):  # write_json's temporary file, if it got that far
            metrics.with_name(f".{metrics.name}.tmp").unlink(missing_ok=True)
        raise StoreError(
            f"{out} is in place and complete, but writing its metrics to {metrics} failed ({e}): "
            f"{_advice(e, metrics.parent)} and re-run {stage} (it finds the store in place and "
            "writes only the metrics)"
        ) from e


# -- the lock on a key ------------------------------------------------------------------------


@dataclass
class WorkLock:
    """The exclusive lock on one key's work folder, held for a whole run (`lock_work`)."""

    kdir: Path
    """The work folder `<work_dir>/<digest>` (created and deleted by the run)."""
    path: Path
    """The lock file `<work_dir>/<digest>.lock`, which outlives the work folder."""
    stage: str
    fd: int
    previous: dict[str, Any] = field(default_factory=dict)
    """What the previous holder left in the lock file: its pid and, if it finished, `done`."""

    def finished_output(self, out: Path) -> dict[str, Any] | None:
        """The metrics of `out` if a run of this key finished it and it is still in place,
        unchanged (the sha256 of its `zarr.json`, which holds every shard's checksum, matches)
        and complete; else None (the run computes, resuming from the finished shards)."""
        done = self.previous.get("done")
        if not isinstance(done, dict) or done.get("key") != self.kdir.name:
            return None
        if done.get("out") != str(Path(out).resolve()) or not isinstance(done.get("metrics"), dict):
            return None
        try:
            if sha256_file(Path(out) / "zarr.json") != done.get("zarr_json"):
                return None
            if read_attrs_any_version(out).get("complete") is not True:
                return None
        except (OSError, StoreError):
            return None
        log.info(
            "%s is already in place, computed by another run of %s with the same key; "
            "not recomputing",
            out,
            self.stage,
        )
        return done["metrics"]

    def record_done(self, out: Path, metrics: dict[str, Any]) -> None:
        """Record in the lock file that `out` now holds this key's store (best effort: if the
        record cannot be written, a later run of the key recomputes instead of reusing it)."""
        try:
            done = {
                "key": self.kdir.name,
                "out": str(Path(out).resolve()),
                "zarr_json": sha256_file(Path(out) / "zarr.json"),
                "metrics": metrics,
            }
            _write_lock(self.fd, {"pid": os.getpid(), "done": done})
        except OSError as e:
            log.warning("%s: could not record the finished store (%s)", self.path, e)


def _read_lock(fd: int) -> dict[str, Any]:
    """The lock file's JSON (empty if unreadable or half-written)."""
    try:
        size = os.fstat(fd).st_size
        data = json.loads(os.pread(fd, size, 0).decode("utf-8")) if size else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_lock(fd: int, data: dict[str, Any]) -> None:
    """Rewrite the lock file in place (never renamed: the lock belongs to this inode)."""
    blob = json.dumps(data, sort_keys=True).encode("utf-8")
    os.pwrite(fd, blob, 0)
    os.ftruncate(fd, len(blob))


@contextmanager
def lock_work(kdir: Path, out: Path, stage: str) -> Iterator[WorkLock]:
    """Hold the exclusive lock of the work folder `kdir` (its file `<kdir>.lock`) for the block.

    A run that finds it held logs one line naming the holder's pid and waits; once it holds the
    lock, the previous holder has exited (finished, failed or killed), and `finished_output`
    tells whether it left the output in place. The lock is released when the block exits, on
    exceptions too, and by the OS when the process dies. Stale partial copies next to `out`
    (of killed runs) are deleted once the lock is held.
    """
    path = kdir.with_name(f"{kdir.name}.lock")
    try:
        kdir.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise StoreError(
            f"{path}: cannot create the work lock ({e}); {_advice(e, kdir.parent)} "
            f"(--work-dir) and re-run {stage}"
        ) from e
    try:
        _acquire(fd, path, kdir, stage)
        lock = WorkLock(kdir, path, stage, fd, _read_lock(fd))
        done = {"done": lock.previous["done"]} if "done" in lock.previous else {}
        with contextlib.suppress(OSError):  # the pid is for the waiting message only
            _write_lock(fd, {"pid": os.getpid(), **done})  # kept for runs waiting after us
        remove_stale_siblings(out)
        yield lock
    finally:
        os.close(fd)  # releases the lock


def _acquire(fd: int, path: Path, kdir: Path, stage: str) -> None:
    """flock(LOCK_EX) on `fd`: at once if free, else after one log line, waiting."""
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_lock(fd).get("pid", "unknown")
            log.warning(
                "another %s run (pid %s) is computing this store in %s; waiting for it",
                stage,
                holder,
                kdir,
            )
            fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            raise
        raise StoreError(
            f"{path}: cannot lock ({e}); put --work-dir on a local filesystem and re-run {stage}"
        ) from e


def install_store(
    lock: WorkLock, store: Path, out: Path, metrics: Path, result: dict[str, Any]
) -> None:
    """Finish a run: move the finished store into place, record that in the lock file, delete
    the work folder, and only then write the metrics (which thus never describe an output that
    is not there)."""
    move_into_place(store, out, stage=lock.stage)
    lock.record_done(out, result)
    shutil.rmtree(lock.kdir, ignore_errors=True)
    write_metrics(metrics, result, out, stage=lock.stage)
