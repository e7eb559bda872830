"""The training and evaluation engine.

Data never goes through PIL or DataLoader workers: a split lives in memory as
one uint8 tensor on the training device, each epoch draws one permutation and
batches are index slices of it; augmentation and normalisation are batched
tensor operations (the recipe of airbench, the fastest CIFAR-10 trainers). On a 2-core machine
DataLoader workers would fight the training threads for the cores.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from kdflow import KdflowError, resume, streams
from kdflow.data import Normalizer
from kdflow.losses import teacher_kl
from kdflow.optim import make_optimizer

log = logging.getLogger(__name__)

EVAL_BATCH = 1000
# On CUDA the loss is checked for NaN/inf on the host every this many steps
# (and at the end of each epoch); the first bad step is recorded on the device.
FINITE_CHECK_EVERY = 32



@dataclass
class Step:
    """What a loss sees in one training step."""

    logits: torch.Tensor                              # the student's
    targets: torch.Tensor
    epoch: int                                        # 1-based (DKD's warm-up)
    teacher_logits: Optional[torch.Tensor] = None
    features: Optional[torch.Tensor] = None           # the student's last feature map
    teacher_features: Optional[torch.Tensor] = None


# loss(step) -> scalar loss
LossFn = Callable[[Step], torch.Tensor]
# teacher(batch_indices, normalised_batch) -> (logits, feature map or None) of
# the teacher for exactly the images the student sees in this step
TeacherFn = Callable[[torch.Tensor, torch.Tensor],
                     tuple[torch.Tensor, Optional[torch.Tensor]]]


def cross_entropy(step: Step) -> torch.Tensor:
    return F.cross_entropy(step.logits, step.targets)


def features_and_logits(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every kdflow model is `classify(features(x))`; feature-based losses
    need both, from one forward pass."""
    f = model.features(x)
    return f, model.classify(f)


# --------------------------------------------------------------------------
# Device, threads, precision, determinism
# --------------------------------------------------------------------------

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


@dataclass(frozen=True)
class EngineOptions:
    """How to run, not what to learn (config section `engine`)."""

    precision: str = "auto"      # auto | fp32 | bf16
    compile: bool = False        # torch.compile the training model
    deterministic: bool = False  # bitwise reproducible kernels (slower on CUDA)

    @classmethod
    def from_config(cls, cfg: Optional[dict]) -> "EngineOptions":
        return cls(**(cfg or {}))


