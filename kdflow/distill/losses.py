"""Distillation losses, one plain function each.

Hinton, Vinyals & Dean (2015), "Distilling the knowledge in a neural network"
(arXiv:1503.02531):

    loss = c * CE(y, s) + w * T^2 * KL(softmax(t / T) || softmax(s / T))

with student logits s, teacher logits t, temperature T, soft-target weight w
and label-loss weight c, by default c = 1 - w (PyTorch's tutorial: w = 0.25,
c = 0.75, T = 2; in the α notation α = 1 - w). Recipes that do not mix the
two convexly give c of its own (kd.ce_weight): logit standardization's
CIFAR-100 recipe is c = 0.1, w = 9, T = 2 (Sun et al. 2024).

- KL is averaged per *sample* (`reduction="batchmean"`); `"mean"` would also
  divide by the number of classes and silently shrink the soft term.
- The T^2 factor keeps the soft term's gradient scale independent of T
  (its gradients scale as 1/T^2).

Further below: logit standardization (Sun et al. 2024), feature losses from
PyTorch's KD tutorial (cosine between hidden representations; FitNets hint
with a regressor, Romero et al. 2015), Decoupled KD (Zhao et al. 2022) and
DIST (Huang et al. 2022). All cast to float32, since training may
run under bf16 autocast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Step:
    """What a loss sees in one training step."""

    logits: torch.Tensor                              # the student's
    targets: torch.Tensor
    epoch: int                                        # 1-based (DKD's warm-up)
    teacher_logits: Optional[torch.Tensor] = None
    features: Optional[torch.Tensor] = None           # the student's last feature map
    teacher_features: Optional[torch.Tensor] = None


# loss(step) -> scalar loss
LossFn = Callable[[Step], torch.Tensor]


def soft_target_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """T^2 * KL(teacher_T || student_T), averaged over the batch."""
    t = float(temperature)
    log_p_student = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * (t * t)


def standardize_logits(logits: torch.Tensor) -> torch.Tensor:
    """Each sample's logits z-scored: (z - mean(z)) / (1e-7 + std(z)).

    Logit standardization, Sun, Zhu, Liu, Cao & Ren (2024), "Logit
    Standardization in Knowledge Distillation", CVPR (the authors' code:
    std unbiased, as torch's default, and 1e-7 added to it). Applied to
    teacher and student alike before the temperature softmax, it lets the
    student match the *shape* of the teacher's logits without having to
    match their range, which a small student often cannot: the temperature
    then acts on a unit scale for both.
    """
    z = logits.float()
    return (z - z.mean(dim=1, keepdim=True)) / (1e-7 + z.std(dim=1, keepdim=True))


def label_weight(soft_target_weight: float, ce_weight: Optional[float]) -> float:
    """The label loss's weight c: `ce_weight`, or 1 - w when it is None
    (the convex mix of Hinton et al. and the tutorial; kd.ce_weight)."""
    return 1.0 - soft_target_weight if ce_weight is None else float(ce_weight)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    soft_target_weight: float,
    *,
    standardize: bool = False,
    ce_weight: Optional[float] = None,
) -> torch.Tensor:
    """Hinton et al.'s loss: c * label CE plus w * the T^2-scaled soft-target KL,
    c = :func:`label_weight` (1 - w unless `ce_weight` is given).

    With `standardize`, both logits are z-scored per sample before the
    temperature softmax (:func:`standardize_logits`; Sun et al. 2024); the
    label CE keeps the raw student logits, as in the authors' code.
    """
    c = label_weight(soft_target_weight, ce_weight)
    ce = F.cross_entropy(student_logits, targets)
    if soft_target_weight == 0:
        # Exactly c * cross-entropy: no teacher term, not even 0 * KL.
        return c * ce
    if standardize:
        student_logits = standardize_logits(student_logits)
        teacher_logits = standardize_logits(teacher_logits)
    soft = soft_target_loss(student_logits, teacher_logits, temperature)
    return c * ce + soft_target_weight * soft


def teacher_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean KL(teacher || student) of the predictive distributions (T = 1).

    A fidelity measure (Stanton et al. 2021): 0 when the student reproduces
    the teacher's predictions exactly.
    """
    return soft_target_loss(student_logits, teacher_logits, 1.0)


def top1_agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> float:
    """Share of samples on which student and teacher predict the same class."""
    same = student_logits.argmax(dim=1) == teacher_logits.argmax(dim=1)
    return same.float().mean().item()


# --------------------------------------------------------------------------
# Feature-based losses (PyTorch knowledge-distillation tutorial, FitNets)
# --------------------------------------------------------------------------


