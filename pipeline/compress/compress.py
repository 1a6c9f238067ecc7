"""The `compress` stage: a trained student -> magnitude-pruned, int8-quantized, entropy-coded.

Two stages run this same code: `compress` (params section `compress`) on the causal-LM student
and `classify_compress` (section `classify_compress`, the same keys) on the sequence-classification
student. The model class comes from the student's config (`architectures`, see
`pipeline.modeling.tasks.model_task`).

Steps, each switchable in params (`compress.*`):

1. Pruning (`prune.enabled`, `prune.amount`): unstructured magnitude (L1) pruning with
   `torch.nn.utils.prune`, layer by layer: in every linear layer of the transformer blocks the
   `amount` fraction of weights with the smallest |w| is set to exactly zero. The token
   embedding and the output head are never pruned (each row is a whole token's vector; zeroing
   its small entries hurts rare tokens most, and with tied embeddings it hits input and output
   at once). No fine-tuning follows, so quality drops with `amount`; `evaluate` measures it.
   A sequence classifier's head (every linear layer outside the base model, e.g. `score` of
   `LlamaForSequenceClassification`, `classifier.dense` and `classifier.out_proj` of XLM-R)
   plays the output head's part: never pruned (a few rows, one per class, each of which every
   prediction reads), and quantized exactly when the LM head would be (`quantize_embeddings`).
2. Quantization (`quantize`, `quantize_embeddings`): symmetric int8 with one scale per output
   row (`pipeline.compress.compressed.quantize_rows`) for the blocks' linear layers and, separately
   switchable, the token embedding and output head (one int8 matrix with per-token scales when
   tied: per-row is per-output-channel for the head and per-token for the lookup, so one copy
   serves both). In small students the embedding is most of the weights, so leaving it float
   leaves most of the size; it is quantized by default and its effect is measured.
3. Storage: `pipeline.compress.compressed` format, the safetensors blob zstd-compressed at
   `zstd_level`. Dense int8 does not shrink from zeros by itself; entropy coding turns both the
   zeros and the peaked distribution of int8 values into saved bytes. The stage also records
   what a bitmask + nonzero-values sparse layout and plain dense int8 would take, so the choice
   stays visible in the metrics (see docs/compress-evaluate.md for measured numbers).

Trade-off: per-row symmetric int8 is post-training and calibration-free (no data is read),
so it is simple and deterministic; activation-aware schemes (GPTQ, AWQ, SmoothQuant) would
keep more quality but need calibration data and libraries this project does not depend on.
Output bytes are deterministic for the same student and params.
"""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

import pipeline
from pipeline.compress.compressed import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    WEIGHTS,
    dequantize_rows,
    encode_blob,
    parameter_counts,
    quantize_rows,
)
from pipeline.core.atomic import atomic_dir, check_destinations
from pipeline.core.config import require, to_dict
from pipeline.core.errors import InputError
from pipeline.core.provenance import (
    TOKENIZER_FILES,
    WEIGHT_SUFFIXES,
    files_sha256,
    sha256_file,
    write_json,
)
from pipeline.modeling.tasks import auto_model_class, model_task

log = logging.getLogger(__name__)

COPIED = (*TOKENIZER_FILES, "softlabels.json", "generation_config.json")
"""Files copied unchanged from the student folder when present."""


@dataclass(frozen=True)
class PruneConfig:
    """Params section `compress.prune`: unstructured magnitude pruning of the blocks' linears."""

    SECTION: ClassVar[str] = "compress.prune"
    """The section its checks name (`classify_compress.prune` when read from there)."""
    enabled: bool = True
    """Prune before quantizing."""
    amount: float = 0.3
    """Fraction of each block linear layer's weights set to zero (smallest |w| first)."""

    def __post_init__(self) -> None:
        require(
            0.0 <= self.amount < 1.0,
            "compress.prune.amount",
            f"must be in [0, 1), got {self.amount}",
        )


@dataclass(frozen=True)
class CompressConfig:
    """Params section `compress` (and `classify_compress`, the same keys): how the student is
    shrunk (see docs/compress-evaluate.md)."""

    SECTION: ClassVar[str] = "compress"
    """The section its checks name (`classify_compress` when read from there)."""
    quantize: bool = True
    """int8 weights (one scale per output row) for the transformer blocks' linear layers."""
    quantize_embeddings: bool = True
    """int8 weights (one scale per token) for the token embedding and the output head (for a
    sequence classifier: its classification head, one scale per class row)."""
    prune: PruneConfig = field(default_factory=PruneConfig)
    """Magnitude pruning (see compress.prune.*)."""
    zstd_level: int = 3
    """zstd level of the weights blob (1-22; level 3 measured within 1.5% of the order-0
    entropy of the int8 values, higher levels gain little for much more time); 0: none."""

    def __post_init__(self) -> None:
        require(
            0 <= self.zstd_level <= 22,
            "compress.zstd_level",
            f"must be in [0, 22] (0: no entropy coding), got {self.zstd_level}",
        )


