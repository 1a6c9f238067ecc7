"""Sparse-KD losses: parity with the full-vocabulary loss, exactness on the induced partition,
unbiasedness of the sampled estimator, duplicates, -inf tails, fp16 inputs, bad options."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from pipeline.student.losses import (
    LOSSES,
    TAILS,
    check_options,
    check_singleton_weight,
    distillation_loss,
    distinct_mask,
    full_kd,
    partition_kd,
    sampled_kd,
    target_nll,
)

B, T, V = 2, 3, 11


def logits(seed: int, scale: float = 2.0, shape=(B, T, V)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).float() * scale


def value_and_grad(fn, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = z.detach().clone().requires_grad_(True)
    out = fn(z)
    out.sum().backward()
    return out.detach(), z.grad


def store_of(teacher: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logprobs at ids, tail) exactly as the store defines them (distinct ids count once)."""
    lp = torch.log_softmax(teacher.double(), -1)
    covered = torch.zeros_like(lp).scatter(-1, ids, 1.0)  # (B, T, V) test-side reference only
    mass = (lp.exp() * covered).sum(-1)
    every = covered.bool().all(-1)  # no id left outside: tail is -inf by definition
    tail = torch.where(every, float("-inf"), torch.log1p(-mass.clamp(max=1.0)))
    return lp.gather(-1, ids).float(), tail.float()


def partition_reference(z, teacher, ids, *, tail, loss, temperature):
    """Dense reference: coarsen both softmaxes onto distinct(ids) + bucket, then the mode."""
    member = torch.zeros_like(teacher).scatter(-1, ids, 1.0).bool()  # (B, T, V)
    p, q = torch.softmax(teacher.double(), -1), torch.softmax(z.double(), -1)
    ps, qs = torch.where(member, p, 0.0), torch.where(member, q, 0.0)
    pb, qb = 1 - ps.sum(-1, keepdim=True), 1 - qs.sum(-1, keepdim=True)
    P, Q = torch.cat([ps, pb], -1), torch.cat([qs, qb], -1)  # (B, T, V+1)
    keep = torch.cat([member, torch.ones_like(pb, dtype=torch.bool)], -1)
    if tail == "renorm":
        keep[..., -1] = False
    lp = torch.where(keep | (tail == "ignore"), P, 0.0).log()
    lq = torch.where(keep | (tail == "ignore"), Q, 0.0).log()
    lp = torch.log_softmax(lp / temperature, -1)
    lq = torch.log_softmax(lq / temperature, -1)
    if tail == "ignore":
        keep[..., -1] = False
    a, b = (lp, lq) if loss == "kl" else (lq, lp)
    keep = keep & (lp > -torch.inf)
    a, b = torch.where(keep, a, 0.0), torch.where(keep, b, 0.0)  # no 0 * inf in the gradient
    terms = torch.where(keep, a.exp() * (a - b), 0.0)
    return terms.sum(-1).float()


@pytest.mark.parametrize(
    "tail,loss,temperature", list(itertools.product(TAILS, LOSSES, (1.0, 2.5)))
)
def test_every_variant_equals_full_kd_when_k_is_vocab(tail, loss, temperature):
    z, t = logits(0), logits(1)
    ids = t.argsort(-1, descending=True)  # (B, T, V): top-k with k = V
    lp, tl = store_of(t, ids)
    assert torch.isinf(tl).all()
    got, g_got = value_and_grad(
        lambda z: partition_kd(z, ids, lp, tl, tail=tail, loss=loss, temperature=temperature),
        z,
    )
    want, g_want = value_and_grad(lambda z: full_kd(z, t, loss=loss, temperature=temperature), z)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(g_got, g_want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_mixed_loss_with_k_vocab_equals_live_loss(alpha):
    z, t = logits(2), logits(3)
    targets = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(0))
    ids = t.argsort(-1, descending=True)
    lp, tl = store_of(t, ids)
    kw = dict(alpha=alpha, temperature=2.0)
    stored, g_s = value_and_grad(
        lambda z: (
            distillation_loss(
                z, targets, method="topk", ids=ids, logprobs=lp, tail_logmass=tl, **kw
            ).total
        ),
        z,
    )
    live, g_l = value_and_grad(
        lambda z: distillation_loss(z, targets, teacher_logits=t, **kw).total, z
    )
    torch.testing.assert_close(stored, live, atol=1e-5, rtol=0)
    torch.testing.assert_close(g_s, g_l, atol=1e-5, rtol=0)


