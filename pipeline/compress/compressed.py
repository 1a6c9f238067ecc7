"""The compressed-model format (int8 weights + scales in safetensors, entropy-coded) and its loader.

A compressed model folder (written by `pipeline.compress.compress`) holds:

- `config.json`: the model's `transformers` config, so the architecture is rebuilt from it (a
  causal LM, or a sequence classifier when its `architectures` name a
  `*ForSequenceClassification` class: `pipeline.modeling.tasks.model_task`);
- `weights.safetensors.zst` (or `weights.safetensors` when `compress.zstd_level` is 0): one
  safetensors blob, zstd-compressed as a whole. Every quantized module `<name>` contributes
  `<name>.weight_int8` (out, in) int8 and `<name>.weight_scale` (out,) float32, with
  w ~= weight_int8 * weight_scale[:, None] (symmetric, one scale per output row, zero point 0,
  values in [-127, 127]); every other tensor is stored float32 under its state-dict name. A
  head tied to the input embedding is not stored: it is rebuilt from the embedding;
- `compression.json`: the manifest (format, which modules are quantized, whether the head is
  tied, the weights file's sha256, settings, sizes) that `load_compressed` follows. It is data
  read from disk: `read_manifest` refuses, in one InputError line naming it, a manifest that is
  not JSON, lacks a key a reader uses or has one of the wrong type, or whose weights file lies
  outside the folder (absolute, `..`, or a link leading out);
- the tokenizer files and the source model's `softlabels.json`, copied unchanged.

Why this format: it needs nothing beyond torch, safetensors and numcodecs (already required;
no ONNX Runtime, no torchao), safetensors holds no pickled code, and plain int8 tensors do not
depend on torch's quantized tensor types, which torch is deprecating. Entropy coding the blob
is what turns pruned zeros (and the peaked distribution of int8 values) into saved bytes.

Loading rebuilds the model from `config.json` and runs it in one of two ways (`kernel`):

- `dynamic`: every quantized linear layer becomes a `torch.ao` dynamically quantized Linear
  (int8 x int8 matrix products, activations quantized per batch on the fly), the embedding an
  `Int8Embedding` (int8 rows scaled on lookup). Weights stay int8 in memory. The activation
  rounding adds a small error on top of the weights'. `torch.ao.quantization` is deprecated in
  favour of torchao (not a dependency here) but still works in torch 2.13.
- `dequantize`: the int8 weights are turned back into float32 once, at load time, and the
  model runs as an ordinary float model: exactly the stored weights, float speed and memory.

Trade-off: one float32 scale per row costs 4 bytes per row (6% on top of the int8 weights of a
64-wide model, 1.6% at width 256) and keeps the rebuild trivial. The format shrinks disk (and,
with the `dynamic` kernel, memory); compute gets faster only where int8 products beat the cost
of quantizing activations, which on CPU means wider matrices than a tiny student's.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from pipeline.core.errors import InputError
from pipeline.core.provenance import sha256_file
from pipeline.core.text import printable
from pipeline.modeling.tasks import auto_model_class, model_task

FORMAT = "softlabels-int8"
"""`format` value in the manifest."""
FORMAT_VERSION = 1
"""Version of the layout above; the loader refuses any other."""
MANIFEST = "compression.json"
"""Manifest file of a compressed model folder."""
WEIGHTS = "weights.safetensors"
"""Weights file name; `.zst` is appended when the blob is zstd-compressed."""
KERNELS = ("dynamic", "dequantize")
"""How `load_compressed` runs int8 weights (module docstring)."""
_INT8_SUFFIXES = (".weight_int8", ".weight_scale")

Kernel = Literal["dynamic", "dequantize"]


def quantize_rows(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 quantization with one scale per row: (int8 (R, C), float32 scale (R,)).

    scale = max|row| / 127, q = round(w / scale) in [-127, 127]; an all-zero row gets scale 1
    (its q is 0 anyway) so no scale is ever 0. Zeros stay exactly zero, so pruning survives.
    """
    w = weight.detach().float()  # (R, C)
    absmax = w.abs().amax(dim=1)  # (R,)
    scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))  # (R,)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)  # (R, C)
    return q.contiguous(), scale.contiguous()


def dequantize_rows(q: Tensor, scale: Tensor) -> Tensor:
    """float32 (R, C) = q * scale[:, None]: the weights the int8 tensors stand for."""
    return q.float() * scale.float()[:, None]


class Int8Embedding(nn.Module):
    """Token embedding kept int8 in memory; a lookup returns float32 rows times their scale."""

    def __init__(self, weight_int8: Tensor, weight_scale: Tensor) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight_int8.shape
        self.register_buffer("weight_int8", weight_int8)  # (V, H) int8
        self.register_buffer("weight_scale", weight_scale.float())  # (V,)

    def forward(self, input_ids: Tensor) -> Tensor:
        rows = nn.functional.embedding(input_ids, self.weight_int8).float()  # (..., H)
        return rows * self.weight_scale[input_ids].unsqueeze(-1)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 rows"


