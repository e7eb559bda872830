"""Training augmentation, batched on the device (config section `augment`).

Each sample draws its own flip and crop from the job's augmentation stream
(kdflow.core.streams), so a batch's augmentation is reproducible whatever
else the job draws; the teacher sees the same augmented view as the student.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdflow.core.schema import fields_of


@dataclass(frozen=True)
class Augment:
    """crop: random translation by up to ±crop pixels with zero padding (the
    classic RandomCrop(32, padding=crop)); flip: random horizontal flips."""

    crop: int
    flip: bool

    @classmethod
    def from_config(cls, augment: dict) -> "Augment":
        return cls(**fields_of(cls, augment, "the augment section"))

    @property
    def enabled(self) -> bool:
        return self.crop > 0 or self.flip


def augment_batch(x: torch.Tensor, aug: Augment, gen: torch.Generator) -> torch.Tensor:
    """Augment a uint8 NCHW batch; per-sample randomness drawn from `gen`."""
    n, _, h, w = x.shape
    dev = x.device
    if aug.flip:
        flip = torch.rand(n, generator=gen, device=dev) < 0.5
        x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
    if aug.crop > 0:
        p = aug.crop
        padded = F.pad(x, (p, p, p, p)).permute(0, 2, 3, 1)  # N, H+2p, W+2p, C
        dy = torch.randint(0, 2 * p + 1, (n, 1), generator=gen, device=dev)
        dx = torch.randint(0, 2 * p + 1, (n, 1), generator=gen, device=dev)
        rows = (dy + torch.arange(h, device=dev)).view(n, h, 1)
        cols = (dx + torch.arange(w, device=dev)).view(n, 1, w)
        x = padded[torch.arange(n, device=dev).view(n, 1, 1), rows, cols].permute(0, 3, 1, 2)
    return x