def test_parts_and_cross_entropy():
    z, t = logits(4), logits(5)
    targets = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    ref_ce = F.cross_entropy(z.reshape(-1, V), targets.reshape(-1))
    torch.testing.assert_close(target_nll(z, targets).mean(), ref_ce)
    parts = distillation_loss(z, targets, alpha=0.0)
    torch.testing.assert_close(parts.total, ref_ce)
    assert parts.kd.item() == 0.0
    parts = distillation_loss(z, targets, alpha=0.25, temperature=3.0, teacher_logits=t)
    kd = full_kd(z, t, temperature=3.0).mean()
    torch.testing.assert_close(parts.kd, kd)
    torch.testing.assert_close(parts.total, 0.25 * 9.0 * kd + 0.75 * ref_ce)


@pytest.mark.parametrize(
    "tail,loss,temperature", list(itertools.product(TAILS, LOSSES, (1.0, 0.7)))
)
def test_partition_loss_is_exact_on_the_induced_partition(tail, loss, temperature):
    """k < V, with duplicate ids (as a sample store has): distinct ids + bucket, exactly."""
    z, t = logits(6), logits(7, scale=3.0)
    ids = t.argsort(-1, descending=True)[..., :5]  # (B, T, 5)
    ids = torch.cat([ids, ids[..., :2]], -1)  # duplicates: the support is still 5 ids
    lp, tl = store_of(t, ids)
    got, g_got = value_and_grad(
        lambda z: partition_kd(z, ids, lp, tl, tail=tail, loss=loss, temperature=temperature),
        z,
    )
    want, g_want = value_and_grad(
        lambda z: partition_reference(z, t, ids, tail=tail, loss=loss, temperature=temperature),
        z,
    )
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(g_got, g_want, atol=1e-5, rtol=0)
    if tail == "bucket" and temperature == 1.0 and loss == "kl":  # KL of coarsening <= full KL
        assert (got <= full_kd(z, t) + 1e-6).all()


def test_distinct_mask_marks_first_occurrences():
    ids = torch.tensor([[3, 1, 3, 2, 1, 1]])
    assert distinct_mask(ids).tolist() == [[True, True, False, True, False, False]]


def test_minus_inf_tails_and_fp16_inputs_stay_finite():
    z, t = logits(8), logits(9)
    ids = t.argsort(-1, descending=True)[..., :4]
    lp, tl = store_of(t, ids)
    tl[0, 0] = float("-inf")  # a position whose stored ids hold all the mass
    for tail, loss in itertools.product(TAILS, LOSSES):
        val, grad = value_and_grad(
            lambda z, tail=tail, loss=loss: partition_kd(
                z.half(), ids.int(), lp.half(), tl.half(), tail=tail, loss=loss
            ),
            z,
        )
        assert val.dtype == torch.float32
        assert torch.isfinite(val).all() and torch.isfinite(grad).all(), (tail, loss)
        ref = partition_kd(z, ids, lp, tl, tail=tail, loss=loss)
        torch.testing.assert_close(val, ref, atol=2e-2, rtol=2e-2)


def draws(t: torch.Tensor, k: int, reps: int, seed: int) -> torch.Tensor:
    """(reps, T, k) ids drawn with replacement from softmax(t) (T, V)."""
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(t.double(), -1)  # (T, V)
    flat = torch.multinomial(p.repeat(reps, 1), k, replacement=True, generator=g)
    return flat.reshape(reps, t.shape[0], k)


@pytest.mark.parametrize("weights", ["empirical", "inclusion"])
def test_sampled_estimator_is_unbiased_for_full_kl_and_its_gradient(weights):
    z, t = logits(10, shape=(T, V)), logits(11, shape=(T, V))
    reps, k = 20000, 8
    ids = draws(t, k, reps, seed=0)  # (R, T, k)
    lp = torch.log_softmax(t, -1).expand(reps, -1, -1).gather(-1, ids).half()

    def mean_estimate(z):
        return sampled_kd(z.expand(reps, -1, -1), ids, lp, weights=weights).mean(0)  # (T,)

    est, g_est = value_and_grad(mean_estimate, z)
    want, g_want = value_and_grad(lambda z: full_kd(z, t), z)
    torch.testing.assert_close(est, want, atol=0.02, rtol=0)
    torch.testing.assert_close(g_est, g_want, atol=3e-3, rtol=0)
    # One draw set alone is far from the full loss: the agreement above is in expectation.
    single = sampled_kd(z, ids[0], lp[0], weights=weights)
    assert not torch.allclose(single, want, atol=0.02)


def test_inclusion_weights_have_lower_variance_than_draw_counts():
    """Horvitz-Thompson uses the exact probability of likely ids instead of their counts."""
    z, t = logits(15, shape=(T, V)), logits(16, scale=3.0, shape=(T, V))
    reps, k = 4000, 8
    ids = draws(t, k, reps, seed=2)
    lp = torch.log_softmax(t, -1).expand(reps, -1, -1).gather(-1, ids)
    spread = {}
    for weights in ("empirical", "inclusion"):
        zz = z.expand(reps, -1, -1).clone().requires_grad_(True)
        sampled_kd(zz, ids, lp, weights=weights).sum().backward()
        spread[weights] = zz.grad.var(0).sum()  # per-draw-set gradient variance
    assert spread["inclusion"] < 0.7 * spread["empirical"]