def dynamic_linear(q: Tensor, scale: Tensor, bias: Tensor | None) -> nn.Module:
    """A torch.ao dynamically quantized Linear holding exactly the stored int8 weights."""
    with warnings.catch_warnings():  # torch.ao and quantized tensors warn of their deprecation
        warnings.simplefilter("ignore")
        from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

        out_features, in_features = q.shape
        qweight = torch._make_per_channel_quantized_tensor(
            q, scale.double(), torch.zeros(out_features, dtype=torch.long), 0
        )
        layer = DynamicLinear(in_features, out_features, bias_=bias is not None, dtype=torch.qint8)
        layer.set_weight_bias(qweight, None if bias is None else bias.float())
    return layer


CORRUPT = "the manifest is corrupt: re-run the compress stage"
"""How every message about a malformed manifest ends."""
_MANIFEST_TYPES: dict[str, type] = {
    "weights": dict,
    "weights.file": str,
    "weights.sha256": str,
    "weights.codec": str,
    "head": dict,
    "head.name": str,
    "head.tied": bool,
    "quantized": list,
    "parameters": int,
    "nonzero_parameters": int,
    "source": dict,
    "source.path": str,
}
"""Every manifest key a reader uses (`load_compressed`, `pipeline.evaluate.common`), by type."""
_QUANTIZED_KINDS = ("linear", "embedding")


def _manifest_problem(manifest: dict[str, Any]) -> str | None:
    """What makes a parsed manifest unusable (a key missing or of the wrong type), or None."""
    for key, kind in _MANIFEST_TYPES.items():
        head, _, leaf = key.rpartition(".")
        parent = manifest[head] if head else manifest  # parents come first in the table
        if leaf not in parent:
            return f"key {key} is missing"
        value = parent[leaf]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            return f"{key} is of type {type(value).__name__}, expected {kind.__name__}"
    for i, entry in enumerate(manifest["quantized"]):
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("name"), str)
            or entry.get("kind") not in _QUANTIZED_KINDS
        ):
            return f"quantized[{i}] is not a {{name, kind: linear|embedding}} entry"
    return None


