import math

import pytest
import torch
import torch.nn.functional as F

from kdflow.losses import kd_loss, soft_target_loss, teacher_kl, top1_agreement


def hand_kd(s, t, y, T, w):
    """Hinton et al.'s loss written out per sample in float64, no kl_div."""
    s, t = s.double(), t.double()
    total = 0.0
    for i in range(len(y)):
        ps = torch.softmax(s[i] / T, 0)
        pt = torch.softmax(t[i] / T, 0)
        kl = float((pt * (pt.log() - ps.log())).sum())
        ce = -float(torch.log_softmax(s[i], 0)[y[i]])
        total += (1 - w) * ce + w * T * T * kl
    return total / len(y)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(16, 10, generator=g) * 3
    t = torch.randn(16, 10, generator=g) * 3
    y = torch.randint(0, 10, (16,), generator=g)
    return s, t, y


@pytest.mark.parametrize("T,w", [(1.0, 0.5), (2.0, 0.25), (4.0, 0.9), (0.5, 1.0)])
def test_kd_loss_matches_formula_by_hand(batch, T, w):
    s, t, y = batch
    assert kd_loss(s, t, y, T, w).item() == pytest.approx(hand_kd(s, t, y, T, w), rel=1e-5)


def test_soft_term_is_scaled_by_t_squared(batch):
    s, t, _ = batch
    for T in (1.0, 2.0, 5.0):
        kl = F.kl_div(F.log_softmax(s / T, 1), F.softmax(t / T, 1), reduction="sum") / len(s)
        assert soft_target_loss(s, t, T).item() == pytest.approx(T * T * kl.item(), rel=1e-5)


def test_kl_is_averaged_per_sample_not_per_element(batch):
    s, t, _ = batch
    # What reduction="mean" computes: the sum over batch *and* classes.
    per_element = F.kl_div(F.log_softmax(s, 1), F.softmax(t, 1), reduction="sum") / s.numel()
    assert soft_target_loss(s, t, 1.0).item() == pytest.approx(10 * per_element.item(), rel=1e-5)


def test_soft_term_vanishes_when_student_equals_teacher(batch):
    s, _, y = batch
    assert soft_target_loss(s, s.clone(), 2.0).item() == pytest.approx(0.0, abs=1e-6)
    ce = F.cross_entropy(s, y).item()
    assert kd_loss(s, s.clone(), y, 2.0, 0.25).item() == pytest.approx(0.75 * ce, rel=1e-6)


def test_zero_soft_weight_is_exactly_cross_entropy(batch):
    s, t, y = batch
    assert torch.equal(kd_loss(s, t, y, 2.0, 0.0), F.cross_entropy(s, y))


def test_gradient_scale_is_independent_of_temperature(batch):
    """With the T^2 factor the soft term's gradient stays O(1) as T grows."""
    s, t, _ = batch
    norms = []
    for T in (4.0, 8.0):
        x = s.clone().requires_grad_()
        soft_target_loss(x, t, T).backward()
        norms.append(x.grad.norm().item())
    assert norms[1] / norms[0] == pytest.approx(1.0, abs=0.25)


def test_fidelity_measures(batch):
    s, t, _ = batch
    assert top1_agreement(s, s) == 1.0
    assert 0.0 <= top1_agreement(s, t) < 1.0
    assert teacher_kl(s, t).item() > 0
    assert math.isclose(teacher_kl(t, t).item(), 0.0, abs_tol=1e-6)
