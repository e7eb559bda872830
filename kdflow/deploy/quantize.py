"""int8 static post-training quantisation of the exported file, calibrated on training images only.

ONNX Runtime's quantize_static in QDQ format (QuantizeLinear/DequantizeLinear
pairs around each quantised node, which ORT's CPU provider fuses into int8
kernels): weights int8 per output channel, activations int8 per tensor with
ranges from MinMax calibration.

Activations int8 (S8S8) rather than uint8 (U8S8): ORT's documentation calls
S8S8 in QDQ format its default and first choice on the CPU, balancing speed
and accuracy; U8S8 runs on x86 through VPMADDUBSW, whose 16-bit
intermediate sums can saturate on CPUs without VNNI (an accuracy loss that
would depend on the machine that runs the file).

The calibration images come from the training split only (split.npz's
train_idx): the validation images choose the settings and the test images
score the result, and ranges fitted to either would leak them into the
int8 model. Which images were used is returned, so it can be recorded and
checked.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                      QuantType, quantize_static)
from onnxruntime.quantization.shape_inference import quant_pre_process

from kdflow import KdflowError
from kdflow.deploy.onnx_export import INPUT

ACTIVATIONS = QuantType.QInt8
WEIGHTS = QuantType.QInt8
CALIBRATION_BATCH = 100  # images per calibration run; memory only, the ranges do not depend on it

# An int8 model that loses more than this much test accuracy against the fp32
# file is flagged in the record (not refused: whether it is acceptable is
# the user's call, and a small test subset makes the drop noisy).
LARGE_DROP = 0.01


def calibration_indices(split: str | os.PathLike, count: int, seed: int) -> np.ndarray:
    """`count` sorted indices into x_train, drawn without replacement from
    the split's training indices by a generator seeded with `seed`."""
    with np.load(split) as s:
        train_idx = s["train_idx"]
    if not 1 <= count <= len(train_idx):
        raise KdflowError(f"calibration needs between 1 and {len(train_idx)} images (the training "
                          f"split's size), not {count}; change export.calibration_images")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(train_idx, size=count, replace=False))


def digest(indices: np.ndarray) -> str:
    """sha256 of the indices as little-endian int64: one line that names the
    calibration set exactly."""
    return hashlib.sha256(np.asarray(indices, dtype="<i8").tobytes()).hexdigest()


class _Images(CalibrationDataReader):
    """Feeds the calibration images to ORT's calibrator in batches, as the
    deployed file takes them (float32 0..255)."""

    def __init__(self, x_uint8: np.ndarray):
        self._batches = iter(range(0, len(x_uint8), CALIBRATION_BATCH))
        self._x = x_uint8

    def get_next(self):
        i = next(self._batches, None)
        if i is None:
            return None
        return {INPUT: self._x[i:i + CALIBRATION_BATCH].astype(np.float32)}


def normalisation_nodes(model: onnx.ModelProto) -> list[str]:
    """The elementwise Mul/Add nodes between the graph input and the first
    real layer: the baked-in normalisation. Kept in float: quantising them
    would round the pixels once more before the first convolution quantises
    its input anyway, for no speed gained."""
    names, frontier = [], {INPUT}
    for node in model.graph.node:  # nodes are stored in topological order
        if node.op_type in ("Mul", "Add", "Sub", "Div") and frontier & set(node.input):
            names.append(node.name)
            frontier |= set(node.output)
    return names


def quantize_int8(fp32_path: str | os.PathLike, out_path: str | os.PathLike,
                  calibration_x: np.ndarray) -> dict:
    """Write the int8 model of `fp32_path` at `out_path`, calibrated on the
    uint8 images `calibration_x`; returns the settings used."""
    with tempfile.TemporaryDirectory(dir=Path(out_path).parent, prefix=".quantize-") as tmp:
        # ORT's pre-processing (symbolic shape inference, basic graph
        # optimisation) gives the quantiser every tensor's shape, which it
        # needs to place the QDQ pairs well; ORT asks for it before quantising.
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32_path), str(pre))
        excluded = normalisation_nodes(onnx.load(str(pre)))
        quantize_static(str(pre), str(out_path), _Images(calibration_x),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=ACTIVATIONS, weight_type=WEIGHTS,
                        calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=excluded)
    return {"method": "static post-training", "format": "QDQ", "weights": WEIGHTS.name,
            "activations": ACTIVATIONS.name, "per_channel": True, "reduce_range": False,
            "calibration_method": "MinMax", "pre_process": True, "float_nodes": excluded}
