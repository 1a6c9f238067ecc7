"""What every store kind must pass before a consumer spends compute on it: layout and checksums.

A store arrives from another team, a cache or a remote; `complete: true` in its attributes says
only that its writer finished. Before the first training or scoring step a consumer calls
`check_integrity`, which checks, for the splits it will read:

1. every array exists with the shape, dtype, chunk and shard shape the attributes imply (an
   attribute edited to disagree with the arrays, e.g. `k`, is caught here, before it can reach a
   student's provenance);
2. every shard file of those arrays exists and its sha256 equals the checksum recorded by
   `finalize_store` (a deleted, truncated or corrupted shard is named here, not as a decoder
   traceback hours into training).

Shard files are hashed on a thread pool (hashlib releases the GIL on large buffers), so the
check reads the store once at disk speed: about a second per GB on one core, 2-8x faster on
several. Trade-off: values inside a chunk that was corrupted *before* its checksum was taken
(a buggy writer) pass this check; the consumers' readers check cheap value ranges per chunk as
they stream (`pipeline.store.verify.label_problems`, `pipeline.classify.store.iter_class_chunks`),
and `softlabels verify` audits everything.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.errors

from pipeline.core.errors import StoreError
from pipeline.core.provenance import sha256_file
from pipeline.store.format import ShardedLayout, expected_keys, shard_files, shard_key

log = logging.getLogger(__name__)

DAMAGED_ADVICE = (
    "the store is damaged: pull or copy it again (`dvc pull`), or rebuild it "
    "(`dvc repro` its capture stage); `softlabels verify` lists every problem"
)
"""What to do about a store that fails these checks (the end of every message)."""


def layout_problems(
    path: str | Path, spec: ShardedLayout, splits: Iterable[str] | None = None
) -> list[str]:
    """Arrays of `splits` (default: all) missing, or whose shape, dtype, chunks or shards
    disagree with what the attributes (`spec`) imply; one line per problem."""
    try:
        group = zarr.open_group(Path(path), mode="r")
    except (OSError, zarr.errors.BaseZarrError, ValueError) as e:
        return [f"{path}: cannot open the Zarr group ({e})"]
    problems = []
    for split in spec.split_names() if splits is None else splits:
        for name in spec.ARRAYS:
            key = f"{split}/{name}"
            try:
                arr = group[key]
            except KeyError:
                problems.append(f"{key}: array missing")
                continue
            except (OSError, zarr.errors.BaseZarrError, ValueError) as e:
                problems.append(f"{key}: array metadata unreadable ({e})")
                continue
            if not isinstance(arr, zarr.Array):
                problems.append(f"{key}: is a group, not an array")
                continue
            shape = spec.array_shape(split, name)
            want = {
                "shape": tuple(shape),
                "dtype": np.dtype(spec.DTYPES[name]),
                "chunks": (spec.rows_per_chunk(), *shape[1:]),
                "shards": (spec.shard_rows(), *shape[1:]),
            }
            have = {"shape": arr.shape, "dtype": arr.dtype, "chunks": arr.chunks}
            have["shards"] = arr.shards
            problems += [
                f"{key}: {field} is {have[field]} but the attributes imply {want[field]}"
                for field in want
                if have[field] != want[field]
            ]
    return problems


def checksum_problems(
    path: str | Path,
    spec: ShardedLayout,
    recorded: dict[str, str],
    splits: Iterable[str] | None = None,
    *,
    report_unrecorded: bool = True,
) -> tuple[list[str], set[tuple[str, int]]]:
    """Every shard file of `splits` (default: all) missing or unlike its recorded sha256, and
    the set of bad (split, shard). Files are hashed on a thread pool.

    Files present but without a recorded checksum (a store not yet finalized) are summed up in
    one line (when `report_unrecorded`) and not counted bad; recorded checksums for shards the
    store does not have are reported too.
    """
    path = Path(path)
    names = spec.split_names() if splits is None else list(splits)
    files: list[tuple[str, int, str, Path]] = []
    for split in names:
        for shard in range(len(spec.shards(split))):
            for key, file in shard_files(path, split, shard, spec.ARRAYS).items():
                files.append((split, shard, key, file))
    problems: list[str] = []
    bad: set[tuple[str, int]] = set()
    unrecorded: list[str] = []
    to_hash = [f for _, _, key, f in files if key in recorded and f.is_file()]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = dict(zip(to_hash, pool.map(sha256_file, to_hash), strict=True))
    for split, shard, key, file in files:  # canonical order: split, shard, array
        if not file.is_file():
            problems.append(f"{key}: shard file missing ({file})")
            bad.add((split, shard))
        elif key not in recorded:
            unrecorded.append(key)
        elif (digest := digests[file]) != recorded[key]:
            problems.append(
                f"{key}: checksum mismatch (recorded {str(recorded[key])[:12]}…, on disk "
                f"{digest[:12]}…, {file.stat().st_size} bytes); the file is corrupt or truncated"
            )
            bad.add((split, shard))
    if unrecorded and report_unrecorded:
        problems.append(
            f"{len(unrecorded)} shard files have no recorded checksum (first: {unrecorded[0]}); "
            "finalize_store records them once every shard is written"
        )
    known = set(expected_keys(spec))
    problems += [
        f"{k}: checksum recorded for a shard this store does not have"
        for k in recorded
        if k not in known
    ]
    return problems, bad


def integrity_problems(
    path: str | Path,
    spec: ShardedLayout,
    attrs: dict[str, Any],
    splits: Iterable[str] | None = None,
) -> list[str]:
    """Layout problems, then (only if the layout is sound) checksum problems of `splits`.
    A shard without a recorded checksum is a problem here: a consumer trusts only what the
    writer recorded."""
    names = spec.split_names() if splits is None else list(splits)
    problems = layout_problems(path, spec, names)
    if problems:
        return problems
    recorded = attrs.get("shards")
    if not isinstance(recorded, dict):
        return ["attributes: 'shards' (the recorded checksums) is missing or not a mapping"]
    sums, _ = checksum_problems(path, spec, recorded, names, report_unrecorded=False)
    missing = [
        shard_key(split, name, shard)
        for split in names
        for shard in range(len(spec.shards(split)))
        for name in spec.ARRAYS
        if shard_key(split, name, shard) not in recorded
    ]
    if missing:
        sums.append(
            f"{len(missing)} shard files have no recorded checksum (first: {missing[0]}), so "
            "they cannot be trusted"
        )
    return sums


def check_integrity(
    path: str | Path,
    spec: ShardedLayout,
    attrs: dict[str, Any],
    splits: Iterable[str] | None = None,
    *,
    purpose: str = "use",
) -> None:
    """Raise StoreError, one line, unless the arrays of `splits` match the attributes and
    every shard file matches its recorded checksum (module docstring). The line names the
    store, the first problem, how many more there are, and what to do; `purpose` says what is
    refused ("train from", "evaluate against")."""
    path = Path(path)
    names = spec.split_names() if splits is None else list(splits)
    t0 = time.perf_counter()
    problems = integrity_problems(path, spec, attrs, names)
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise StoreError(
            f"{path}: refusing to {purpose} this store: {problems[0]}{more}; {DAMAGED_ADVICE}"
        )
    log.info(
        "store %s: layout and %d shard checksums of %s verified in %.1f s",
        path,
        sum(len(spec.shards(s)) for s in names) * len(spec.ARRAYS),
        "+".join(names),
        time.perf_counter() - t0,
    )
