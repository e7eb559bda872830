import math

import pytest
import torch
import torch.nn.functional as F

from torch import nn

from kdflow.distill.losses import (
    HintRegressor,
    cosine_loss,
    dist_loss,
    dist_total_loss,
    dkd_total_loss,
    hint_loss,
    kd_loss,
    match_vectors,
    soft_target_loss,
    standardize_logits,
    teacher_kl,
    top1_agreement,
)
from tests.helpers.losses import hand_ce, rows


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


# --------------------------------------------------------------------------
# Hand references: plain Python floats (float64), loops, math.exp / math.log.
# (rows, lse and hand_ce, which tests/test_dkd.py uses too: tests.helpers.losses)
# --------------------------------------------------------------------------


def hand_adaptive_pool(v, n):
    """Adaptive average pooling's windows: [floor(i*L/n), ceil((i+1)*L/n))."""
    L = len(v)
    out = []
    for i in range(n):
        a, b = (i * L) // n, -((-(i + 1) * L) // n)
        out.append(sum(v[a:b]) / (b - a))
    return out


def hand_cos_term(hs, ht):
    total = 0.0
    for a, b in zip(rows(hs), rows(ht)):
        if len(a) > len(b):
            a = hand_adaptive_pool(a, len(b))
        elif len(b) > len(a):
            b = hand_adaptive_pool(b, len(a))
        dot = sum(x * z for x, z in zip(a, b))
        na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(z * z for z in b))
        total += 1 - dot / (na * nb)
    return total / len(hs)


def hand_block_mean(m, h, w):
    """Average-pool a (C, H, W) nested list by integer factors to (C, h, w)."""
    fh, fw = len(m[0]) // h, len(m[0][0]) // w
    return [
        [
            [
                sum(ch[i * fh + a][j * fw + b] for a in range(fh) for b in range(fw)) / (fh * fw)
                for j in range(w)
            ]
            for i in range(h)
        ]
        for ch in m
    ]


def hand_mse(r, t):
    r, t = r.double().tolist(), t.double().tolist()

    def leaves(x):
        return [v for e in x for v in leaves(e)] if isinstance(x, list) else [x]

    a, b = leaves(r), leaves(t)
    return sum((x - z) ** 2 for x, z in zip(a, b)) / len(a)


# --------------------------------------------------------------------------
# Cosine loss (PyTorch KD tutorial)
# --------------------------------------------------------------------------


@pytest.fixture
def features():
    g = torch.Generator().manual_seed(1)
    hs = torch.randn(6, 4, 2, 2, generator=g)  # 16-d
    ht = torch.randn(6, 8, 2, 2, generator=g)  # 32-d
    s = torch.randn(6, 5, generator=g) * 2
    y = torch.randint(0, 5, (6,), generator=g)
    return hs, ht, s, y


@pytest.mark.parametrize("w", [0.25, 0.5, 1.0])
def test_cosine_loss_matches_hand_value(features, w):
    hs, ht, s, y = features
    want = (1 - w) * hand_ce(s, y) + w * hand_cos_term(hs, ht)
    assert cosine_loss(hs, ht, s, y, w).item() == pytest.approx(want, rel=1e-5)


def test_cosine_tiny_batch_by_hand():
    hs = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    ht = torch.tensor([[0.0, 2.0, 4.0, 0.0], [1.0, 1.0, -1.0, -1.0]])  # pooled: [1, 2], [1, -1]
    s = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    y = torch.tensor([0, 2])
    cos = [1 / math.sqrt(5), 0.0]
    ce = [
        math.log(math.exp(2) + 1 + math.exp(-1)) - 2,
        math.log(2 * math.exp(0.5) + 1) - 0,
    ]
    want = 0.75 * sum(ce) / 2 + 0.25 * sum(1 - c for c in cos) / 2
    assert cosine_loss(hs, ht, s, y, 0.25).item() == pytest.approx(want, rel=1e-6)


