"""Distillation losses from sparse stored soft labels, exact wherever the store allows.

A store keeps, per position, k teacher ids with their log-probabilities (temperature 1) and
its `tail` array, the log of the mass not covered by the distinct ids: the argument
`tail_logmass` below. The word `tail` alone names the mode (params `train_student.tail`). Two
estimators follow from the two ways the ids were chosen (`method`):

- `topk` (and any store read "on its support"): the distinct ids S plus one extra class, the
  bucket B = V \\ S, form a partition of the vocabulary. Both distributions are coarsened onto
  it: teacher P(i) = exp(logprob_i), P(B) = exp(tail_logmass); student Q(i) = softmax(z)_i and
  Q(B) = 1 - sum_S Q(i). The `tail` mode decides what the loss sees:
    * `bucket`: KL(P || Q) over S + {B}: the exact KL between the coarsened distributions.
    * `renorm`: P and Q renormalised over S, bucket dropped: KL(P|S || Q|S).
    * `ignore`: the terms of S only, sum_S P(i) log(P(i)/Q(i)), bucket term left out.
  With k = V (tail_logmass = -inf) all three equal the full-vocabulary KL. Reverse KL, KL(Q || P),
  is computed on the same partition. Trade-off: top-k alone is biased, it says nothing about
  where the tail mass goes; the bucket only says how much there is.
- `sample`: k draws x_1..x_k with replacement from the teacher (duplicates kept). The loss is
  the student's cross-entropy against the draws' empirical distribution, plus the draws'
  mean teacher log-probability (a constant for the student, an unbiased estimate of -H(p)):
      L = (1/k) sum_j [log p(x_j) - log q(x_j)],
  whose expectation over the draws is KL(p || q) and whose gradient is, in expectation, the
  full-KD gradient (Anshumann et al. 2025). Only forward KL has such an estimator. A format-2
  store keeps the same draws as distinct ids with counts c_i and the teacher's entropy H(p),
  often without logprobs: L = -H(p) - sum_i (c_i/k) log q(i), the same gradient, with the
  exact constant in place of its estimate (`sampled_kd`'s `counts` and `entropy`).
  `singleton_weight` w < 1 trades that unbiasedness for variance: each id drawn once keeps w/k
  and the rest of its draw goes to a bucket (the ids drawn fewer than twice) whose target is
  the student's own distribution (`_shrunk_cross_entropy`); the default run's student is better
  for it (docs/train-student.md).

Temperature T (the T^2 factor is applied by `distillation_loss`). On a partition, T tempers the
coarsened distributions: log P_T(c) = log P(c)/T - logsumexp(log P/T), and the same for Q.
That is exact for `renorm` (softmax(logprob_S/T) is the tempered teacher restricted to S) and
for every mode when k = V; for `bucket`/`ignore` with k < V it tempers the bucket as one class,
because the store cannot say how the tail mass is spread. For `sample` the draws come from the
teacher at T = 1; for T != 1 each draw is reweighted by p(x)^(1/T - 1), self-normalised over the
k draws (a consistent, not unbiased, estimate of the tempered teacher), and the student is
softmax(z/T). T = 1 is the recommended and default setting for sample stores.

Memory: nothing of shape (B, T, V) is built besides what softmax needs: one logsumexp over the
student logits, then gathers at the stored ids, (B, T, k). Every input may be float16 or
bfloat16; all arithmetic is float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.store.format import LEGACY_SAMPLING, METHODS, SAMPLINGS

Loss = Literal["kl", "reverse_kl"]
LOSSES: tuple[str, ...] = get_args(Loss)
"""Divergence directions: KL(teacher || student) and KL(student || teacher)."""
Tail = Literal["renorm", "bucket", "ignore"]
TAILS: tuple[str, ...] = get_args(Tail)
"""How a partition loss treats the mass outside the stored ids (module docstring)."""
SampleWeights = Literal["empirical", "inclusion"]
SAMPLE_WEIGHTS: tuple[str, ...] = get_args(SampleWeights)
"""Estimators for sample stores: the draws' empirical distribution, or Horvitz-Thompson."""

