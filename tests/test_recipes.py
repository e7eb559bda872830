"""The authors' recipes as written: separate CE and KD weights (kd.ce_weight),
the presets' losses against the authors' formulas written out here, and the
report's published-versus-measured line."""

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml

from kdflow import KdflowError
from kdflow.distill import methods
from kdflow.study import planner
from kdflow.distill.losses import (Step, cosine_loss, hint_loss, kd_loss, soft_target_loss,
                                   standardize_logits)
from kdflow.workflow.config import validate
from tests.helpers.workflow import REPO, report_tables

PRESETS = REPO / "config" / "presets"


def logits(n=16, c=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(n, c, generator=g) * 3, torch.randn(n, c, generator=g) * 6 + 1
    return s, t, torch.randint(0, c, (n,), generator=g)


def preset_loss(preset: str, batch) -> torch.Tensor:
    """The loss a preset's one distilled setting trains with, built as a job builds it."""
    config = validate(yaml.safe_load((PRESETS / preset).read_text()))
    [(method, _, values)] = planner.settings(config)
    s, t, y = batch
    # Logit-only methods need nothing of the build context.
    loss = methods.build(method, values, None).loss
    return loss(Step(logits=s, targets=y, epoch=1, teacher_logits=t))


# ---------------------------------------------------------------------------
# The authors' formulas, written out from their code
# ---------------------------------------------------------------------------

def authors_ls_kd(s, t, y, temperature=2.0, ce_weight=0.1, kd_weight=9.0, unbiased=True):
    """logit-standardization-KD's KD distiller (mdistiller/distillers/KD.py) in
    float64: normalize() with torch's unbiased std plus 1e-7, then
    ce_weight * CE(raw logits) + kd_weight * T^2 * KL summed over classes,
    averaged over the batch."""
    s, t = s.double(), t.double()

    def normalize(z):
        return (z - z.mean(-1, keepdim=True)) / (1e-7 + z.std(-1, keepdim=True,
                                                             unbiased=unbiased))

    zs, zt = normalize(s) / temperature, normalize(t) / temperature
    log_q = zs - zs.logsumexp(1, keepdim=True)
    log_p = zt - zt.logsumexp(1, keepdim=True)
    kl = (log_p.exp() * (log_p - log_q)).sum(1).mean()
    ce = -(s - s.logsumexp(1, keepdim=True)).gather(1, y[:, None]).mean()
    return ce_weight * ce + kd_weight * temperature ** 2 * kl


def authors_dist(s, t, y, tau=4.0, beta=1.0, gamma=1.0, kd_loss_weight=2.0):
    """DIST_KD's CIFAR-100 loss (dist_cifar.yaml: ori_loss_weight 1,
    kd_loss_weight 2, kd dist_t4; lib/models/losses/dist_kd.py) in float64."""
    s, t = s.double(), t.double()
    ys, yt = (s / tau).softmax(1), (t / tau).softmax(1)

    def pearson(a, b, eps=1e-8):
        a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)

    inter = tau ** 2 * (1 - pearson(ys, yt).mean())
    intra = tau ** 2 * (1 - pearson(ys.T, yt.T).mean())
    ce = -(s - s.logsumexp(1, keepdim=True)).gather(1, y[:, None]).mean()
    return ce + kd_loss_weight * (beta * inter + gamma * intra)


@pytest.mark.parametrize("seed", [0, 1])
def test_ls_kd_preset_is_the_authors_loss(seed):
    batch = logits(seed=seed)
    got = preset_loss("ls_kd_cifar100_resnet32x4_resnet8x4.yaml", batch).item()
    assert got == pytest.approx(authors_ls_kd(*batch).item(), rel=1e-6)
    # The test tells the conventions apart: a biased std, or 1 - w for the
    # label weight, would be another loss.
    assert got != pytest.approx(authors_ls_kd(*batch, unbiased=False).item(), rel=1e-4)
    assert got != pytest.approx(authors_ls_kd(*batch, ce_weight=-8.0).item(), rel=1e-4)


@pytest.mark.parametrize("seed", [0, 1])
def test_dist_preset_is_the_authors_loss(seed):
    batch = logits(seed=seed)
    got = preset_loss("dist_cifar100_resnet32x4_resnet8x4.yaml", batch).item()
    assert got == pytest.approx(authors_dist(*batch).item(), rel=1e-6)
    assert got != pytest.approx(authors_dist(*batch, kd_loss_weight=1.0).item(), rel=1e-4)


# ---------------------------------------------------------------------------
# ce_weight: its default is the old loss, bit for bit
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("w", [0.0, 0.25, 0.9, 1.0])
@pytest.mark.parametrize("standardize", [False, True])
def test_kd_without_ce_weight_is_the_convex_mix_exactly(w, standardize):
    s, t, y = logits()
    ce = F.cross_entropy(s, y)
    if w == 0:
        old = ce
    else:
        zs, zt = (standardize_logits(s), standardize_logits(t)) if standardize else (s, t)
        old = (1.0 - w) * ce + w * soft_target_loss(zs, zt, 2.0)
    assert torch.equal(kd_loss(s, t, y, 2.0, w, standardize=standardize), old)
    assert torch.equal(kd_loss(s, t, y, 2.0, w, standardize=standardize, ce_weight=1.0 - w), old)