def test_cosine_non_divisible_sizes_pool_adaptively(features):
    g = torch.Generator().manual_seed(2)
    hs, ht = torch.randn(3, 7, generator=g), torch.randn(3, 10, generator=g)
    _, _, s, y = features
    want = 0.5 * hand_ce(s[:3], y[:3]) + 0.5 * hand_cos_term(hs, ht)
    assert cosine_loss(hs, ht, s[:3], y[:3], 0.5).item() == pytest.approx(want, rel=1e-5)
    # Pooling is symmetric in which side is larger.
    assert cosine_loss(ht, hs, s[:3], y[:3], 0.5).item() == pytest.approx(want, rel=1e-5)


def test_cosine_term_vanishes_for_equal_features(features):
    hs, _, s, y = features
    flat = torch.flatten(hs, 1)
    ht = flat.repeat_interleave(2, dim=1)  # pools back to exactly hs
    assert cosine_loss(hs, ht, s, y, 0.25).item() == pytest.approx(0.75 * hand_ce(s, y), rel=1e-6)
    assert cosine_loss(hs, hs.clone() * 3.0, s, y, 1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_cosine_pooling_is_the_tutorials_avg_pool1d():
    """Tutorial: teacher conv output 32x8x8 = 2048 -> avg_pool1d(., 2) -> 1024."""
    g = torch.Generator().manual_seed(3)
    student = torch.randn(4, 16, 8, 8, generator=g)
    teacher = torch.randn(4, 32, 8, 8, generator=g)
    a, b = match_vectors(student, teacher)
    assert a.shape == b.shape == (4, 1024)
    torch.testing.assert_close(b, F.avg_pool1d(torch.flatten(teacher, 1), 2))
    torch.testing.assert_close(a, torch.flatten(student, 1))
    # And the whole loss is the tutorial's 0.25 * CosineEmbeddingLoss + 0.75 * CE.
    s, y = torch.randn(4, 10, generator=g), torch.tensor([1, 2, 3, 4])
    tut = 0.25 * nn.CosineEmbeddingLoss()(a, b, torch.ones(4)) + 0.75 * F.cross_entropy(s, y)
    torch.testing.assert_close(cosine_loss(student, teacher, s, y, 0.25), tut)


def test_cosine_zero_weight_is_exactly_cross_entropy(features):
    hs, ht, s, y = features
    assert torch.equal(cosine_loss(hs, ht, s, y, 0.0), F.cross_entropy(s, y))


def test_cosine_bf16_inputs_give_float32_and_finite_grads(features):
    hs, ht, s, y = features
    hs = hs.bfloat16().requires_grad_()
    out = cosine_loss(hs, ht.bfloat16(), s.bfloat16(), y, 0.25)
    assert out.dtype == torch.float32
    out.backward()
    assert torch.isfinite(hs.grad).all() and hs.grad.abs().sum() > 0


# --------------------------------------------------------------------------
# FitNets hint
# --------------------------------------------------------------------------


def test_hint_regressor_shapes():
    reg = HintRegressor(16, 32)
    assert isinstance(reg.conv, nn.Conv2d)
    assert (reg.conv.kernel_size, reg.conv.padding) == ((3, 3), (1, 1))
    x = torch.randn(2, 16, 8, 8)
    assert reg(x).shape == (2, 32, 8, 8)
    assert reg(x, (8, 8)).shape == (2, 32, 8, 8)
    assert reg(x, (4, 4)).shape == (2, 32, 4, 4)
    assert reg(x, (16, 16)).shape == (2, 32, 8, 8)  # never upsamples
    assert reg(torch.randn(2, 16, 8, 4), (4, 8)).shape == (2, 32, 4, 4)


@pytest.mark.parametrize("w", [0.25, 0.6])
def test_hint_loss_matches_hand_value(w):
    g = torch.Generator().manual_seed(4)
    r, t = torch.randn(3, 4, 2, 3, generator=g), torch.randn(3, 4, 2, 3, generator=g)
    s, y = torch.randn(3, 5, generator=g), torch.tensor([0, 4, 2])
    want = (1 - w) * hand_ce(s, y) + w * hand_mse(r, t)
    assert hint_loss(r, t, s, y, w).item() == pytest.approx(want, rel=1e-5)
    assert torch.equal(hint_loss(r, t, s, y, 0.0), F.cross_entropy(s, y))


def test_hint_loss_is_the_tutorials_regressor_loss():
    torch.manual_seed(5)
    reg = HintRegressor(16, 32)
    x, t = torch.randn(4, 16, 8, 8), torch.randn(4, 32, 8, 8)
    s, y = torch.randn(4, 10), torch.tensor([0, 1, 2, 3])
    r = reg(x, t.shape[-2:])
    tut = 0.25 * nn.MSELoss()(r, t) + 0.75 * nn.CrossEntropyLoss()(s, y)
    torch.testing.assert_close(hint_loss(r, t, s, y, 0.25), tut)


def test_hint_gradients_reach_regressor_and_student_features():
    torch.manual_seed(6)
    reg = HintRegressor(16, 32)
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    t = torch.randn(2, 32, 8, 8)
    s = torch.randn(2, 10, requires_grad=True)
    hint_loss(reg(x, t.shape[-2:]), t, s, torch.tensor([3, 7]), 0.25).backward()
    for g in (reg.conv.weight.grad, reg.conv.bias.grad, x.grad, s.grad):
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


def test_hint_pools_the_larger_map_when_spatial_sizes_differ():
    torch.manual_seed(7)
    reg = HintRegressor(2, 3)
    y, s = torch.tensor([1, 0]), torch.randn(2, 4)
    # Student map larger (8x8) than the teacher's (4x4): the regressor pools.
    x, t = torch.randn(2, 2, 8, 8), torch.randn(2, 3, 4, 4)
    full = reg(x)
    r = reg(x, t.shape[-2:])
    want_r = [hand_block_mean(m, 4, 4) for m in full.double().tolist()]
    torch.testing.assert_close(r.double(), torch.tensor(want_r, dtype=torch.float64))
    assert hint_loss(r, t, s, y, 1.0).item() == pytest.approx(
        hand_mse(torch.tensor(want_r), t), rel=1e-5
    )
    # Student map smaller (4x4) than the teacher's (8x8): the loss pools the teacher.
    x, t = torch.randn(2, 2, 4, 4), torch.randn(2, 3, 8, 8)
    r = reg(x, t.shape[-2:])
    assert r.shape[-2:] == (4, 4)
    want_t = torch.tensor([hand_block_mean(m, 4, 4) for m in t.double().tolist()])
    assert hint_loss(r, t, s, y, 1.0).item() == pytest.approx(hand_mse(r, want_t), rel=1e-5)
    # Mixed: student 8x4, teacher 4x8 -> both end at 4x4.
    x, t = torch.randn(2, 2, 8, 4), torch.randn(2, 3, 4, 8)
    r = reg(x, t.shape[-2:])
    want_t = torch.tensor([hand_block_mean(m, 4, 4) for m in t.double().tolist()])
    assert hint_loss(r, t, s, y, 1.0).item() == pytest.approx(hand_mse(r, want_t), rel=1e-5)


# --------------------------------------------------------------------------
# Logit standardization (Sun et al. 2024), by hand
# --------------------------------------------------------------------------


def test_standardized_logits_by_hand():
    z = standardize_logits(torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 3.0]]))
    # mean 2, unbiased sd 1; mean 1, unbiased sd sqrt(3)
    r3 = math.sqrt(3)
    want = torch.tensor([[-1.0, 0.0, 1.0], [-1 / r3, -1 / r3, 2 / r3]])
    assert torch.allclose(z, want, atol=1e-6)


