"""One training job: a teacher, a plain student or a distilled student."""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Optional

import torch

from kdflow import KdflowError
from kdflow.core import atomic
from kdflow.models import checkpoint, weights
from kdflow.distill import methods
from kdflow.core import hashing, provenance
from kdflow.train import resume
from kdflow.core import streams
from kdflow.study import planner
from kdflow.data.arrays import Normalizer, Splits
from kdflow.core.device import EngineOptions, precision_for, setup
from kdflow.models.inference import features_and_logits, predict_logits
from kdflow.train.engine import TeacherFn, TrainConfig, fit
from kdflow.models.zoo import build_model, count_parameters

log = logging.getLogger(__name__)

def write_history(rows: list[dict], path: str | os.PathLike) -> None:
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    atomic.write_with(path, write)


def train(
    arm: dict,
    *,
    dataset: str,
    split: str,
    out_model: str,
    out_history: str,
    seed: int,
    device: str,
    engine: dict,
    threads: Optional[int] = None,
    teacher: Optional[str] = None,
    teacher_logits: Optional[str] = None,
    init: Optional[str] = None,
    init_record: Optional[dict] = None,
    init_described: Optional[dict] = None,
    placement: dict,
) -> None:
    """Train one model and save its best-validation checkpoint and history.

    arm: the model's plan record (kdflow.study.planner.Arm.record(): role, validated
    training section {model, epochs, batch_size, lr, optimizer, ...,
    augment}, method and values). Students get the `teacher` checkpoint of
    their seed: the baseline only to measure agreement with it, a distilled
    student to learn from it, from the precomputed `teacher_logits` file
    when given. engine: the validated engine section {precision, compile,
    deterministic}. init: weights the training starts from (teacher.init
    or student.init, whose source is `init_record`, and what its publisher
    says of it `init_described`, see kdflow.models.pretrained.init_source):
    fine-tuning. Both students of a seed get the same file and draw the same
    fresh head, so they still start from the same weights. placement: the
    config's placement section (where the images are held: kdflow.data.store;
    it changes no result).
    """
    role, model_cfg = arm["role"], arm["training"]
    if role not in planner.ROLES:
        raise KdflowError(f"role must be one of {planner.ROLES}, not {role!r}")
    dev, options = setup(device, engine, threads)
    cfg = TrainConfig.from_config(model_cfg, engine)
    aug = cfg.augment
    precision = precision_for(dev, options.precision)
    amp = precision.dtype
    log.info("%s, seed %d, on %s (%s), %s, augmentation %s", arm["path"], seed, dev,
             provenance.device_name(dev), precision.name, aug if aug.enabled else "off")
    log.info("precision %s: %s", precision.name, precision.reason)
    data = Splits(dataset, split, dev, placement)
    normalize = Normalizer(dev, data.mean, data.std)
    log.info("data: %d train, %d validation images, %d classes",
             len(data.train_y), len(data.val_y), data.num_classes)

    teacher_val = None
    teacher_record = None
    method = None
    teacher_fn = None
    if teacher is not None:
        # BatchNorm teachers must use their running statistics: eval mode
        # throughout (checkpoint.load_model and predict_logits ensure it).
        t_model, t_ckpt = checkpoint.load_model(teacher, dev)
        t_model.eval()
        teacher_record = {"path": str(teacher), "model": t_ckpt["model"],
                          "best_epoch": t_ckpt["best_epoch"],
                          "best_val_accuracy": t_ckpt["best_val_accuracy"]}
        teacher_val = predict_logits(t_model, data.val_x, normalize, amp_dtype=amp)

    # Initial weights depend on the seed alone, so the plain and the
    # distilled students of one seed start from the same weights; seeding
    # here also fixes the dropout masks (CPU and CUDA generators alike).
    torch.manual_seed(streams.stream_seed(seed, "init"))
    image_size = int(data.train_x.shape[-1])
    model = build_model(model_cfg["model"], data.num_classes, image_size)
    log.info("model %s: %d parameters", model_cfg["model"], count_parameters(model))
    started_from = None
    if init is not None:
        # After the seeded build: a replaced head is the one build_model
        # drew, the same for the plain and the distilled student.
        started_from = {**(init_record or {}), **weights.init_from(
            model, init, classes=data.classes, image_size=image_size,
            normalisation=checkpoint.normalisation(data.mean, data.std),
            described=init_described)}
        if started_from.get("head_replaced"):
            log.info("fine-tuning from %s: classifier head %s replaced (%d classes there, "
                     "%d here%s), all else loaded", init, started_from["head"],
                     started_from["from_classes"], started_from["to_classes"],
                     ", other names" if started_from["from_classes"] ==
                     started_from["to_classes"] else "")
        else:
            log.info("fine-tuning from %s: every weight loaded", init)

    if role == "student_kd":
        if teacher is None:
            raise KdflowError("a distilled student needs its teacher's checkpoint")
        # A method's own modules (a hint regressor) draw their initial
        # weights from a generator of their own, never from the global ones:
        # the student's dropout masks stay those of its plain twin.
        method = methods.build(arm["method"], arm["values"], methods.BuildContext(
            model, t_model, dev, streams.generator(seed, "method"),
            tuple(data.train_x.shape[1:])))
        log.info("distillation: %s, %s", arm["method"],
                 ", ".join(f"{k} {v}" for k, v in arm["values"].items()))
        cached = None
        if methods.caches_teacher_logits(arm["method"], model_cfg["augment"]):
            cached = (load_teacher_logits(teacher_logits, teacher, split, dev)
                      if teacher_logits is not None else
                      predict_logits(t_model, data.train_x, normalize, amp_dtype=amp))
        teacher_fn = teacher_signal(t_model, features=method.features, cached=cached)

    # Resumable state beside the outputs, not one of them (kdflow.train.resume).
    state_path = str(Path(out_model).with_name("resume.pt"))
    job = job_identity(arm, options, seed, dev.type, dataset, split, teacher, init,
                       precision=precision.name)
    result = fit(model, data.train_x, data.train_y, data.val_x, data.val_y, cfg, seed=seed,
                 loss_fn=method.loss if method else None, teacher=teacher_fn,
                 teacher_val_logits=teacher_val, features=bool(method and method.features),
                 extra=method.extra if method else None, normalize=normalize,
                 state_path=state_path, job=job, name=str(Path(out_model).parent))
    last = result.history[-1]
    log.info("best epoch %d (val acc %.2f%%), last epoch %d (val acc %.2f%%)",
             result.best_epoch, 100 * result.best_val_accuracy,
             last["epoch"], 100 * last["val_accuracy"])

    Path(out_model).parent.mkdir(parents=True, exist_ok=True)
    write_history(result.history, out_history)
    checkpoint.save(
        out_model,
        state_dict=result.best_state,
        model=model_cfg["model"],
        num_classes=data.num_classes,
        image_size=image_size,
        classes=data.classes,
        normalisation=checkpoint.normalisation(data.mean, data.std),
        role=role,
        seed=seed,
        # The plan record: the training section, method and values it was
        # trained with (the aggregate reads them from metrics.json).
        plan=dict(arm),
        engine=dict(engine) if engine else None,
        best_epoch=result.best_epoch,
        best_val_accuracy=result.best_val_accuracy,
        best_val_correct=result.best_val_correct,
        val_images=result.val_images,
        last_epoch=last["epoch"],
        last_val_accuracy=last["val_accuracy"],
        train_seconds=sum(r["seconds"] for r in result.history),
        teacher=teacher_record,
        init=started_from,
        provenance=provenance.collect(dev, precision),
    )
    resume.remove(state_path)  # outputs complete: nothing left to resume


