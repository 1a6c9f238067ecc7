"""Per-token soft labels from a causal LM, without materialising (B, T, V) logits.

The kernel splits a Hugging Face causal LM into its backbone (everything up to the final hidden
states) and its linear output head, runs the backbone on a batch, then walks the B*T positions in
slices of `head_chunk_tokens` rows. Per slice, into scratch buffers reused across slices:

    L = h @ W^T in fp32 (+ bias, * logit scale, softcap)   (R, Vp)  Vp = V padded to BLOCK
    m = max_v L;  L -= m;  E = exp(L);  S = sum_v E         logprob_v = L_v - log S
    entropy = log S - sum_v E*L / S;  top-1 probability = 1 / S

(`eager`: max, subtract, exp into E, block sums, product and sum, as separate torch ops on a
cache-sized group of rows; `fused`: one torch.compile'd kernel, `_vocab_stats`, that reads L and
writes only the per-block and per-row results, so exponentials are recomputed for just the
blocks and ids used below: on CUDA that replaces about eight trips over the (R, V) slice in
memory by one; `native`, the CPU default: everything below, id choice included, in C
(`pipeline/capture/_passes.c`, `native_passes`), one row at a time while it is in cache, 3.7-4.2x
faster than eager: the torch ops' trips over the row and their per-op overhead on the small
id-choice tensors were most of the passes' cost), then chooses k ids per position:

- `topk`: the k largest logits. The row is cut into blocks of BLOCK ids; the k blocks with the
  largest block maxima must hold every top-k id (each block outside them has k blocks whose
  maxima rank above all of its elements), so `topk` runs on k*BLOCK candidates, not V.
- `sample`: k draws by inverse CDF, two-level: a float64 cumulative sum over the
  block sums picks a block, a cumulative sum inside that block picks the id, taken once per
  distinct (row, block) however many draws land there (16 distinct blocks for 32 draws on the
  default run: half the work of one sum per draw, the same values). The CDF points
  (k independent uniforms, or one uniform spread systematically: `draw_uniforms`) come
  from a CPU `torch.Generator` seeded per shard (`shard_generator`) and are drawn row by row in
  shard order, so the draws depend on neither batch size, slice size, device
  nor process: a resumed or distributed shard gets the same draws.

Determinism: every reduction runs per row in one thread (a single long row, which torch would
split across threads, is summed block-wise instead), so results do not depend on torch's thread
count. They may depend, in the last bit, on the matmul shapes (batch and slice sizes), which are
fixed by the config; hence batch_size and head_chunk_tokens are part of the resume key.

Ids are stored in one canonical order, by descending logprob then ascending id (duplicates of a
sampled id stay, adjacent). A `sample` store that keeps no logprobs (`logprobs=False`) gets its
draws in ascending id order and skips the logprob sort and the tail below (`logprobs` and
`tail` come back NaN): the writer re-encodes the draws as distinct ids and counts anyway.
`tail` is log of the mass outside the *distinct* ids, summed without cancellation: untouched
blocks' sums plus the touched blocks re-summed with the chosen ids zeroed; where that underflows
(mass < 1e-30) it is recomputed exactly as logsumexp over the uncovered logits (-inf when every
id is covered), once per batch for the few rows concerned.

Trade-off: every statistic costs a few extra streaming passes over each (R, V) slice instead of
one over a (B, T, V) tensor, so memory is ~3 x R x V x 4 bytes whatever the batch (1 x fused or
native), and small slices stay cache-resident; the price is a per-slice kernel-launch overhead
on GPUs (keep R large there) and an fp32 head (on CUDA a half-precision matmul with fp32 output
when torch supports it, which computes the same products exactly).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.errors import ConfigError, InputError, first_line
from pipeline.store.format import LEGACY_SAMPLING, METHODS, SAMPLINGS

try:  # built by setup.py where GCC is found (optional)
    from pipeline.capture import _passes as _native

    _NATIVE_ERROR = ""
except ImportError as e:  # pragma: no cover - depends on the install
    _native = None
    _NATIVE_ERROR = first_line(e)

FORMAT_VERSION = 2
"""Version of how soft labels are computed (block sampling, ordering, tail); part of the
resume key, so a change here never mixes shards computed two ways. 2: `vocab_passes: auto`
runs the native passes on CPU (own exponential, fixed-order sums; `topk` ties to the lower id),
so the default CPU labels differ from version 1's in float32 rounding."""

NON_FINITE = "the teacher's logits are not finite (NaN or infinite)"
NON_FINITE_ADVICE = (
    "check the teacher's weights, or run it in float32 (teacher_logits.dtype) if half "
    "precision overflows"
)
"""What a teacher with NaN or infinite logits is told, by `check_split` and by the shard
writer (`pipeline.capture.shards`), wherever it shows."""

BLOCK = 64
"""Ids per block for the two-level top-k and sampling (block reductions are cheap at 64)."""
_PAD_LOGIT = -1e30
"""Logit of padding columns (ids >= V): finite, so 0 * pad is 0 in the entropy sum."""
SUB = 16
"""Ids per sub-block in the second round of the top-k search."""
_GRAIN = 32768
"""torch's internal reduction grain (see `_rowsum`)."""
GROUP_BYTES = 2 << 20
"""Bytes of one row group's fp32 logits in the vocabulary-wide passes on CPU (`_passes`): with
the exponentials and the scratch, three such buffers per compute stream stay in cache."""
MIN_GROUP = 16
"""Fewest rows per group: with a vocabulary of 10^5 ids a row alone fills the cache, the
passes are bound by arithmetic (exp, products) rather than memory, and smaller groups only add
per-call overhead (measured: V = 151,936, groups of 3 rows 20% slower than of 16)."""
_TINY = 1e-30
"""Below this uncovered mass (relative to the max id's), `tail` is recomputed in log space."""


