"""The table of distillation methods: one `MethodSpec` per method, in `METHODS`.

A method is one entry: its name (the config's `kd.method` value and a path
segment of its students), a label for the report, its knobs (config keys
under `kd`, each a value or a list to sweep), whether it learns from the
teacher's logits alone (then, without augmentation, the teacher's logits are
computed once per seed and shared), and a build function that turns one
setting's values into the loss the engine calls. The losses themselves are
plain functions in kdflow.distill.losses.

Adding a method: its loss in kdflow.distill.losses, an entry here, its knobs and its
name in config/schema.yaml (`$defs.method`), a row in the README's method
table. The study (kdflow.study.planner), the workflow's rules, the aggregate and the
report all read this table; tests check it against the schema and the README.

This module imports no torch at import time: the workflow reads the table
while it plans, and the losses are imported only when a job builds one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

from kdflow import KdflowError
from kdflow.core import schema

if TYPE_CHECKING:  # for annotations only: torch is imported by the jobs
    import torch
    from torch import nn

    from kdflow.distill.losses import LossFn


@dataclass(frozen=True)
class Knob:
    """One parameter of a method: `key` is its config key under `kd` (dotted
    for a method's own section, e.g. "dkd.beta"), and the name its value
    goes by in every record, table and column; `tag` writes it in setting
    names (T2, w0.25, ls). A `primary` knob is always in the name; any
    other only when it differs from its schema default, so that sweeping a
    new knob keeps the existing settings' names (and results).

    A knob added to a method once results existed is not `recorded_at_default`:
    at its default it is left out of the plan record, which is each job's
    Snakemake params, so that adding it reruns nothing; :func:`complete`
    puts it back for whoever reads a record."""

    key: str
    tag: str
    primary: bool
    recorded_at_default: bool = True


@dataclass
class Method:
    """What the engine needs of one distilled job."""

    loss: "LossFn"
    features: bool                         # needs feature maps of student and teacher
    extra: Optional["nn.Module"] = None    # trained with the student, then dropped


@dataclass(frozen=True)
class BuildContext:
    """What a build function may need besides the setting's values."""

    student: "nn.Module"
    teacher: "nn.Module"
    device: Any
    generator: Optional["torch.Generator"]   # for a method's own initial weights
    image_shape: tuple[int, int, int]        # (C, H, W) of the data


@dataclass(frozen=True)
class MethodSpec:
    name: str
    label: str
    knobs: tuple[Knob, ...]
    logits_only: bool     # learns from the teacher's logits alone
    build: Callable[[dict, BuildContext], Method]
    reference: str        # where the method comes from


# Knobs shared by several methods: one definition each.
TEMPERATURE = Knob("temperature", "T", primary=True)
WEIGHT = Knob("soft_target_weight", "w", primary=True)
# The label loss's weight beside WEIGHT; its default (none) means 1 - w.
CE_WEIGHT = Knob("ce_weight", "ce", primary=False, recorded_at_default=False)
STANDARDIZE = Knob("standardize", "ls", primary=False)


def _kd(v: dict, ctx: BuildContext) -> Method:
    from kdflow.distill.losses import kd_loss

    T, w, c, ls = v["temperature"], v["soft_target_weight"], v["ce_weight"], v["standardize"]
    return Method(lambda s: kd_loss(s.logits, s.teacher_logits, s.targets, T, w,
                                    standardize=ls, ce_weight=c), features=False)


def _dkd(v: dict, ctx: BuildContext) -> Method:
    from kdflow.distill.losses import dkd_total_loss, dkd_warmup

    T, alpha, beta, warmup = v["temperature"], v["dkd.alpha"], v["dkd.beta"], \
        v["dkd.warmup_epochs"]
    ls = v["standardize"]
    return Method(lambda s: dkd_total_loss(
        s.logits, s.teacher_logits, s.targets, T, alpha, beta,
        dkd_warmup(s.epoch, warmup), standardize=ls), features=False)


def _dist(v: dict, ctx: BuildContext) -> Method:
    from kdflow.distill.losses import dist_total_loss

    T, beta, gamma = v["temperature"], v["dist.beta"], v["dist.gamma"]
    return Method(lambda s: dist_total_loss(s.logits, s.teacher_logits, s.targets, T,
                                            beta, gamma), features=False)


def _cosine(v: dict, ctx: BuildContext) -> Method:
    from kdflow.distill.losses import cosine_loss

    w, c = v["soft_target_weight"], v["ce_weight"]
    return Method(lambda s: cosine_loss(s.features, s.teacher_features, s.logits,
                                        s.targets, w, ce_weight=c), features=True)


def _hint(v: dict, ctx: BuildContext) -> Method:
    from kdflow.distill.losses import HintRegressor, hint_loss

    w, c = v["soft_target_weight"], v["ce_weight"]
    c_s, *_ = _feature_shape(ctx.student.to(ctx.device), ctx.device, ctx.image_shape)
    c_t, h_t, w_t = _feature_shape(ctx.teacher, ctx.device, ctx.image_shape)
    # Initial weights from the method's own generator (kdflow.core.streams): the
    # student's dropout masks stay those of its plain twin.
    regressor = HintRegressor(c_s, c_t, generator=ctx.generator)
    return Method(lambda s: hint_loss(regressor(s.features, (h_t, w_t)), s.teacher_features,
                                      s.logits, s.targets, w, ce_weight=c),
                  features=True, extra=regressor)


METHODS: dict[str, MethodSpec] = {
    "kd": MethodSpec(
        "kd", "KD (Hinton)", (TEMPERATURE, WEIGHT, CE_WEIGHT, STANDARDIZE), logits_only=True,
        build=_kd,
        reference="Hinton, Vinyals & Dean 2015; logit standardization: Sun et al., CVPR 2024"),
    "dkd": MethodSpec(
        "dkd", "DKD",
        (TEMPERATURE, Knob("dkd.alpha", "a", False), Knob("dkd.beta", "b", False),
         Knob("dkd.warmup_epochs", "warm", False), STANDARDIZE),
        logits_only=True, build=_dkd, reference="Zhao et al., CVPR 2022"),
    "dist": MethodSpec(
        "dist", "DIST",
        (TEMPERATURE, Knob("dist.beta", "b", False), Knob("dist.gamma", "g", False)),
        logits_only=True, build=_dist, reference="Huang et al., NeurIPS 2022"),
    "cosine": MethodSpec(
        "cosine", "cosine (features)", (WEIGHT, CE_WEIGHT), logits_only=False, build=_cosine,
        reference="PyTorch's knowledge-distillation tutorial"),
    "hint": MethodSpec(
        "hint", "hint (FitNets)", (WEIGHT, CE_WEIGHT), logits_only=False, build=_hint,
        reference="Romero et al., ICLR 2015"),
}


def spec(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise KdflowError(f"unknown distillation method {name!r}; choose one of "
                          f"{', '.join(METHODS)}") from None


def caches_teacher_logits(method: str, augment: dict) -> bool:
    """Whether a distilled student learns from teacher logits computed once
    per seed: a logit-only method without augmentation (the teacher, in
    eval mode, then gives an image the same logits every epoch). The one
    place this is decided; the workflow and the training job both ask it."""
    return spec(method).logits_only and not (augment["crop"] or augment["flip"])


def recorded(method: str, values: dict) -> dict:
    """A setting's values as its plan record keeps them: without the knobs
    that are not recorded at their default (see :class:`Knob`)."""
    quiet = {k.key for k in spec(method).knobs if not k.recorded_at_default
             and k.key in values and values[k.key] == schema.default(f"kd.{k.key}")}
    return {k: v for k, v in values.items() if k not in quiet}


def complete(method: str, values: dict) -> dict:
    """A record's values with every knob :func:`recorded` leaves out back at
    its schema default, in the order of the method's knobs."""
    knobs = spec(method).knobs
    defaults = {k.key: schema.default(f"kd.{k.key}") for k in knobs if not k.recorded_at_default}
    return {k.key: values[k.key] if k.key in values else defaults[k.key]
            for k in knobs if k.key in values or k.key in defaults}


def check(method: str, values: dict) -> None:
    """Refuse one setting whose loss makes no sense, naming the fix."""
    if "ce_weight" not in values:
        return
    w, c = values["soft_target_weight"], values["ce_weight"]
    if c is None and w > 1:
        raise KdflowError(
            f"invalid config: {method} with kd.soft_target_weight {w:g} and no kd.ce_weight "
            f"would give the label loss the weight 1 - w = {1 - w:g}; set kd.ce_weight, the "
            "label loss's own weight (logit standardization's recipe: ce_weight 0.1, "
            "soft_target_weight 9), or keep soft_target_weight in [0, 1]")
    if c == 0 and w == 0:
        raise KdflowError(
            f"invalid config: {method} with kd.ce_weight 0 and kd.soft_target_weight 0 has no "
            "loss at all; give one of them a positive weight")


def build(method: str, values: dict, ctx: BuildContext) -> Method:
    """The Method of one distilled job: `values` holds every knob of the
    method (a study record's values; those :func:`recorded` leaves out may
    be missing)."""
    s = spec(method)
    values = complete(method, values)
    missing = [k.key for k in s.knobs if k.key not in values]
    if missing:
        raise KdflowError(f"method {method!r} needs values for {', '.join(missing)}")
    return s.build(values, ctx)


def _feature_shape(model: "nn.Module", device, image_shape) -> tuple[int, ...]:
    """(C, H, W) of a model's last feature map, from one probe image."""
    import torch

    was_training = model.training
    model.eval()
    with torch.no_grad():
        shape = tuple(model.features(torch.zeros(1, *image_shape, device=device)).shape[1:])
    model.train(was_training)
    return shape