SINGLETON_WEIGHT = 0.5
"""Default weight an id drawn once keeps in the sampled-KD target (`sampled_kd`); 1 is the
unbiased estimator. Measured: `benchmarks/kd_quality.py` (docs/logits-store.md)."""

_NEG_INF = float("-inf")
_EDGE = -1e-6
"""Largest log-mass of the stored ids the student may have when a bucket remains (stability)."""


def check_options(*, loss: str, tail: str, method: str, temperature: float) -> None:
    """Raise ValueError for names or values these losses do not define."""
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r} (known: {', '.join(LOSSES)})")
    if tail not in TAILS:
        raise ValueError(f"unknown tail {tail!r} (known: {', '.join(TAILS)})")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} (known: {', '.join(METHODS)})")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if method == "sample" and loss == "reverse_kl":
        raise ValueError(
            "reverse_kl needs the teacher's probability wherever the student puts mass; a "
            "'sample' store only has draws from the teacher: use loss 'kl' or a 'topk' store"
        )


def distinct_mask(ids: Tensor) -> Tensor:
    """(..., k) bool: True at the first occurrence of each id along the last axis.

    Sorting is stable, so "first" is the lowest position; for a top-k store (ids already
    distinct) every entry is True.
    """
    sorted_ids, order = ids.sort(dim=-1, stable=True)  # (..., k)
    first = torch.ones_like(sorted_ids, dtype=torch.bool)
    first[..., 1:] = sorted_ids[..., 1:] != sorted_ids[..., :-1]
    return torch.empty_like(first).scatter_(-1, order, first)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate on the whole range (Maechler 2012)."""
    return torch.where(
        x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x))
    )


def _kl_terms(log_a: Tensor, log_b: Tensor, keep: Tensor) -> Tensor:
    """sum over the last axis of a * (log a - log b) where `keep` and a > 0.

    Masked entries are replaced by 0 *before* the arithmetic as well as after, so an infinite
    log never reaches a product and no NaN can leak into the gradient (0 * inf).
    """
    keep = keep & (log_a > _NEG_INF)
    log_a = torch.where(keep, log_a, 0.0)
    log_b = torch.where(keep, log_b, 0.0)
    return torch.where(keep, torch.exp(log_a) * (log_a - log_b), 0.0).sum(-1)


def partition_kd(
    student_logits: Tensor,
    ids: Tensor,
    logprobs: Tensor,
    tail_logmass: Tensor,
    *,
    tail: str = "bucket",
    loss: str = "kl",
    temperature: float = 1.0,
    lse: Tensor | None = None,
) -> Tensor:
    """Per-position KL between teacher and student coarsened onto the stored ids (+ bucket).

    student_logits (..., V); ids (..., k) int; logprobs (..., k); tail_logmass (...), the
    store's `tail` array; `tail` is the mode (`TAILS`). `lse` may pass
    logsumexp(student_logits, -1) (...,) if the caller already has it. Duplicate ids count once.
    Where tail_logmass = -inf (no mass left), the bucket is dropped on both sides. Returns
    (...,) float32.
    """
    check_options(loss=loss, tail=tail, method="topk", temperature=temperature)
    z = student_logits.float()
    if lse is None:
        lse = torch.logsumexp(z, dim=-1)  # (...,)
    ids = ids.long()
    first = distinct_mask(ids)  # (..., k)
    lq_s = torch.where(first, z.gather(-1, ids) - lse.unsqueeze(-1), _NEG_INF)  # (..., k)
    lp_s = torch.where(first, logprobs.float(), _NEG_INF)  # (..., k)
    lp_b = tail_logmass.float()  # (...,)
    has_b = lp_b > _NEG_INF
    covered = torch.logsumexp(lq_s, dim=-1).clamp(max=_EDGE)  # (...,) log Q(S)
    lq_b = torch.where(has_b, _log1mexp(covered), _NEG_INF)  # (...,) log Q(B)
    lp = torch.cat([lp_s, lp_b.unsqueeze(-1)], dim=-1)  # (..., k+1) teacher partition
    lq = torch.cat([lq_s, lq_b.unsqueeze(-1)], dim=-1)  # (..., k+1) student partition
    keep = torch.ones_like(lp, dtype=torch.bool)
    if tail == "renorm":  # drop the bucket before normalising
        lp = torch.cat([lp_s, torch.full_like(lp_b, _NEG_INF).unsqueeze(-1)], dim=-1)
        lq = torch.cat([lq_s, torch.full_like(lq_b, _NEG_INF).unsqueeze(-1)], dim=-1)
    elif tail == "ignore":  # normalise with the bucket, but leave its term out
        keep[..., -1] = False
    # Temper (or, for renorm, renormalise): log P_T = log P / T - logsumexp(log P / T).
    if temperature != 1.0 or tail == "renorm":
        lp = torch.log_softmax(lp / temperature, dim=-1)
        lq = torch.log_softmax(lq / temperature, dim=-1)
    if loss == "kl":
        return _kl_terms(lp, lq, keep)
    # Reverse KL: classes without teacher mass are dropped (they would make it infinite).
    return _kl_terms(lq, lp, keep & (lp > _NEG_INF))


def check_singleton_weight(weight: float, *, temperature: float, weights: str) -> None:
    """Raise ValueError unless `weight` is in [0, 1], and 1 unless the estimator it shrinks
    (empirical weights at temperature 1) is the one in use."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"singleton_weight must be in [0, 1], got {weight}")
    if weight != 1.0 and (temperature != 1.0 or weights != "empirical"):
        raise ValueError(
            f"singleton_weight {weight} shrinks the empirical estimator at temperature 1, "
            f"not {weights!r} weights at temperature {temperature}; use singleton_weight: 1, "
            "or sample_weights: empirical and temperature: 1"
        )


