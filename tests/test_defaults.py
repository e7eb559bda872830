"""Defaults live in config/schema.yaml alone: every default left in the code
of the config-facing classes and functions is the schema's, key for key."""

import dataclasses
import inspect

import pytest

from kdflow.data import datasets, folder
from kdflow.models import efficiency
from kdflow.core import device
from kdflow.train import augment, engine
from kdflow.analysis import evaluate
from kdflow.distill import losses
from kdflow.train import optim
from kdflow.train import job as train
from kdflow.workflow.config import load_schema

SCHEMA = load_schema()
TRAINING = SCHEMA["$defs"]["training"]["properties"]
from kdflow.workflow.config import TEACHER_ONLY  # noqa: E402
KD = SCHEMA["properties"]["kd"]["properties"]

# (object, the schema properties its parameters or fields are keys of,
#  names that are inputs of a job rather than config keys: they may default)
CONFIG_FACING = [
    (device.EngineOptions, SCHEMA["properties"]["engine"]["properties"], set()),
    (augment.Augment, TRAINING["augment"]["properties"], set()),
    (engine.TrainConfig, {**TRAINING, "engine": SCHEMA["properties"]["engine"]}, set()),
    (optim.make_optimizer, TRAINING, {"params", "cfg"}),
    (device.setup, SCHEMA["properties"], {"threads"}),
    (engine.fit, TRAINING, {"model", "train_x", "train_y", "val_x", "val_y", "cfg", "seed",
                            "loss_fn", "teacher", "teacher_val_logits", "features", "extra",
                            "normalize", "state_path", "job", "name"}),
    # arm is the job's plan record (kdflow.study.planner), made from validated sections.
    (train.train, SCHEMA["properties"], {"arm", "dataset", "split", "out_model",
                                         "out_history", "seed", "threads",
                                         "teacher", "teacher_logits", "init",
                                         "init_record", "init_described"}),
    (train.save_teacher_logits, SCHEMA["properties"], {"teacher", "dataset", "split", "out",
                                                       "threads"}),
    # The losses' knobs are kd keys; logits, targets and DKD's fixed label
    # weight are not configurable.
    (losses.kd_loss, KD, {"student_logits", "teacher_logits", "targets"}),
    (losses.cosine_loss, KD, {"student_features", "teacher_features", "student_logits",
                              "targets"}),
    (losses.hint_loss, KD, {"regressed_student", "teacher_features", "student_logits",
                            "targets"}),
    (losses.dkd_total_loss, {**KD, **KD["dkd"]["properties"]},
     {"student_logits", "teacher_logits", "targets", "warmup_factor", "ce_weight"}),
    (losses.dist_total_loss, {**KD, **KD["dist"]["properties"]},
     {"student_logits", "teacher_logits", "targets"}),
    (evaluate.evaluate, SCHEMA["properties"], {"model_path", "dataset", "out", "arm", "seed",
                                               "teacher", "out_speed", "threads",
                                               "speed_settings"}),
    (efficiency.measure_speed, SCHEMA["properties"]["speed"]["properties"],
     {"model", "device", "image_shape"}),
    # The library's defaults for callers without a config (the workflow passes every key).
    (datasets.convert, SCHEMA["properties"]["data"]["properties"], {"source", "out", "md5"}),
    # scratch: where the decoded images wait on disk (the output's directory).
    (folder.read_folder, SCHEMA["properties"]["data"]["properties"], {"source", "entry",
                                                                      "scratch"}),
]


def defaults(obj) -> dict:
    """{name: default} of a dataclass's fields or a function's parameters."""
    if dataclasses.is_dataclass(obj):
        out = {}
        for f in dataclasses.fields(obj):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
        return out
    return {name: p.default for name, p in inspect.signature(obj).parameters.items()
            if p.default is not inspect.Parameter.empty}


def names(obj) -> list[str]:
    if dataclasses.is_dataclass(obj):
        return [f.name for f in dataclasses.fields(obj)]
    return list(inspect.signature(obj).parameters)


@pytest.mark.parametrize("obj, keys, inputs", CONFIG_FACING,
                         ids=[o.__qualname__ for o, _, _ in CONFIG_FACING])
def test_every_default_in_the_code_is_the_schemas(obj, keys, inputs):
    for name, default in defaults(obj).items():
        if name in inputs:
            continue
        assert name in keys, (f"{obj.__qualname__}: {name} has a default ({default!r}) but is "
                              "no key of the schema: put it in config/schema.yaml, or list it "
                              "here as a job input")
        assert "default" in keys[name] and keys[name]["default"] == default, (
            f"{obj.__qualname__}: {name} defaults to {default!r}, the schema to "
            f"{keys[name].get('default', '(none)')!r}: keep the default in the schema only")
    # Every other name is a config key or a listed input: nothing unaccounted.
    stray = [n for n in names(obj) if n not in keys and n not in inputs]
    assert not stray, f"{obj.__qualname__}: {stray} are neither schema keys nor listed inputs"


def test_train_config_has_every_key_of_a_training_section():
    """A key added to the schema's training section reaches the engine."""
    fields = {f.name for f in dataclasses.fields(engine.TrainConfig)}
    # The teacher-only keys and init say where a model's weights come from,
    # not how to train: the workflow's rules read them (kdflow.workflow.config).
    assert fields == set(TRAINING) - set(TEACHER_ONLY) - {"init"} | {"engine"}
    assert {f.name for f in dataclasses.fields(augment.Augment)} == \
        set(TRAINING["augment"]["properties"])
    assert {f.name for f in dataclasses.fields(device.EngineOptions)} == \
        set(SCHEMA["properties"]["engine"]["properties"])
