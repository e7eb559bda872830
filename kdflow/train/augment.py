"""Training augmentation, batched on the device (config section `augment`).

Each sample draws its own resized crop, flip and translation from the job's
augmentation stream (kdflow.core.streams), so a batch's augmentation is
reproducible whatever else the job draws; the teacher sees the same
augmented view as the student. Two crops: a translation by a few pixels
with zero padding (CIFAR's RandomCrop(32, padding=4)), and for real images
torchvision's RandomResizedCrop (a box of random area and aspect ratio,
resized to the image size). Evaluation always sees the converted S x S image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from kdflow.core.schema import fields_of

# torchvision's RandomResizedCrop draws up to this many boxes per image
# before it falls back to a centre crop.
RESIZED_CROP_TRIES = 10


@dataclass(frozen=True)
class ResizedCrop:
    """A box of area scale[0]..scale[1] of the image and aspect ratio
    ratio[0]..ratio[1] (drawn log-uniformly), resized to the image size."""

    scale: tuple[float, float]
    ratio: tuple[float, float]

    @classmethod
    def from_config(cls, section: Optional[dict]) -> Optional["ResizedCrop"]:
        if section is None:
            return None
        v = fields_of(cls, section, "the augment.resized_crop section")
        return cls(scale=tuple(map(float, v["scale"])), ratio=tuple(map(float, v["ratio"])))


@dataclass(frozen=True)
class Augment:
    """crop: random translation by up to ±crop pixels with zero padding (the
    classic RandomCrop(32, padding=crop)); flip: random horizontal flips;
    resized_crop: torchvision's RandomResizedCrop, or None."""

    crop: int
    flip: bool
    resized_crop: Optional[ResizedCrop] = None

    @classmethod
    def from_config(cls, augment: dict) -> "Augment":
        v = fields_of(cls, augment, "the augment section")
        return cls(**{**v, "resized_crop": ResizedCrop.from_config(v["resized_crop"])})

    @property
    def enabled(self) -> bool:
        return self.crop > 0 or self.flip or self.resized_crop is not None


def augment_batch(x: torch.Tensor, aug: Augment, gen: torch.Generator) -> torch.Tensor:
    """Augment a uint8 NCHW batch; per-sample randomness drawn from `gen`.
    Resized crop first (as torchvision's recipe), then flip, then translation;
    without a resized crop the draws are exactly those of the flip and crop."""
    if aug.resized_crop is not None:
        x = resized_crop(x, aug.resized_crop, gen)
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


def crop_boxes(n: int, h: int, w: int, rc: ResizedCrop, gen: torch.Generator,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """(n, 4) boxes (top, left, height, width) in pixels, as torchvision's
    RandomResizedCrop.get_params draws them: up to RESIZED_CROP_TRIES tries
    of area * U(scale) at aspect exp(U(log ratio)), the first that fits;
    else the largest centre crop within the ratio range. All tries are drawn
    for every image at once (the draws differ from torchvision's, the
    distribution is the same)."""
    t = RESIZED_CROP_TRIES
    area = h * w
    scale = torch.empty(n, t, device=device).uniform_(rc.scale[0], rc.scale[1], generator=gen)
    log_r = torch.empty(n, t, device=device).uniform_(math.log(rc.ratio[0]), math.log(rc.ratio[1]),
                                                      generator=gen)
    aspect = torch.exp(log_r)
    bw = torch.round(torch.sqrt(area * scale * aspect))
    bh = torch.round(torch.sqrt(area * scale / aspect))
    fits = (bw > 0) & (bw <= w) & (bh > 0) & (bh <= h)
    first = torch.where(fits.any(1), fits.float().argmax(1), torch.full((n,), -1, device=device))
    u = torch.rand(n, 2, generator=gen, device=device)
    # Fallback: a centre crop of the whole image, cut to the ratio range.
    in_ratio = w / h
    if in_ratio < min(rc.ratio):
        fw, fh = w, round(w / min(rc.ratio))
    elif in_ratio > max(rc.ratio):
        fw, fh = round(h * max(rc.ratio)), h
    else:
        fw, fh = w, h
    pick = first.clamp(min=0).view(n, 1)
    ch = torch.where(first >= 0, bh.gather(1, pick).view(n), torch.tensor(float(fh), device=device))
    cw = torch.where(first >= 0, bw.gather(1, pick).view(n), torch.tensor(float(fw), device=device))
    # top ~ randint(0, h - ch + 1), left likewise; the centre for the fallback
    top = torch.where(first >= 0, torch.floor(u[:, 0] * (h - ch + 1)), torch.floor((h - ch) / 2))
    left = torch.where(first >= 0, torch.floor(u[:, 1] * (w - cw + 1)), torch.floor((w - cw) / 2))
    return torch.stack([top, left, ch, cw], 1)


def resized_crop(x: torch.Tensor, rc: ResizedCrop, gen: torch.Generator) -> torch.Tensor:
    """Each uint8 image of the batch cropped to its own box and resized back
    to H x W (bilinear, averaging over each output pixel's footprint, as an
    antialiased resize does; roi_align)."""
    from torchvision.ops import roi_align  # deferred: torchvision costs ~1 s to import

    n, _, h, w = x.shape
    b = crop_boxes(n, h, w, rc, gen, x.device)
    rois = torch.stack([torch.arange(n, device=x.device, dtype=torch.float32),
                        b[:, 1], b[:, 0], b[:, 1] + b[:, 3], b[:, 0] + b[:, 2]], 1)
    out = roi_align(x.float(), rois, output_size=(h, w), spatial_scale=1.0,
                    sampling_ratio=-1, aligned=True)
    return out.round_().clamp_(0, 255).to(torch.uint8)