@pytest.mark.parametrize("weights", ["empirical", "inclusion"])
def test_sampled_estimator_with_temperature_is_consistent(weights):
    z, t = logits(12, shape=(T, V)), logits(13, shape=(T, V))
    ids = draws(t, 200000, 1, seed=1)[0]  # (T, k) with large k
    lp = torch.log_softmax(t, -1).gather(-1, ids)
    got, g_got = value_and_grad(
        lambda z: sampled_kd(z, ids, lp, temperature=2.0, weights=weights), z
    )
    want, g_want = value_and_grad(lambda z: full_kd(z, t, temperature=2.0), z)
    torch.testing.assert_close(got, want, atol=0.02, rtol=0)
    torch.testing.assert_close(g_got, g_want, atol=0.01, rtol=0)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(loss="js"), "unknown loss 'js' (known: kl, reverse_kl)"),
        (dict(tail="drop"), "unknown tail 'drop' (known: renorm, bucket, ignore)"),
        (dict(method="beam"), "unknown method 'beam' (known: topk, sample)"),
        (dict(temperature=0.0), "temperature must be > 0, got 0.0"),
        (
            dict(method="sample", loss="reverse_kl"),
            "reverse_kl needs the teacher's probability wherever the student puts mass; a "
            "'sample' store only has draws from the teacher: use loss 'kl' or a 'topk' store",
        ),
    ],
)
def test_bad_options_are_refused(kwargs, message):
    opts = dict(loss="kl", tail="bucket", method="topk", temperature=1.0) | kwargs
    with pytest.raises(ValueError) as e:
        check_options(**opts)
    assert str(e.value) == message


def test_alpha_outside_unit_interval_is_refused():
    z = logits(14)
    with pytest.raises(ValueError, match=r"^alpha must be in \[0, 1\], got 1.5$"):
        distillation_loss(z, z.argmax(-1), alpha=1.5)


@pytest.mark.parametrize("weights", ["empirical", "inclusion"])
def test_sampled_kd_is_unbiased_under_systematic_sampling(weights: str) -> None:
    """Mean over many systematic draws of the sampled estimate equals the full KL (both
    estimators; inclusion uses pi = min(1, k p))."""
    torch.manual_seed(0)
    V, k, n = 30, 8, 20000
    teacher = torch.randn(1, V) * 2
    student = torch.randn(1, V)
    lp = torch.log_softmax(teacher.double(), -1)  # (1, V)
    cdf = lp.exp().cumsum(-1)
    u = (torch.rand(n, 1, dtype=torch.float64) + torch.arange(k)) / k  # (n, k) systematic
    ids = torch.searchsorted(cdf.expand(n, V).contiguous(), u, right=True).clamp(max=V - 1)
    est = sampled_kd(
        student.expand(n, V),
        ids,
        lp[0][ids].float(),
        weights=weights,
        sampling="systematic",
    )
    exact = full_kd(student, teacher)[0]
    assert float(est.mean()) == pytest.approx(
        float(exact), abs=4 * float(est.std()) / n**0.5 + 1e-4
    )


def shrunk_target(z: torch.Tensor, ids: torch.Tensor, weight: float) -> torch.Tensor:
    """(..., V) the target t of the shrunk estimator built densely (test-side reference):
    counts over the vocabulary, ids drawn >= 2 times keep c/k, ids drawn once w/k, and the
    rest of the singletons' mass is spread over the ids drawn < 2 times as the student's q."""
    k = ids.shape[-1]
    c = torch.zeros(*ids.shape[:-1], z.shape[-1], dtype=torch.float64)
    c.scatter_add_(-1, ids, torch.ones_like(ids, dtype=torch.float64))  # (..., V)
    q = torch.softmax(z.double(), -1)  # (..., V)
    head = c >= 2
    n1 = (c == 1).sum(-1, keepdim=True) / k
    t = torch.where(c == 1, weight * c, c) / k
    bucket_q = torch.where(head, 0.0, q)
    return t + (1 - weight) * n1 * bucket_q / bucket_q.sum(-1, keepdim=True)


def shrunk_value(z: torch.Tensor, ids: torch.Tensor, weight: float) -> torch.Tensor:
    """(...,) the returned cross-entropy, bucket as one class, built densely."""
    k = ids.shape[-1]
    c = torch.zeros(*ids.shape[:-1], z.shape[-1], dtype=torch.float64)
    c.scatter_add_(-1, ids, torch.ones_like(ids, dtype=torch.float64))  # (..., V)
    lq = torch.log_softmax(z.double(), -1)
    explicit = torch.where(c == 1, weight * c, c) / k
    n1 = (c == 1).sum(-1) / k
    q_bucket = torch.where(c >= 2, 0.0, lq.exp()).sum(-1)
    return -(explicit * lq).sum(-1) - (1 - weight) * n1 * q_bucket.log()