def _inside(folder: Path, name: str) -> bool:
    """True if file `name` (from a manifest) is a relative path that resolves strictly inside
    `folder` (no absolute path, no `..`, no symbolic link leading out)."""
    if not name or Path(name).is_absolute() or ".." in Path(name).parts or "\0" in name:
        return False
    root = folder.resolve()
    target = (folder / name).resolve()
    return target != root and target.is_relative_to(root)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a compressed model folder; one-line InputError naming the manifest if it
    is absent, not JSON, of another format, missing a key or of the wrong type somewhere, or if
    its weights file is not inside the folder."""
    file = Path(path) / MANIFEST
    if not file.is_file():
        raise InputError(
            f"{path}: no {MANIFEST}; not a compressed model folder (run `dvc repro compress`)"
        )
    try:
        manifest = json.loads(file.read_text("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        why = (
            f"{e.msg} at line {e.lineno} column {e.colno}"
            if isinstance(e, json.JSONDecodeError)
            else "not UTF-8"
        )
        raise InputError(f"{file}: not valid JSON ({why}); {CORRUPT}") from e
    if not isinstance(manifest, dict):
        raise InputError(
            f"{file}: holds a JSON {type(manifest).__name__}, not an object; {CORRUPT}"
        )
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise InputError(
            f"{file}: format {printable(repr(manifest.get('format')))} version "
            f"{printable(repr(manifest.get('format_version')))} is not {FORMAT!r} version "
            f"{FORMAT_VERSION}; re-run the compress stage with this softlabels version"
        )
    problem = _manifest_problem(manifest)
    if problem is not None:
        raise InputError(f"{file}: {problem}; {CORRUPT}")
    name = manifest["weights"]["file"]
    if not _inside(Path(path), name):
        raise InputError(
            f"{file}: weights file '{printable(name)}' is outside the model folder; {CORRUPT}"
        )
    return manifest


def is_compressed(path: str | Path) -> bool:
    """True if `path` is a compressed model folder (has a manifest)."""
    return (Path(path) / MANIFEST).is_file()


def encode_blob(tensors: dict[str, Tensor], level: int, metadata: dict[str, str]) -> bytes:
    """safetensors bytes of `tensors`, zstd-compressed at `level` (0: not compressed)."""
    from safetensors.torch import save

    blob = save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    if level == 0:
        return blob
    from numcodecs import Zstd

    return bytes(Zstd(level=level).encode(blob))


def decode_blob(raw: bytes, compressed: bool) -> dict[str, Tensor]:
    """Inverse of `encode_blob`."""
    from safetensors.torch import load

    if compressed:
        from numcodecs import Zstd

        raw = bytes(Zstd().decode(raw))
    return load(raw)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _check_int8(
    file: Path,
    wfile: Path,
    model: nn.Module,
    owned: set[str],
    quantized: list[dict[str, Any]],
    tensors: dict[str, Tensor],
) -> None:
    """InputError unless every module the manifest `file` names is a layer with a matrix weight
    in `model`, and every quantized one has int8 weights and scales of its shape in `wfile`."""
    weights: dict[str, Tensor] = {}
    for name in sorted(owned):
        try:
            weight = getattr(model.get_submodule(name), "weight", None) if name else None
        except AttributeError:
            weight = None
        if not isinstance(weight, Tensor) or weight.ndim != 2:
            raise InputError(
                f"{file}: module '{printable(name)}' is not a layer with a weight matrix in the "
                f"model of config.json; {CORRUPT}"
            )
        weights[name] = weight
    for entry in quantized:
        name, shape = entry["name"], tuple(weights[entry["name"]].shape)
        q, scale = tensors.get(f"{name}.weight_int8"), tensors.get(f"{name}.weight_scale")
        if (
            q is None
            or scale is None
            or q.dtype != torch.int8
            or tuple(q.shape) != shape
            or tuple(scale.shape) != shape[:1]
        ):
            raise InputError(
                f"{wfile}: the int8 weights of {printable(name)} are missing or not of its shape "
                f"{shape}; re-run the compress stage"
            )


def load_compressed(path: str | Path, *, int8_kernel: Kernel = "dynamic") -> nn.Module:
    """Rebuild a compressed model (module docstring) in eval mode on CPU, ready to run: a causal
    LM or a sequence classifier, as its `config.json` says (`model_task`).

    Checks the weights file's sha256 against the manifest and that every stored tensor is used
    and every model tensor is set, so a truncated or mixed-up folder is an InputError, never a
    silently half-random model.
    """
    from transformers import AutoConfig

    path = Path(path)
    if int8_kernel not in KERNELS:
        raise ValueError(f"int8_kernel must be one of {KERNELS}, got {int8_kernel!r}")
    manifest = read_manifest(path)
    wfile = path / manifest["weights"]["file"]
    if not wfile.is_file():
        raise InputError(f"{wfile}: missing (the compressed model folder is incomplete)")
    if sha256_file(wfile) != manifest["weights"]["sha256"]:
        raise InputError(
            f"{wfile}: sha256 differs from {MANIFEST}'s; the file is corrupt or from another "
            "run (re-run the compress stage, or `dvc checkout` it)"
        )
    tensors = decode_blob(wfile.read_bytes(), manifest["weights"]["codec"] != "none")
    config = AutoConfig.from_pretrained(path)
    torch.manual_seed(0)  # every weight is overwritten below; this only fixes the throwaway init
    model_class = auto_model_class(model_task(config.architectures))
    model = model_class.from_config(config, dtype=torch.float32)
    head = manifest["head"]
    quantized = manifest["quantized"]
    # Float tensors first (torch.ao modules cannot take part in a plain load_state_dict).
    owned = {e["name"] for e in quantized}
    if head["tied"]:  # the head is the embedding: rebuilt from it, never stored
        owned.add(head["name"])
    _check_int8(path / MANIFEST, wfile, model, owned, quantized, tensors)
    set_by_int8 = {f"{name}.{k}" for name in owned for k in model.get_submodule(name).state_dict()}
    missing, unexpected = model.load_state_dict(
        {k: v for k, v in tensors.items() if not k.endswith(_INT8_SUFFIXES)}, strict=False
    )
    missing = [k for k in missing if k not in set_by_int8]
    if missing or unexpected:
        raise InputError(
            f"{wfile}: does not match {path / 'config.json'}: missing tensors {missing[:5]}, "
            f"unexpected tensors {unexpected[:5]}; re-run the compress stage"
        )
    for entry in quantized:
        name, kind = entry["name"], entry["kind"]
        q, scale = tensors[f"{name}.weight_int8"], tensors[f"{name}.weight_scale"]
        bias = tensors.get(f"{name}.bias")
        targets = [name] + ([head["name"]] if kind == "embedding" and head["tied"] else [])
        for target in targets:
            module = model.get_submodule(target)
            if int8_kernel == "dequantize":
                with torch.no_grad():
                    module.weight.copy_(dequantize_rows(q, scale))
            elif isinstance(module, nn.Embedding):
                _set_module(model, target, Int8Embedding(q, scale))
            else:  # a Linear, or the head tied to a quantized embedding
                _set_module(model, target, dynamic_linear(q, scale, bias))
    return model.eval()


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(parameters, nonzero parameters) of a float model; shared (tied) tensors count once."""
    total = nonzero = 0
    for p in model.parameters():  # parameters() yields a shared tensor once
        total += p.numel()
        nonzero += int(torch.count_nonzero(p.detach()))
    return total, nonzero
