"""Inference: a model's logits (and features) for uint8 images, in batches sized by memory.

Used by training (validation every epoch, the teacher's logits), evaluation,
the speed measurement and the export's references, so all of them score a
model the same way. A batch's activations grow with batch x image area, not
with the training batch size: 1,000 CIFAR images through the default teacher
are ~100 MB, 1,000 images of 224 px through a ResNet-18 ~7 GB. So the batch
is the largest that keeps one image's activation cost (measured on one
image, `image_cost`) times the batch within `INFERENCE_MEMORY`, at most
`MAX_BATCH`. Batching changes no logit beyond float rounding.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from kdflow.core.device import autocast
from kdflow.data.arrays import Normalizer
from kdflow.data.store import batches_of

# At most this many images per inference batch (small images and models
# reach it; more gains no speed on a CPU).
MAX_BATCH = 1000
# Bytes one inference batch's activations may take. With the model, the data
# and PyTorch itself a job stays within ~1-2 GB at any image size.
INFERENCE_MEMORY = 512 << 20
# A batch holds a layer's input and output at once, and a convolution's
# workspace (im2col, oneDNN's reorders) can be as large again.
WORKSPACE_FACTOR = 2


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


@torch.no_grad()
def image_cost(model: nn.Module, image_shape: tuple[int, ...],
               device: torch.device | str = "cpu") -> int:
    """Bytes of activations one image costs in inference: the largest
    input + output of any layer for one image (measured by one forward pass
    of a single image, in float32, with hooks on every leaf module), times
    WORKSPACE_FACTOR, plus the normalised input itself."""
    net = getattr(model, "_orig_mod", model)  # torch.compile's wrapper runs no hooks
    peak = 0

    def hook(module, inputs, output):
        nonlocal peak
        size = sum(t.numel() * 4 for t in _tensors(inputs) + _tensors(output))
        peak = max(peak, size)

    leaves = [m for m in net.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    was_training = net.training
    try:
        net.eval()
        net(torch.zeros(1, *image_shape, device=device))
    finally:
        for h in handles:
            h.remove()
        net.train(was_training)
    area = 4 * int(torch.tensor(image_shape).prod())
    return WORKSPACE_FACTOR * peak + area


def inference_batch(model: nn.Module, image_shape: tuple[int, ...],
                    device: torch.device | str = "cpu", *, budget: int = INFERENCE_MEMORY,
                    cap: int = MAX_BATCH) -> int:
    """The largest batch (at least 1, at most `cap`) whose activations fit `budget` bytes."""
    return max(1, min(cap, budget // max(1, image_cost(model, image_shape, device))))


def features_and_logits(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every kdflow model is `classify(features(x))`; feature-based losses
    need both, from one forward pass."""
    f = model.features(x)
    return f, model.classify(f)


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, normalize: Normalizer,
                   batch_size: Optional[int] = None,
                   amp_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Logits (float32) for uint8 images `x` (a tensor, or StoredImages read
    a batch ahead), in eval mode without gradients,
    `batch_size` images at a time (default: as many as memory allows,
    `inference_batch`)."""
    if batch_size is None:
        batch_size = inference_batch(model, tuple(x.shape[1:]), x.device) if len(x) else 1
    was_training = model.training
    model.eval()
    with autocast(x.device, amp_dtype):
        out = [model(normalize(xb)).float() for xb in batches_of(
            x, (slice(i, i + batch_size) for i in range(0, len(x), batch_size)))]
    model.train(was_training)
    if not out:
        return torch.empty(0, 0, device=x.device)
    return torch.cat(out)