def job_identity(arm: dict, options: EngineOptions, seed: int, device_type: str,
                 dataset: str, split: str, teacher: Optional[str],
                 init: Optional[str] = None, precision: Optional[str] = None) -> str:
    """What a saved training state must match to be resumed: the plan
    record, the seed, the inputs' contents, the device type (a CUDA
    generator state cannot be restored on a CPU node, nor the reverse), the
    precision `auto` chose (an fp32 state resumed on a bf16 CPU would train
    in neither precision, and its checkpoint could record only one) and the
    library's code (kdflow.train.resume.library_digest)."""
    return resume.fingerprint(
        arm=arm, engine=options, seed=seed, device=device_type,
        library=resume.library_digest(),
        split=hashing.file_digest(split), dataset=hashing.file_digest(dataset),
        teacher=hashing.file_digest(teacher) if teacher else None,
        **({"init": hashing.file_digest(init)} if init else {}),
        **({"precision": precision} if precision else {}))


def teacher_signal(t_model, *, features: bool,
                   cached: Optional[torch.Tensor]) -> TeacherFn:
    """The teacher's (logits, feature map or None) for each training step.

    With `cached` (the teacher's logits for the whole training split, where
    kdflow.distill.methods.caches_teacher_logits allows: a logit-only method without
    augmentation, so the teacher in eval mode gives an image the same
    logits every epoch) they are looked up by index: the teacher's forward
    pass leaves the training loop. Otherwise the teacher runs online: with
    augmentation it must see the very view the student sees in that step
    (Beyer et al. 2022, "consistent teaching"), and feature maps are too
    large to keep for the whole training set.
    """
    t_model.eval()
    if cached is not None:
        return lambda idx, xb: (cached[idx], None)

    @torch.no_grad()
    def online(idx, xb):
        if features:
            f, logits = features_and_logits(t_model, xb)
            return logits.float(), f.float()
        return t_model(xb).float(), None

    return online


def save_teacher_logits(teacher: str, dataset: str, split: str, out: str, *,
                        device: str, engine: dict, threads: Optional[int] = None,
                        placement: dict) -> None:
    """The teacher's logits on the training split, once, for every
    logit-based student of its seed (same computation as `teacher_signal`)."""
    dev, options = setup(device, engine, threads)
    precision = precision_for(dev, options.precision)
    log.info("precision %s: %s", precision.name, precision.reason)
    data = Splits(dataset, split, dev, placement)
    t_model, _ = checkpoint.load_model(teacher, dev)
    logits = predict_logits(t_model, data.train_x, Normalizer(dev, data.mean, data.std),
                            amp_dtype=precision.dtype)
    record = {"logits": logits.cpu(), "teacher": hashing.file_digest(teacher),
              "split": hashing.file_digest(split)}
    atomic.save_torch(out, record)
    log.info("teacher logits for %d training images -> %s", len(logits), out)


def load_teacher_logits(path: str, teacher: str, split: str, device) -> torch.Tensor:
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if saved["teacher"] != hashing.file_digest(teacher) or \
            saved["split"] != hashing.file_digest(split):
        raise KdflowError(f"{path} was computed for another teacher or split; "
                          "delete it and rerun")
    return saved["logits"].to(device)
