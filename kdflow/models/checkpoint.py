"""Checkpoints that explain themselves: weights plus the config they came from.

Everything stored is a tensor or a plain Python value, so checkpoints load
with `torch.load(..., weights_only=True)`, which cannot execute code.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
from torch import nn

from kdflow import KdflowError
from kdflow.core import atomic
from kdflow.models.zoo import build_model

FORMAT = "kdflow-checkpoint-1"


def save(path: str | os.PathLike, *, state_dict: dict, model: str, num_classes: int,
         image_size: int, classes: Optional[Sequence[str]] = None,
         normalisation: Optional[dict] = None, **record) -> None:
    """Write atomically: a crash mid-write never leaves a truncated model.pt.

    What the weights only make sense with goes with them: the class names in
    the order of the logits (`classes`), the image size, and the
    `normalisation` the model's inputs had ({"mean": [r, g, b], "std": [r,
    g, b]} on the 0..1 pixel scale, see normalisation()). Importing or
    fine-tuning from the file compares them with the data
    (kdflow.models.weights); a file without them can only be said to be
    unchecked there. Every checkpoint kdflow trains or imports has both."""
    extra = {}
    if classes is not None:
        extra["classes"] = [str(c) for c in classes]
    if normalisation is not None:
        extra["normalisation"] = normalisation
    atomic.save_torch(path, {"format": FORMAT, "model": model, "num_classes": num_classes,
                             "image_size": image_size, **extra, "state_dict": state_dict,
                             **record})


def normalisation(mean: Sequence[float], std: Sequence[float]) -> dict:
    """The checkpoint's record of the per-channel statistics its inputs
    were normalised with (kdflow.data.arrays.channel_stats, 0..1 scale)."""
    return {"mean": [float(v) for v in mean], "std": [float(v) for v in std]}


def load(path: str | os.PathLike) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise KdflowError(f"cannot read checkpoint {path}: {e}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise KdflowError(f"{path} is not a kdflow checkpoint ({FORMAT})")
    # Older kdflow trained on 32x32 images only and did not record the size.
    ckpt.setdefault("image_size", 32)
    return ckpt


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """The checkpoint's model in eval mode on `device`, and the checkpoint."""
    ckpt = load(path)
    model = build_model(ckpt["model"], ckpt["num_classes"], ckpt["image_size"])
    model.load_state_dict(ckpt["state_dict"])
    model.to(device).to(memory_format=torch.channels_last).eval()
    return model, ckpt


def validation_counts(ckpt: dict, path: str | os.PathLike) -> tuple[int, int, int]:
    """(validation images right at the best epoch, validation images, epochs
    trained): the exact numbers that the choice of a setting and the
    chance-level test use."""
    if "best_val_correct" not in ckpt or "val_images" not in ckpt:
        raise KdflowError(f"{path} has no exact validation counts (it was trained by an "
                          "older kdflow); delete it and rerun to retrain it")
    # An imported teacher trained no epoch here but was measured once: one look.
    return (int(ckpt["best_val_correct"]), int(ckpt["val_images"]),
            max(1, int(ckpt["last_epoch"])))
