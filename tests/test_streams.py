"""Independent random streams, one per (seed, purpose) (kdflow.core.streams):
distinct, reproducible in another process, pinned to known values; a
method's modules drawn from their own stream, never from torch's global one;
and the twins they make: the plain and the distilled student of a seed draw
the same dropout masks (on the shared workflow_run)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from kdflow.core import streams
from kdflow.distill import methods
from kdflow.models.zoo import build_model
from kdflow.workflow.config import validate
from tests.helpers.workflow import REPO

# A run's models are drawn from these: the derivation (the children of
# numpy.random.SeedSequence(seed), spawned by the purpose's index in
# PURPOSES) must never change, or every result made before goes stale.
KNOWN = {(0, "init"): 8668861027912758289, (0, "order"): 4881901421217228719,
         (0, "augment"): 16452687389592421897, (0, "method"): 13238389300853459902,
         (1, "init"): 8431846347943309920, (1, "augment"): 1275975541612323131,
         (3, "order"): 18443715169928553612, (3, "method"): 17058895752279943796}


def draws(seed, purpose, n=4):
    g = streams.generator(seed, purpose)
    return tuple(torch.randint(0, 2 ** 31, (n,), generator=g).tolist())


def test_every_seed_and_purpose_has_its_own_stream():
    firsts = {(seed, purpose): draws(seed, purpose)
              for seed in range(10) for purpose in streams.PURPOSES}
    # No two (seed, purpose) pairs share a stream: not `seed + index` either,
    # which would make seed 0's "order" seed 1's "init".
    assert len(set(firsts.values())) == len(firsts) == 10 * len(streams.PURPOSES)
    seeds = {(s, p): streams.stream_seed(s, p) for s, p in firsts}
    assert len(set(seeds.values())) == len(seeds)
    assert all(0 <= v < 2 ** 64 for v in seeds.values())
    # Reproducible: asked again, in another order, after other draws (no
    # shared state between generators), each pair gives the same stream.
    for key in sorted(firsts, reverse=True):
        assert draws(*key) == firsts[key], key
        assert streams.stream_seed(*key) == seeds[key], key


def test_stream_seeds_keep_their_known_values():
    assert {key: streams.stream_seed(*key) for key in KNOWN} == KNOWN
    # The purposes' order is part of each stream: append, never reorder.
    assert streams.PURPOSES[:4] == ("init", "order", "augment", "method")


def test_a_generator_is_seeded_from_its_stream_not_from_the_seed():
    for (seed, purpose), value in KNOWN.items():
        want = torch.randint(0, 2 ** 31, (4,),
                             generator=torch.Generator().manual_seed(value)).tolist()
        assert list(draws(seed, purpose)) == want, (seed, purpose)
        naive = torch.randint(0, 2 ** 31, (4,),
                              generator=torch.Generator().manual_seed(seed)).tolist()
        assert list(draws(seed, purpose)) != naive, (seed, purpose)


def test_streams_are_the_same_in_another_process():
    """A job's streams come out alike in every process: nothing depends on
    Python's per-process hash seed or on what ran before."""
    keys = [(s, p) for s in range(3) for p in streams.PURPOSES]
    code = ("import json, sys, torch; from kdflow.core import streams; "
            "keys = json.loads(sys.argv[1]); "
            "print(json.dumps([[streams.stream_seed(s, p), torch.randint(0, 2 ** 31, (4,), "
            "generator=streams.generator(s, p)).tolist()] for s, p in keys]))")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(keys)], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONHASHSEED": "random"})
    assert proc.returncode == 0, proc.stderr
    there = json.loads(proc.stdout)
    here = [[streams.stream_seed(s, p), list(draws(s, p))] for s, p in keys]
    assert there == here


def test_an_unknown_purpose_is_refused():
    with pytest.raises(ValueError, match="purpose must be one of"):
        streams.stream_seed(0, "dropout")


@pytest.mark.parametrize("method", list(methods.METHODS))
def test_building_a_method_leaves_the_global_random_state_alone(method):
    from kdflow.study import planner
    from kdflow.workflow.config import validate

    arm = next(a for a in planner.plan(validate({"kd": {"method": method}}))
               if a.role == "student_kd")
    student, teacher = build_model("lightnn"), build_model("deepnn").eval()
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    def build():
        return methods.build(method, arm.values, methods.BuildContext(
            student, teacher, "cpu", streams.generator(0, "method"), (3, 32, 32)))

    m = build()
    assert torch.equal(torch.get_rng_state(), cpu)
    if cuda is not None:
        assert all(torch.equal(a, b) for a, b in zip(torch.cuda.get_rng_state_all(), cuda))
    if m.extra is not None:  # the regressor's weights come from its own stream
        again = build()
        assert all(torch.equal(a, b) for a, b in
                   zip(m.extra.state_dict().values(), again.extra.state_dict().values()))


def test_plain_and_distilled_twins_draw_the_same_dropout_masks(workflow_run, tmp_path,
                                                                monkeypatch):
    import kdflow.train.job as train_module

    workdir, _ = workflow_run
    data = workdir / "results/data"
    masks: dict[str, list] = {}
    real_build = train_module.build_model

    def recording_build(name, *args):
        model = real_build(name, *args)
        if name == "lightnn":
            store = masks.setdefault(current, [])
            for module in model.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.register_forward_hook(
                        lambda mod, inp, out: store.append((out == 0) & (inp[0] != 0))
                        if mod.training and len(store) < 1 else None)
        return model

    monkeypatch.setattr(train_module, "build_model", recording_build)
    teacher = str(workdir / "results/seed0/teacher/model.pt")
    cfg = validate({"student": {"model": "lightnn", "epochs": 1, "batch_size": 32},
                    "engine": {"deterministic": True}})
    common = dict(placement={}, dataset=str(data / "cifar10.npz"), split=str(data / "split.npz"), seed=0,
                  device="cpu", threads=1, teacher=teacher, engine=cfg["engine"])
    from kdflow.study import planner
    config = validate({"student": {"model": "lightnn", "epochs": 1, "batch_size": 32},
                       "kd": {"method": ["hint", "kd"], "soft_target_weight": 0.5}})
    for current, path in (("plain", "lightnn/ce"), ("hint", "lightnn/hint/w0.5"),
                          ("kd", "lightnn/kd/T2_w0.5")):
        out = tmp_path / current
        out.mkdir()
        train_module.train(planner.lookup(config, path).record(), out_model=str(out / "model.pt"),
                           out_history=str(out / "history.csv"), **common)
    assert masks["plain"] and masks["plain"][0].any()
    for twin in ("hint", "kd"):
        assert torch.equal(masks[twin][0], masks["plain"][0]), twin

