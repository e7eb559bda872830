"""A model to ONNX with the dataset's normalisation baked in, and the file checked against PyTorch.

What the deployed file takes and gives (also written into export.json):

  input   `images`, float32, (batch, 3, H, W) NCHW, RGB pixel values in
          [0, 255] -- a decoded uint8 image cast to float32, nothing more:
          no scaling to [0, 1], no mean/std, the file's first two nodes
          (Mul, Add) apply the training set's per-channel statistics.
  output  `logits`, float32, (batch, classes), before any softmax.

The batch dimension is dynamic. A caller of the file needs no kdflow and no
statistics, and cannot normalise twice or with the wrong dataset's numbers,
which is the mistake a separate preprocessing step invites. float32 rather
than uint8 because that is what serving stacks and ONNX Runtime's quantiser
feed, and resized images are no longer whole numbers.

The file is not trusted: `check_against_pytorch` runs it in ONNX Runtime on
the test images and compares its logits with kdflow's own evaluation path.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import re
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from kdflow import KdflowError
from kdflow.data.arrays import Normalizer
from kdflow.models.inference import MAX_BATCH, predict_logits

INPUT, OUTPUT = "images", "logits"
PIXEL_RANGE = (0.0, 255.0)

# Two correct fp32 implementations (PyTorch's oneDNN kernels in channels_last
# and ONNX Runtime's MLAS ones) differ only by summation order: ~1e-6 of the
# logits' scale for these networks. A real export fault (normalisation
# missing or applied twice, dropout left on, wrong weights) moves the logits
# by a large part of their scale. 1e-3 of the largest |logit| sits between
# the two with three orders of magnitude to spare on either side.
MAX_DIFF_RELATIVE = 1e-3
# A top-1 flip needs two logits within 2x the difference above, i.e. a near
# tie; 1 in 1000 test images may be one. Fewer agreements mean a wrong file.
MIN_AGREEMENT = 0.999



class Normalised(nn.Module):
    """`model` behind the dataset's per-channel normalisation: takes 0..255 pixels.

    x * (1 / (255 std)) + (-mean / std) is (x / 255 - mean) / std, as two
    elementwise nodes that every runtime fuses or runs in a blink.
    """

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.model = model
        mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("scale", 1 / (255 * std))
        self.register_buffer("shift", -mean / std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x * self.scale + self.shift)


def plain_copy(model: nn.Module) -> nn.Module:
    """An fp32, contiguous (not channels_last), CPU copy in eval mode: what
    the exporter traces best, leaving the caller's model untouched."""
    return copy.deepcopy(model).float().cpu().to(memory_format=torch.contiguous_format).eval()


def _reason(e: BaseException) -> str:
    """The innermost cause's first line, without the terminal colour codes
    the exporter's messages carry: the exporter wraps the real reason (a
    missing ONNX function, an untraceable branch) in generic advice."""
    seen = set()
    while (e.__cause__ or e.__context__) is not None and id(e) not in seen:
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    line = next((s.strip() for s in text.splitlines() if s.strip()), "")
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


def _dims(value_info) -> list:
    """A graph input's or output's shape as the file records it: names for
    dynamic dimensions, numbers for fixed ones."""
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def describe(path: str | os.PathLike) -> dict:
    """The facts a user of the file needs, read from the file itself."""
    m = onnx.load(str(path), load_external_data=False)
    opset = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    dtype = onnx.helper.tensor_dtype_to_np_dtype
    (inp,), (out,) = m.graph.input, m.graph.output
    return {
        "opset": int(opset),
        "ir_version": int(m.ir_version),
        "input": {"name": inp.name, "dtype": str(dtype(inp.type.tensor_type.elem_type)),
                  "shape": _dims(inp), "layout": "NCHW", "channels": "RGB",
                  "range": list(PIXEL_RANGE)},
        "output": {"name": out.name, "dtype": str(dtype(out.type.tensor_type.elem_type)),
                   "shape": _dims(out), "meaning": "logits (no softmax)"},
    }


def export_onnx(model: nn.Module, path: str | os.PathLike, mean, std,
                image_shape: tuple[int, int, int], what: str) -> dict:
    """Write `model` behind its normalisation as an ONNX file at `path`
    (dynamic batch) and describe it. An export the exporter refuses is a
    one-line KdflowError naming `what` (the model's file) and the reason."""
    wrapped = Normalised(plain_copy(model), mean, std).eval()
    # Batch 2, not 1: torch.export specialises a dimension of size 1 to a
    # constant, and the batch must stay dynamic.
    example = torch.zeros(2, *image_shape)
    try:
        # verbose=False silences the exporter's progress lines and stdout is
        # caught besides, so nothing of it lands in a job's log; its warnings
        # are about its own internals, nothing a user of kdflow can act on.
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                wrapped, (example,), dynamo=True, verbose=False,
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                input_names=[INPUT], output_names=[OUTPUT])
            program.save(str(path), external_data=False)
    except Exception as e:
        raise KdflowError(f"cannot export {what} to ONNX: {_reason(e)}; rewrite that part of "
                          "the model with operations PyTorch's ONNX exporter supports") from None
    return describe(path)


