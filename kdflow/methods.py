"""Distillation methods: what each needs from teacher and student, and its loss.

A method is configured by `kdflow.study.method_config` ({method, temperature
and/or weight, fixed parameters}); `build` turns that into what the engine
needs. The losses themselves are plain functions in kdflow.losses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from kdflow import KdflowError
from kdflow.engine import LossFn, Step
from kdflow.losses import cosine_loss, dkd_total_loss, dkd_warmup, hint_loss, kd_loss, HintRegressor

# Methods that learn from the teacher's logits only: the teacher's output can
# be computed once and looked up (without augmentation).
LOGIT_METHODS = ("kd", "dkd")
FEATURE_METHODS = ("cosine", "hint")


@dataclass
class Method:
    name: str
    loss: LossFn
    features: bool = False               # needs feature maps of student and teacher
    extra: Optional[nn.Module] = None    # trained with the student, then dropped


@torch.no_grad()
def _feature_shape(model: nn.Module, device) -> tuple[int, ...]:
    """(C, H, W) of a model's last feature map, from one 32x32 probe image."""
    was_training = model.training
    model.eval()
    shape = tuple(model.features(torch.zeros(1, 3, 32, 32, device=device)).shape[1:])
    model.train(was_training)
    return shape


def build(cfg: dict, student: nn.Module, teacher: nn.Module, device,
          generator: Optional[torch.Generator] = None) -> Method:
    """The Method of one distilled job (cfg from kdflow.study.method_config).

    A method's own modules draw their initial weights from `generator` only
    (kdflow.streams): building a method leaves torch's global random state,
    CPU and CUDA, untouched.
    """
    name = cfg["method"]
    if name == "kd":
        T, w = cfg["temperature"], cfg["soft_target_weight"]
        return Method(name, lambda s: kd_loss(s.logits, s.teacher_logits, s.targets, T, w))
    if name == "dkd":
        T, alpha, beta, warmup = cfg["temperature"], cfg["alpha"], cfg["beta"], \
            cfg["warmup_epochs"]
        return Method(name, lambda s: dkd_total_loss(
            s.logits, s.teacher_logits, s.targets, T, alpha, beta, dkd_warmup(s.epoch, warmup)))
    if name == "cosine":
        w = cfg["weight"]
        return Method(name, lambda s: cosine_loss(s.features, s.teacher_features, s.logits,
                                                  s.targets, w), features=True)
    if name == "hint":
        w = cfg["weight"]
        c_s, *_ = _feature_shape(student.to(device), device)
        c_t, h_t, w_t = _feature_shape(teacher, device)
        regressor = HintRegressor(c_s, c_t, generator=generator)

        def loss(s: Step) -> torch.Tensor:
            return hint_loss(regressor(s.features, (h_t, w_t)), s.teacher_features,
                             s.logits, s.targets, w)
        return Method(name, loss, features=True, extra=regressor)
    raise KdflowError(f"unknown distillation method {name!r}")