def head_and_embedding(model: nn.Module) -> tuple[str, str, bool]:
    """(embedding module name, head module name, tied?) of a causal LM."""
    names = {id(m): n for n, m in model.named_modules()}
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or id(emb) not in names or id(head) not in names:
        raise InputError("the model has no input embedding or output head to identify")
    return names[id(emb)], names[id(head)], head.weight is emb.weight


def classifier_head(model: nn.Module) -> list[str]:
    """Names of a sequence classifier's head: every nn.Linear outside its base model (`score` of
    a Llama classifier; `classifier.dense` and `classifier.out_proj` of XLM-R), in module order,
    so the last one is the layer that outputs the class logits."""
    base = {id(m) for m in model.base_model.modules()}
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and id(m) not in base]
    if not names:
        raise InputError(f"{type(model).__name__}: no linear classification head to identify")
    return names


def model_parts(model: nn.Module) -> tuple[str, list[str], bool]:
    """(embedding module name, output head module names, tied?) of a causal LM (its one output
    head, `head_and_embedding`) or of a sequence classifier (`classifier_head`, never tied)."""
    if model_task([type(model).__name__]) == "sequence-classification":
        names = {id(m): n for n, m in model.named_modules()}
        emb = model.get_input_embeddings()
        if id(emb) not in names:
            raise InputError(f"{type(model).__name__}: no input embedding to identify")
        return names[id(emb)], classifier_head(model), False
    emb_name, head_name, tied = head_and_embedding(model)
    return emb_name, [head_name], tied


def block_linears(model: nn.Module, head: str | list[str]) -> list[str]:
    """Names of every nn.Linear except the output head module(s) (the transformer blocks'
    layers)."""
    heads = {head} if isinstance(head, str) else set(head)
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in heads]


def prune_linears(model: nn.Module, names: list[str], amount: float) -> dict[str, float]:
    """Zero the `amount` smallest-|w| fraction of each named Linear's weight, in place.

    Returns {name: fraction of zeros after pruning}. Uses torch.nn.utils.prune and then makes
    the pruning permanent (the mask is applied and removed), so the model is a plain one.
    """
    from torch.nn.utils import prune

    sparsity = {}
    for name in names:
        module = model.get_submodule(name)
        if amount > 0:
            prune.l1_unstructured(module, "weight", amount=amount)
            prune.remove(module, "weight")
        w = module.weight.detach()
        sparsity[name] = float((w == 0).sum()) / w.numel()
    return sparsity


def _bitmask_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Tensor bytes of a sparse layout where it pays: an int8 tensor as a 1-bit mask plus its
    nonzero values when that is smaller than dense, anything else as it is."""
    total = 0
    for t in tensors.values():
        dense = t.numel() * t.element_size()
        if t.dtype == torch.int8:
            dense = min(dense, math.ceil(t.numel() / 8) + int(torch.count_nonzero(t)))
        total += dense
    return total


def compress_model(model: nn.Module, cfg: CompressConfig) -> tuple[dict[str, torch.Tensor], dict]:
    """Prune and quantize `model` (modified in place by pruning); return (tensors, manifest part).

    `tensors` is exactly what goes into the weights blob (module docstring of
    `pipeline.compress.compressed`); the manifest part lists the quantized modules, the head, per-layer
    sparsity and the relative weight error of quantization (||W - deq(q(W))|| / ||W||). For a
    sequence classifier the head entry adds `task` and `modules` (every head linear).
    """
    emb_name, heads, tied = model_parts(model)
    head_name = heads[-1]  # the layer that outputs the logits
    linears = block_linears(model, heads)
    sparsity = prune_linears(model, linears, cfg.prune.amount) if cfg.prune.enabled else {}
    quantized: list[dict[str, Any]] = []
    errors: dict[str, float] = {}
    targets = [(n, "linear") for n in linears] if cfg.quantize else []
    if cfg.quantize_embeddings:
        targets.append((emb_name, "embedding"))
        if not tied:
            targets.extend((name, "linear") for name in heads)
    tensors: dict[str, torch.Tensor] = {}
    covered: set[str] = set()
    for name, kind in targets:
        module = model.get_submodule(name)
        q, scale = quantize_rows(module.weight)  # (out, in) int8, (out,)
        w = module.weight.detach().float()
        errors[name] = float((w - dequantize_rows(q, scale)).norm() / w.norm().clamp(min=1e-12))
        tensors[f"{name}.weight_int8"], tensors[f"{name}.weight_scale"] = q, scale
        bias = getattr(module, "bias", None)
        if bias is not None:
            tensors[f"{name}.bias"] = bias.detach().float()
        covered.update(f"{name}.{k}" for k in module.state_dict())
        quantized.append({"name": name, "kind": kind, "shape": list(q.shape)})
    if tied:
        covered.add(f"{head_name}.weight")  # rebuilt from the embedding
    for key, value in model.state_dict().items():
        if key not in covered:
            tensors[key] = value.detach().float()
    params, _ = parameter_counts(model)
    # Nonzeros as stored: quantization also rounds weights below half a step to zero.
    nonzero = sum(
        int(torch.count_nonzero(t)) for k, t in tensors.items() if not k.endswith(".weight_scale")
    )
    head: dict[str, Any] = {"name": head_name, "embedding": emb_name, "tied": tied}
    if model_task([type(model).__name__]) == "sequence-classification":
        head.update(task="sequence-classification", modules=heads)
    part = {
        "quantized": quantized,
        "head": head,
        "parameters": params,
        "nonzero_parameters": nonzero,
        "sparsity": sparsity,
        "quantization_relative_error": errors,
    }
    return tensors, part


def weight_bytes(folder: str | Path) -> int:
    """Bytes of the weight files of a model folder (safetensors/bin/..., compressed or not)."""
    return sum(
        p.stat().st_size
        for p in Path(folder).iterdir()
        if p.is_file() and (p.name.endswith(WEIGHT_SUFFIXES) or p.name.endswith(".zst"))
    )


def folder_bytes(folder: str | Path) -> int:
    """Bytes of every file under a folder."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def load_student(student: Path) -> nn.Module:
    """The student in float32 from its `save_pretrained` folder, a causal LM or a sequence
    classifier as its config's `architectures` say; InputError naming the path."""
    from transformers import AutoConfig

    if not student.is_dir():
        raise InputError(
            f"{student}: no such student folder (train it first: `dvc repro train_student`, or "
            "`dvc repro classify_student@kd` for the classifier)"
        )
    try:
        task = model_task(AutoConfig.from_pretrained(student).architectures)
        model_class = auto_model_class(task)
        return model_class.from_pretrained(student, dtype=torch.float32).eval()
    except (OSError, ValueError) as e:
        raise InputError(
            f"{student}: cannot load a causal LM or sequence classifier from it ({e})"
        ) from e


