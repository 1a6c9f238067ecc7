"""Identities of artifacts, so a store of soft labels can be traced to what produced it.

Three fingerprints, each a sha256 hex digest:

- a model's files (`files_sha256`): the weight and tokenizer files byte for byte. Exact, but
  sensitive to how a library version serialises them; used for provenance, not compatibility.
- a tokenizer (`tokenizer_identity`): what decides tokenization, canonicalised (the `model`,
  `normalizer`, `pre_tokenizer` and `added_tokens` sections of tokenizer.json with sorted keys,
  plus the EOS id). Two tokenizers with the same digest map every text to the same ids, whatever
  library version saved them; this is the digest compatibility checks compare.
- token ids (`ids_fingerprint`): shape, dtype and little-endian bytes of an (N, L) int32 array.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import InputError

PROVENANCE_FILE = "provenance.json"
"""File next to a prepared model recording its identity (see `teacher_provenance`)."""

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)

_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    """sha256 hex digest of one file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def files_sha256(model_dir: str | Path) -> tuple[str, dict[str, str]]:
    """Digest of a model folder's weight and tokenizer files: (combined, {name: digest}).

    The combined digest hashes the sorted `name  digest` lines, like `sha256sum` output, so it
    changes when any file's bytes or name change and not when files are listed in another order.
    """
    model_dir = Path(model_dir)
    names = sorted(
        p.name
        for p in model_dir.iterdir()
        if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name in TOKENIZER_FILES)
    )
    if not any(n.endswith(WEIGHT_SUFFIXES) for n in names):
        raise InputError(f"{model_dir}: no weight files (*.safetensors, *.bin) found")
    per_file = {n: sha256_file(model_dir / n) for n in names}
    listing = "".join(f"{d}  {n}\n" for n, d in per_file.items())
    return hashlib.sha256(listing.encode()).hexdigest(), per_file


def tokenizer_identity(tokenizer: Any) -> dict[str, Any]:
    """{sha256, vocab_size, eos_id} of a `transformers` tokenizer (see module docstring).

    `vocab_size` is `len(tokenizer)`: the base vocabulary plus added tokens, i.e. the number of
    ids the tokenizer can emit, which is what a model's embedding must cover.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        canonical = {k: spec.get(k) for k in ("model", "normalizer", "pre_tokenizer")}
        canonical["added_tokens"] = sorted(
            (t["id"], t["content"], t.get("special", False)) for t in spec.get("added_tokens", [])
        )
    else:  # slow (sentencepiece / python) tokenizer: the full vocabulary decides tokenization
        canonical = {"vocab": sorted(tokenizer.get_vocab().items())}
    canonical["eos_id"] = tokenizer.eos_token_id
    blob = json.dumps(canonical, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return {
        "sha256": hashlib.sha256(blob.encode()).hexdigest(),
        "vocab_size": len(tokenizer),
        "eos_id": tokenizer.eos_token_id,
    }


def ids_fingerprint(ids: np.ndarray) -> str:
    """sha256 of an (N, L) token-id array's shape, dtype and little-endian bytes."""
    h = IdsHasher(ids.shape)
    h.update(ids)
    return h.hexdigest()


class IdsHasher:
    """`ids_fingerprint` of an array of `shape` fed in row blocks (a split too large to hold)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self._h = hashlib.sha256(f"int32{tuple(int(n) for n in shape)}".encode())

    def update(self, rows: np.ndarray) -> None:
        """Add the next rows ((n, L) token ids)."""
        arr = np.ascontiguousarray(rows, dtype=np.dtype("<i4"))
        self._h.update(arr.reshape(-1).view(np.uint8))  # zero-copy; fine for an empty block

    def hexdigest(self) -> str:
        return self._h.hexdigest()


PROVENANCE_KEYS: tuple[str, ...] = ("name", "sha256", "architecture")
"""Keys every prepared model's provenance has (both tasks' teachers)."""

LM_TEACHER_KEYS: tuple[str, ...] = (
    *PROVENANCE_KEYS,
    "revision",
    "vocab_size",
    "tokenizer.sha256",
    "tokenizer.vocab_size",
    "tokenizer.eos_id",
)
"""Keys an LM teacher's provenance must have for `teacher_logits` and a live student
(dotted: a key of a nested mapping)."""

_REDO = "re-run the stage that wrote the folder (`dvc repro prepare_teacher`) or `dvc pull` it"


def read_provenance(
    model_dir: str | Path, required: tuple[str, ...] = PROVENANCE_KEYS
) -> dict[str, Any]:
    """Load `provenance.json` from a prepared model folder; InputError (one line naming the
    file and the key) if it is missing, not UTF-8 JSON, not an object, or lacks a `required`
    key (dotted keys name nested ones, e.g. `tokenizer.sha256`)."""
    path = Path(model_dir) / PROVENANCE_FILE
    if not path.is_file():
        raise InputError(
            f"{path}: missing; this folder was not written by `prepare_teacher` "
            "(run `dvc repro prepare_teacher`)"
        )
    try:
        prov = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{path}: not valid JSON ({e}); the file is damaged: {_REDO}") from e
    if not isinstance(prov, dict):
        raise InputError(f"{path}: not a JSON object; the file is damaged: {_REDO}")
    for key in required:
        value: Any = prov
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is None and not (key == "revision" and "revision" in prov):
            raise InputError(f"{path}: key '{key}' is missing; the record is incomplete: {_REDO}")
    return prov


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON deterministically (sorted keys, 2-space indent, trailing newline), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(
            json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", "utf-8"
        )
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no torn temporary behind
        raise
