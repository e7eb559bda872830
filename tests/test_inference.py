"""Inference batches sized by memory: the same logits at any batch size, the
batch shrinking with image area, and a 224-px job's memory within the budget."""

import json
import subprocess
import sys

import pytest
import torch

from kdflow.data.arrays import Normalizer
from kdflow.models.inference import (INFERENCE_MEMORY, MAX_BATCH, image_cost, inference_batch,
                                     predict_logits)
from kdflow.models.zoo import build_model
from tests.helpers.workflow import REPO

NORMALIZE = Normalizer("cpu", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def images(n, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize("name", ["deepnn", "resnet8"])
def test_the_batch_size_changes_no_logit_beyond_rounding(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, image_size=32)
    x = images(70, 32)
    whole = predict_logits(model, x, NORMALIZE, batch_size=1000)
    for b in (1, 7, None):
        part = predict_logits(model, x, NORMALIZE, batch_size=b)
        assert part.shape == whole.shape
        torch.testing.assert_close(part, whole, rtol=1e-4, atol=1e-5)
    assert model.training  # scoring leaves the model's mode as it was


def test_the_batch_shrinks_with_image_area_and_is_capped():
    net = build_model("resnet18", num_classes=10, image_size=224)
    small, big = image_cost(net, (3, 112, 112)), image_cost(net, (3, 224, 224))
    assert 3.5 < big / small < 4.5            # activations grow with the area
    assert inference_batch(net, (3, 224, 224)) == INFERENCE_MEMORY // big < 64
    # A small model on CIFAR images reaches the cap; a budget below one
    # image still scores one image at a time.
    assert inference_batch(build_model("lightnn"), (3, 32, 32)) == MAX_BATCH
    assert inference_batch(net, (3, 224, 224), budget=1) == 1


def test_image_cost_needs_no_hooks_on_a_compiled_wrapper():
    class Wrapper(torch.nn.Module):      # what torch.compile hands back
        def __init__(self, m):
            super().__init__()
            self._orig_mod = m

        def forward(self, x):
            return self._orig_mod(x)

    net = build_model("lightnn")
    assert image_cost(Wrapper(net), (3, 32, 32)) == image_cost(net, (3, 32, 32))


CHILD = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from kdflow.data.arrays import Normalizer
from kdflow.models.inference import predict_logits
from kdflow.models.zoo import build_model
def hwm():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status")
                if l.startswith("VmHWM"))
torch.set_num_threads(2)
model = build_model("resnet18", num_classes=10, image_size=224)
x = torch.randint(0, 256, (128, 3, 224, 224), dtype=torch.uint8)
base = hwm()
logits = predict_logits(model, x, Normalizer("cpu", (0.5,) * 3, (0.25,) * 3))
print(json.dumps({"growth": hwm() - base, "rows": len(logits)}))
"""


def test_scoring_224_pixel_images_stays_within_the_inference_budget():
    # 128 images of 224 px through a ResNet-18 in one batch cost ~850 MiB of
    # activations; in memory-sized batches the job grows by under the budget.
    proc = subprocess.run([sys.executable, "-c", CHILD, str(REPO)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["rows"] == 128
    assert out["growth"] < 1.25 * INFERENCE_MEMORY, out