def test_logit_standardization_ignores_the_teachers_scale():
    """Teacher logits 2x the student's: plain KD still pushes the student to
    sharpen, KD with standardization sees identical shapes (soft term 0)."""
    s, t, y = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[0.0, 2.0, 4.0]]), torch.tensor([0])
    ce = F.cross_entropy(s, y).item()
    assert kd_loss(s, t, y, 2.0, 0.25, standardize=True).item() == pytest.approx(0.75 * ce,
                                                                                  abs=1e-6)
    assert kd_loss(s, t, y, 2.0, 0.25, standardize=False).item() > 0.75 * ce + 1e-3


def test_kd_with_standardization_by_hand():
    # z_s = [-1, -1, 2] / sqrt(3), z_t = [-1, 0, 1]; KL(softmax(z_t) || softmax(z_s))
    # = 0.0503709 at T = 1 (worked by hand: p_t = [.0900, .2447, .6652],
    # q_s = [.1307, .1307, .7387]).
    s, t, y = torch.tensor([[0.0, 0.0, 3.0]]), torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([2])
    ce = F.cross_entropy(s, y).item()
    got = kd_loss(s, t, y, 1.0, 0.5, standardize=True).item()
    assert got == pytest.approx(0.5 * ce + 0.5 * 0.0503709, abs=1e-6)