def autocast_dtype(device: torch.device, precision: str) -> Optional[torch.dtype]:
    """bf16 where it pays: on CUDA with bf16 support under 'auto'. On CPUs
    'auto' stays fp32: bf16 autocast only helps with AVX-512 BF16 / AMX
    hardware and there it must be shown to keep accuracy (ask for it
    explicitly with precision: bf16)."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def configure(device: torch.device, options: EngineOptions) -> None:
    """Global flags for determinism or speed; call before any CUDA work."""
    if options.deterministic:
        # cuBLAS needs a fixed workspace to be deterministic; must be set
        # before the first cuBLAS call.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        # Fixed shapes every step: let cuDNN time its algorithms once.
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


# --------------------------------------------------------------------------
# Augmentation, batched on the device
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Augment:
    """crop: random translation by up to ±crop pixels with zero padding (the
    classic RandomCrop(32, padding=crop)); flip: random horizontal flips."""

    crop: int = 0
    flip: bool = False

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


# --------------------------------------------------------------------------
# Inference and training
# --------------------------------------------------------------------------

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
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    loss_fn: Optional[LossFn] = None,
    teacher: Optional[TeacherFn] = None,
    teacher_val_logits: Optional[torch.Tensor] = None,
    augment: Augment = Augment(),
    options: EngineOptions = EngineOptions(),
    optim: Optional[dict] = None,
    features: bool = False,
    extra: Optional[nn.Module] = None,
    normalize: Optional[Normalizer] = None,
    state_path: Optional[str] = None,
    job: str = "",
    name: str = "training",
) -> FitResult:
    """Train and keep the weights of the best validation epoch.

    Selection uses the validation split only, never the test set. The loss
    (`loss_fn`, cross-entropy by default) gets a `Step`: with `teacher`, the
    teacher's output for the step's batch (distillation); with `features`,
    the student's last feature map too. `extra` holds modules trained beside
    the student and not kept (a hint regressor). `optim` is the training
    section of the config (optimizer, weight decay, lr schedule; Adam
    without decay by default). With `teacher_val_logits` each epoch also
    records the student's agreement with its teacher on the validation split.

    With `state_path`, the full training state is saved there after every
    epoch and on SIGTERM, and a saved state of the same `job` (a fingerprint
    of its config and inputs) is resumed; see kdflow.resume.

    A non-finite training loss stops training at once with a KdflowError
    naming `name`, the epoch and the step (the saved state is removed:
    nothing of a diverged run is kept), and an epoch whose weights hold a
    non-finite value is never selected.
    """
    device = train_x.device
    configure(device, options)
    amp = autocast_dtype(device, options.precision)
    loss_fn = loss_fn or cross_entropy
    normalize = normalize or Normalizer(device)
    model.to(device).to(memory_format=torch.channels_last)
    params = list(model.parameters())
    if extra is not None:
        extra.to(device).to(memory_format=torch.channels_last)
        params += list(extra.parameters())
    forward = ((lambda x: features_and_logits(model, x)) if features
               else (lambda x: (None, model(x))))
    step_fn = torch.compile(forward) if options.compile else forward
    opt, sched = make_optimizer(params, lr, optim)
    # Batch order and augmentation depend on the seed alone, so two students
    # of one seed (plain and distilled) see the same views in the same order.
    order = streams.generator(seed, "order")
    aug_gen = streams.generator(seed, "augment", device)
    n = len(train_x)
    if n == 0:
        raise KdflowError("the training split is empty; lower data.val_size")

    history: list[dict] = []
    best = FitResult({}, 0, -1.0, history)
    first_epoch, partial = 1, None
    saved = resume.load(state_path, job)
    if saved is not None:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        if sched is not None:
            sched.load_state_dict(saved["scheduler"])
        if extra is not None:
            extra.load_state_dict(saved["extra"])
        order.set_state(saved["rng"]["order"])
        aug_gen.set_state(saved["rng"]["augment"].to(aug_gen.get_state().device))
        torch.set_rng_state(saved["rng"]["torch"])
        if device.type == "cuda" and saved["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(saved["rng"]["cuda"], device)
        history[:] = saved["history"]
        best.best_state, best.best_epoch = saved["best_state"], saved["best_epoch"]
        best.best_val_accuracy = saved["best_val_accuracy"]
        first_epoch, partial = saved["epoch"] + 1, saved["partial"]
        where = (f"epoch {first_epoch}, step {partial['next'] // batch_size}"
                 if partial else f"the end of epoch {saved['epoch']}")
        log.info("resuming from %s (saved state %s)", where, state_path)

    def save_state(epoch_done: int, partial_epoch: Optional[dict]) -> None:
        resume.save(state_path, {
            "job": job, "epoch": epoch_done, "partial": partial_epoch,
            "model": model.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict() if sched is not None else None,
            "extra": extra.state_dict() if extra is not None else None,
            "rng": {"order": order.get_state(), "augment": aug_gen.get_state().cpu(),
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
            "history": history, "best_state": best.best_state,
            "best_epoch": best.best_epoch, "best_val_accuracy": best.best_val_accuracy,
        })

    # On the CPU checking every step's loss costs nothing; on CUDA it would
    # force a host sync per step (see FINITE_CHECK_EVERY).
    sync_check = device.type != "cuda"
    bad_step = torch.full((), -1, dtype=torch.long, device=device)
    with resume.TermGuard(enabled=state_path is not None) as term:
        for epoch in range(first_epoch, epochs + 1):
            t0 = time.perf_counter()
            model.train()
            if extra is not None:
                extra.train()
            if partial is None:
                perm = torch.randperm(n, generator=order).to(device)
                begin, elapsed = 0, 0.0
                loss_sum = torch.zeros((), device=device)
                correct = torch.zeros((), device=device, dtype=torch.long)
            else:
                perm, begin, elapsed = partial["perm"].to(device), partial["next"], partial["elapsed"]
                loss_sum = partial["loss_sum"].to(device)
                correct = partial["correct"].to(device)
                partial = None
            for start in range(begin, n, batch_size):
                if term.requested:
                    save_state(epoch - 1, {"perm": perm.cpu(), "next": start,
                                           "loss_sum": loss_sum.cpu(), "correct": correct.cpu(),
                                           "elapsed": elapsed + time.perf_counter() - t0})
                    raise resume.Preempted(
                        f"stopped by SIGTERM in epoch {epoch}; state saved to {state_path}, "
                        "rerun the job to resume")
                idx = perm[start:start + batch_size]
                xb = train_x[idx]
                if augment.enabled:
                    xb = augment_batch(xb, augment, aug_gen)
                xb = normalize(xb)
                targets = train_y[idx]
                with autocast(device, amp):
                    t_logits, t_feat = teacher(idx, xb) if teacher else (None, None)
                    feat, logits = step_fn(xb)
                    loss = loss_fn(Step(logits, targets, epoch, t_logits, feat, t_feat))
                step = start // batch_size + 1
                if sync_check or step % FINITE_CHECK_EVERY == 0:
                    _check_finite(loss, bad_step, step, epoch, name, state_path, sync_check)
                else:
                    # Recorded on the device, checked every few steps: no
                    # host sync per step on CUDA.
                    bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss.detach()),
                                           step, bad_step)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                # Accumulated on the device: no host sync per step on CUDA.
                loss_sum += loss.detach().float() * len(idx)
                correct += (logits.detach().argmax(1) == targets).sum()
            if not sync_check:
                _check_finite(None, bad_step, None, epoch, name, state_path, False)
            row = _epoch_row(model, epoch, n, loss_sum, correct, val_x, val_y, normalize,
                             amp, teacher_val_logits)
            row["lr"] = opt.param_groups[0]["lr"]  # the rate this epoch trained with
            row["seconds"] = elapsed + time.perf_counter() - t0
            if sched is not None:
                sched.step()
            history.append(row)
            improved = row["val_accuracy"] > best.best_val_accuracy and _all_finite(model)
            if improved:
                best.best_state = {k: v.detach().to("cpu", copy=True)
                                   for k, v in model.state_dict().items()}
                best.best_epoch, best.best_val_accuracy = epoch, row["val_accuracy"]
            _log_epoch(row, epochs, n, improved)
            if state_path is not None:
                save_state(epoch, None)
    if not best.best_state:
        resume.remove(state_path)
        raise KdflowError(f"{name}: no epoch ended with finite weights, so there is no model "
                          "to keep; lower the learning rate or use engine.precision: fp32")
    # Weights are stored contiguous (NCHW): channels_last is a runtime layout.
    best.best_state = {k: v.contiguous() for k, v in best.best_state.items()}
    return best


def _all_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in model.state_dict().values()
               if v.is_floating_point())


def _check_finite(loss: Optional[torch.Tensor], bad_step: torch.Tensor, step: Optional[int],
                  epoch: int, name: str, state_path: Optional[str], sync: bool) -> None:
    """Stop a diverged run: one line naming the job, epoch and step."""
    if not sync and int(bad_step) >= 0:
        where, value = int(bad_step), ""
    elif loss is not None and not bool(torch.isfinite(loss.detach()).all()):
        where, value = step, f" ({loss.item():g})"
    else:
        return
    resume.remove(state_path)  # nothing of a diverged run is kept
    raise KdflowError(
        f"{name}: training loss became non-finite{value} at epoch {epoch}, step {where}: "
        "the run diverged and nothing was saved; lower the learning rate (lr) or train "
        "in fp32 (engine.precision: fp32)")


def _epoch_row(model, epoch, n, loss_sum, correct, val_x, val_y, normalize, amp,
               teacher_val_logits) -> dict:
    row = {
        "epoch": epoch,
        "train_loss": loss_sum.item() / n,
        "train_accuracy": correct.item() / n,
    }
    val_logits = predict_logits(model, val_x, normalize, amp_dtype=amp)
    row["val_loss"] = F.cross_entropy(val_logits, val_y).item()
    row["val_accuracy"] = (val_logits.argmax(1) == val_y).sum().item() / len(val_y)
    if teacher_val_logits is not None:
        row["val_teacher_agreement"] = (
            val_logits.argmax(1) == teacher_val_logits.argmax(1)
        ).sum().item() / len(val_y)
        row["val_teacher_kl"] = teacher_kl(val_logits, teacher_val_logits).item()
    return row


def _log_epoch(row: dict, epochs: int, n: int, improved: bool) -> None:
    agree = row.get("val_teacher_agreement")
    log.info(
        "epoch %d/%d  train loss %.4f acc %.2f%%  val loss %.4f acc %.2f%%%s  "
        "%.1fs (%.0f img/s)%s",
        row["epoch"], epochs, row["train_loss"], 100 * row["train_accuracy"],
        row["val_loss"], 100 * row["val_accuracy"],
        f"  agree {100 * agree:.2f}%" if agree is not None else "",
        row["seconds"], n / row["seconds"], "  *best" if improved else "",
    )