@pytest.mark.parametrize("weight", [0.0, 0.5, 0.8])
def test_shrunk_estimator_gradient_is_student_minus_shrunk_target(weight: float) -> None:
    """The loss is -H(p) plus a cross-entropy whose gradient in the logits is q - t, t the
    shrunk target (summing to 1), for raw draws (format 1) and for distinct ids with counts
    (format 2) alike."""
    z, t = logits(30, shape=(T, V)), logits(31, scale=3.0, shape=(T, V))
    ids = draws(t, 8, 4, seed=3)  # (4, T, 8) raw draws with repeats
    zz = z.expand(4, -1, -1)
    entropy = torch.full(ids.shape[:-1], 1.5)
    want_t = shrunk_target(zz, ids, weight)  # (4, T, V)
    torch.testing.assert_close(want_t.sum(-1), torch.ones(4, T, dtype=torch.float64))

    def raw(z):
        return sampled_kd(z, ids, None, entropy=entropy, singleton_weight=weight)

    sorted_ids, _ = ids.sort(-1)
    first = distinct_mask(sorted_ids)
    counts = torch.where(first, (sorted_ids.unsqueeze(-1) == sorted_ids.unsqueeze(-2)).sum(-1), 0)

    def counted(z):
        return sampled_kd(
            z, sorted_ids, None, counts=counts, entropy=entropy, singleton_weight=weight
        )

    for fn in (raw, counted):
        value, grad = value_and_grad(fn, zz)
        q = torch.softmax(zz.double(), -1)
        torch.testing.assert_close(grad.double(), q - want_t, atol=1e-6, rtol=0)
        torch.testing.assert_close(
            value.double(), shrunk_value(zz, ids, weight) - 1.5, atol=1e-5, rtol=0
        )


def test_singleton_weight_one_is_the_unbiased_estimator_and_edges_stay_finite() -> None:
    z, t = logits(32, shape=(T, V)), logits(33, shape=(T, V))
    ids = draws(t, 8, 3, seed=4)
    lp = torch.log_softmax(t, -1).expand(3, -1, -1).gather(-1, ids)
    zz = z.expand(3, -1, -1)
    torch.testing.assert_close(
        sampled_kd(zz, ids, lp, singleton_weight=1.0), sampled_kd(zz, ids, lp)
    )
    # With logprobs kept, the shrunk loss uses the draws' mean log p as its constant.
    shrunk = sampled_kd(zz, ids, lp, singleton_weight=0.5)
    want = shrunk_value(zz, ids, 0.5) + lp.double().mean(-1)
    torch.testing.assert_close(shrunk.double(), want, atol=1e-5, rtol=0)
    # Every draw on one id (no singleton, bucket = the rest) and every draw distinct (no head):
    one = torch.zeros(1, 1, 8, dtype=torch.long)
    spread = torch.arange(8).reshape(1, 1, 8)
    for ids in (one, spread):
        value, grad = value_and_grad(
            lambda z, ids=ids: sampled_kd(
                z, ids, None, entropy=torch.zeros(1, 1), singleton_weight=0.5
            ),
            logits(34, shape=(1, 1, V)),
        )
        assert torch.isfinite(value).all() and torch.isfinite(grad).all()
        want = torch.softmax(logits(34, shape=(1, 1, V)).double(), -1) - shrunk_target(
            logits(34, shape=(1, 1, V)), ids, 0.5
        )
        torch.testing.assert_close(grad.double(), want, atol=1e-6, rtol=0)


def test_singleton_weight_is_refused_outside_its_estimator() -> None:
    with pytest.raises(ValueError, match=r"^singleton_weight must be in \[0, 1\], got 1.5$"):
        check_singleton_weight(1.5, temperature=1.0, weights="empirical")
    with pytest.raises(ValueError) as e:
        check_singleton_weight(0.5, temperature=2.0, weights="empirical")
    assert str(e.value) == (
        "singleton_weight 0.5 shrinks the empirical estimator at temperature 1, not "
        "'empirical' weights at temperature 2.0; use singleton_weight: 1, or "
        "sample_weights: empirical and temperature: 1"
    )
    with pytest.raises(ValueError, match="not 'inclusion' weights at temperature 1.0"):
        z = logits(35)
        ids = torch.zeros(B, T, 4, dtype=torch.long)
        sampled_kd(z, ids, torch.zeros(B, T, 4), weights="inclusion", singleton_weight=0.5)
    check_singleton_weight(1.0, temperature=2.0, weights="inclusion")  # the unbiased default