def sampled_kd(
    student_logits: Tensor,
    ids: Tensor,
    logprobs: Tensor | None,
    *,
    counts: Tensor | None = None,
    entropy: Tensor | None = None,
    temperature: float = 1.0,
    weights: str = "empirical",
    sampling: str = LEGACY_SAMPLING,
    singleton_weight: float = 1.0,
    lse: Tensor | None = None,
) -> Tensor:
    """Per-position estimate of KL(p || q) from k teacher draws (module docstring).

    student_logits (..., V); ids (..., m) the draws; logprobs (..., m) the teacher's log p at
    T = 1, or None when the store keeps none. `counts` (..., m) says how often each entry was
    drawn (a format-2 store's distinct ids; 0 = padding); None weighs every entry once (raw
    draws, m = k). `entropy` (...,) is the teacher's H(p) at T = 1, used in place of the draws'
    mean -log p when `logprobs` is None (same gradient, exact constant). `lse` =
    logsumexp(student_logits / T, -1) if already known. `weights`: `empirical`, (1/k) sum_j
    [log p(x_j) - log q(x_j)]; or `inclusion`, the Horvitz-Thompson sum over the distinct drawn
    ids i of p(i)/pi(i) [log p(i) - log q(i)], pi(i) the probability that i is drawn at all:
    1 - (1 - p(i))^k for `iid` draws, min(1, k p(i)) for `systematic` ones (`sampling`, the
    store's attribute). Both are unbiased at T = 1 under either sampling. T != 1 and
    `inclusion` need `logprobs` (ValueError otherwise). `singleton_weight` w < 1 (empirical
    weights at T = 1 only) shrinks the ids drawn once toward the student: each keeps w/k, and
    the other (1 - w)/k of its draw joins a bucket, the ids drawn fewer than twice, where the
    target follows the student's own distribution (`_shrunk_cross_entropy`). Returns (...,)
    float32.
    """
    check_options(loss="kl", tail="bucket", method="sample", temperature=temperature)
    if weights not in SAMPLE_WEIGHTS:
        raise ValueError(f"unknown sample weights {weights!r} (known: {', '.join(SAMPLE_WEIGHTS)})")
    if sampling not in SAMPLINGS:
        raise ValueError(f"unknown sampling {sampling!r} (known: {', '.join(SAMPLINGS)})")
    check_singleton_weight(singleton_weight, temperature=temperature, weights=weights)
    if logprobs is None and (temperature != 1.0 or weights != "empirical" or entropy is None):
        raise ValueError(
            "this sample store keeps no logprobs, so only temperature 1 with empirical weights "
            "(and the store's entropy) is possible; set train_student.temperature: 1 and "
            "sample_weights: empirical, or re-run teacher_logits with sample_logprobs: true"
        )
    z = student_logits.float()
    if temperature != 1.0:
        z = z / temperature
    if lse is None:
        lse = torch.logsumexp(z, dim=-1)  # (...,)
    lq = z.gather(-1, ids.long()) - lse.unsqueeze(-1)  # (..., m) log q_T(x_j)
    if singleton_weight != 1.0:
        c = _distinct_counts(ids) if counts is None else counts.float()  # (..., m)
        if logprobs is None:
            assert entropy is not None
            minus_h = -entropy.float()  # (...,)
        else:  # the draws' estimate of -H(p), as the empirical estimator's constant
            minus_h = (c * logprobs.float()).sum(-1) / c.sum(-1)
        return minus_h + _shrunk_cross_entropy(lq, c, singleton_weight)
    c = torch.ones_like(lq) if counts is None else counts.float()  # (..., m) draws per entry
    k = c.sum(-1, keepdim=True)  # (..., 1) draws per position
    if logprobs is None:  # T = 1, empirical: -H(p) - (1/k) sum_i c_i log q(i)
        assert entropy is not None
        return -entropy.float() - (c * lq).sum(-1) / k.squeeze(-1)
    lp = logprobs.float()  # (..., m) log p(x_j), T = 1
    if weights == "empirical":
        if temperature == 1.0:
            return (c * (lp - lq)).sum(-1) / k.squeeze(-1)
        log_c = torch.where(c > 0, c.clamp(min=1).log(), _NEG_INF)  # (..., m)
        log_w = log_c + lp * (1.0 / temperature - 1.0)  # toward p_T ~ p^(1/T), times 1/p
        log_z = torch.logsumexp(log_w, dim=-1, keepdim=True) - k.log()  # est. log Z_T
    else:
        first = distinct_mask(ids) & (c > 0)  # (..., m)
        if sampling == "systematic":  # hit by one of k evenly spaced points: min(1, k p)
            log_pi = (lp + k.log()).clamp(max=0.0)  # (..., m)
        else:
            log_1mp = _log1mexp(lp.clamp(max=_EDGE))  # log(1 - p)
            log_pi = _log1mexp(k * log_1mp)  # (..., m) log P(id drawn at least once)
        log_w = torch.where(first, lp / temperature - log_pi, _NEG_INF)  # p_T-ish / pi
        if temperature == 1.0:  # unbiased Horvitz-Thompson
            return torch.where(first, torch.exp(log_w) * (lp - lq), 0.0).sum(-1)
        log_z = torch.logsumexp(log_w, dim=-1, keepdim=True)  # HT estimate of log Z_T
    # T != 1: self-normalised weights (consistent, not unbiased); log p_T = log p / T - log Z_T.
    w = torch.softmax(log_w, dim=-1)  # (..., m)
    return (w * (lp / temperature - log_z - lq)).sum(-1)


