"""The classification KD loss: parity with a dense formula and with F.kl_div / F.cross_entropy,
the T^2 scaling, alpha = 0 / 1, batches without gold rows, one-hot teachers, finite gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.student.losses import classification_kd_loss

B, C = 6, 7


def rand(seed: int, shape=(B, C), scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).float() * scale


def teacher(seed: int) -> torch.Tensor:
    return torch.log_softmax(rand(seed), -1)  # (B, C) log-probabilities at T = 1


GOLD = torch.tensor([3, -1, 0, -1, -1, 6])


def dense(z, lp, gold, *, alpha, temperature):
    """Direct float64 formula: alpha * CE(gold rows) + (1 - alpha) * T^2 * KL(p_T || q_T)."""
    z, lp = z.double(), lp.double()
    p_t = torch.softmax(lp / temperature, -1)
    q_t = torch.softmax(z / temperature, -1)
    kl = (p_t * (p_t.log() - q_t.log())).sum(-1).mean()
    rows = [i for i in range(len(gold)) if gold[i] >= 0]
    q = torch.softmax(z, -1)
    ce = -sum(q[i, gold[i]].log() for i in rows) / len(rows) if rows else z.new_zeros(())
    return alpha * ce + (1 - alpha) * temperature**2 * kl, ce, kl


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
def test_matches_the_dense_formula_in_value_and_gradient(alpha, temperature):
    z0, lp = rand(0), teacher(1)
    z = z0.clone().requires_grad_(True)
    total, parts = classification_kd_loss(z, lp, GOLD, alpha=alpha, temperature=temperature)
    total.backward()
    zr = z0.double().clone().requires_grad_(True)
    ref, ce, kl = dense(zr, lp, GOLD, alpha=alpha, temperature=temperature)
    ref.backward()
    assert total.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    assert parts["ce"].item() == pytest.approx(ce.item(), rel=1e-5)
    if alpha < 1:
        assert parts["kd"].item() == pytest.approx(kl.item(), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(z.grad, zr.grad.float(), rtol=1e-4, atol=1e-6)
    assert parts["gold_rows"].item() == 3


def test_parts_match_torch_kl_div_and_cross_entropy():
    z, lp, T = rand(2), teacher(3), 3.0
    _, parts = classification_kd_loss(z, lp, GOLD, alpha=0.5, temperature=T)
    kl = F.kl_div(
        F.log_softmax(z / T, -1), F.log_softmax(lp / T, -1), log_target=True, reduction="batchmean"
    )
    ce = F.cross_entropy(z, GOLD, ignore_index=-1)
    assert parts["kd"].item() == pytest.approx(kl.item(), rel=1e-5)
    assert parts["ce"].item() == pytest.approx(ce.item(), rel=1e-6)


def test_kd_term_is_scaled_by_t_squared():
    z, lp = rand(4), teacher(5)
    for T in (1.0, 2.0, 5.0):
        total, parts = classification_kd_loss(z, lp, GOLD, alpha=0.0, temperature=T)
        assert total.item() == pytest.approx(T**2 * parts["kd"].item(), rel=1e-6)


def test_alpha_one_is_ce_only_and_needs_no_teacher():
    z = rand(6)
    total, parts = classification_kd_loss(z, None, GOLD, alpha=1.0, temperature=2.0)
    assert total.item() == pytest.approx(F.cross_entropy(z, GOLD, ignore_index=-1).item())
    assert parts["kd"].item() == 0.0
    with pytest.raises(ValueError, match="teacher_logprobs are needed"):
        classification_kd_loss(z, None, GOLD, alpha=0.5, temperature=2.0)


def test_alpha_zero_ignores_gold_labels():
    z, lp = rand(7), teacher(8)
    a, _ = classification_kd_loss(z, lp, GOLD, alpha=0.0, temperature=2.0)
    b, _ = classification_kd_loss(z, lp, torch.full((B,), -1), alpha=0.0, temperature=2.0)
    assert a.item() == b.item()


def test_a_batch_without_gold_rows_has_zero_ce_and_no_nan():
    z0, lp = rand(9), teacher(10)
    none = torch.full((B,), -1)
    z = z0.clone().requires_grad_(True)
    total, parts = classification_kd_loss(z, lp, none, alpha=0.5, temperature=2.0)
    total.backward()
    assert parts["ce"].item() == 0.0 and parts["gold_rows"].item() == 0
    # alpha is not renormalised: only the KD term, with its own weight, is left
    assert total.item() == pytest.approx(0.5 * 4.0 * parts["kd"].item(), rel=1e-6)
    assert torch.isfinite(z.grad).all()
    _, kd_only = classification_kd_loss(z0, lp, GOLD, alpha=0.0, temperature=2.0)
    assert parts["kd"].item() == pytest.approx(kd_only["kd"].item())
    total, parts = classification_kd_loss(z0, None, none, alpha=1.0, temperature=2.0)
    assert total.item() == 0.0 and not math.isnan(parts["ce"].item())


def test_one_hot_teacher_with_minus_inf_is_finite_and_equals_ce_at_t1():
    z0 = rand(11)
    gold = torch.tensor([0, 1, 2, 3, 4, 5])
    lp = torch.full((B, C), float("-inf"))
    lp[torch.arange(B), gold] = 0.0  # (B, C) a one-hot "teacher"
    z = z0.clone().requires_grad_(True)
    total, parts = classification_kd_loss(z, lp, torch.full((B,), -1), alpha=0.0, temperature=1.0)
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(z.grad).all()
    # KL(one-hot || q) = -log q(gold) = the CE on those labels
    assert total.item() == pytest.approx(F.cross_entropy(z0, gold).item(), rel=1e-5)
    z.grad = None
    total, _ = classification_kd_loss(z, lp, gold, alpha=0.3, temperature=3.0)
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(z.grad).all()


def test_zero_when_the_student_is_the_teacher_and_gradients_are_finite_for_extremes():
    lp = teacher(12)
    total, parts = classification_kd_loss(
        lp.clone(), lp, torch.full((B,), -1), alpha=0.0, temperature=2.0
    )
    assert abs(total.item()) < 1e-6
    z = (rand(13) * 1e3).requires_grad_(True)  # saturated softmax
    total, _ = classification_kd_loss(z, lp, GOLD, alpha=0.5, temperature=4.0)
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(z.grad).all()


def test_half_precision_inputs_compute_in_float32():
    z, lp = rand(14), teacher(15)
    full, _ = classification_kd_loss(z, lp, GOLD, alpha=0.5, temperature=2.0)
    half, _ = classification_kd_loss(z.bfloat16(), lp.bfloat16(), GOLD, alpha=0.5, temperature=2.0)
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(full.item(), rel=0.05)


@pytest.mark.parametrize(
    "kw,message",
    [
        ({"alpha": 1.5, "temperature": 1.0}, "alpha must be in"),
        ({"alpha": 0.5, "temperature": 0.0}, "temperature must be > 0"),
    ],
)
def test_bad_options_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        classification_kd_loss(rand(0), teacher(1), GOLD, **kw)
