"""Decoupled KD (Zhao et al. 2022) against values computed by hand."""

import math

import pytest
import torch
import torch.nn.functional as F

from kdflow.distill.losses import dkd_loss, dkd_terms, dkd_total_loss, dkd_warmup
from tests.helpers.losses import hand_ce, lse, rows


def hand_kl(log_pt, log_ps):
    return sum(math.exp(lt) * (lt - ls) for lt, ls in zip(log_pt, log_ps))


def hand_dkd_terms(s, t, y, T):
    """TCKD and NCKD per the paper, in log space so ±1e4 logits stay exact."""
    tckd = nckd = 0.0
    for zs, zt, c in zip(rows(s), rows(t), y):
        c = int(c)
        logs = {}
        for name, z in (("s", zs), ("t", zt)):
            z = [v / T for v in z]
            others = [v for j, v in enumerate(z) if j != c]
            total, rest = lse(z), lse(others)
            logs[name] = (
                [z[c] - total, rest - total],  # log b = log [p_gt, 1 - p_gt]
                [v - rest for v in others],  # log of the non-target softmax
            )
        tckd += hand_kl(logs["t"][0], logs["s"][0])
        nckd += hand_kl(logs["t"][1], logs["s"][1])
    n = len(y)
    return T * T * tckd / n, T * T * nckd / n


def mdistiller_dkd(s, t, y, alpha, beta, T):
    """mdistiller/distillers/DKD.py's dkd_loss, -1000 mask included (size_average=False = sum)."""
    gt = torch.zeros_like(s).scatter_(1, y.unsqueeze(1), 1).bool()
    ps, pt = F.softmax(s / T, 1), F.softmax(t / T, 1)
    cat = lambda p: torch.stack([(p * gt).sum(1), (p * ~gt).sum(1)], 1)  # noqa: E731
    tckd = F.kl_div(torch.log(cat(ps)), cat(pt), reduction="sum") * T**2 / len(y)
    pt2 = F.softmax(t / T - 1000.0 * gt, 1)
    lps2 = F.log_softmax(s / T - 1000.0 * gt, 1)
    nckd = F.kl_div(lps2, pt2, reduction="sum") * T**2 / len(y)
    return alpha * tckd + beta * nckd


# --------------------------------------------------------------------------
# Decoupled KD
# --------------------------------------------------------------------------


def test_dkd_terms_tiny_batch_by_hand():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = torch.tensor([[3.0, 0.0, 1.0], [2.0, 0.0, 1.5]])
    y = torch.tensor([0, 2])
    T = 2.0

    def kl2(p, q):  # KL([p, 1 - p] || [q, 1 - q])
        return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))

    # Written out directly with math.exp: 3 classes, so the non-target softmax
    # over the 2 remaining classes is itself a binary distribution.
    tc = nc = 0.0
    for zs, zt, c, (o1, o2) in ((s[0], t[0], 0, (1, 2)), (s[1], t[1], 2, (0, 1))):
        es = [math.exp(float(v) / T) for v in zs]
        et = [math.exp(float(v) / T) for v in zt]
        tc += kl2(et[c] / sum(et), es[c] / sum(es))
        nc += kl2(et[o1] / (et[o1] + et[o2]), es[o1] / (es[o1] + es[o2]))
    want_t, want_n = T * T * tc / 2, T * T * nc / 2

    tckd, nckd = dkd_terms(s, t, y, T)
    assert tckd.item() == pytest.approx(want_t, rel=1e-5)
    assert nckd.item() == pytest.approx(want_n, rel=1e-5)
    # The log-space hand reference used elsewhere agrees with the direct one.
    assert hand_dkd_terms(s, t, y, T) == pytest.approx((want_t, want_n), rel=1e-12)


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_dkd_terms_match_hand_values_on_random_batch(batch, T):
    s, t, y = batch
    tckd, nckd = dkd_terms(s, t, y, T)
    hand_t, hand_n = hand_dkd_terms(s, t, y, T)
    assert tckd.item() == pytest.approx(hand_t, rel=1e-5)
    assert nckd.item() == pytest.approx(hand_n, rel=1e-5)