def _distinct_counts(ids: Tensor) -> Tensor:
    """(..., k) float: at the first occurrence of each id, how often it occurs along the last
    axis; 0 at the repeats. Raw draws (format 1) as a format-2 store's counts."""
    same = (ids.unsqueeze(-1) == ids.unsqueeze(-2)).sum(-1)  # (..., k)
    return torch.where(distinct_mask(ids), same, 0).float()


def _shrunk_cross_entropy(lq: Tensor, counts: Tensor, weight: float) -> Tensor:
    """(...,) the student's cross-entropy against the shrunk target t, bucket coarsened.

    lq (..., m) the student's log q at distinct ids, counts (..., m) their draws (0 = padding),
    k = sum of counts. H = the ids drawn at least twice (every id with p >= 2/k under
    systematic draws, with its count within one draw of k p); S1 = the ids drawn once, n1 =
    |S1| / k their share of the draws; B = V minus H, the bucket, with student mass Q(B). The
    target t gives H its counts, t_i = c_i / k, S1 a share w / k each, and spreads the
    remaining (1 - w) n1 over B as the student's own distribution: t_j += (1 - w) n1 q(j) /
    Q(B); it sums to 1. Returns -sum_H (c_i / k) log q(i) - sum_S1 (w / k) log q(i) - (1 - w)
    n1 log Q(B), whose gradient with respect to the logits is q - t (tested), with nothing of
    shape (..., V) built.

    Why: an id drawn once stands for mass anywhere below about 2/k, most of it on ids never
    drawn; the unbiased 1/k puts all of it on the one drawn. Giving part of it to the bucket
    lowers the target's variance on the tail at the cost of a bias toward the student there:
    on the default run w = 0.5 takes a k = 32 store from 1.4% above live full-vocabulary KD in
    validation perplexity to below it (docs/logits-store.md).
    """
    k = counts.sum(-1)  # (...,)
    head = counts >= 2  # (..., m)
    single = counts == 1  # (..., m)
    t = torch.where(single, weight * counts, counts) / k.unsqueeze(-1)  # (..., m)
    n1 = single.sum(-1) / k  # (...,)
    log_q_head = torch.logsumexp(torch.where(head, lq, _NEG_INF), dim=-1)  # (...,)
    log_q_bucket = _log1mexp(log_q_head.clamp(max=_EDGE))  # (...,) log Q(B)
    return -(torch.where(counts > 0, t * lq, 0.0)).sum(-1) - (1.0 - weight) * n1 * log_q_bucket


