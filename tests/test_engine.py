"""The training engine: augmentation, teacher signal, determinism."""

import copy
import filecmp
import shutil

import pytest
import torch
import torch.nn.functional as F

from kdflow.data.arrays import Normalizer
from kdflow import KdflowError
from kdflow.core import streams
from kdflow.workflow.config import validate
from kdflow.models.inference import predict_logits
from kdflow.train.augment import Augment, augment_batch
from kdflow.train.engine import TrainConfig, fit
from kdflow.analysis.evaluate import evaluate
from kdflow.distill.losses import kd_loss
from kdflow.models.zoo import build_model
from kdflow.train.job import teacher_signal, train
from kdflow.study import planner


NO_AUGMENT = Augment(crop=0, flip=False)


def train_config(**training) -> TrainConfig:
    """A TrainConfig from a training section, defaults filled from the schema."""
    engine = training.pop("engine", {})
    cfg = validate({"teacher": {"model": "lightnn", **training}, "engine": engine})
    return TrainConfig.from_config(cfg["teacher"], cfg["engine"])


def images(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)


def test_augmentation_is_reproducible_per_seed():
    x = images()
    aug = Augment(crop=4, flip=True)
    a = augment_batch(x, aug, torch.Generator().manual_seed(3))
    b = augment_batch(x, aug, torch.Generator().manual_seed(3))
    c = augment_batch(x, aug, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.uint8 and a.shape == x.shape


def test_crop_is_a_zero_padded_translation_and_flip_a_mirror():
    x = images(32)
    p = 2
    out = augment_batch(x, Augment(crop=p, flip=False), torch.Generator().manual_seed(0))
    padded = F.pad(x, (p, p, p, p))
    shifts = set()
    for i in range(len(x)):
        matches = [(dy, dx) for dy in range(2 * p + 1) for dx in range(2 * p + 1)
                   if torch.equal(out[i], padded[i, :, dy:dy + 32, dx:dx + 32])]
        assert matches, f"image {i} is not a translated copy"
        shifts.add(matches[0])
    assert len(shifts) > 5  # per-sample, not one shift for the batch
    flipped = augment_batch(x, Augment(crop=0, flip=True), torch.Generator().manual_seed(0))
    kinds = [torch.equal(flipped[i], x[i]) or torch.equal(flipped[i], x[i].flip(2))
             for i in range(len(x))]
    assert all(kinds)
    assert 0 < sum(torch.equal(flipped[i], x[i]) for i in range(len(x))) < len(x)


def small_problem(n=96):
    x = images(n, seed=1)
    y = torch.arange(n) % 10
    return x, y, x[:20], y[:20]


def test_teacher_sees_exactly_the_students_augmented_views():
    x, y, vx, vy = small_problem()
    torch.manual_seed(0)
    teacher = build_model("lightnn").eval()
    seen_by_teacher, seen_by_student = [], []
    online = teacher_signal(teacher, features=False, cached=None)

    def teacher_fn(idx, xb):
        seen_by_teacher.append(xb.clone())
        return online(idx, xb)

    student = build_model("lightnn")
    student.register_forward_pre_hook(
        lambda m, args: seen_by_student.append(args[0].clone()) if m.training else None)
    cfg = train_config(epochs=2, batch_size=32, augment={"crop": 4, "flip": True})
    fit(student, x, y, vx, vy, cfg, seed=0, teacher=teacher_fn,
        loss_fn=lambda s: kd_loss(s.logits, s.teacher_logits, s.targets, 2.0, 0.5))
    assert len(seen_by_teacher) == len(seen_by_student) == 6
    for t_view, s_view in zip(seen_by_teacher, seen_by_student):
        assert torch.equal(t_view, s_view)
    # and the views really are augmented: not the plain normalised images
    plain = Normalizer("cpu")(x)
    assert not any(torch.equal(v, plain[: len(v)]) for v in seen_by_student)


def test_cached_teacher_logits_give_the_online_kd_losses():
    x, y, _, _ = small_problem()
    torch.manual_seed(0)
    teacher = build_model("deepnn").eval()
    normalize = Normalizer("cpu")
    cached = teacher_signal(teacher, features=False,
                            cached=predict_logits(teacher, x, normalize))
    student = build_model("lightnn")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    for start in range(0, len(x), 32):
        idx = perm[start:start + 32]
        xb = normalize(x[idx])
        with torch.no_grad():
            online = teacher(xb)
            s = student(xb)
        a = kd_loss(s, cached(idx, xb)[0], y[idx], 2.0, 0.25)
        b = kd_loss(s, online, y[idx], 2.0, 0.25)
        assert a.item() == pytest.approx(b.item(), rel=1e-5, abs=1e-6)


def test_fit_is_deterministic_on_cpu():
    x, y, vx, vy = small_problem()
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_model("lightnn")
        cfg = train_config(epochs=2, batch_size=32, augment={"crop": 2, "flip": True},
                           engine={"deterministic": True})
        runs.append(fit(model, x, y, vx, vy, cfg, seed=0))
    a, b = runs
    for k in a.best_state:
        assert torch.equal(a.best_state[k], b.best_state[k])
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]
    assert strip(a.history) == strip(b.history)


