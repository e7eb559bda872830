"""Inference: a model's logits (and features) for uint8 images, batched.

Used by training (validation every epoch, the teacher's logits), evaluation
and the export's PyTorch reference, so all of them score a model the same
way.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from kdflow.core.device import autocast
from kdflow.data.arrays import Normalizer

EVAL_BATCH = 1000


def features_and_logits(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every kdflow model is `classify(features(x))`; feature-based losses
    need both, from one forward pass."""
    f = model.features(x)
    return f, model.classify(f)


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, normalize: Normalizer,
                   batch_size: int = EVAL_BATCH,
                   amp_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Logits (float32) for uint8 images `x`, in eval mode without gradients."""
    was_training = model.training
    model.eval()
    with autocast(x.device, amp_dtype):
        out = [model(normalize(x[i:i + batch_size])).float()
               for i in range(0, len(x), batch_size)]
    model.train(was_training)
    if not out:
        return torch.empty(0, 0, device=x.device)
    return torch.cat(out)