def run_compress(cfg: CompressConfig, *, student: Path, out: Path, metrics: Path) -> dict[str, Any]:
    """Run the stage: write the compressed folder to `out` (atomically) and metrics; return them."""
    check_destinations(out, metrics)  # fail now, not after the work
    student = Path(student)
    model = load_student(student)
    if not (cfg.quantize or cfg.quantize_embeddings or cfg.prune.enabled):
        log.warning("compress: quantization and pruning are all off; only entropy coding applies")
    source_digest, _ = files_sha256(student)
    with torch.no_grad():
        tensors, part = compress_model(model, cfg)
    codec = "none" if cfg.zstd_level == 0 else f"zstd-{cfg.zstd_level}"
    name = WEIGHTS if cfg.zstd_level == 0 else f"{WEIGHTS}.zst"
    # One metadata key only: safetensors writes its metadata map in hash order.
    meta = {"format": f"{FORMAT}/{FORMAT_VERSION}"}
    raw = encode_blob(tensors, 0, meta)
    blob = raw if cfg.zstd_level == 0 else encode_blob(tensors, cfg.zstd_level, meta)
    with atomic_dir(out) as tmp:
        model.config.save_pretrained(tmp)
        for fname in COPIED:
            if (student / fname).is_file():
                shutil.copyfile(student / fname, tmp / fname)
        (tmp / name).write_bytes(blob)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "weights": {
                "file": name,
                "codec": codec,
                "sha256": sha256_file(tmp / name),
                "bytes": len(blob),
                "uncompressed_bytes": len(raw),
            },
            "source": {"path": str(student), "sha256": source_digest},
            "compress": to_dict(cfg),
            "softlabels_version": pipeline.__version__,
            **part,
        }
        write_json(tmp / MANIFEST, manifest)
    before, after = weight_bytes(student), weight_bytes(out)
    errs = list(part["quantization_relative_error"].values())
    spars = list(part["sparsity"].values())
    result = {
        "weights_bytes_before": before,
        "weights_bytes_after": after,
        "weights_ratio": after / before if before else float("nan"),
        "folder_bytes_before": folder_bytes(student),
        "folder_bytes_after": folder_bytes(out),
        "parameters": part["parameters"],
        "nonzero_parameters": part["nonzero_parameters"],
        "pruned_layers": len(spars),
        "block_sparsity": sum(spars) / len(spars) if spars else 0.0,
        "quantized_modules": len(part["quantized"]),
        "quantization_relative_error_mean": sum(errs) / len(errs) if errs else 0.0,
        "quantization_relative_error_max": max(errs) if errs else 0.0,
        "storage_alternatives_bytes": {
            "dense": len(raw),
            "bitmask_sparse": _bitmask_bytes(tensors) + (len(raw) - _tensor_bytes(tensors)),
            "zstd": len(blob) if cfg.zstd_level else len(encode_blob(tensors, 3, meta)),
        },
        "codec": codec,
    }
    write_json(metrics, result)
    log.info(
        "compressed %s -> %s: weights %d -> %d bytes (x%.3f)",
        student,
        out,
        before,
        after,
        result["weights_ratio"],
    )
    return result


def _tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())