@dataclass(frozen=True)
class SoftLabels:
    """Soft labels of a batch, on the compute device. Leading dims (B, T) or (N,)."""

    ids: torch.Tensor
    """(..., k) int32: stored ids, by descending logprob then ascending id (ascending id
    without logprobs)."""
    logprobs: torch.Tensor
    """(..., k) float16: teacher log-probabilities of `ids` (temperature 1); NaN from a kernel
    built with `logprobs=False`."""
    tail: torch.Tensor
    """(...,) float16: log of the mass outside the distinct `ids` (-inf if none is left); NaN
    from a kernel built with `logprobs=False`."""
    covered: torch.Tensor
    """(...,) float32: probability mass of the distinct `ids`."""
    entropy: torch.Tensor
    """(...,) float32: teacher entropy in nats."""
    top1: torch.Tensor
    """(...,) float32: probability of the most likely id."""

    def reshape(self, *lead: int) -> SoftLabels:
        k = self.ids.shape[-1]
        return SoftLabels(
            self.ids.reshape(*lead, k),
            self.logprobs.reshape(*lead, k),
            *(getattr(self, f).reshape(*lead) for f in ("tail", "covered", "entropy", "top1")),
        )


@dataclass(frozen=True)
class SplitModel:
    """A causal LM as backbone + linear head + the logit transforms its forward applies."""

    backbone: nn.Module
    head: nn.Linear
    scale: float
    """Multiplier on the head's output (Cohere `logit_scale`, 1 / Granite `logits_scaling`)."""
    softcap: float | None
    """`final_logit_softcapping` (Gemma 2/3): logits = c * tanh(logits / c)."""


def split_causal_lm(model: nn.Module) -> SplitModel:
    """Split a `transformers` causal LM into backbone and output head, or raise InputError.

    Generic across HF causal LMs: the backbone is `model.get_decoder()` (else
    `model.base_model`), the head `model.get_output_embeddings()`, which must be an `nn.Linear`.
    `check_split` then proves the split reproduces `model(...).logits`.
    """
    name = type(model).__name__
    backbone = None
    try:
        backbone = model.get_decoder()
    except (AttributeError, NotImplementedError, ValueError):
        backbone = None
    if backbone is None or backbone is model:
        base = getattr(model, "base_model", None)
        backbone = base if base is not None and base is not model else None
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if backbone is None or not isinstance(head, nn.Linear):
        raise InputError(
            f"{name}: cannot split this model into a backbone and a linear output head "
            "(get_decoder()/base_model and get_output_embeddings() must exist); teacher_logits "
            "supports Hugging Face *ForCausalLM models"
        )
    config = model.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    scale = 1.0
    if getattr(config, "logit_scale", None):  # Cohere: logits * logit_scale
        scale *= float(config.logit_scale)
    if getattr(config, "logits_scaling", None):  # Granite: logits / logits_scaling
        scale /= float(config.logits_scaling)
    softcap = getattr(config, "final_logit_softcapping", None)
    return SplitModel(backbone, head, scale, float(softcap) if softcap else None)


def hidden_states(split: SplitModel, input_ids: torch.Tensor) -> torch.Tensor:
    """Final hidden states (B, T, H) of the backbone, in the model's dtype."""
    out = split.backbone(input_ids=input_ids, use_cache=False)
    return out[0] if isinstance(out, tuple) else out.last_hidden_state


