"""`softlabels inspect`: a logits store's provenance, layout and size, as text or plain data.

Reads only the attributes, the arrays' metadata and file sizes (never decompresses data), so it
is instant on any store, complete or not, and reports how far a store in progress has got
(shard files present per array). Sizes are reported per stored (id, logprob) entry, the number
that decides how big a store for a given corpus, k and compressor will be.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import zarr

from pipeline.core.errors import StoreError
from pipeline.core.text import printable
from pipeline.store.format import (
    StoreSpec,
    entries,
    raw_bytes_per_sequence,
    read_attrs_any_version,
    sampling_of,
    shard_files,
)
from pipeline.store.verify import abbreviate, content_sha256


def _codec_names(arr: zarr.Array) -> str:
    parts = [c.to_dict()["name"] for c in arr.filters]
    for c in arr.compressors:
        d = c.to_dict()
        cfg = d.get("configuration", {})
        if d["name"] == "blosc":
            parts.append(f"blosc({cfg['cname']}, {cfg['clevel']}, {cfg['shuffle']})")
        else:
            parts.append(
                f"{d['name']}({', '.join(f'{k}={v}' for k, v in cfg.items() if k != 'checksum')})"
            )
    return "+".join(parts) or "none"


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def store_summary(path: str | Path) -> dict[str, Any]:
    """Provenance, layout and sizes of a store as plain data (`softlabels inspect --json`)."""
    path = Path(path)
    attrs = read_attrs_any_version(path)
    spec = StoreSpec.from_attrs(attrs)
    group = zarr.open_group(path, mode="r")
    splits: dict[str, Any] = {}
    pair_bytes = 0
    by_array: dict[str, int] = {}
    for s in spec.splits:
        n_shards = len(spec.shards(s.name))
        files: dict[str, list[Path]] = {name: [] for name in spec.ARRAYS}
        for name in spec.ARRAYS:
            if f"{s.name}/{name}" not in group:
                raise StoreError(
                    f"{path}: array {s.name}/{name} is missing; the store is damaged "
                    "(`softlabels verify` lists what else is wrong)"
                )
        for i in range(n_shards):
            for key, file in shard_files(path, s.name, i, spec.ARRAYS).items():
                files[key.split("/")[1]].append(file)
        arrays = {}
        for name in spec.ARRAYS:
            arr = group[f"{s.name}/{name}"]
            present = [f for f in files[name] if f.is_file()]
            size = sum(f.stat().st_size for f in present)
            by_array[name] = by_array.get(name, 0) + size
            if name in ("ids", "counts", "logprobs"):
                pair_bytes += size
            arrays[name] = {
                "shape": list(arr.shape),
                "dtype": str(arr.dtype),
                "chunks": list(arr.chunks),
                "shards": list(arr.shards),
                "compressors": _codec_names(arr),
                "shard_files": f"{len(present)}/{n_shards}",
                "bytes": size,
            }
        splits[s.name] = {
            "n": s.n,
            "seq_len": s.seq_len,
            "shards": n_shards,
            "fingerprint": attrs.get("dataset", {})
            .get("splits", {})
            .get(s.name, {})
            .get("fingerprint"),
            "arrays": arrays,
        }
    n_entries = entries(spec)
    positions = n_entries // spec.k
    total = _tree_bytes(path)
    return {
        "path": str(path),
        "format_version": attrs.get("format_version"),
        "softlabels_version": attrs.get("softlabels_version"),
        "complete": attrs.get("complete"),
        "teacher": attrs.get("teacher"),
        "tokenizer": attrs.get("tokenizer"),
        "method": attrs.get("method"),
        "sampling": sampling_of(attrs),
        "k": spec.k,
        "seed": attrs.get("seed"),
        "temperature": attrs.get("temperature"),
        "chunk_sequences": spec.chunk_sequences,
        "shard_chunks": spec.shard_chunks,
        "splits": splits,
        "checksums_recorded": len(attrs.get("shards", {})),
        "content_sha256": content_sha256(attrs),
        "bytes_on_disk": total,
        "entries": n_entries,
        "bytes_per_entry_ids_logprobs": round(pair_bytes / n_entries, 4) if n_entries else None,
        "bytes_per_entry_all": round(total / n_entries, 4) if n_entries else None,
        "positions": positions,
        "bytes_per_position": round(total / positions, 3) if positions else None,
        "bytes_per_position_by_array": {
            a: round(b / positions, 3) if positions else None for a, b in by_array.items()
        },
        "encoding": attrs.get("encoding"),
    }


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def describe_store(path: str | Path) -> str:
    """Human-readable summary of a store (`softlabels inspect`); attribute strings come from the
    store's files, so every line is `printable` (control characters escaped)."""
    d = store_summary(path)
    spec = StoreSpec.from_attrs(read_attrs_any_version(path))
    t, tok = d["teacher"] or {}, d["tokenizer"] or {}
    k = d["k"]
    lines = [
        f"logits store {d['path']}  (format_version {d['format_version']}, written by softlabels {d['softlabels_version']})",
        f"complete:   {'yes' if d['complete'] else 'NO'}  ({d['checksums_recorded']} shard checksums recorded, content sha256 {abbreviate(d['content_sha256'])})",
        f"teacher:    {t.get('name')} @ {t.get('revision') or '-'}  {t.get('architecture')}  vocab_size {t.get('vocab_size')}  sha256 {abbreviate(t.get('sha256'))}",
        f"tokenizer:  vocab_size {tok.get('vocab_size')}  eos_id {tok.get('eos_id')}  sha256 {abbreviate(tok.get('sha256'))}",
        f"labels:     method {d['method']}"
        + (f" ({d['sampling']})" if d["sampling"] else "")
        + f"  k {k}  seed {d['seed']}  temperature {d['temperature']}",
        f"layout:     {d['chunk_sequences']} sequences per chunk, {d['shard_chunks']} chunks per shard "
        f"({d['chunk_sequences'] * d['shard_chunks']} sequences per shard file)",
    ]
    for name, s in d["splits"].items():
        raw = raw_bytes_per_sequence(spec, s["seq_len"]) * d["chunk_sequences"]
        lines.append(
            f"split {name}: {s['n']} sequences x {s['seq_len']} positions, {s['shards']} shards, "
            f"dataset fingerprint {abbreviate(s['fingerprint'])}, {_size(raw)} raw per chunk"
        )
        for aname, a in s["arrays"].items():
            lines.append(
                f"  {aname:<11} {a['dtype']:<8} shape {tuple(a['shape'])!s:<16} chunks {tuple(a['chunks'])!s:<14} "
                f"shards {tuple(a['shards'])!s:<16} {a['compressors']:<36} files {a['shard_files']:<7} {_size(a['bytes'])}"
            )
    if d["entries"]:
        arrays = ", ".join(f"{a} {b:.2f}" for a, b in d["bytes_per_position_by_array"].items())
        lines.append(
            f"on disk:    {_size(d['bytes_on_disk'])}; {d['positions']} positions: "
            f"{d['bytes_per_position']:.2f} B per position ({arrays}; the rest is metadata), "
            f"{d['bytes_per_entry_all']:.3f} B per stored id (k = {k})"
        )
    else:
        lines.append(f"on disk:    {_size(d['bytes_on_disk'])}; no entries")
    return "\n".join(printable(line) for line in lines)