def open_session(path: str | os.PathLike, threads: int | None = None, *,
                 spinning: bool = True) -> ort.InferenceSession:
    """An ONNX Runtime CPU session of the file, once onnx's checker and ORT
    have both accepted it: a truncated or damaged file is a one-line
    KdflowError, not a protobuf traceback. `threads`: intra-op threads
    (None: ORT's default, one per physical core). `spinning` False stops
    idle threads from busy-waiting, for sessions kept open beside others."""
    try:
        onnx.checker.check_model(str(path))
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only; its warnings are for ORT's developers
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        if not spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise KdflowError(f"{path} is not a usable ONNX model ({_reason(e)}); delete it and "
                          "rerun the export") from None
    names = ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
    if names != ([INPUT], [OUTPUT]):
        raise KdflowError(f"{path} has inputs {names[0]} and outputs {names[1]}, not kdflow's "
                          f"[{INPUT!r}] and [{OUTPUT!r}]; rerun the export")
    return session


def onnx_logits(session: ort.InferenceSession, x_uint8: np.ndarray,
                batch: int = MAX_BATCH) -> np.ndarray:
    """Logits (float32) of uint8 NCHW images, fed as the file expects them,
    `batch` images per call (the export job passes the PyTorch model's
    memory-sized batch, kdflow.models.inference.inference_batch)."""
    out = [session.run(None, {INPUT: x_uint8[i:i + batch].astype(np.float32)})[0]
           for i in range(0, len(x_uint8), batch)]
    return np.concatenate(out) if out else np.empty((0, 0), np.float32)


def pytorch_logits(model: nn.Module, x_uint8: np.ndarray, mean, std) -> np.ndarray:
    """The same images through kdflow's own evaluation path (Normalizer,
    channels_last, eval mode) in fp32 on the CPU: the numbers the workflow
    reports for the model."""
    model = copy.deepcopy(model).float().cpu().to(memory_format=torch.channels_last)
    return predict_logits(model, torch.from_numpy(np.ascontiguousarray(x_uint8)),
                          Normalizer("cpu", mean, std)).numpy()


def accuracy(logits: np.ndarray, labels: np.ndarray) -> dict:
    correct = int((logits.argmax(1) == labels).sum())
    return {"correct": correct, "images": int(len(labels)),
            "accuracy": correct / len(labels) if len(labels) else None}


def agreement(a: np.ndarray, b: np.ndarray) -> dict:
    """How often two sets of logits pick the same class."""
    same = int((a.argmax(1) == b.argmax(1)).sum())
    return {"same": same, "images": int(len(a)), "fraction": same / len(a) if len(a) else None}


def check_against_pytorch(reference: np.ndarray, logits: np.ndarray, labels: np.ndarray,
                          what: str) -> dict:
    """Compare the file's logits with PyTorch's on the same images; outside
    the tolerance it is a one-line KdflowError naming `what` and the numbers."""
    if len(labels) == 0:
        raise KdflowError(f"no test images to check the ONNX export of {what} on")
    scale = float(np.abs(reference).max())
    diff = float(np.abs(logits - reference).max())
    agree = agreement(logits, reference)
    record = {
        "test_images": int(len(labels)),
        "tolerance": {"max_abs_diff_relative": MAX_DIFF_RELATIVE,
                      "max_abs_diff": MAX_DIFF_RELATIVE * scale, "min_agreement": MIN_AGREEMENT},
        "logit_scale": scale, "max_abs_diff": diff, "agreement": agree,
        "pytorch": accuracy(reference, labels), "onnxruntime": accuracy(logits, labels),
    }
    # `not <=` also catches NaN.
    if not diff <= MAX_DIFF_RELATIVE * scale or agree["fraction"] < MIN_AGREEMENT:
        raise KdflowError(
            f"the ONNX export of {what} does not match PyTorch on {len(labels)} test images: "
            f"max |logit difference| {diff:.3g} (allowed {MAX_DIFF_RELATIVE * scale:.3g}, "
            f"{MAX_DIFF_RELATIVE:g} of the largest |logit| {scale:.3g}), top-1 agreement "
            f"{agree['fraction']:.2%} (at least {MIN_AGREEMENT:.1%} needed); the file is wrong, "
            "do not deploy it")
    return record
