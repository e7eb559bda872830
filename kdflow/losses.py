"""Distillation losses, one plain function each.

Hinton, Vinyals & Dean (2015), "Distilling the knowledge in a neural network"
(arXiv:1503.02531):

    loss = (1 - w) * CE(y, s) + w * T^2 * KL(softmax(t / T) || softmax(s / T))

with student logits s, teacher logits t, temperature T and soft-target weight
w (PyTorch's tutorial: w = 0.25, CE weight 0.75, T = 2). In the α notation,
α = 1 - w is the weight of the label loss.

- KL is averaged per *sample* (`reduction="batchmean"`); `"mean"` would also
  divide by the number of classes and silently shrink the soft term.
- The T^2 factor keeps the soft term's gradient scale independent of T
  (its gradients scale as 1/T^2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_target_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """T^2 * KL(teacher_T || student_T), averaged over the batch."""
    t = float(temperature)
    log_p_student = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * (t * t)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    soft_target_weight: float,
) -> torch.Tensor:
    """Hinton et al.'s loss: label CE plus the T^2-scaled soft-target KL."""
    ce = F.cross_entropy(student_logits, targets)
    if soft_target_weight == 0:
        # Exactly plain cross-entropy: no teacher term, not even 0 * KL.
        return ce
    soft = soft_target_loss(student_logits, teacher_logits, temperature)
    return (1.0 - soft_target_weight) * ce + soft_target_weight * soft


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
