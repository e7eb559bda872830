"""The training and evaluation engine.

Data never goes through PIL or DataLoader workers: a split lives in memory as
one uint8 tensor on the training device, each epoch draws one permutation and
batches are index slices of it (airbench's recipe; REFERENCE.md §4). On a
2-core machine DataLoader workers would fight the training threads.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from kdflow import KdflowError
from kdflow.data import Normalizer
from kdflow.losses import teacher_kl

log = logging.getLogger(__name__)

EVAL_BATCH = 1000

# loss(student_logits, targets, batch_indices) -> scalar loss. The indices let
# a distillation loss look up the teacher's logits for exactly this batch.
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def set_threads(threads: Optional[int]) -> None:
    """Use `threads` intra-op threads, never more than the cores we may run on:
    oversubscribed cores slow PyTorch's CPU kernels down sharply."""
    if threads:
        available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
            else os.cpu_count() or 1
        torch.set_num_threads(max(1, min(threads, available)))


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise KdflowError(
            f"device {name!r} requested but CUDA is not available here; "
            "set device: auto (or cpu) in the config"
        )
    return torch.device(name)


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, normalize: Normalizer,
                   batch_size: int = EVAL_BATCH) -> torch.Tensor:
    """Logits (float32) for uint8 images `x`, in eval mode without gradients."""
    was_training = model.training
    model.eval()
    out = [model(normalize(x[i:i + batch_size])).float()
           for i in range(0, len(x), batch_size)]
    model.train(was_training)
    if not out:
        return torch.empty(0, 0, device=x.device)
    return torch.cat(out)


@dataclass
class FitResult:
    best_state: dict          # weights of the best validation epoch (on CPU)
    best_epoch: int           # 1-based
    best_val_accuracy: float
    history: list[dict]       # one row per epoch


def fit(
    model: nn.Module,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    *,
    loss_fn: LossFn,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    teacher_val_logits: Optional[torch.Tensor] = None,
) -> FitResult:
    """Train with Adam and keep the weights of the best validation epoch.

    Selection uses the validation split only, never the test set. With
    `teacher_val_logits` each epoch also records the student's agreement with
    its teacher on the validation split (top-1 agreement and mean KL).
    """
    device = train_x.device
    normalize = Normalizer(device)
    model.to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    # The batch order depends on the seed alone, so two students of one seed
    # (plain and distilled) see the same batches in the same order.
    order = torch.Generator().manual_seed(seed)
    n = len(train_x)
    if n == 0:
        raise KdflowError("the training split is empty; lower data.val_size")

    history: list[dict] = []
    best = FitResult({}, 0, -1.0, history)
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        model.train()
        perm = torch.randperm(n, generator=order).to(device)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        for start in range(0, n, batch_size):
            idx = perm[start:start + batch_size]
            logits = model(normalize(train_x[idx]))
            targets = train_y[idx]
            loss = loss_fn(logits, targets, idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            # Accumulated on the device: no host sync per step on CUDA.
            loss_sum += loss.detach() * len(idx)
            correct += (logits.detach().argmax(1) == targets).sum()
        row = {
            "epoch": epoch,
            "train_loss": loss_sum.item() / n,
            "train_accuracy": correct.item() / n,
        }
        val_logits = predict_logits(model, val_x, normalize)
        row["val_loss"] = F.cross_entropy(val_logits, val_y).item()
        row["val_accuracy"] = (val_logits.argmax(1) == val_y).sum().item() / len(val_y)
        if teacher_val_logits is not None:
            row["val_teacher_agreement"] = (
                val_logits.argmax(1) == teacher_val_logits.argmax(1)
            ).sum().item() / len(val_y)
            row["val_teacher_kl"] = teacher_kl(val_logits, teacher_val_logits).item()
        row["lr"] = opt.param_groups[0]["lr"]
        row["seconds"] = time.perf_counter() - t0
        history.append(row)
        improved = row["val_accuracy"] > best.best_val_accuracy
        if improved:
            best.best_state = {k: v.detach().to("cpu", copy=True)
                               for k, v in model.state_dict().items()}
            best.best_epoch, best.best_val_accuracy = epoch, row["val_accuracy"]
        log.info(
            "epoch %d/%d  train loss %.4f acc %.2f%%  val loss %.4f acc %.2f%%%s  "
            "%.1fs (%.0f img/s)%s",
            epoch, epochs, row["train_loss"], 100 * row["train_accuracy"],
            row["val_loss"], 100 * row["val_accuracy"],
            (f"  agree {100 * row['val_teacher_agreement']:.2f}%"
             if teacher_val_logits is not None else ""),
            row["seconds"], n / row["seconds"], "  *best" if improved else "",
        )
    # Weights are stored contiguous (NCHW): channels_last is a runtime layout.
    best.best_state = {k: v.contiguous() for k, v in best.best_state.items()}
    return best
