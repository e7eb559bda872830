"""The workflow's export job: a checkpoint to model.onnx, model.int8.onnx and their export.json.

export.json (FORMAT), each number measured in this job:

  model, dataset, split   what was exported, and from which data
  preprocessing  how each image was prepared before the model saw it, as
              the converted .npz records it (kdflow.data.preprocessing):
              source, exif, alpha, colour, resize, crop, image_size, and the
              normalisation (mean, std) the file applies itself; what a
              deployment does to a photo to feed the file
  onnx        file, opset, ir_version, input and output (name, dtype, shape
              with "batch" dynamic, layout, channels, range), normalisation
  check       the fp32 file against PyTorch on every test image: tolerance,
              logit_scale, max_abs_diff, agreement {same, images, fraction},
              pytorch / onnxruntime {correct, images, accuracy}
  validation  the same scores on the validation split, per variant
              (pytorch, onnxruntime, and int8 with int8): what the choice
              of the variant to ship reads (kdflow.analysis.ship), so that
              the test set never enters it
  int8        null without int8; else file, quantization (the settings),
              calibration {images, seed, drawn_from, sha256, indices},
              accuracy, agreement_with_fp32, accuracy_drop, large_drop
              (both on the test set), validation_accuracy_drop and
              validation_large_drop (on the validation split)
  files       per precision: file, bytes, sha256
  cpu         name, machine, cores and the flags avx2, avx512f,
              avx512_vnni, avx_vnni, amx (null where unknown)
  provenance  kdflow.core.provenance plus the onnx packages' versions

No latency is measured here: export jobs run beside other jobs, which
would time the contention. The models the report compares are timed
together in one job of their own (kdflow.deploy.timing).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from kdflow.core import atomic, hashing, provenance
from kdflow.data.arrays import channel_stats
from kdflow.data.datasets import preprocessing_of
from kdflow.data.store import read_rows
from kdflow.deploy import timing
from kdflow.models.inference import inference_batch
from kdflow.deploy.onnx_export import (accuracy, agreement, check_against_pytorch, export_onnx,
                                       onnx_logits, open_session, pytorch_logits)
from kdflow.deploy.quantize import (LARGE_DROP, calibration_indices, digest, quantize_int8)
from kdflow.models import checkpoint

log = logging.getLogger(__name__)

FORMAT = "kdflow-export-1"
FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx"}
RECORD = "export.json"


def export_model(model_path: str | os.PathLike, dataset: str | os.PathLike,
                 split: str | os.PathLike, out_dir: str | os.PathLike, *,
                 calibration_images: int, seed: int, int8: bool, threads: int) -> dict:
    """Export, check, quantise and time one checkpoint; returns the record.

    Writes into `out_dir`: model.onnx (fp32, normalisation baked in, see
    kdflow.deploy.onnx_export), model.int8.onnx when `int8`, and
    export.json, each whole (kdflow.core.atomic) and export.json last: it
    exists only beside the files it describes. Everything is built in a
    temporary folder inside `out_dir` first, so a failure at any step
    leaves no new output at all.

    calibration_images: training images (of `split`'s train_idx, drawn with
    `seed`) that set the int8 ranges. threads: ONNX Runtime's threads for
    scoring (0: every available core).
    """
    scoring_threads = timing.thread_counts(threads)[-1]
    where = str(model_path)
    # Drawn first: a count the split cannot give fails before minutes of work.
    # A training split smaller than the count (a tiny first look) is used
    # whole: all of it is training data, and export.json records the count.
    if int8:
        with np.load(split) as s:
            available = len(s["train_idx"])
        if calibration_images > available:
            log.info("calibrating on all %d training images (export.calibration_images is %d)",
                     available, calibration_images)
        idx = calibration_indices(split, min(calibration_images, available), seed)
    else:
        idx = None
    model, ckpt = checkpoint.load_model(model_path)
    with np.load(dataset) as d, np.load(split) as s:
        x_test, y_test = d["x_test"], d["y_test"]
        mean, std = channel_stats(d)
        preprocessing = preprocessing_of(d)
        val_idx = s["val_idx"]
        y_val = d["y_train"][val_idx]
    # Only the training images used are read, not the whole training set.
    x_val = read_rows(dataset, "x_train", val_idx)
    image_shape = tuple(int(n) for n in x_test.shape[1:])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {"format": FORMAT,
              "model": {"file": where, "name": ckpt["model"], "num_classes": ckpt["num_classes"]},
              "dataset": str(dataset), "split": str(split), "preprocessing": preprocessing}

    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".export-") as tmp:
        paths = {"fp32": Path(tmp) / FILES["fp32"]}
        record["onnx"] = {"file": FILES["fp32"],
                          **export_onnx(model, paths["fp32"], mean, std, image_shape, where),
                          "normalisation": {"mean": list(mean), "std": list(std),
                                            "baked_in": True}}
        reference = pytorch_logits(model, x_test, mean, std)
        # ONNX Runtime's activations are the size PyTorch's are: the same
        # memory-sized batch.
        batch = inference_batch(model, image_shape)
        fp32_logits = onnx_logits(open_session(paths["fp32"], scoring_threads), x_test, batch)
        record["check"] = check_against_pytorch(reference, fp32_logits, y_test, where)
        log.info("%s: ONNX matches PyTorch on %d test images (max |diff| %.2g)", where,
                 len(y_test), record["check"]["max_abs_diff"])
        fp32_session = open_session(paths["fp32"], scoring_threads)
        record["validation"] = {
            "pytorch": accuracy(pytorch_logits(model, x_val, mean, std), y_val),
            "onnxruntime": accuracy(onnx_logits(fp32_session, x_val, batch), y_val)}
        del fp32_session

        record["int8"] = None
        if int8:
            paths["int8"] = Path(tmp) / FILES["int8"]
            quantization = quantize_int8(paths["fp32"], paths["int8"],
                                         read_rows(dataset, "x_train", idx))
            q_logits = onnx_logits(open_session(paths["int8"], scoring_threads), x_test, batch)
            acc = accuracy(q_logits, y_test)
            drop = record["check"]["onnxruntime"]["accuracy"] - acc["accuracy"]
            q_session = open_session(paths["int8"], scoring_threads)
            record["validation"]["int8"] = accuracy(onnx_logits(q_session, x_val, batch), y_val)
            del q_session
            val_drop = (record["validation"]["onnxruntime"]["accuracy"]
                        - record["validation"]["int8"]["accuracy"])
            record["int8"] = {
                "file": FILES["int8"], "quantization": quantization,
                "calibration": {"images": len(idx), "seed": seed, "drawn_from": "train_idx",
                                "sha256": digest(idx), "indices": idx.tolist()},
                "accuracy": acc, "agreement_with_fp32": agreement(q_logits, fp32_logits),
                "accuracy_drop": drop, "large_drop": drop > LARGE_DROP,
                "validation_accuracy_drop": val_drop, "validation_large_drop": val_drop > LARGE_DROP,
                "large_drop_threshold": LARGE_DROP}
            log.info("%s: int8 test accuracy %.2f%% (fp32 %.2f%%)%s", where,
                     100 * acc["accuracy"], 100 * record["check"]["onnxruntime"]["accuracy"],
                     ": a large drop" if drop > LARGE_DROP else "")

        record["files"] = {p: {"file": FILES[p], "bytes": path.stat().st_size,
                               "sha256": hashing.file_digest(path)} for p, path in paths.items()}
        record["cpu"] = timing.cpu_info()
        record["provenance"] = {**provenance.collect("cpu"),
                                **{p: provenance.package_version(p)
                                   for p in ("onnx", "onnxscript", "onnxruntime")}}

        # Into place. The old record goes first, so no export.json ever
        # describes files other than those beside it; a stale int8 file of
        # an earlier run with int8 on would be taken for this run's.
        (out_dir / RECORD).unlink(missing_ok=True)
        for precision, name in FILES.items():
            if precision in paths:
                with atomic.atomic_path(out_dir / name) as part:
                    os.replace(paths[precision], part)
            else:
                (out_dir / name).unlink(missing_ok=True)
        atomic.write_json(out_dir / RECORD, record)
    return record
