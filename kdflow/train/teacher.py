"""Teachers from outside: a trained checkpoint imported as this run's teacher.

The imported file (teacher.checkpoint, fetched and md5-verified by the
workflow) is loaded as weights only and checked against this config's
architecture, the dataset's classes and its image size
(kdflow.models.weights), then measured on this run's validation split, as a
trained teacher's best epoch is, and written as an ordinary kdflow
checkpoint. Everything downstream (its logits, the students, evaluation,
the report) then treats it like a teacher trained here; the checkpoint's
`source` record says where it came from.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from kdflow import KdflowError
from kdflow.core import provenance
from kdflow.data.arrays import Normalizer, Splits
from kdflow.models import checkpoint, weights
from kdflow.train.engine import autocast_dtype, predict_logits, setup

log = logging.getLogger(__name__)


def import_teacher(arm: dict, *, source: str, source_record: dict, dataset: str, split: str,
                   out_model: str, device: str, engine: dict,
                   threads: Optional[int] = None) -> dict:
    """Check the file at `source` and write it to `out_model` as the teacher.

    arm: the teacher's plan record; source_record: its teacher.checkpoint
    section ({url, md5}), kept in the checkpoint. Returns the validation
    accuracy it measured."""
    name = arm["training"]["model"]
    dev, options = setup(device, engine, threads)
    data = Splits(dataset, split, dev)
    image_size = int(data.train_x.shape[-1])
    try:
        model, loaded = weights.load_teacher(source, model=name, num_classes=data.num_classes,
                                             image_size=image_size)
    except KdflowError as e:
        # Named by the config's url: the downloaded copy's path means little.
        raise KdflowError(f"teacher.checkpoint {source_record['url']}: {e}") from None
    theirs = loaded.get("classes")
    if theirs is not None and [str(c) for c in theirs] != [str(c) for c in data.classes]:
        raise KdflowError(
            f"teacher.checkpoint {source_record['url']}: its classes "
            f"{list(theirs)[:5]}... are not this dataset's {list(data.classes)[:5]}... "
            "(same count, other names or order): a teacher's logits would mean other "
            "classes; use a teacher trained on this dataset")
    model.to(dev).to(memory_format=torch.channels_last).eval()
    normalize = Normalizer(dev, data.mean, data.std)
    logits = predict_logits(model, data.val_x, normalize,
                            amp_dtype=autocast_dtype(dev, options.precision))
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
        source={"url": source_record["url"], "md5": source_record["md5"].lower(),
                **{k: v for k, v in loaded.items() if k != "classes"}},
        provenance=provenance.collect(dev),
    )
    return {"val_correct": correct, "val_images": images}
