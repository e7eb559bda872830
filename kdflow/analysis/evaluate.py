"""Test-set evaluation of one trained model, written as JSON."""

from __future__ import annotations

import logging
import os
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from kdflow import KdflowError
from kdflow.core import atomic
from kdflow.models import checkpoint
from kdflow.core import provenance
from kdflow.models.efficiency import count_macs, measure_speed
from kdflow.analysis.stats import (CHANCE_FLAG, TEACHER_CHANCE_FLAG, at_chance, calibration,
                          chance_p_value)
from kdflow.data.arrays import Normalizer, channel_stats
from kdflow.data.store import open_images
from kdflow.core.device import resolve_device, set_threads
from kdflow.models.inference import inference_batch, predict_logits
from kdflow.distill.losses import teacher_kl
from kdflow.models.zoo import count_parameters, parameter_bytes

log = logging.getLogger(__name__)


def write_json(obj, path: str | os.PathLike) -> None:
    atomic.write_json(path, obj)


def evaluate(model_path: str, dataset: str, out: str, *, arm: str, seed: Optional[int],
             device: str = "auto", teacher: Optional[str] = None,
             threads: Optional[int] = None, out_speed: Optional[str] = None,
             speed_settings: Optional[dict] = None,
             placement: dict) -> dict:
    """Accuracy, loss, per-class accuracy, confusion matrix, size; and for a
    student, its agreement with the teacher on the test set.

    The file holds results only, no timings, dates or hosts, so with
    deterministic training two runs give byte-identical metrics files;
    provenance stays in the checkpoint. Measured latency and throughput go
    to `out_speed`, with the device they were measured on, as the config's
    `speed` section (`speed_settings`) says.
    """
    if out_speed is not None and speed_settings is None:
        raise ValueError("measuring speed needs the config's speed settings")
    set_threads(threads)
    dev = resolve_device(device)
    with np.load(dataset) as d:
        y = torch.from_numpy(d["y_test"]).to(dev)
        classes = [str(c) for c in d["classes"]]
        normalize = Normalizer(dev, *channel_stats(d))
    (x,), where = open_images(dataset, [("x_test", None)], dev, placement)
    log.info("%s", where)
    model, ckpt = checkpoint.load_model(model_path, dev)
    if "plan" not in ckpt:
        raise KdflowError(f"{model_path} has no plan record (trained by a kdflow before "
                          "plan records): retrain it (delete it, or --forcerun its training "
                          "rule)")
    if ckpt["plan"]["path"] != arm:
        raise KdflowError(f"{model_path} was trained as {ckpt['plan']['path']!r}, not as "
                          f"{arm!r}: it is in another model's place; delete it and rerun")
    val_correct, val_images, epochs = checkpoint.validation_counts(ckpt, model_path)
    logits = predict_logits(model, x, normalize)
    pred = logits.argmax(1)
    k = len(classes)
    confusion = torch.bincount(y * k + pred, minlength=k * k).view(k, k).cpu()
    per_class = (confusion.diag().double() / confusion.sum(1).clamp(min=1)).tolist()

    metrics = {
        "arm": arm,
        "seed": seed,
        "model": ckpt["model"],
        "role": ckpt["role"],
        "test_images": len(y),
        "correct": int((pred == y).sum().item()),
        "accuracy": (pred == y).sum().item() / len(y),
        "loss": F.cross_entropy(logits, y).item(),
        "per_class_accuracy": dict(zip(classes, per_class)),
        "confusion_matrix": confusion.tolist(),  # rows: true class, cols: predicted
        "classes": classes,
        "parameters": count_parameters(model),
        "parameter_bytes": parameter_bytes(model),
        "macs_per_image": count_macs(model, tuple(x.shape[1:])),
        "calibration": calibration(torch.softmax(logits, 1).cpu().numpy(), y.cpu().numpy()),
        "best_epoch": ckpt["best_epoch"],
        "best_val_accuracy": ckpt["best_val_accuracy"],
        "best_val_correct": val_correct, "val_images": val_images,
        "last_epoch": ckpt["last_epoch"],
        "last_val_accuracy": ckpt["last_val_accuracy"],
        # What the model is (kdflow.study.planner.plan): the aggregate reads its
        # method and values from here, never from the path.
        "plan": ckpt["plan"],
        "engine": ckpt["engine"],
        "checkpoint": str(model_path),
    }
    # A model no better than guessing on validation (a diverged or
    # mis-configured run) is flagged, and so is every student of such a
    # teacher: the report marks them instead of summarising them silently.
    metrics["chance_p_value"] = chance_p_value(val_correct, val_images, k, epochs)
    metrics["at_chance"] = at_chance(val_correct, val_images, k, epochs)
    metrics["flag"] = CHANCE_FLAG if metrics["at_chance"] else None
    if teacher is not None:
        t_model, t_ckpt = checkpoint.load_model(teacher, dev)
        t_correct, t_images, t_epochs = checkpoint.validation_counts(t_ckpt, teacher)
        metrics["teacher_at_chance"] = at_chance(t_correct, t_images, k, t_epochs)
        if metrics["teacher_at_chance"] and not metrics["at_chance"]:
            metrics["flag"] = TEACHER_CHANCE_FLAG
        t_logits = predict_logits(t_model, x, normalize)
        metrics["teacher_agreement"] = (pred == t_logits.argmax(1)).sum().item() / len(y)
        metrics["teacher_kl"] = teacher_kl(logits, t_logits).item()
        metrics["teacher_checkpoint"] = str(teacher)
    write_json(metrics, out)
    if out_speed is not None:
        speed = {"arm": arm, "seed": seed, "device": str(dev),
                 "device_name": provenance.device_name(dev),
                 **measure_speed(model, dev, image_shape=tuple(x.shape[1:]),
                                 **{**speed_settings, "batch": min(
                                     speed_settings["batch"],
                                     inference_batch(model, tuple(x.shape[1:]), dev))})}
        write_json(speed, out_speed)
        log.info("latency %.2f ms (batch 1), throughput %.0f images/s",
                 speed["latency_ms_batch1"], speed["throughput_images_per_s"])
    if metrics["flag"]:
        log.warning("%s seed %s: %s (best validation accuracy %.2f%%, chance %.2f%%)", arm, seed,
                    metrics["flag"], 100 * ckpt["best_val_accuracy"], 100 / k)
    log.info("%s seed %s: test accuracy %.2f%%, loss %.4f%s", arm, seed,
             100 * metrics["accuracy"], metrics["loss"],
             f", agreement with teacher {100 * metrics['teacher_agreement']:.2f}%"
             if teacher else "")
    return metrics
