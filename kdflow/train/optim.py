"""Optimizer and learning-rate schedule of a training configuration."""

from __future__ import annotations

from typing import Protocol, Sequence

import torch


class OptimizerSettings(Protocol):
    """The fields of a training configuration this module reads (the engine's
    TrainConfig has them); a protocol, so the engine imports this module and
    not the other way round."""

    optimizer: str
    lr: float
    momentum: float
    weight_decay: float
    lr_milestones: Sequence[int]
    lr_gamma: float


def make_optimizer(params, cfg: OptimizerSettings):
    """Adam (the tutorial) or SGD with momentum, and the step schedule
    (MultiStepLR, stepped once per epoch) when cfg has milestones. Every
    value comes from cfg: the defaults live in config/schema.yaml."""
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                              weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    milestones = sorted(cfg.lr_milestones)
    sched = (torch.optim.lr_scheduler.MultiStepLR(opt, milestones, cfg.lr_gamma)
             if milestones else None)
    return opt, sched