def full_kd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    loss: str = "kl",
    temperature: float = 1.0,
) -> Tensor:
    """Per-position KL over the whole vocabulary (the live-teacher baseline and the reference).

    student_logits, teacher_logits (..., V). Builds (..., V) teacher log-probabilities: this is
    what storing sparse labels avoids. Returns (...,) float32.
    """
    check_options(loss=loss, tail="bucket", method="topk", temperature=temperature)
    lq = torch.log_softmax(student_logits.float() / temperature, dim=-1)  # (..., V)
    lp = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (..., V)
    if loss == "kl":
        return F.kl_div(lq, lp, log_target=True, reduction="none").sum(-1)
    return F.kl_div(lp, lq, log_target=True, reduction="none").sum(-1)


def target_nll(logits: Tensor, targets: Tensor, lse: Tensor | None = None) -> Tensor:
    """Per-position negative log-likelihood -log softmax(z)[target] = logsumexp(z) - z[target].

    logits (..., V) and targets (...) at the same positions: for next-token prediction the
    logits at positions 0..L-2 and the ids at 1..L-1. `lse` may pass logsumexp(logits.float(),
    -1) if the caller already has it. Returns (...,) float32, computed in float32 whatever the
    input dtype. The one definition of the NLL behind the training CE, the student's validation
    perplexity and the evaluate stage's perplexity, so their numbers agree to the bit.
    """
    z = logits.float()
    if lse is None:
        lse = torch.logsumexp(z, dim=-1)
    return lse - z.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)


@dataclass(frozen=True)
class LossParts:
    """One batch's loss and its parts (scalars; `total` carries the graph)."""

    total: Tensor
    """alpha * T^2 * kd + (1 - alpha) * ce: what is back-propagated."""
    kd: Tensor
    """Mean distillation term (nats/token, before the T^2 factor); 0 when alpha = 0."""
    ce: Tensor
    """Mean next-token cross-entropy (nats/token), always computed (it is cheap)."""


