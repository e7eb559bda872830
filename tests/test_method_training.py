"""Distillation methods wired into the engine: what each needs and trains."""

import copy

import pytest
import torch

from kdflow import KdflowError
from kdflow.distill import methods
from kdflow.data.arrays import Normalizer
from kdflow.distill.losses import Step
from kdflow.models.inference import predict_logits
from kdflow.train.augment import Augment
from kdflow.train.engine import TrainConfig, fit
from kdflow.train.optim import make_optimizer
from kdflow.models.zoo import build_model
from kdflow.study.planner import plan
from kdflow.workflow.config import validate
from kdflow.train.job import teacher_signal

CONFIG = validate({"kd": {"method": list(methods.METHODS), "standardize": [False, True],
                          "soft_target_weight": [0.25, 0.5]}})
# One setting of each method, by its plan record.
SETTINGS = {a.method: a for a in reversed(plan(CONFIG)) if a.role == "student_kd"}


def build(arm, student, teacher, generator=None):
    ctx = methods.BuildContext(student, teacher, "cpu", generator, (3, 32, 32))
    return methods.build(arm.method, arm.values, ctx)


def problem(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    return x, torch.arange(n) % 10


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_each_method_gives_a_finite_loss_and_gradients(name):
    torch.manual_seed(0)
    student, teacher = build_model("lightnn"), build_model("deepnn").eval()
    method = build(SETTINGS[name], student, teacher)
    assert method.features == (not methods.METHODS[name].logits_only)
    x, y = problem(8)
    xb = Normalizer("cpu")(x)
    with torch.no_grad():
        t_feat = teacher.features(xb)
        t_logits = teacher.classify(t_feat)
    feat = student.features(xb)
    loss = method.loss(Step(student.classify(feat), y, 1, t_logits, feat, t_feat))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for p in student.parameters())


def test_hint_regressor_maps_student_channels_to_the_teachers():
    student, teacher = build_model("lightnn"), build_model("deepnn")
    method = build(SETTINGS["hint"], student, teacher)
    conv = method.extra.conv
    # The tutorial's regressor: Conv2d(16, 32, 3, padding=1) on 16x8x8 -> 32x8x8.
    assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (16, 32, (3, 3))


def test_hint_trains_its_regressor_with_the_student():
    torch.manual_seed(0)
    student, teacher = build_model("lightnn"), build_model("deepnn").eval()
    method = build(SETTINGS["hint"], student, teacher)
    before = copy.deepcopy(method.extra.state_dict())
    x, y = problem()
    online = teacher_signal(teacher, features=True, cached=None)
    cfg = validate({"student": {"model": "lightnn", "epochs": 1, "batch_size": 32}})
    result = fit(student, x, y, x[:16], y[:16], TrainConfig.from_config(cfg["student"], cfg["engine"]),
                 seed=0, loss_fn=method.loss, teacher=online, features=True, extra=method.extra)
    after = method.extra.state_dict()
    assert not torch.equal(before["conv.weight"], after["conv.weight"])
    assert not any(k.startswith("conv") for k in result.best_state)


def test_batchnorm_teacher_is_used_in_eval_mode():
    """A teacher left in train mode would normalise with batch statistics and
    update its running averages: its targets would depend on the batch."""
    torch.manual_seed(0)
    teacher = build_model("resnet8").train()
    running = teacher.bn1.running_mean.clone()
    x, _ = problem(32)
    normalize = Normalizer("cpu")
    for aug in (Augment(crop=0, flip=False), Augment(crop=0, flip=True)):
        cached = None if aug.enabled else predict_logits(teacher, x, normalize)
        fn = teacher_signal(teacher, features=aug.enabled, cached=cached)
        assert not teacher.training
        logits, _ = fn(torch.arange(4), normalize(x[:4]))
        with torch.no_grad():
            alone, _ = fn(torch.arange(1), normalize(x[:1]))
        # Image 0's logits do not depend on the rest of the batch.
        assert torch.allclose(logits[:1], alone, atol=1e-5)
    assert torch.equal(teacher.bn1.running_mean, running)


def test_sgd_with_milestones_steps_the_learning_rate_per_epoch():
    x, y = problem()
    model = build_model("lightnn")
    config = validate({"student": {"model": "lightnn", "epochs": 3, "batch_size": 32,
                                   "lr": 0.05, "optimizer": "sgd", "momentum": 0.9,
                                   "weight_decay": 5e-4, "lr_milestones": [2, 1],
                                   "lr_gamma": 0.1}})
    cfg = TrainConfig.from_config(config["student"], config["engine"])
    result = fit(model, x, y, x[:16], y[:16], cfg, seed=0)
    assert [r["lr"] for r in result.history] == pytest.approx([0.05, 0.005, 0.0005])
    opt, sched = make_optimizer(model.parameters(), cfg)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["weight_decay"] == 5e-4
    plain = validate({})  # the schema's defaults: Adam, constant rate
    opt, sched = make_optimizer(model.parameters(),
                                TrainConfig.from_config(plain["student"], plain["engine"]))
    assert isinstance(opt, torch.optim.Adam) and sched is None


def test_shared_teacher_logits_equal_the_in_job_computation(tmp_path, tiny_archive):
    """The teacher_logits job's file gives the very logits a job computes itself."""
    from kdflow.core.device import autocast_dtype
    from kdflow.models import checkpoint
    from kdflow.data.arrays import Splits, write_split
    from kdflow.data.datasets import convert
    from kdflow.models.inference import predict_logits
    from kdflow.train.job import load_teacher_logits, save_teacher_logits

    dataset, split = tmp_path / "c.npz", tmp_path / "split.npz"
    convert(tiny_archive[0], dataset)
    write_split(dataset, split, val_size=50, seed=0)
    torch.manual_seed(0)
    teacher = tmp_path / "teacher.pt"
    checkpoint.save(teacher, state_dict=build_model("deepnn").state_dict(), model="deepnn",
                    num_classes=10, image_size=32)
    out = tmp_path / "logits.pt"
    save_teacher_logits(str(teacher), str(dataset), str(split), str(out), device="cpu",
                        engine=validate({})["engine"], placement={})
    data = Splits(dataset, split)
    model, _ = checkpoint.load_model(teacher)
    # In the job's own precision: auto is bf16 on a CPU with native bf16.
    direct = predict_logits(model, data.train_x, Normalizer("cpu", data.mean, data.std),
                            amp_dtype=autocast_dtype(torch.device("cpu"), "auto"))
    assert torch.equal(load_teacher_logits(str(out), str(teacher), str(split), "cpu"), direct)
    write_split(dataset, split, val_size=60, seed=0)  # another split: refused
    with pytest.raises(KdflowError, match="another teacher or split"):
        load_teacher_logits(str(out), str(teacher), str(split), "cpu")
