"""The training engine: augmentation, teacher signal, determinism."""

import filecmp
import shutil

import pytest
import torch
import torch.nn.functional as F

from kdflow.data import Normalizer
from kdflow.engine import Augment, EngineOptions, augment_batch, fit, predict_logits
from kdflow.evaluate import evaluate
from kdflow.losses import kd_loss
from kdflow.models import build_model
from kdflow.train import teacher_signal, train
from kdflow import study
from kdflow.config import validate


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
    out = augment_batch(x, Augment(crop=p), torch.Generator().manual_seed(0))
    padded = F.pad(x, (p, p, p, p))
    shifts = set()
    for i in range(len(x)):
        matches = [(dy, dx) for dy in range(2 * p + 1) for dx in range(2 * p + 1)
                   if torch.equal(out[i], padded[i, :, dy:dy + 32, dx:dx + 32])]
        assert matches, f"image {i} is not a translated copy"
        shifts.add(matches[0])
    assert len(shifts) > 5  # per-sample, not one shift for the batch
    flipped = augment_batch(x, Augment(flip=True), torch.Generator().manual_seed(0))
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
    fit(student, x, y, vx, vy, epochs=2, batch_size=32, lr=1e-3, seed=0,
        teacher=teacher_fn, augment=Augment(crop=4, flip=True),
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
        runs.append(fit(model, x, y, vx, vy, epochs=2, batch_size=32, lr=1e-3, seed=0,
                        augment=Augment(crop=2, flip=True),
                        options=EngineOptions(deterministic=True)))
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
        common = dict(dataset="results/data/cifar10.npz", split="results/data/split.npz",
                      seed=0, device="cpu", engine={"deterministic": True})
        cfg = validate({"teacher": {"model": "deepnn", "epochs": 1, "batch_size": 32},
                        "student": {"model": "lightnn", "epochs": 2, "batch_size": 32}})
        train(study.lookup(cfg, "teacher").record(), out_model="results/seed0/teacher/model.pt",
              out_history="results/seed0/teacher/history.csv", **common)
        train(study.lookup(cfg, KD).record(), out_model=f"results/seed0/{KD}/model.pt",
              out_history=f"results/seed0/{KD}/history.csv",
              teacher="results/seed0/teacher/model.pt", **common)
        for arm in ("teacher", KD):
            evaluate(f"results/seed0/{arm}/model.pt", "results/data/cifar10.npz",
                     f"results/seed0/{arm}/metrics.json", arm=arm, seed=0, device="cpu",
                     teacher=None if arm == "teacher" else "results/seed0/teacher/model.pt")
    for arm in ("teacher", KD):
        a = tmp_path / "a" / "results" / "seed0" / arm / "metrics.json"
        b = tmp_path / "b" / "results" / "seed0" / arm / "metrics.json"
        assert filecmp.cmp(a, b, shallow=False), arm


def test_predict_logits_restores_training_mode():
    model = build_model("lightnn").train()
    out = predict_logits(model, images(5), Normalizer("cpu"), batch_size=2)
    assert out.shape == (5, 10) and model.training