def distillation_loss(
    student_logits: Tensor,
    targets: Tensor,
    *,
    alpha: float,
    temperature: float = 1.0,
    loss: str = "kl",
    tail: str = "bucket",
    method: str | None = None,
    sample_weights: str = "empirical",
    sampling: str = LEGACY_SAMPLING,
    singleton_weight: float = 1.0,
    ids: Tensor | None = None,
    logprobs: Tensor | None = None,
    tail_logmass: Tensor | None = None,
    counts: Tensor | None = None,
    entropy: Tensor | None = None,
    teacher_logits: Tensor | None = None,
) -> LossParts:
    """Mix KD and hard-label CE: alpha * T^2 * KD + (1 - alpha) * CE, averaged over positions.

    student_logits (B, T, V) predict targets (B, T). The teacher is either a store's labels at
    the same positions (`method`, for sample stores their `sampling`, ids (B, T, k), logprobs (B, T, k) or None, tail_logmass
    (B, T), and for a format-2 sample store counts (B, T, k) and entropy (B, T); see
    `pipeline.store.labels.decode_block`) or live `teacher_logits` (B, T, V). With alpha = 0 no
    teacher input is needed.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    z = student_logits.float()
    lse = torch.logsumexp(z, dim=-1)  # (B, T) at T = 1, shared by CE and the partition losses
    ce = target_nll(z, targets, lse).mean()
    if alpha == 0.0:
        kd = torch.zeros((), device=z.device)
    elif teacher_logits is not None:
        kd = full_kd(z, teacher_logits, loss=loss, temperature=temperature).mean()
    elif method == "sample":
        assert ids is not None
        kd = sampled_kd(
            z,
            ids,
            logprobs,
            counts=counts,
            entropy=entropy,
            temperature=temperature,
            weights=sample_weights,
            sampling=sampling,
            singleton_weight=singleton_weight,
            lse=lse if temperature == 1.0 else None,
        ).mean()
    elif method == "topk":
        assert ids is not None and logprobs is not None and tail_logmass is not None
        kd = partition_kd(
            z,
            ids,
            logprobs,
            tail_logmass,
            tail=tail,
            loss=loss,
            temperature=temperature,
            lse=lse,
        ).mean()
    else:
        raise ValueError(f"no teacher given: method={method!r} and no teacher_logits")
    total = alpha * temperature**2 * kd + (1.0 - alpha) * ce
    return LossParts(total=total, kd=kd.detach(), ce=ce.detach())


def classification_kd_loss(
    student_logits: Tensor,
    teacher_logprobs: Tensor | None,
    gold: Tensor,
    *,
    alpha: float,
    temperature: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Sequence-classification distillation: alpha * CE(gold) + (1 - alpha) * T^2 * KL.

    student_logits (B, C); teacher_logprobs (B, C), the teacher's log-probabilities at T = 1
    (a classification store holds every class, so this KL is exact, no tail); gold (B,) int64,
    the class index, or -1 where the row has no gold label the student may train on.

    - CE = mean over the rows with a gold label of -log softmax(z)[gold] (at T = 1); 0 (not
      NaN, and no gradient) when the batch has none.
    - KL = mean over *all* rows of KL(teacher_T || student_T), teacher_T = softmax(logprobs/T),
      student_T = softmax(z/T); scaled by T^2 so its gradient keeps its size as T changes
      (Hinton et al. 2015). Teacher classes with probability 0 (-inf) contribute 0.

    Mixing: the weights are fixed, never renormalised per batch. A batch without gold rows
    contributes (1 - alpha) * T^2 * KL and nothing else; one whose rows all have gold labels
    contributes both terms in full. So alpha is the weight of the gold term *per batch*, and
    the gold rows' share of the data decides how often it acts, not how strongly: with 1 labeled
    language in 21 most batches hold a gold row or two, whose CE is averaged over those rows
    only. alpha = 1 is CE only (teacher_logprobs may be None); alpha = 0 is KD only.

    Returns (total, parts): `total` carries the graph; parts are detached scalars `ce`, `kd`
    (the KL before the T^2 factor) and `gold_rows` (how many rows had a gold label). Inputs may
    be float16/bfloat16; the arithmetic is float32.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = student_logits.float()  # (B, C)
    has_gold = gold >= 0  # (B,)
    n_gold = has_gold.sum()
    target = torch.where(has_gold, gold, 0).long()  # (B,) any valid index where masked
    nll = target_nll(z, target)  # (B,)
    ce = torch.where(has_gold, nll, 0.0).sum() / n_gold.clamp(min=1)
    if alpha < 1.0:
        if teacher_logprobs is None:
            raise ValueError("teacher_logprobs are needed when alpha < 1")
        lp = torch.log_softmax(teacher_logprobs.float() / temperature, dim=-1)  # (B, C)
        lq = torch.log_softmax(z / temperature, dim=-1)  # (B, C)
        kd = _kl_terms(lp, lq, torch.ones_like(lp, dtype=torch.bool)).mean()
    else:
        kd = torch.zeros((), device=z.device)
    total = alpha * ce + (1.0 - alpha) * temperature**2 * kd
    return total, {"ce": ce.detach(), "kd": kd.detach(), "gold_rows": n_gold.detach()}
