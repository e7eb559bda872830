"""The feature losses use no op that lacks a deterministic CUDA kernel.

With `engine.deterministic: true` training calls
torch.use_deterministic_algorithms(True), under which such an op raises a
RuntimeError on CUDA, in the middle of training. There is no GPU here, so the
aten ops of each feature loss's forward and backward are recorded on the CPU
(a TorchDispatchMode sees the same aten ops on either device) and checked
against the ops torch's documentation names.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from kdflow.distill import methods
from kdflow.workflow.config import validate
from kdflow.distill.losses import Step
from kdflow.models.inference import features_and_logits
from kdflow.distill.losses import HintRegressor, cosine_loss, hint_loss
from kdflow.models.zoo import build_model
from kdflow.study import planner

# The docstring of torch.use_deterministic_algorithms (torch 2.14), list
# "The following normally-nondeterministic operations will throw a
# RuntimeError when mode=True", as the aten ops those entries dispatch to.
# Where an entry depends on an argument (EmbeddingBag mode='max', bincount
# with weights, median with indices) the op is listed whatever the argument:
# stricter than the documentation, never looser.
NO_DETERMINISTIC_CUDA_KERNEL = {
    "avg_pool3d_backward",                                     # AvgPool3d
    "_adaptive_avg_pool2d_backward",                           # AdaptiveAvgPool2d
    "_adaptive_avg_pool3d_backward",                           # AdaptiveAvgPool3d
    "adaptive_max_pool2d_backward",                            # AdaptiveMaxPool2d
    "fractional_max_pool2d_backward",                          # FractionalMaxPool2d
    "fractional_max_pool3d_backward",                          # FractionalMaxPool3d
    "max_unpool2d", "max_unpool3d",                            # MaxUnpool1d/2d/3d
    # interpolate, modes linear, bilinear, bicubic, trilinear (and antialiased)
    "upsample_linear1d_backward", "upsample_bilinear2d_backward",
    "upsample_bicubic2d_backward", "upsample_trilinear3d_backward",
    "_upsample_bilinear2d_aa_backward", "_upsample_bicubic2d_aa_backward",
    "reflection_pad1d_backward", "reflection_pad2d_backward",  # ReflectionPad1d/2d/3d
    "reflection_pad3d_backward",
    # NLLLoss: the documentation names the module; in torch's source the
    # alert is raised by the spatial (N, C, H, W) kernel only. The (N, C)
    # nll_loss that cross_entropy uses for logits has a deterministic kernel.
    "nll_loss2d_forward",
    "_ctc_loss_backward",                                      # CTCLoss
    "_embedding_bag_backward", "_embedding_bag_dense_backward",  # EmbeddingBag
    "put", "put_",                                             # Tensor.put_
    "histc",
    "bincount",
    "median",
    "grid_sampler_2d_backward", "grid_sampler_3d_backward",    # grid_sample
    "cudnn_grid_sampler_backward",
    # Tensor.scatter_reduce with reduce='prod': see forbidden().
    # Tensor.resize_ with a quantized tensor: kdflow has none.
}


class OpRecorder(TorchDispatchMode):
    """Every aten op dispatched while active, with its arguments."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)

    def names(self) -> set[str]:
        return {f.overloadpacket.__name__ for f, _, _ in self.calls}


def forbidden(recorder: OpRecorder) -> set[str]:
    bad = recorder.names() & NO_DETERMINISTIC_CUDA_KERNEL
    for func, args, kwargs in recorder.calls:
        if func.overloadpacket.__name__.startswith("scatter_reduce") and \
                "prod" in (*args, *kwargs.values()):
            bad.add("scatter_reduce(prod)")
    return bad


def record(loss_fn) -> OpRecorder:
    """Ops of loss_fn()'s forward and of its backward."""
    with OpRecorder() as rec:
        loss_fn().backward()
    return rec


def test_the_recorder_catches_the_adaptive_pooling_the_losses_used():
    # The check can fail: the pooling the feature losses used before is caught.
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    rec = record(lambda: F.adaptive_avg_pool2d(x, (4, 4)).square().sum())
    assert "_adaptive_avg_pool2d_backward" in forbidden(rec)
    v = torch.randn(2, 10, requires_grad=True)
    rec = record(lambda: F.adaptive_avg_pool1d(v.unsqueeze(1), 5).square().sum())
    assert "_adaptive_avg_pool2d_backward" in forbidden(rec)


LABELS = torch.tensor([1, 0])


@pytest.mark.parametrize("student_shape,teacher_shape", [
    ((16, 8, 8), (32, 8, 8)),  # the tutorial: 1024 vs 2048, pooled by 2
    ((32, 8, 8), (16, 8, 8)),  # the student's the longer one
    ((16, 8, 8), (16, 8, 8)),  # equal
    ((7,), (10,)),             # sizes that do not divide
    ((10,), (7,)),
])
def test_cosine_loss_uses_only_deterministic_cuda_ops(student_shape, teacher_shape):
    g = torch.Generator().manual_seed(0)
    hs = torch.randn(2, *student_shape, generator=g, requires_grad=True)
    ht = torch.randn(2, *teacher_shape, generator=g)
    s = torch.randn(2, 10, generator=g, requires_grad=True)
    rec = record(lambda: cosine_loss(hs, ht, s, LABELS, 0.25))
    assert forbidden(rec) == set()


@pytest.mark.parametrize("student_hw,teacher_hw", [
    ((8, 8), (8, 8)),
    ((8, 8), (4, 4)),  # the regressor pools the student's map
    ((4, 4), (8, 8)),  # the loss pools the teacher's map
    ((8, 4), (4, 8)),  # both
    ((6, 6), (4, 4)),  # sizes that do not divide
    ((4, 5), (6, 3)),
])
def test_hint_loss_uses_only_deterministic_cuda_ops(student_hw, teacher_hw):
    g = torch.Generator().manual_seed(0)
    reg = HintRegressor(4, 6, generator=g)
    x = torch.randn(2, 4, *student_hw, generator=g, requires_grad=True)
    t = torch.randn(2, 6, *teacher_hw, generator=g)
    s = torch.randn(2, 10, generator=g, requires_grad=True)
    rec = record(lambda: hint_loss(reg(x, t.shape[-2:]), t, s, LABELS, 0.25))
    assert forbidden(rec) == set()


@pytest.mark.parametrize("method", ["cosine", "hint"])
@pytest.mark.parametrize("student_name,teacher_name", [
    ("lightnn", "deepnn"),
    ("resnet8x4", "vgg8"),    # 8x8 student map, 4x4 teacher map
    ("vgg8", "resnet32x4"),   # the reverse
])
def test_a_whole_distillation_step_uses_only_deterministic_cuda_ops(
        method, student_name, teacher_name):
    """Student forward, teacher features, the method's loss and backward, as
    a training step runs them."""
    torch.manual_seed(0)
    cfg = validate({"kd": {"method": method}})
    student, teacher = build_model(student_name), build_model(teacher_name).eval()
    arm = planner.lookup(cfg, f"lightnn/{method}/w0.25")
    m = methods.build(method, arm.values, methods.BuildContext(
        student, teacher, "cpu", torch.Generator().manual_seed(1), (3, 32, 32)))
    x = torch.randn(2, 3, 32, 32)

    def step():
        with torch.no_grad():
            t_features, t_logits = features_and_logits(teacher, x)
        features, logits = features_and_logits(student, x)
        return m.loss(Step(logits=logits, targets=LABELS, epoch=1, teacher_logits=t_logits,
                           features=features, teacher_features=t_features))

    assert forbidden(record(step)) == set()