def test_feature_losses_without_ce_weight_are_the_convex_mix_exactly():
    g = torch.Generator().manual_seed(2)
    s, y = torch.randn(4, 10, generator=g), torch.tensor([0, 3, 5, 9])
    fs, ft = torch.randn(4, 16, 4, 4, generator=g), torch.randn(4, 16, 2, 2, generator=g)
    ce = F.cross_entropy(s, y)
    for loss in (cosine_loss, hint_loss):
        hidden = loss(fs, ft, s, y, 1.0, ce_weight=0.0)  # the feature term alone
        assert torch.equal(loss(fs, ft, s, y, 0.25), 0.75 * ce + 0.25 * hidden)
        assert torch.allclose(loss(fs, ft, s, y, 3.0, ce_weight=0.5), 0.5 * ce + 3.0 * hidden)
        assert torch.equal(loss(fs, ft, s, y, 0.0), ce)


def test_ce_weight_is_named_only_when_set_and_recorded_only_when_set():
    c = validate({"kd": {"method": ["kd", "dkd", "hint"], "ce_weight": [None, 0.1],
                         "soft_target_weight": [0.25, 0.5]}})
    assert [(m, s) for m, s, _ in planner.settings(c)] == [
        ("kd", "T2_w0.25"), ("kd", "T2_w0.25_ce0.1"), ("kd", "T2_w0.5"), ("kd", "T2_w0.5_ce0.1"),
        ("dkd", "T2"), ("hint", "w0.25"), ("hint", "w0.25_ce0.1"), ("hint", "w0.5"),
        ("hint", "w0.5_ce0.1")]
    plain = planner.lookup(c, "lightnn/kd/T2_w0.25")
    weighted = planner.lookup(c, "lightnn/kd/T2_w0.5_ce0.1")
    assert "ce_weight" not in plain.record()["values"]
    assert weighted.record()["values"]["ce_weight"] == 0.1
    assert planner.Arm.from_record(plain.record()).values == plain.values
    assert planner.label(weighted) == "KD (Hinton) T=2, w=0.5, ce=0.1"
    # A job given a record without the knob builds the default loss.
    s, t, y = logits()
    step = Step(logits=s, targets=y, epoch=1, teacher_logits=t)
    built = methods.build("kd", plain.record()["values"], None).loss(step)
    assert torch.equal(built, kd_loss(s, t, y, 2.0, 0.25))


@pytest.mark.parametrize("kd,says", [
    ({"soft_target_weight": 9}, "1 - w = -8; set kd.ce_weight"),
    ({"method": "hint", "soft_target_weight": [0.5, 1.5]}, "hint with kd.soft_target_weight 1.5"),
    ({"soft_target_weight": 0, "ce_weight": 0}, "has no loss at all"),
    ({"soft_target_weight": 101, "ce_weight": 0.1}, "greater than the maximum of 100"),
    ({"ce_weight": -0.1}, "kd.ce_weight: -0.1 is less than the minimum of 0"),
    ({"ce_weight": "heavy"}, "kd.ce_weight"),
])
def test_nonsense_weights_are_refused_clearly(kd, says):
    with pytest.raises(KdflowError, match="invalid config") as e:
        validate({"kd": kd})
    assert says in str(e.value)


def test_dkd_and_dist_ignore_the_soft_target_weight():
    # dkd and dist have no soft-target weight: w = 9 without ce_weight means nothing to them.
    c = validate({"kd": {"method": ["dkd", "dist"], "soft_target_weight": 9}})
    assert [s for _, s, _ in planner.settings(c)] == ["T2", "T2"]


# ---------------------------------------------------------------------------
# The report: published beside measured
# ---------------------------------------------------------------------------

def test_report_shows_published_beside_measured(workflow_run, tmp_path):
    from kdflow.analysis.report import render_report

    workdir, config = workflow_run
    summary = workdir / "results/summary"
    tables = report_tables(summary)
    published = validate({"report": {"published": {
        "student_kd": 76.62, "source": "Sun et al. 2024"}}})["report"]["published"]
    out = tmp_path / "report.html"
    render_report(tables, str(out), "t", validate(config), published=published)
    html = out.read_text()
    arms = pd.read_csv(summary / "arms.csv")
    kd = arms[(arms["role"] == "student_kd") & (arms["stage"] == "selection")]
    measured = f"{100 * kd['accuracy_mean'].iloc[0]:.2f}"
    line = html.split('id="published-student_kd">', 1)[1].split("</span>", 1)[0]
    assert line == f"published 76.62% vs measured {measured}%"
    assert 'id="published-teacher"' not in html and "Sun et al. 2024 (report.published)" in html
    # The shipped config publishes nothing: no line at all.
    plain = tmp_path / "plain.html"
    render_report(tables, str(plain), "t", validate(config),
                  published=validate(config)["report"]["published"])
    assert 'id="published-' not in plain.read_text()