def shard_seed(seed: int, split: str, shard: int) -> int:
    """64-bit seed of one shard's sampling stream, from the stage seed and the shard's name."""
    digest = hashlib.sha256(f"softlabels:sample:{seed}:{split}:{shard}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def shard_generator(seed: int, split: str, shard: int) -> torch.Generator:
    """A CPU generator for one shard: the same draws in any process, on any device."""
    return torch.Generator(device="cpu").manual_seed(shard_seed(seed, split, shard))


def draw_uniforms(
    generator: torch.Generator, rows: int, k: int, sampling: str = LEGACY_SAMPLING
) -> torch.Tensor:
    """(rows, k) float64 points in [0, 1), ascending per row for `systematic`: the CDF
    positions of the next `rows` rows' draws in the shard's stream.

    - `iid`: k independent uniforms per row (multinomial draws).
    - `systematic`: one uniform u per row and the k points (u + j) / k, j = 0..k-1 (systematic
      sampling). Each id i is still drawn k p_i times in expectation (unbiased: the point set
      hits its CDF interval of length p_i floor(k p_i) or ceil(k p_i) times), but its count
      never strays further than that, against a binomial spread of k p_i (1 - p_i) for iid:
      the sampled-KD target c_i / k has far lower variance at the same k, and ids with
      p_i >= 1/k are always included.

    CPU `torch.rand` consumes its generator one value at a time, so drawing rows in batches of
    any size yields the same stream as drawing them all at once.
    """
    if sampling == "iid":
        return torch.rand((rows, k), generator=generator, dtype=torch.float64)
    if sampling != "systematic":
        raise ValueError(f"unknown sampling {sampling!r} (known: {', '.join(SAMPLINGS)})")
    u = torch.rand((rows, 1), generator=generator, dtype=torch.float64)  # (rows, 1)
    return (u + torch.arange(k, dtype=torch.float64)) / k  # (rows, k) ascending


VocabPasses = Literal["auto", "native", "fused", "eager"]
"""`teacher_logits.vocab_passes` (`resolve_vocab_passes`)."""
VOCAB_PASSES: tuple[str, ...] = get_args(VocabPasses)


def native_built() -> bool:
    """Whether the native passes (`pipeline/capture/_passes.c`) were built by the install."""
    return _native is not None


def resolve_vocab_passes(setting: str, device: str) -> str:
    """`native`, `fused` or `eager` for a `vocab_passes` setting on a device type ("cpu" /
    "cuda"), or ConfigError naming the key.

    auto: fused on CUDA, where the passes are bound by memory and one read of the logits
    replaces about eight; native on CPU (each row read twice while in cache, the id choice in
    scalar code: 3.7-4.2x faster than the torch ops, see docs/teacher-logits.md), or eager where
    the install built no native passes (no GCC). The implementations agree to float32
    rounding, not bit for bit, so the resolved value is part of the resume key."""
    if setting not in VOCAB_PASSES:
        raise ConfigError(
            f"teacher_logits.vocab_passes: must be one of {', '.join(VOCAB_PASSES)}, "
            f"got {setting!r}"
        )
    if setting == "native":
        if device != "cpu":
            raise ConfigError(
                f"teacher_logits.vocab_passes: native passes run on the CPU, not {device}; "
                "set vocab_passes: auto (fused on CUDA) or eager"
            )
        if not native_built():
            raise ConfigError(
                "teacher_logits.vocab_passes: the native passes were not built with this "
                f"install ({_NATIVE_ERROR}); reinstall where GCC is found "
                "(pip install -e .) or set vocab_passes: eager"
            )
    if setting != "auto":
        return setting
    if device == "cuda":
        return "fused"
    return "native" if native_built() else "eager"


PHASES = ("body", "head", "passes")
"""Where a batch's compute time goes: the backbone, the output-head matmul, and the
vocabulary-wide passes and id choice that follow it (`PhaseClock`)."""


class PhaseClock:
    """Seconds per phase (`PHASES`) of one batch's compute, for the stage's time split.

    CPU: wall clock around each phase. CUDA: a pair of timing events per phase on the current
    stream, resolved by `seconds()` once the batch's host copies are done (the writer thread
    waits for them anyway), so measuring never makes the device wait.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, Any, Any]] = []

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end = torch.cuda.Event(enable_timing=True)
            end.record()
        else:
            start = time.perf_counter()
            yield
            end = time.perf_counter()
        self.marks.append((name, start, end))

    def seconds(self) -> dict[str, float]:
        """{phase: seconds} summed over the batch's slices (synchronises CUDA events)."""
        out = dict.fromkeys(PHASES, 0.0)
        for name, start, end in self.marks:
            out[name] += start.elapsed_time(end) / 1000 if self.cuda else end - start
        return out


def _phase(clock: PhaseClock | None, name: str) -> contextlib.AbstractContextManager:
    return clock.phase(name) if clock is not None else contextlib.nullcontext()


class SoftLabelKernel:
    """A teacher turned into a soft-label function: `kernel(input_ids, uniforms) -> SoftLabels`.

    Holds the head weights (fp32, padded to a multiple of BLOCK rows), shared, and per-slice
    scratch buffers, one set per calling thread, so several threads may use one kernel.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        method: str,
        k: int,
        head_chunk_tokens: int,
        logprobs: bool = True,
        vocab_passes: str = "eager",
    ) -> None:
        if method not in METHODS:
            raise ConfigError(f"teacher_logits.method: must be one of {METHODS}, got {method!r}")
        self.split = split_causal_lm(model)
        weight = self.split.head.weight  # (V, H)
        self.vocab_size, hidden = weight.shape
        if not 1 <= k <= self.vocab_size:
            raise ConfigError(
                f"teacher_logits.k: must be between 1 and the teacher's vocabulary size "
                f"{self.vocab_size}, got {k}"
            )
        if head_chunk_tokens < 1:
            raise ConfigError(
                f"teacher_logits.head_chunk_tokens: must be >= 1, got {head_chunk_tokens}"
            )
        self.method, self.k, self.rows = method, k, head_chunk_tokens
        self.logprobs = logprobs or method == "topk"
        """Whether `logprobs` and `tail` are computed (a `sample` store written without them
        skips their sort and coverage passes; see `SoftLabels`)."""
        if vocab_passes not in ("native", "fused", "eager"):
            raise ValueError(
                f"vocab_passes must be resolved to native, fused or eager, got {vocab_passes!r}"
            )
        if vocab_passes == "native":
            resolve_vocab_passes("native", weight.device.type)  # built, on CPU, or ConfigError
        self.native = vocab_passes == "native"
        """Whether the passes run in the native code (`native_passes`), a slice at a time."""
        self.fused = vocab_passes == "fused"
        """Whether the vocabulary-wide passes run as one compiled kernel (`_vocab_stats`)."""
        self.device = weight.device
        self.padded = math.ceil(self.vocab_size / BLOCK) * BLOCK
        self.blocks = self.padded // BLOCK
        half = weight.dtype in (torch.float16, torch.bfloat16)
        self.out_dtype_mm = half and self.device.type == "cuda" and _mm_out_dtype_works(weight)
        w_dtype = weight.dtype if self.out_dtype_mm else torch.float32
        if self.padded == self.vocab_size and weight.dtype == w_dtype and self.split.scale == 1:
            w = weight.detach()  # used as is: no copy of a large head
        else:
            w = torch.zeros(self.padded, hidden, dtype=w_dtype, device=self.device)
            w[: self.vocab_size] = weight.detach().to(w_dtype)
        bias = self.split.head.bias
        self.bias = None if bias is None else bias.detach().float()
        if self.split.scale != 1.0:
            if self.out_dtype_mm:  # keep the half weight exact; scale the fp32 logits instead
                self.post_scale = self.split.scale
            else:
                w.mul_(self.split.scale)
                self.post_scale = 1.0
            if self.bias is not None:
                self.bias = self.bias * self.split.scale
        else:
            self.post_scale = 1.0
        self.weight = w  # (Vp, H)
        # Rows per cache-resident group of the passes (CPU); a GPU takes the slice at once.
        fit = max(MIN_GROUP, GROUP_BYTES // (self.padded * 4))
        self.group = self.rows if self.device.type == "cuda" else min(self.rows, fit)
        self._local = threading.local()  # per-thread scratch buffers
        self._stats = _compile_stats(self.device, self.padded) if self.fused else None

    # -- public -----------------------------------------------------------------------------

    @torch.inference_mode()
    def __call__(
        self,
        input_ids: torch.Tensor,
        uniforms: torch.Tensor | None,
        clock: PhaseClock | None = None,
    ) -> SoftLabels:
        """Soft labels for `input_ids` (B, T) on the model's device; `uniforms` (B*T, k) float64
        (CPU) for `sample`, None for `topk`. Returns (B, T, ...) tensors on the device. A
        `clock` collects the time of each phase."""
        b, t = input_ids.shape
        with _phase(clock, "body"):
            hidden = self.hidden(input_ids)
        return self.from_hidden(hidden, uniforms, clock).reshape(b, t)

    @torch.inference_mode()
    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The backbone's final hidden states of `input_ids` (B, T), flattened to (B*T, H)."""
        if self.device.type == "cuda":
            input_ids = input_ids.pin_memory().to(self.device, non_blocking=True)
        hidden = hidden_states(self.split, input_ids.to(self.device))  # (B, T, H)
        return hidden.reshape(-1, hidden.shape[-1])

    @torch.inference_mode()
    def from_hidden(
        self,
        hidden: torch.Tensor,
        uniforms: torch.Tensor | None,
        clock: PhaseClock | None = None,
    ) -> SoftLabels:
        """Soft labels of N rows of final hidden states (N, H), slice by slice. Returns (N, ...)."""
        n, k, dev = hidden.shape[0], self.k, self.device
        if self.method == "sample" and (uniforms is None or tuple(uniforms.shape) != (n, k)):
            raise ValueError(f"sample needs uniforms of shape {(n, k)}")
        out = SoftLabels(
            torch.empty(n, k, dtype=torch.int32, device=dev),
            torch.empty(n, k, dtype=torch.float16, device=dev),
            torch.empty(n, dtype=torch.float16, device=dev),
            *(torch.empty(n, dtype=torch.float32, device=dev) for _ in range(3)),
        )
        tinies = []
        for s in range(0, n, self.rows):
            e = min(s + self.rows, n)
            u = None
            if uniforms is not None:
                u = uniforms[s:e]
                if dev.type == "cuda":
                    u = u.pin_memory().to(dev, non_blocking=True)
            ids, lp, tail, covered, entropy, top1, tiny = self._slice(hidden[s:e], u, clock)
            tinies.append(tiny)
            out.ids[s:e] = ids
            out.logprobs[s:e] = lp
            out.tail[s:e] = tail
            out.covered[s:e] = covered
            out.entropy[s:e] = entropy
            out.top1[s:e] = top1
        tiny = torch.cat(tinies) if tinies else torch.zeros(0, dtype=torch.bool, device=dev)
        with _phase(clock, "passes"):
            if bool(tiny.any()):  # one host sync per call; such rows are rare
                rows = tiny.nonzero().squeeze(-1)
                exact = self._exact_tail(hidden[rows], out.ids[rows].long())
                out.tail[rows] = exact.to(torch.float16)
        return out

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits (N, V) of a few rows through the same head path (for `check_split`)."""
        out = torch.empty(hidden.shape[0], self.padded, device=self.device)
        return self._logits(hidden, out)[:, : self.vocab_size].clone()

    # -- internals --------------------------------------------------------------------------

    def _buffer(self, name: str, rows: int) -> torch.Tensor:
        """A per-thread (rows, Vp) fp32 scratch buffer, grown to the largest request."""
        scratch = self._local.__dict__
        buf = scratch.get(name)
        if buf is None or buf.shape[0] < rows:
            buf = torch.empty(rows, self.padded, device=self.device)
            scratch[name] = buf
        return buf[:rows]  # first rows of a row-major buffer: contiguous

    def _logits(self, h: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        """Head output (R, Vp) in fp32 (into `out` when given), with the model's logit
        transforms applied."""
        if self.out_dtype_mm:  # half inputs, fp32 accumulation and output (CUDA)
            out = torch.mm(h.to(self.weight.dtype), self.weight.t(), out_dtype=torch.float32)
        else:
            out = torch.mm(h.float(), self.weight.t(), out=out)
        if self.bias is not None:
            out[:, : self.vocab_size].add_(self.bias)
        if self.post_scale != 1.0:
            out.mul_(self.post_scale)
        if self.split.softcap is not None:
            c = self.split.softcap
            out.div_(c).tanh_().mul_(c)
        if self.padded > self.vocab_size:
            out[:, self.vocab_size :] = _PAD_LOGIT
        return out

    def _slice(
        self, h: torch.Tensor, u: torch.Tensor | None, clock: PhaseClock | None = None
    ) -> tuple[torch.Tensor, ...]:
        """ids, logprobs, tail, covered, entropy, top1 of R rows, and which rows' tail
        underflowed (see `from_hidden`)."""
        with _phase(clock, "head"):
            scratch = None if self.out_dtype_mm else self._buffer("logits", h.shape[0])
            L = self._logits(h, scratch)  # (R, Vp) fp32
        with _phase(clock, "passes"):
            return self._passes(L, u)

    def _passes(self, L: torch.Tensor, u: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """`_slice` after the head: the vocabulary-wide passes over the logits L (R, Vp), run on
        groups of `self.group` rows so that a group's logits, exponentials and scratch stay in
        cache across the passes (one trip to memory per row instead of one per pass). Every
        pass is per row, so the results are those of one call on all R rows, bit for bit (a
        group is never a single row of several: `_rowsum` sums single rows differently)."""
        if self.native:  # row by row in cache already: one call for the slice
            return native_passes(L, u, k=self.k, topk=self.method == "topk", logprobs=self.logprobs)
        bounds = _row_groups(L.shape[0], self.group)
        if len(bounds) == 1:
            return self._passes_rows(L, u)
        parts = [self._passes_rows(L[a:b], None if u is None else u[a:b]) for a, b in bounds]
        return tuple(torch.cat(x) for x in zip(*parts, strict=True))

    def _passes_rows(self, L: torch.Tensor, u: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """The passes on rows L (R, Vp): max, exponentials, block sums, entropy, the k ids,
        their logprobs, coverage and tail."""
        r, nb = L.shape[0], self.blocks
        block_max = None
        if self.fused:  # one read of L; exponentials recomputed only where they are needed
            block_max, block_sum, el = _vocab_stats_rows(self._stats, L)
            m = block_max.amax(-1, keepdim=True)  # (R, 1)
            exps = _Exps(L, m, None)
        else:
            if self.method == "topk":
                block_max = L.view(r, nb, BLOCK).amax(-1)  # (R, nb)
                m = block_max.amax(-1, keepdim=True)  # (R, 1)
            else:
                m = L.amax(-1, keepdim=True)  # (R, 1)
            L.sub_(m)  # shifted logits, max 0
            E = torch.exp(L, out=self._buffer("exp", r))  # (R, Vp) in [0, 1]
            block_sum = E.view(r, nb, BLOCK).sum(-1)  # (R, nb)
            el = _rowsum(torch.mul(E, L, out=self._buffer("scratch", r)))  # (R,) sum_v E*L
            exps = _Exps(L, m, E)
        cdf = block_sum.double().cumsum(-1)  # (R, nb) float64
        total = cdf[:, -1]  # (R,) = S >= 1
        log_total = total.log()  # (R,) float64
        entropy = (log_total - el.double() / total).float()
        top1 = total.reciprocal().float()
        # (R, k) int64 ids
        if self.method == "topk":
            assert block_max is not None
            ids = self._topk(L, block_max)
        else:
            ids = self._sample(exps, cdf, u)
        # canonical order: ascending id, then (stable) descending logprob
        ids = ids.sort(-1).values  # (R, k) int64
        if not self.logprobs:  # ascending ids, duplicates adjacent; no logprobs, no tail
            covered_e = _rowsum((exps.at(ids) * _distinct(ids)).double())  # (R,)
            nan = torch.full(ids.shape[:1], math.nan, dtype=torch.float16, device=L.device)
            return (
                ids.to(torch.int32),
                nan[:, None].expand(ids.shape),
                nan,
                (covered_e / total).float(),
                entropy,
                top1,
                torch.zeros_like(nan, dtype=torch.bool),
            )
        ascending = ids
        lp = (exps.shifted_at(ids).double() - log_total[:, None]).float()  # (R, k)
        lp, order = lp.sort(dim=-1, descending=True, stable=True)
        ids = ids.gather(-1, order)
        distinct = _distinct(ids)  # duplicates stay adjacent
        covered_e = _rowsum((exps.at(ids) * distinct).double())  # (R,)
        uncovered = _uncovered(exps, block_sum, ascending)  # (R,) float64; spends `exps`
        tail = uncovered.log() - log_total
        tiny = uncovered < _TINY  # underflow in E: redone exactly by `from_hidden`
        return (
            ids.to(torch.int32),
            lp.to(torch.float16),
            tail.to(torch.float16),
            (covered_e / total).float(),
            entropy,
            top1,
            tiny,
        )

    def _exact_tail(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """log of the mass outside `ids` (r, k) as logsumexp over the uncovered logits minus
        logsumexp over all, for rows whose fast tail underflowed (r, H) -> (r,) float64."""
        L = self._logits(hidden, None)[:, : self.vocab_size]  # (r, V)
        log_total = _logsumexp(L).double()
        L.scatter_(-1, ids, -math.inf)
        return _logsumexp(L).double() - log_total

    def _topk(self, L: torch.Tensor, block_max: torch.Tensor) -> torch.Tensor:
        """Ids of the k largest logits per row (R, k) int64, searched in two rounds: the k blocks
        with the largest maxima, then the k sub-blocks (of SUB ids) with the largest maxima
        inside those, then top-k among k * SUB candidates."""
        r, nb = block_max.shape
        kb = min(self.k, nb)
        blocks = block_max.topk(kb, -1).indices.sort(-1).values  # (R, kb) ascending
        per = BLOCK // SUB
        sub = _blocks(L, blocks).view(r, kb * per, SUB)  # (R, kb*per, SUB) in id order
        ks = min(self.k, kb * per)
        subs = sub.amax(-1).topk(ks, -1).indices.sort(-1).values  # (R, ks) ascending
        rows = torch.arange(r, device=L.device)[:, None] * (kb * per)
        cand = sub.reshape(-1, SUB).index_select(0, (rows + subs).reshape(-1)).view(r, ks * SUB)
        pos = cand.topk(self.k, -1).indices  # (R, k)
        s = subs.gather(-1, pos // SUB)  # (R, k) sub-block within the gathered blocks
        return blocks.gather(-1, s // per) * BLOCK + (s % per) * SUB + pos % SUB

    def _sample(self, exps: _Exps, cdf: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """k inverse-CDF draws per row (R, k) int64 from unnormalised probabilities `exps`, each
        row's draws in ascending order. The walk inside a block runs on each distinct
        (row, block) once: a peaky teacher's k draws land in a few blocks, and the in-block
        cumulative sums were the costliest step when taken once per draw (same values: the
        sum of a block is the same whichever draw asks for it)."""
        r, nb = cdf.shape
        k = u.shape[1]
        total = cdf[:, -1:]  # (R, 1)
        x = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))  # (R, k)
        if x.device.type != "cpu" or not bool((x[:, 1:] >= x[:, :-1]).all()):
            x = x.sort(-1).values  # a draw's id depends on its point only: order is free
        blk = torch.searchsorted(cdf, x, right=True)  # (R, k): cdf[blk-1] <= x < cdf[blk]
        blk.clamp_(max=nb - 1)  # a no-op unless the row holds NaN (refused by the writer)
        base = F.pad(cdf, (1, 0)).gather(-1, blk)  # cdf[blk-1], 0 for the first block
        rest = (x - base).float().view(-1, 1)  # (R*k, 1) mass to walk inside the block
        key = _block_keys(blk, nb)  # (R*k,) sorted
        uniq, which = torch.unique_consecutive(key, return_inverse=True)  # (U,), (R*k,)
        inner = exps.flat_blocks(uniq).cumsum(-1)  # (U, BLOCK)
        inner = inner.index_select(0, which)  # (R*k, BLOCK)
        last = inner[:, -1:]
        rest = torch.minimum(rest, torch.nextafter(last, torch.zeros_like(last)))
        pos = torch.searchsorted(inner, rest, right=True).view(r, k)  # (R, k)
        return blk * BLOCK + pos.clamp_(max=BLOCK - 1)  # clamp: as blk's


def native_passes(
    L: torch.Tensor, u: torch.Tensor | None, *, k: int, topk: bool, logprobs: bool
) -> tuple[torch.Tensor, ...]:
    """`SoftLabelKernel._passes_rows` in native code (`pipeline/capture/_passes.c`): the same
    quantities from CPU logits L (R, Vp) fp32 and, for `sample`, CDF points u (R, k) float64;
    equal to the torch passes up to float32 rounding (an own exponential, fixed-order sums),
    the same bits on any CPU and thread count. `topk` breaks ties in the k-th value by lower id.
    The call releases the GIL."""
    if _native is None:
        raise RuntimeError(f"native passes not built ({_NATIVE_ERROR})")
    r, vp = L.shape
    if L.device.type != "cpu" or L.dtype != torch.float32 or not L.is_contiguous():
        raise ValueError("native passes need contiguous fp32 CPU logits")
    if not topk and (u is None or u.dtype != torch.float64 or tuple(u.shape) != (r, k)):
        raise ValueError(f"sample needs float64 uniforms of shape {(r, k)}")
    u = None if topk else u.contiguous()
    ids = torch.empty(r, k, dtype=torch.int32)
    lp = torch.empty(r, k, dtype=torch.float32)
    tail = torch.empty(r, dtype=torch.float64)
    covered, entropy, top1 = (torch.empty(r, dtype=torch.float32) for _ in range(3))
    tiny = torch.empty(r, dtype=torch.bool)
    _native.rows(
        L.data_ptr(),
        r,
        vp,
        k,
        topk,
        logprobs,
        0 if u is None else u.data_ptr(),
        *(x.data_ptr() for x in (ids, lp, tail, covered, entropy, top1, tiny)),
    )
    return ids, lp.to(torch.float16), tail.to(torch.float16), covered, entropy, top1, tiny


def _uncovered(exps: _Exps, block_sum: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mass (unnormalised, float64) outside the distinct `ids` (R, k), ascending: a sum of
    non-negative terms, the blocks holding no chosen id plus the chosen ids' blocks re-summed
    without them (no cancellation)."""
    blk = ids // BLOCK  # (R, k) ascending
    touched = exps.blocks_without(blk, ids)  # (R, k, BLOCK)
    kept = (touched.sum(-1) * _distinct(blk)).double().sum(-1)  # (R,)
    untouched = _rowsum(block_sum.scatter(-1, blk, 0.0).double())  # (R,)
    return kept + untouched


class _Exps:
    """exp(L - m) of a row group's logits, as the passes after the normaliser ask for it.

    Eager passes wrote every exponential once (`E`, with `L` shifted in place); fused passes
    wrote none, so the few entries asked for (the chosen ids, the blocks the draws land in) are
    recomputed from the logits, the same float32 operations elementwise.
    """

    def __init__(self, L: torch.Tensor, m: torch.Tensor, E: torch.Tensor | None) -> None:
        self.L, self.m, self.E = L, m, E  # L (R, Vp): shifted iff E is given; m (R, 1)

    def shifted_at(self, ids: torch.Tensor) -> torch.Tensor:
        """L - m at ids (R, j)."""
        values = self.L.gather(-1, ids)
        return values if self.E is not None else values - self.m

    def at(self, ids: torch.Tensor) -> torch.Tensor:
        """exp(L - m) at ids (R, j)."""
        return self.E.gather(-1, ids) if self.E is not None else self.shifted_at(ids).exp()

    def blocks(self, blk: torch.Tensor) -> torch.Tensor:
        """Blocks blk (R, j) of every row, (R, j, BLOCK)."""
        r, j = blk.shape
        return self.flat_blocks(_block_keys(blk, self.L.shape[1] // BLOCK)).view(r, j, BLOCK)

    def blocks_without(self, blk: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Blocks blk (R, k) with the entries `ids` (R, k) of their row set to 0, (R, k,
        BLOCK). Eager: the ids are zeroed in E itself (one scatter), so this is the last use
        of an eager `_Exps`; fused: in the recomputed blocks, by mask."""
        if self.E is not None:
            self.E.scatter_(-1, ids, 0.0)
            return self.blocks(blk)
        r, k = ids.shape
        touched = self.blocks(blk)  # (R, k, BLOCK), recomputed
        same = blk[:, :, None] == blk[:, None, :]  # (R, k, k): ids j' in the block of slot j
        hit = torch.zeros(touched.shape, dtype=torch.int32, device=ids.device)
        hit.scatter_add_(-1, (ids % BLOCK)[:, None, :].expand(r, k, k), same.to(torch.int32))
        return touched.masked_fill_(hit > 0, 0.0)

    def flat_blocks(self, keys: torch.Tensor) -> torch.Tensor:
        """Blocks by flat key row * blocks + block (n,), (n, BLOCK)."""
        source = self.E if self.E is not None else self.L
        r, vp = source.shape
        out = source.view(r * (vp // BLOCK), BLOCK).index_select(0, keys)
        if self.E is not None:
            return out
        return out.sub_(self.m.view(-1).index_select(0, keys // (vp // BLOCK))[:, None]).exp_()


def _vocab_stats(L: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The vocabulary-wide passes fused (`vocab_passes: fused`, compiled by torch.compile):
    from logits L (R, Vp), block maxima (R, nb), block sums of E = exp(L - m) (R, nb) and
    sum_v E_v (L_v - m) (R,), m the row maximum, reading L and writing nothing of size Vp."""
    r, vp = L.shape
    block_max = L.view(r, vp // BLOCK, BLOCK).amax(-1)  # (R, nb)
    shifted = L - block_max.amax(-1, keepdim=True)  # (R, Vp), fused away
    E = shifted.exp()
    return block_max, E.view(r, vp // BLOCK, BLOCK).sum(-1), (E * shifted).sum(-1)


def _compile_stats(device: torch.device, padded: int) -> Any:
    """`_vocab_stats` compiled for `device` (Triton on CUDA, C++ on CPU), shape-generic, and
    compiled now, on the calling thread, by one call: compute threads then only run it, and a
    machine where torch.compile cannot work fails here with the key to change."""
    stats = torch.compile(_vocab_stats, dynamic=True)
    try:
        with torch.inference_mode():
            stats(torch.zeros(2, padded, device=device))
    except Exception as e:  # inductor raises many types (no compiler, no Triton, ...)
        raise ConfigError(
            f"teacher_logits.vocab_passes: fused passes need torch.compile on {device.type}, "
            f"which failed here ({first_line(e)}); set vocab_passes: eager"
        ) from e
    return stats


def _vocab_stats_rows(stats: Any, L: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`stats(L)` with a lone row run as two (a compiled kernel may treat a size-1 dimension
    differently; two copies of the row keep its results those of any other group)."""
    if L.shape[0] != 1:
        return stats(L)
    return tuple(x[:1] for x in stats(torch.cat([L, L])))


def _row_groups(rows: int, group: int) -> list[tuple[int, int]]:
    """[start, stop) bounds covering `rows` in groups of `group`; a lone last row joins the
    group before it (a single row would be summed by `_rowsum`'s single-row path)."""
    bounds = [(a, min(a + group, rows)) for a in range(0, rows, group)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2:] = [(bounds[-2][0], rows)]
    return bounds


def _distinct(ids: torch.Tensor) -> torch.Tensor:
    """(R, k) bool: the first of each run of equal ids in rows whose duplicates are adjacent."""
    first = torch.ones_like(ids, dtype=torch.bool)
    first[:, 1:] = ids[:, 1:] != ids[:, :-1]
    return first


def _rowsum(x: torch.Tensor) -> torch.Tensor:
    """Row sums (R, n) -> (R,) computed the same way whatever torch's thread count: torch splits
    a reduction with a single output over threads once it exceeds its grain (32768 elements),
    so a single long row is summed per block of BLOCK first."""
    r, n = x.shape
    if r > 1 or n < _GRAIN:
        return x.sum(-1)
    return F.pad(x, (0, (-n) % BLOCK)).view(1, -1, BLOCK).sum(-1).sum(-1)


def _logsumexp(x: torch.Tensor) -> torch.Tensor:
    """Row-wise logsumexp (R, n) -> (R,), -inf for all -inf rows; thread-count independent."""
    m = x.amax(-1, keepdim=True)  # exact in any order
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return _rowsum(torch.exp(x - m)).log() + m[:, 0]


def _blocks(x: torch.Tensor, blk: torch.Tensor) -> torch.Tensor:
    """Blocks `blk` (R, j) of each row of x (R, Vp), as (R, j, BLOCK): one contiguous copy per
    block (index_select on whole blocks is several times faster than an elementwise gather)."""
    r, j = blk.shape
    nb = x.shape[1] // BLOCK
    return x.view(r * nb, BLOCK).index_select(0, _block_keys(blk, nb)).view(r, j, BLOCK)


def _block_keys(blk: torch.Tensor, blocks: int) -> torch.Tensor:
    """Flat keys row * blocks + block (R*j,) of blocks `blk` (R, j): rows of a (R * blocks,
    BLOCK) view of (R, Vp) values."""
    rows = torch.arange(blk.shape[0], device=blk.device)[:, None] * blocks  # (R, 1)
    return (rows + blk).reshape(-1)


def _mm_out_dtype_works(weight: torch.Tensor) -> bool:
    """Whether this torch build multiplies half matrices into fp32 output on weight's device."""
    try:
        a = torch.zeros(2, weight.shape[1], dtype=weight.dtype, device=weight.device)
        return torch.mm(a, weight[:2].t(), out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def check_split(model: nn.Module, kernel: SoftLabelKernel, *, tokens: int = 8) -> None:
    """Prove that backbone + head reproduces `model(input_ids).logits` on a short probe.

    Catches architectures that post-process logits in a way `split_causal_lm` does not know
    (the relative tolerance covers half-precision rounding, not a missing transform), and a
    teacher whose logits are not finite at all.
    """
    n = min(tokens, kernel.vocab_size)
    probe = (torch.arange(n, device=kernel.device) * 7919 % kernel.vocab_size)[None]  # (1, n)
    with torch.inference_mode():
        ref = model(input_ids=probe, use_cache=False).logits.float()[0]  # (n, V)
        ours = kernel.logits(hidden_states(kernel.split, probe)[0])  # (n, V)
    if not bool(torch.isfinite(ref).all()):
        raise InputError(
            f"{type(model).__name__}: {NON_FINITE} on a probe of {n} tokens; {NON_FINITE_ADVICE}"
        )
    half = kernel.weight.dtype != torch.float32 or ref.dtype != torch.float32
    half = half or next(model.parameters()).dtype != torch.float32
    tol = (3e-2 if half else 1e-3) * max(1.0, float(ref.abs().max()))
    diff = float((ref - ours).abs().max()) if ref.shape == ours.shape else math.inf
    if not diff <= tol:
        raise InputError(
            f"{type(model).__name__}: backbone + output head do not reproduce the model's logits "
            f"(max difference {diff:.3g} > {tol:.3g}); this architecture transforms its logits in "
            "a way teacher_logits does not support"
        )


class Fidelity:
    """Per-language sums of tokens, covered mass, entropy and top-1 probability.

    Sums are float64 and accumulated per sequence in row order (`add`), so the totals depend only
    on the data, not on batch sizes or on which process computed a shard.
    """

    FIELDS = ("covered", "entropy", "top1")

    def __init__(self, sums: dict[str, list[float]] | None = None) -> None:
        self.sums: dict[str, list[float]] = {k: list(v) for k, v in (sums or {}).items()}

    def add(
        self, names: list[str], codes: np.ndarray, per_sequence: np.ndarray, seq_len: int
    ) -> None:
        """Add n sequences: row i's language is `names[codes[i]]`; `per_sequence` (n, 3) float64
        holds each row's sums over its `seq_len` positions of covered, entropy, top1."""
        codes = np.asarray(codes, dtype=np.int64)
        m = len(names)
        counts = np.bincount(codes, minlength=m)
        sums = [np.bincount(codes, per_sequence[:, j], m) for j in range(3)]
        for c, lang in enumerate(names):
            if not counts[c]:
                continue
            acc = self.sums.setdefault(str(lang), [0.0, 0.0, 0.0, 0.0])
            acc[0] += float(counts[c] * seq_len)
            for j in range(3):
                acc[1 + j] += float(sums[j][c])

    def merge(self, other: Fidelity) -> None:
        for lang, v in other.sums.items():
            acc = self.sums.setdefault(lang, [0.0, 0.0, 0.0, 0.0])
            for j in range(4):
                acc[j] += v[j]

    def report(self) -> dict[str, Any]:
        """{"overall": {...}, "per_language": {lang: {...}}} with means per token."""

        def means(v: list[float]) -> dict[str, Any]:
            n = v[0]
            return {
                "tokens": int(n),
                "covered_mass": v[1] / n if n else None,
                "entropy": v[2] / n if n else None,
                "top1_prob": v[3] / n if n else None,
            }

        total = [0.0, 0.0, 0.0, 0.0]
        for lang in sorted(self.sums):
            for j in range(4):
                total[j] += self.sums[lang][j]
        return {
            "overall": means(total),
            "per_language": {lang: means(self.sums[lang]) for lang in sorted(self.sums)},
        }


def per_sequence_stats(covered: np.ndarray, entropy: np.ndarray, top1: np.ndarray) -> np.ndarray:
    """(n, 3) float64 per-row sums over positions of (n, L) float32 statistics."""
    return np.stack([a.astype(np.float64).sum(axis=1) for a in (covered, entropy, top1)], axis=1)