def test_dkd_with_standardization_uses_the_z_scores():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 10, generator=g) * 4, torch.randn(8, 10, generator=g) * 9
    y = torch.randint(0, 10, (8,), generator=g)
    ce = F.cross_entropy(s, y)
    on = dkd_total_loss(s, t, y, 2.0, 1.0, 8.0, 1.0, standardize=True)
    by_hand = dkd_total_loss(standardize_logits(s), standardize_logits(t), y, 2.0, 1.0, 8.0,
                             1.0) - F.cross_entropy(standardize_logits(s), y) + ce
    assert on.item() == pytest.approx(by_hand.item(), rel=1e-5)


# --------------------------------------------------------------------------
# DIST (Huang et al. 2022), by hand
# --------------------------------------------------------------------------


LN2 = math.log(2)
# softmax rows: student [1/4, 1/4, 1/2], [1/2, 1/4, 1/4];
#               teacher [1/5, 2/5, 2/5], [2/5, 2/5, 1/5]
DIST_S = torch.tensor([[0.0, 0.0, LN2], [LN2, 0.0, 0.0]])
DIST_T = torch.tensor([[0.0, LN2, LN2], [LN2, LN2, 0.0]])


def test_dist_by_hand():
    """Rows: centred [-1/12, -1/12, 1/6] . [-2/15, 1/15, 1/15] = 1/60 over
    norms 1/30, so each sample's correlation is 1/2: inter = 1/2. Columns:
    class 0 and 2 correlate perfectly (1), class 1 is constant (0 by the
    eps convention): intra = 1 - 2/3 = 1/3."""
    assert dist_loss(DIST_S, DIST_T, 1.0, 1.0, 0.0).item() == pytest.approx(0.5, rel=1e-5)
    assert dist_loss(DIST_S, DIST_T, 1.0, 0.0, 1.0).item() == pytest.approx(1 / 3, rel=1e-5)
    assert dist_loss(DIST_S, DIST_T, 1.0, 2.0, 3.0).item() == pytest.approx(2.0, rel=1e-5)
    # T^2 scaling: the same probabilities at T = 2 from doubled logits.
    assert dist_loss(2 * DIST_S, 2 * DIST_T, 2.0, 1.0, 1.0).item() == pytest.approx(
        4 * (0.5 + 1 / 3), rel=1e-5)
    y = torch.tensor([2, 0])
    assert dist_total_loss(DIST_S, DIST_T, y, 1.0, 1.0, 1.0).item() == pytest.approx(
        F.cross_entropy(DIST_S, y).item() + 0.5 + 1 / 3, rel=1e-5)


def test_dist_is_zero_for_a_shifted_and_scaled_copy_and_has_gradients():
    """Pearson correlation is invariant to shift and scale of the
    probabilities: a student matching the teacher's relations exactly has
    no DIST loss even where its probabilities differ (here p_s = p_t / 2 +
    1/6 per row, so each row still sums to 1, and per column too)."""
    p_t = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1], [0.25, 0.5, 0.25]])
    p_s = 0.5 * p_t + 0.5 / 3
    assert not torch.allclose(p_s, p_t)
    assert dist_loss(p_s.log(), p_t.log(), 1.0, 1.0, 1.0).item() == pytest.approx(0, abs=1e-6)
    # ...while KL, which asks for the very probabilities, is not zero.
    assert kd_loss(p_s.log(), p_t.log(), torch.tensor([0, 1, 2]), 1.0, 1.0).item() > 1e-3
    s = torch.randn(4, 10, requires_grad=True)
    dist_total_loss(s, torch.randn(4, 10), torch.tensor([0, 1, 2, 3]), 4.0, 1.0, 1.0).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