# Pooling, here and in the hint loss, avoids F.adaptive_avg_pool1d/2d: their
# CUDA backward has no deterministic kernel (torch.use_deterministic_algorithms
# raises on it), which made `engine.deterministic: true` crash the cosine and
# hint methods on the first backward pass. Sizes that divide (every pair of
# kdflow's models) use avg_pool with kernel = stride = the ratio; other sizes
# average the same adaptive windows with a matrix product. Both have
# deterministic CUDA kernels and give adaptive pooling's values.


def _pool_matrix(size_in: int, size_out: int, like: torch.Tensor) -> torch.Tensor:
    """(size_in, size_out) matrix whose column i averages adaptive window i,
    [floor(i * L / n), ceil((i + 1) * L / n)), as ``F.adaptive_avg_pool1d``."""
    i = torch.arange(size_out, device=like.device)
    start, end = (i * size_in) // size_out, -((-(i + 1) * size_in) // size_out)
    j = torch.arange(size_in, device=like.device).unsqueeze(1)
    inside = (j >= start) & (j < end)
    return inside.to(like.dtype) / (end - start).to(like.dtype)


def _pool1d(x: torch.Tensor, size: int) -> torch.Tensor:
    """Average-pool (N, L) to (N, size) over adaptive windows (size <= L)."""
    length = x.shape[1]
    if length % size == 0:
        k = length // size
        return F.avg_pool1d(x.unsqueeze(1), k, k).squeeze(1)
    # The windows repeat every L/g inputs and n/g outputs (g = gcd): one small
    # (L/g, n/g) matrix applied to each of the g blocks.
    g = math.gcd(length, size)
    m = _pool_matrix(length // g, size // g, x)
    return (x.reshape(len(x), g, length // g) @ m).reshape(len(x), size)


def _pool2d(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Average-pool (..., H, W) to (..., h, w) over adaptive windows (h <= H, w <= W)."""
    (big_h, big_w), (h, w) = tuple(x.shape[-2:]), tuple(hw)
    if (big_h, big_w) == (h, w):
        return x
    if big_h % h == 0 and big_w % w == 0:
        kernel = (big_h // h, big_w // w)
        return F.avg_pool2d(x, kernel, kernel)
    # Adaptive 2-d windows are products of 1-d ones: pool W, then H.
    if big_w != w:
        x = x @ _pool_matrix(big_w, w, x)
    if big_h != h:
        x = _pool_matrix(big_h, h, x).T @ x
    return x


def match_vectors(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten two batches of features to (N, D) and pool the longer to the shorter D.

    Average pooling is the tutorial's ``avg_pool1d(x, 2)`` when D halves
    (2048 -> 1024), ``avg_pool1d(x, k)`` when D divides by k; for sizes that
    do not divide it averages ``F.adaptive_avg_pool1d``'s (possibly
    overlapping) windows instead (see :func:`_pool1d`).
    """
    a, b = torch.flatten(a, 1).float(), torch.flatten(b, 1).float()
    if a.shape[1] > b.shape[1]:
        a = _pool1d(a, b.shape[1])
    elif b.shape[1] > a.shape[1]:
        b = _pool1d(b, a.shape[1])
    return a, b


def cosine_loss(
    student_features: torch.Tensor,
    teacher_features: torch.Tensor,
    student_logits: torch.Tensor,
    targets: torch.Tensor,
    soft_target_weight: float,
    *,
    ce_weight: Optional[float] = None,
) -> torch.Tensor:
    """Label CE plus a cosine loss between flattened hidden representations.

        loss = c * CE(y, s) + w * mean_i(1 - cos(h_s_i, h_t_i)),  c = 1 - w by default

    PyTorch's knowledge-distillation tutorial ("ModifiedDeepNNCosine" /
    "ModifiedLightNNCosine", ``nn.CosineEmbeddingLoss`` with target 1):
    hidden_rep_loss_weight 0.25, ce_loss_weight 0.75, i.e. w = 0.25. The
    feature vectors are matched in size by :func:`match_vectors`. Teacher
    features are expected to come from ``torch.no_grad()``.
    """
    w = soft_target_weight
    c = label_weight(w, ce_weight)
    ce = F.cross_entropy(student_logits.float(), targets)
    if w == 0:
        return c * ce  # exactly c * CE, as in kd_loss
    h_s, h_t = match_vectors(student_features, teacher_features)
    hidden = (1.0 - F.cosine_similarity(h_s, h_t, dim=1)).mean()
    return c * ce + w * hidden


def _common_hw(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    return min(a[0], b[0]), min(a[1], b[1])


class HintRegressor(nn.Module):
    """FitNets regressor (Romero et al. 2015, "FitNets: Hints for thin deep nets").

    One ``Conv2d(c_s, c_t, 3, padding=1)`` mapping the student's feature map
    to the teacher's channel count, as the tutorial's "ModifiedLightNNRegressor"
    (16 -> 32 channels). It is trained together with the student and dropped
    after training: it is not part of the deployed student.
    """

    def __init__(self, student_channels: int, teacher_channels: int,
                 generator: torch.Generator | None = None):
        super().__init__()
        # Built without weights, then initialised as nn.Conv2d would be but
        # from `generator`: building a method must not draw from (or reseed)
        # torch's global generators, which also drive the student's dropout.
        self.conv = nn.Conv2d(student_channels, teacher_channels, kernel_size=3, padding=1,
                              device="meta").to_empty(device="cpu")
        fan_in = student_channels * 3 * 3
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.conv.weight, a=math.sqrt(5), generator=generator)
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.conv.bias, -bound, bound, generator=generator)

    def forward(
        self, student_map: torch.Tensor, teacher_hw: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Regress; average-pool down in any dimension larger than ``teacher_hw``.

        Never upsamples: where the student map is the smaller one,
        :func:`hint_loss` pools the teacher's map down instead.
        """
        out = self.conv(student_map)
        if teacher_hw is not None:
            out = _pool2d(out, _common_hw(tuple(out.shape[-2:]), tuple(teacher_hw)))
        return out


def hint_loss(
    regressed_student: torch.Tensor,
    teacher_features: torch.Tensor,
    student_logits: torch.Tensor,
    targets: torch.Tensor,
    soft_target_weight: float,
    *,
    ce_weight: Optional[float] = None,
) -> torch.Tensor:
    """Label CE plus the FitNets hint: MSE between regressed student and teacher maps.

        loss = c * CE(y, s) + w * mean((r(h_s) - h_t)^2),  c = 1 - w by default

    Romero et al. 2015; the tutorial's feature_map_weight 0.25 and
    ce_loss_weight 0.75 are w = 0.25. The MSE averages over all elements
    (``nn.MSELoss``). If the maps' spatial sizes still differ (the student's
    was smaller than the teacher's in some dimension), the teacher's map is
    average-pooled down to the common size: pooling never invents detail,
    upsampling the student would.
    """
    w = soft_target_weight
    c = label_weight(w, ce_weight)
    ce = F.cross_entropy(student_logits.float(), targets)
    if w == 0:
        return c * ce
    r, t = regressed_student.float(), teacher_features.float()
    hw = _common_hw(tuple(r.shape[-2:]), tuple(t.shape[-2:]))
    r, t = _pool2d(r, hw), _pool2d(t, hw)
    return c * ce + w * F.mse_loss(r, t)


# --------------------------------------------------------------------------
# Decoupled KD (Zhao et al. 2022)
# --------------------------------------------------------------------------


def dkd_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(TCKD, NCKD) of Decoupled KD, each T^2-scaled and averaged over the batch.

    TCKD = T^2 * KL(b_t || b_s), b = [p_gt, 1 - p_gt] of softmax(z / T);
    NCKD = T^2 * KL(p^_t || p^_s), p^ = softmax over the non-target classes.

    Computed in log space: log p_gt from log_softmax and
    log(1 - p_gt) = logsumexp(non-target z / T) - logsumexp(z / T), so neither
    log(0) nor 1 - p_gt cancellation occurs for confident logits. The
    non-target logits are gathered into (N, C - 1) instead of being masked
    with mdistiller's "- 1000 * gt_mask", which stops excluding the target
    once logits / T exceed ~1000 and would put -inf (hence NaN) into the KL
    if -inf were used. Needs C >= 2.
    """
    t = float(temperature)
    zs, zt = student_logits.float() / t, teacher_logits.float() / t
    n, c = zs.shape
    gt = F.one_hot(targets.reshape(-1), c).bool()
    # Boolean indexing keeps row-major order, so each row keeps its C - 1 others.
    zs_other, zt_other = zs[~gt].view(n, c - 1), zt[~gt].view(n, c - 1)

    def binary_log_probs(z: torch.Tensor, z_other: torch.Tensor) -> torch.Tensor:
        lse = torch.logsumexp(z, dim=1)
        log_gt = z[gt] - lse
        log_other = torch.logsumexp(z_other, dim=1) - lse
        return torch.stack([log_gt, log_other], dim=1)

    def kl(log_p_student: torch.Tensor, log_p_teacher: torch.Tensor) -> torch.Tensor:
        # exp(log_t) * (log_t - log_s): finite logs, so an underflowed teacher
        # probability gives 0 * finite = 0, not NaN, forward and backward.
        return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)

    tckd = kl(binary_log_probs(zs, zs_other), binary_log_probs(zt, zt_other))
    nckd = kl(F.log_softmax(zs_other, dim=1), F.log_softmax(zt_other, dim=1))
    return tckd * (t * t), nckd * (t * t)


def dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    alpha: float,
    beta: float,
) -> torch.Tensor:
    """Decoupled KD: alpha * TCKD + beta * NCKD (see :func:`dkd_terms`).

    Zhao, Cui, Song, Qiu & Liang (2022), "Decoupled Knowledge Distillation",
    CVPR, arXiv:2203.08679; matches mdistiller's ``dkd_loss``
    (mdistiller/distillers/DKD.py) wherever its -1000 mask suffices.
    """
    tckd, nckd = dkd_terms(student_logits, teacher_logits, targets, temperature)
    return alpha * tckd + beta * nckd


def dkd_warmup(epoch: int, warmup_epochs: int) -> float:
    """DKD's linear warm-up factor min(epoch / warmup_epochs, 1); epoch is 1-based.

    warmup_epochs <= 0 means no warm-up (factor 1).
    """
    if warmup_epochs <= 0:
        return 1.0
    return min(epoch / warmup_epochs, 1.0)


def dkd_total_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    alpha: float,
    beta: float,
    warmup_factor: float,
    ce_weight: float = 1.0,
    *,
    standardize: bool = False,
) -> torch.Tensor:
    """ce_weight * CE + warmup_factor * dkd_loss, as mdistiller's DKD distiller.

    The authors' CIFAR-100 values (mdistiller's configs): CE weight 1.0,
    alpha 1.0, beta 8.0 (6.0 for wrn_40_2 -> wrn_16_2), T 4.0, warm-up 20
    epochs (warmup_factor = dkd_warmup(epoch, 20)). kdflow's config takes
    alpha, beta and the warm-up as theirs (kd.dkd.*), but T is the shared
    kd.temperature, whose default is the tutorial's 2.0: their recipe needs
    kd.temperature 4. The CE weight is always theirs, 1. With `standardize`
    the DKD terms see z-scored logits (Sun et al. 2024's DKD + LS, whose
    README runs it with alpha and beta times 9 at T = 2); the label CE keeps
    the raw ones.
    """
    ce = F.cross_entropy(student_logits.float(), targets)
    if standardize:
        student_logits = standardize_logits(student_logits)
        teacher_logits = standardize_logits(teacher_logits)
    dkd = dkd_loss(student_logits, teacher_logits, targets, temperature, alpha, beta)
    return ce_weight * ce + warmup_factor * dkd


# --------------------------------------------------------------------------
# DIST (Huang et al. 2022)
# --------------------------------------------------------------------------


def _pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of each row of `a` with the same row of `b`
    (centred cosine; eps as the authors' code keeps a constant row finite)."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    beta: float,
    gamma: float,
) -> torch.Tensor:
    """DIST: match the teacher's relations, not its exact probabilities.

    Huang, You, Wang, Qian & Xu (2022), "Knowledge Distillation from A
    Stronger Teacher", NeurIPS (arXiv:2205.10536). With p = softmax(z / T)
    for student and teacher, (N, C) matrices:

        inter = 1 - mean over samples i of pearson(p_s[i, :], p_t[i, :])
        intra = 1 - mean over classes j of pearson(p_s[:, j], p_t[:, j])
        loss  = beta * T^2 * inter + gamma * T^2 * intra

    The inter-class term asks each sample's class ranking to correlate with
    the teacher's (invariant to shift and scale, so a stronger teacher's
    sharper outputs need not be copied exactly); the intra-class term asks
    each class's scores across the batch to correlate. Paper: beta = gamma
    = 1, T = 1 (ImageNet). On CIFAR-100 the authors' config
    (dist_cifar.yaml) trains CE + 2 * DIST(beta 1, gamma 1, tau 4): here
    beta = gamma = 2, T = 4.
    """
    t = float(temperature)
    p_s = F.softmax(student_logits.float() / t, dim=1)
    p_t = F.softmax(teacher_logits.float() / t, dim=1)
    inter = 1.0 - _pearson_rows(p_s, p_t).mean()
    intra = 1.0 - _pearson_rows(p_s.T, p_t.T).mean()
    return (t * t) * (beta * inter + gamma * intra)


def dist_total_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    beta: float,
    gamma: float,
) -> torch.Tensor:
    """CE + DIST, the label loss at weight 1 as in the authors' training."""
    ce = F.cross_entropy(student_logits.float(), targets)
    return ce + dist_loss(student_logits, teacher_logits, temperature, beta, gamma)