@pytest.mark.parametrize("alpha,beta", [(1.0, 0.0), (0.0, 1.0), (1.0, 8.0), (0.5, 2.0)])
def test_dkd_loss_is_linear_in_alpha_beta(batch, alpha, beta):
    s, t, y = batch
    hand_t, hand_n = hand_dkd_terms(s, t, y, 4.0)
    got = dkd_loss(s, t, y, 4.0, alpha, beta).item()
    assert got == pytest.approx(alpha * hand_t + beta * hand_n, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("T,alpha,beta", [(4.0, 1.0, 8.0), (1.0, 2.0, 0.5), (2.0, 1.0, 1.0)])
def test_dkd_matches_mdistiller_reference(batch, T, alpha, beta):
    s, t, y = batch
    torch.testing.assert_close(
        dkd_loss(s, t, y, T, alpha, beta), mdistiller_dkd(s, t, y, alpha, beta, T)
    )
    s64, t64 = s.double(), t.double()
    assert dkd_loss(s, t, y, T, alpha, beta).item() == pytest.approx(
        mdistiller_dkd(s64, t64, y, alpha, beta, T).item(), rel=1e-5
    )


def test_dkd_vanishes_when_student_equals_teacher(batch):
    s, _, y = batch
    tckd, nckd = dkd_terms(s, s.clone(), y, 4.0)
    assert tckd.item() == pytest.approx(0.0, abs=1e-7)
    assert nckd.item() == pytest.approx(0.0, abs=1e-7)
    assert dkd_loss(s, s.clone(), y, 4.0, 1.0, 8.0).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dkd_has_no_nan_or_inf_with_extreme_logits(dtype):
    g = torch.Generator().manual_seed(8)
    sign = lambda: torch.randint(0, 2, (8, 10), generator=g).float() * 2 - 1  # noqa: E731
    s, t = sign() * 1e4, sign() * 1e4
    y = torch.randint(0, 10, (8,), generator=g)
    s[0, y[0]], t[0, y[0]] = 1e4, 1e4  # p_gt == 1 in float: naive log(1 - p_gt) = -inf
    s[0, :], s[0, y[0]] = -1e4, 1e4  # every non-target prob underflows to 0 for the student
    s[1, y[1]], t[1, y[1]] = -1e4, 1e4  # student sure it is not the target, teacher sure it is
    s = s.to(dtype).requires_grad_()
    t = t.to(dtype).requires_grad_()
    for T in (1.0, 4.0):
        loss = dkd_total_loss(s, t, y, T, 1.0, 8.0, 1.0)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        s.grad = t.grad = None
        loss.backward()
        assert torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()
        hand_t, hand_n = hand_dkd_terms(s.detach().float(), t.detach().float(), y, T)
        assert dkd_loss(s, t, y, T, 1.0, 8.0).item() == pytest.approx(
            hand_t + 8.0 * hand_n, rel=1e-4
        )


def test_dkd_excludes_the_target_even_beyond_mdistillers_mask():
    """With logits / T > 1000 mdistiller's "- 1000 * gt_mask" no longer masks."""
    s = torch.tensor([[5000.0, 0.0, 1.0]])
    t = torch.tensor([[5000.0, 1.0, 0.0]])
    y = torch.tensor([0])
    _, nckd = dkd_terms(s, t, y, 1.0)
    assert nckd.item() == pytest.approx(hand_dkd_terms(s, t, y, 1.0)[1], rel=1e-5)
    assert nckd.item() > 0.1  # the non-target distributions do differ


def test_dkd_warmup():
    assert [dkd_warmup(e, 20) for e in (1, 10, 20, 40)] == [0.05, 0.5, 1.0, 1.0]
    assert dkd_warmup(3, 0) == 1.0


@pytest.mark.parametrize("ce_weight,warm", [(1.0, 1.0), (1.0, 0.05), (0.5, 0.5), (2.0, 0.0)])
def test_dkd_total_loss_combination(batch, ce_weight, warm):
    s, t, y = batch
    hand_t, hand_n = hand_dkd_terms(s, t, y, 4.0)
    want = ce_weight * hand_ce(s, y) + warm * (1.0 * hand_t + 8.0 * hand_n)
    got = dkd_total_loss(s, t, y, 4.0, 1.0, 8.0, warm, ce_weight=ce_weight)
    assert got.item() == pytest.approx(want, rel=1e-5)
    if warm == 0.0:
        assert got.item() == pytest.approx(ce_weight * F.cross_entropy(s, y).item(), rel=1e-6)
