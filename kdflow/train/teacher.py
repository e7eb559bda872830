"""Teachers from outside: a trained checkpoint imported as this run's teacher.

The imported file (teacher.checkpoint, fetched and md5-verified by the
workflow) is loaded as weights only and checked against this config's
architecture and the dataset's class count, and, as far as the file
records them, its class names, image size and normalisation
(kdflow.models.weights.load_teacher: a misfit is refused); then measured
on this run's validation split, as a trained teacher's best epoch is, and
written as an ordinary kdflow checkpoint. Everything downstream (its
logits, the students, evaluation, the report) then treats it like a
teacher trained here. The checkpoint's `source` record says where it came
from and what was `checked` and what could not be (`unchecked`, each with
its reason: a plain state dict records no class names, for one).
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from kdflow import KdflowError
from kdflow.core import provenance
from kdflow.data.arrays import Normalizer, Splits
from kdflow.models import checkpoint, weights
from kdflow.core.device import precision_for, setup
from kdflow.models.inference import predict_logits

log = logging.getLogger(__name__)


def import_teacher(arm: dict, *, source: str, source_record: dict, dataset: str, split: str,
                   out_model: str, device: str, engine: dict,
                   threads: Optional[int] = None, placement: dict) -> dict:
    """Check the file at `source` and write it to `out_model` as the teacher.

    arm: the teacher's plan record, kept in the checkpoint (of its training
    section only `model` is used: the workflow passes no other key, so the
    training keys an import does not use rerun nothing); source_record: its
    teacher.checkpoint section ({url, md5}), kept in the checkpoint's
    `source` with the checks made. Returns the validation counts it
    measured."""
    name = arm["training"]["model"]
    dev, options = setup(device, engine, threads)
    precision = precision_for(dev, options.precision)
    log.info("precision %s: %s", precision.name, precision.reason)
    data = Splits(dataset, split, dev, placement)
    image_size = int(data.train_x.shape[-1])
    normalisation = checkpoint.normalisation(data.mean, data.std)
    try:
        model, loaded = weights.load_teacher(source, model=name, classes=data.classes,
                                             image_size=image_size,
                                             normalisation=normalisation)
    except KdflowError as e:
        # Named by the config's url: the downloaded copy's path means little.
        raise KdflowError(f"teacher.checkpoint {source_record['url']}: {e}") from None
    for what in loaded["unchecked"]:
        log.info("imported teacher: not checked: %s", what)
    model.to(dev).to(memory_format=torch.channels_last).eval()
    normalize = Normalizer(dev, data.mean, data.std)
    logits = predict_logits(model, data.val_x, normalize,
                            amp_dtype=precision.dtype)
    correct = int((logits.argmax(1) == data.val_y).sum())
    images = len(data.val_y)
    log.info("imported teacher %s (%s, md5 %s): %d of %d validation images right (%.2f%%)",
             name, source_record["url"], source_record["md5"], correct, images,
             100 * correct / images)
    checkpoint.save(
        out_model,
        state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()},
        model=name,
        num_classes=data.num_classes,
        image_size=image_size,
        classes=data.classes,
        normalisation=normalisation,
        role="teacher",
        seed=None,
        plan=dict(arm),
        engine=dict(engine) if engine else None,
        # No epoch was trained here: one look at the validation split.
        best_epoch=0,
        best_val_accuracy=correct / images,
        best_val_correct=correct,
        val_images=images,
        last_epoch=0,
        last_val_accuracy=correct / images,
        train_seconds=0.0,
        teacher=None,
        # {url, md5, kind, (a kdflow file's model, num_classes, image_size),
        # checked, unchecked}.
        source={"url": source_record["url"], "md5": source_record["md5"].lower(), **loaded},
        provenance=provenance.collect(dev, precision),
    )
    return {"val_correct": correct, "val_images": images}