KD = "lightnn/kd/T2_w0.25"


def test_deterministic_mode_gives_byte_identical_metrics_files(workflow_run, tmp_path, monkeypatch):
    """Two CPU runs of a seed, trained and evaluated as the workflow does."""
    workdir, config = workflow_run
    for run in ("a", "b"):
        d = tmp_path / run
        shutil.copytree(workdir / "results" / "data", d / "results" / "data")
        monkeypatch.chdir(d)
        cfg = validate({"teacher": {"model": "deepnn", "epochs": 1, "batch_size": 32},
                        "student": {"model": "lightnn", "epochs": 2, "batch_size": 32},
                        "engine": {"deterministic": True}})
        common = dict(placement={}, dataset="results/data/cifar10.npz", split="results/data/split.npz",
                      seed=0, device="cpu", engine=cfg["engine"])
        train(planner.lookup(cfg, "teacher").record(), out_model="results/seed0/teacher/model.pt",
              out_history="results/seed0/teacher/history.csv", **common)
        train(planner.lookup(cfg, KD).record(), out_model=f"results/seed0/{KD}/model.pt",
              out_history=f"results/seed0/{KD}/history.csv",
              teacher="results/seed0/teacher/model.pt", **common)
        for arm in ("teacher", KD):
            evaluate(f"results/seed0/{arm}/model.pt", "results/data/cifar10.npz",
                     f"results/seed0/{arm}/metrics.json", arm=arm, seed=0, device="cpu", placement={},
                     teacher=None if arm == "teacher" else "results/seed0/teacher/model.pt")
    for arm in ("teacher", KD):
        a = tmp_path / "a" / "results" / "seed0" / arm / "metrics.json"
        b = tmp_path / "b" / "results" / "seed0" / arm / "metrics.json"
        assert filecmp.cmp(a, b, shallow=False), arm


def test_predict_logits_restores_training_mode():
    model = build_model("lightnn").train()
    out = predict_logits(model, images(5), Normalizer("cpu"), batch_size=2)
    assert out.shape == (5, 10) and model.training


def test_fit_is_the_plain_training_loop_bit_for_bit():
    """fit's weights and validation history equal, bit for bit, those of the
    recipe written out as one straight loop (seeded streams, batched
    augmentation, SGD with decay and a step schedule, best-validation
    selection): a refactoring of the engine cannot change results unseen."""
    x, y, vx, vy = small_problem()
    cfg = train_config(epochs=3, batch_size=32, lr=0.05, optimizer="sgd", momentum=0.9,
                       weight_decay=5e-4, lr_milestones=[2], lr_gamma=0.5,
                       augment={"crop": 2, "flip": True},
                       # The loop below is fp32: so must fit be, on a CPU
                       # where precision auto would take bf16 too.
                       engine={"precision": "fp32"})
    torch.manual_seed(0)
    model = build_model("lightnn")
    ref = copy.deepcopy(model).to(memory_format=torch.channels_last)
    dropout = torch.get_rng_state()
    result = fit(model, x, y, vx, vy, cfg, seed=7)

    torch.set_rng_state(dropout)  # the same dropout masks
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [2], 0.5)
    order, aug = streams.generator(7, "order"), streams.generator(7, "augment")
    normalize = Normalizer("cpu")
    rows, best_acc, best_state, best_epoch = [], -1.0, None, 0
    for epoch in (1, 2, 3):
        ref.train()
        perm = torch.randperm(len(x), generator=order)
        for start in range(0, len(x), 32):
            idx = perm[start:start + 32]
            loss = F.cross_entropy(ref(normalize(augment_batch(x[idx], cfg.augment, aug))), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        val = predict_logits(ref, vx, normalize)
        acc = (val.argmax(1) == vy).sum().item() / len(vy)
        rows.append((epoch, F.cross_entropy(val, vy).item(), acc, opt.param_groups[0]["lr"]))
        sched.step()
        if acc > best_acc:
            best_acc, best_epoch = acc, epoch
            best_state = {k: v.detach().clone().contiguous() for k, v in ref.state_dict().items()}
    assert [(r["epoch"], r["val_loss"], r["val_accuracy"], r["lr"])
            for r in result.history] == rows
    assert (result.best_epoch, result.best_val_accuracy) == (best_epoch, best_acc)
    assert result.best_state.keys() == best_state.keys()
    for k, v in best_state.items():
        assert torch.equal(result.best_state[k], v), k


def test_a_training_section_without_defaults_is_refused():
    """Defaults come from the schema via validation, never from the code."""
    with pytest.raises(KdflowError, match="lacks .*weight_decay"):
        TrainConfig.from_config({"model": "lightnn", "epochs": 1, "batch_size": 32, "lr": 1e-3,
                                 "optimizer": "adam", "momentum": 0.9, "lr_milestones": [],
                                 "lr_gamma": 0.1, "augment": {"crop": 0, "flip": False}},
                                validate({})["engine"])
