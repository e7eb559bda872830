"""The training loop: TrainConfig, TrainState and fit.

Data never goes through PIL or DataLoader workers: a split is one uint8
tensor on the training device (or, streamed, read from disk a batch ahead,
kdflow.data.store), each epoch draws one permutation and batches are index
slices of it; augmentation and normalisation are batched
tensor operations (the recipe of airbench, the fastest CIFAR-10 trainers). On a 2-core machine
DataLoader workers would fight the training threads for the cores.
Augmentation lives in kdflow.train.augment, inference (validation scores)
in kdflow.models.inference, device and precision in kdflow.core.device.
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
from kdflow.core import streams
from kdflow.core.device import EngineOptions, autocast, autocast_dtype
from kdflow.core.schema import fields_of
from kdflow.data.arrays import Normalizer
from kdflow.data.store import StoredImages, batches_of
from kdflow.models.inference import features_and_logits, predict_logits
from kdflow.train import resume
from kdflow.train.augment import Augment, augment_batch
from kdflow.distill.losses import LossFn, Step, teacher_kl
from kdflow.train.optim import make_optimizer

log = logging.getLogger(__name__)

# On CUDA the loss is checked for NaN/inf on the host every this many steps
# (and at the end of each epoch); the first bad step is recorded on the device.
FINITE_CHECK_EVERY = 32

# teacher(batch_indices, normalised_batch) -> (logits, feature map or None) of
# the teacher for exactly the images the student sees in this step
TeacherFn = Callable[[torch.Tensor, torch.Tensor],
                     tuple[torch.Tensor, Optional[torch.Tensor]]]


def cross_entropy(step: Step) -> torch.Tensor:
    return F.cross_entropy(step.logits, step.targets)


@dataclass(frozen=True)
class TrainConfig:
    """What to learn and how to run: a training section of the config
    (`teacher`, or a student's: a plan record's `training`, kdflow.study.planner)
    and the engine section, validated, built once per job."""

    model: str
    epochs: int
    batch_size: int
    lr: float
    optimizer: str               # adam | sgd (with momentum)
    momentum: float              # SGD only
    weight_decay: float
    lr_milestones: tuple[int, ...]  # epochs after which lr *= lr_gamma
    lr_gamma: float
    augment: Augment
    engine: EngineOptions

    @classmethod
    def from_config(cls, training: dict, engine: dict) -> "TrainConfig":
        v = fields_of(cls, {**training, "engine": engine}, "the training section")
        return cls(**{**v, "lr_milestones": tuple(sorted(v["lr_milestones"])),
                      "augment": Augment.from_config(v["augment"]),
                      "engine": EngineOptions.from_config(engine)})


# --------------------------------------------------------------------------
# Inference and training
# --------------------------------------------------------------------------

@dataclass
class FitResult:
    best_state: dict          # weights of the best validation epoch (on CPU)
    best_epoch: int           # 1-based
    best_val_accuracy: float
    history: list[dict]       # one row per epoch
    # The best epoch's validation images right, and of how many: the exact
    # numbers that choices and the chance test compare (floats can tie in
    # one order and not in another).
    best_val_correct: int = -1
    val_images: int = 0


@dataclass
class TrainState:
    """Everything that changes during training, and so everything a resumed
    job restores (kdflow.train.resume): the weights of the model and of the
    modules trained beside it, the optimizer and schedule, the random
    streams, the epochs done and the position in the next one (`partial`,
    set while SIGTERM interrupts an epoch), the history and the best epoch."""

    model: nn.Module
    extra: Optional[nn.Module]
    optimizer: torch.optim.Optimizer
    scheduler: Optional[torch.optim.lr_scheduler.LRScheduler]
    order: torch.Generator          # batch order
    augment: torch.Generator        # augmentation draws, on the training device
    job: str                        # what a saved state must match (resume.fingerprint)
    epoch: int                      # epochs completed
    partial: Optional[dict]         # perm, next, loss_sum, correct, elapsed
    history: list[dict]
    best: FitResult

    @classmethod
    def start(cls, model: nn.Module, extra: Optional[nn.Module], cfg: TrainConfig,
              seed: int, device: torch.device, job: str) -> "TrainState":
        params = list(model.parameters()) + (list(extra.parameters()) if extra else [])
        opt, sched = make_optimizer(params, cfg)
        # Batch order and augmentation depend on the seed alone, so two
        # students of one seed (plain and distilled) see the same views in
        # the same order.
        history: list[dict] = []
        return cls(model, extra, opt, sched, streams.generator(seed, "order"),
                   streams.generator(seed, "augment", device), job, 0, None, history,
                   FitResult({}, 0, -1.0, history))

    def end_epoch(self, epoch: int, row: dict) -> bool:
        """Record a finished epoch; keep its weights if they are the best so
        far on validation (and finite); says whether they are."""
        if self.scheduler is not None:
            self.scheduler.step()
        self.history.append(row)
        self.epoch = epoch
        improved = row["val_accuracy"] > self.best.best_val_accuracy and _all_finite(self.model)
        if improved:
            self.best.best_state = {k: v.detach().to("cpu", copy=True)
                                    for k, v in self.model.state_dict().items()}
            self.best.best_epoch, self.best.best_val_accuracy = epoch, row["val_accuracy"]
            self.best.best_val_correct, self.best.val_images = row["val_correct"], row["val_images"]
        return improved

    def save(self, path: str | os.PathLike) -> None:
        device = self.augment.device
        partial = self.partial and {k: v.cpu() if torch.is_tensor(v) else v
                                    for k, v in self.partial.items()}
        resume.save(path, {
            "job": self.job, "epoch": self.epoch, "partial": partial,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "extra": self.extra.state_dict() if self.extra is not None else None,
            "rng": {"order": self.order.get_state(), "augment": self.augment.get_state().cpu(),
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
            "history": self.history, "best_state": self.best.best_state,
            "best_epoch": self.best.best_epoch,
            "best_val_accuracy": self.best.best_val_accuracy,
            "best_val_correct": self.best.best_val_correct, "val_images": self.best.val_images,
        })

    def restore(self, path: Optional[str | os.PathLike]) -> bool:
        """Continue from the state saved at `path` if it is this job's (one
        of another job is set aside, see resume.load)."""
        saved = resume.load(path, self.job)
        if saved is None:
            return False
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(saved["scheduler"])
        if self.extra is not None:
            self.extra.load_state_dict(saved["extra"])
        rng, device = saved["rng"], self.augment.device
        self.order.set_state(rng["order"])
        self.augment.set_state(rng["augment"].to(self.augment.get_state().device))
        torch.set_rng_state(rng["torch"])
        if device.type == "cuda" and rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"], device)
        self.epoch, self.partial = saved["epoch"], saved["partial"]
        self.history[:] = saved["history"]
        self.best.best_state, self.best.best_epoch = saved["best_state"], saved["best_epoch"]
        self.best.best_val_accuracy = saved["best_val_accuracy"]
        self.best.best_val_correct, self.best.val_images = saved["best_val_correct"], saved["val_images"]
        p = self.partial
        log.info("resuming from %s (saved state %s)",
                 f"epoch {self.epoch + 1}, image {p['next']} of {len(p['perm'])}" if p
                 else f"the end of epoch {self.epoch}", path)
        return True


@dataclass(frozen=True)
class _Run:
    """What stays fixed during one `fit`: data, loss, teacher, settings."""

    cfg: TrainConfig
    train_x: torch.Tensor    # or kdflow.data.store.StoredImages
    train_y: torch.Tensor
    forward: Callable       # x -> (feature map or None, logits)
    loss_fn: LossFn
    teacher: Optional[TeacherFn]
    normalize: Normalizer
    amp: Optional[torch.dtype]
    name: str
    state_path: Optional[str]


def fit(model: nn.Module, train_x: torch.Tensor, train_y: torch.Tensor,
        val_x: torch.Tensor, val_y: torch.Tensor, cfg: TrainConfig, *, seed: int,
        loss_fn: Optional[LossFn] = None, teacher: Optional[TeacherFn] = None,
        teacher_val_logits: Optional[torch.Tensor] = None, features: bool = False,
        extra: Optional[nn.Module] = None, normalize: Optional[Normalizer] = None,
        state_path: Optional[str] = None, job: str = "", name: str = "training") -> FitResult:
    """Train and keep the weights of the best validation epoch.

    Selection uses the validation split only, never the test set. The loss
    (`loss_fn`, cross-entropy by default) gets a `Step`: with `teacher`, the
    teacher's output for the step's batch (distillation); with `features`,
    the student's last feature map too. `extra` holds modules trained beside
    the student and not kept (a hint regressor). With `teacher_val_logits`
    each epoch also records the student's agreement with its teacher.

    With `state_path`, the TrainState is saved there after every epoch and
    on SIGTERM, and a saved state of the same `job` is resumed. A non-finite
    loss stops training with a KdflowError naming `name`, the epoch and the
    step; an epoch with non-finite weights is never selected."""
    device = train_x.device
    if len(train_x) == 0:
        raise KdflowError("the training split is empty; lower data.val_size")
    for module in (model, extra):
        if module is not None:
            module.to(device).to(memory_format=torch.channels_last)
    forward = ((lambda x: features_and_logits(model, x)) if features
               else (lambda x: (None, model(x))))
    run = _Run(cfg, train_x, train_y, torch.compile(forward) if cfg.engine.compile else forward,
               loss_fn or cross_entropy, teacher, normalize or Normalizer(device),
               autocast_dtype(device, cfg.engine.precision), name, state_path)
    state = TrainState.start(model, extra, cfg, seed, device, job)
    state.restore(state_path)
    with resume.TermGuard(enabled=state_path is not None) as term:
        for epoch in range(state.epoch + 1, cfg.epochs + 1):
            t0 = time.perf_counter()
            loss_sum, correct, elapsed = _train_epoch(run, state, epoch, term)
            row = _epoch_row(model, epoch, len(train_x), loss_sum, correct, val_x, val_y,
                             run.normalize, run.amp, teacher_val_logits)
            row["lr"] = state.optimizer.param_groups[0]["lr"]  # the rate this epoch trained with
            row["seconds"] = elapsed + time.perf_counter() - t0
            improved = state.end_epoch(epoch, row)
            _log_epoch(row, cfg.epochs, len(train_x), improved)
            if state_path is not None:
                state.save(state_path)
    best = state.best
    if not best.best_state:
        resume.remove(state_path)
        raise KdflowError(f"{name}: no epoch ended with finite weights, so there is no model "
                          "to keep; lower the learning rate or use engine.precision: fp32")
    # Weights are stored contiguous (NCHW): channels_last is a runtime layout.
    best.best_state = {k: v.contiguous() for k, v in best.best_state.items()}
    return best


def _train_epoch(run: _Run, state: TrainState, epoch: int,
                 term: resume.TermGuard) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One pass over the training split, or the rest of an interrupted one;
    returns the summed loss, the correct count and the seconds spent before
    this process took over (0 unless resumed mid-epoch)."""
    t0, device = time.perf_counter(), run.train_x.device
    n, batch_size = len(run.train_x), run.cfg.batch_size
    state.model.train()
    if state.extra is not None:
        state.extra.train()
    p = state.partial or {
        "perm": torch.randperm(n, generator=state.order), "next": 0, "elapsed": 0.0,
        "loss_sum": torch.zeros(()), "correct": torch.zeros((), dtype=torch.long)}
    state.partial = None
    perm, elapsed = p["perm"].to(device), p["elapsed"]
    loss_sum, correct = p["loss_sum"].to(device), p["correct"].to(device)
    # On the CPU checking every step's loss costs nothing; on CUDA it would
    # force a host sync per step, so the first bad step is recorded on the
    # device and checked every FINITE_CHECK_EVERY steps and at the end.
    sync_check = device.type != "cuda"
    bad_step = torch.full((), -1, dtype=torch.long, device=device)
    starts = range(p["next"], n, batch_size)
    # Streamed images: the next batch is read while this one trains.
    # Their indices come from the host copy of the order: reading them from
    # the device would wait for the GPU and undo the overlap.
    order = p["perm"].cpu() if isinstance(run.train_x, StoredImages) else perm
    images = batches_of(run.train_x, (order[s:s + batch_size] for s in starts))
    for start, xb in zip(starts, images):
        if term.requested:
            state.partial = {"perm": perm, "next": start, "loss_sum": loss_sum,
                             "correct": correct, "elapsed": elapsed + time.perf_counter() - t0}
            state.save(run.state_path)
            raise resume.Preempted(
                f"stopped by SIGTERM in epoch {epoch}; state saved to {run.state_path}, "
                "rerun the job to resume")
        idx = perm[start:start + batch_size]
        step = start // batch_size + 1
        loss, logits, targets = _step(run, state, epoch, idx, xb)
        if sync_check or step % FINITE_CHECK_EVERY == 0:
            _check_finite(loss, bad_step, step, epoch, run.name, run.state_path, sync_check)
        else:
            bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss.detach()),
                                   step, bad_step)
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        state.optimizer.step()
        # Accumulated on the device: no host sync per step on CUDA.
        loss_sum += loss.detach().float() * len(idx)
        correct += (logits.detach().argmax(1) == targets).sum()
    if not sync_check:
        _check_finite(None, bad_step, None, epoch, run.name, run.state_path, False)
    return loss_sum, correct, elapsed


def _step(run: _Run, state: TrainState, epoch: int, idx: torch.Tensor,
          xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss, the student's logits and the labels for the images `idx`
    (`xb`, their uint8 pixels)."""
    if run.cfg.augment.enabled:
        xb = augment_batch(xb, run.cfg.augment, state.augment)
    xb, targets = run.normalize(xb), run.train_y[idx]
    with autocast(xb.device, run.amp):
        t_logits, t_feat = run.teacher(idx, xb) if run.teacher else (None, None)
        feat, logits = run.forward(xb)
        loss = run.loss_fn(Step(logits, targets, epoch, t_logits, feat, t_feat))
    return loss, logits, targets


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
    row["val_correct"] = int((val_logits.argmax(1) == val_y).sum().item())
    row["val_images"] = len(val_y)
    row["val_accuracy"] = row["val_correct"] / len(val_y)
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
