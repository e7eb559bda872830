"""Optimizer and learning-rate schedule from a training section of the config."""

from __future__ import annotations

from typing import Optional

import torch


def make_optimizer(params, lr: float, cfg: Optional[dict] = None):
    """Adam (the tutorial) or SGD with momentum, and the optional step
    schedule (MultiStepLR, stepped once per epoch); cfg is a training section
    of the config."""
    cfg = cfg or {}
    wd = cfg.get("weight_decay", 0.0)
    if cfg.get("optimizer", "adam") == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=cfg.get("momentum", 0.9),
                              weight_decay=wd)
    else:
        opt = torch.optim.Adam(params, lr=lr, weight_decay=wd)
    milestones = sorted(cfg.get("lr_milestones") or [])
    sched = (torch.optim.lr_scheduler.MultiStepLR(opt, milestones, cfg.get("lr_gamma", 0.1))
             if milestones else None)
    return opt, sched
