"""A study as a plan: the config's lists expanded into typed records, one per model.

`plan(config)` returns one `Arm` per model of a seed, each with its path
under results/seed{seed}/, its role, its training section and, for a
distilled student, its method and that setting's exact values:

    teacher                          the teacher
    {student}/ce                     a plain (cross-entropy) student
    {student}/{method}/{setting}     a distilled student

The method table (kdflow.distill.methods) says which knobs a method has; any knob
may be a list in the config, and every combination is a setting. A setting's
name is written once from its exact values (T2_w0.25, T2_w0.25_ls, T4_b2)
and never read back: the workflow looks records up by path, every job gets
its record as a parameter, and the checkpoint and metrics.json keep it, so
the aggregate reads values from there. Adding or changing one value of a
list adds or renames only that setting's jobs: the others keep their paths,
their parameters and their results. Plain students do not depend on any
distillation setting and are shared by all of them.

Two stages (config `confirm_seeds`): with several settings, the one with the
best mean *validation* accuracy over `seeds` is chosen (`choose`, recorded by
the workflow's `choose` checkpoint in results/study/choice.json) and
retrained, with its teacher and plain student, on the confirmation seeds;
the headline uses those alone. A run's luck lifts its validation and test
accuracy together, so the best of N settings measured on the seeds that
chose it overstates its gain (the winner's curse).
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Optional

from kdflow import KdflowError
from kdflow.core import atomic
from kdflow.core import schema
from kdflow.distill import methods
from kdflow.distill.methods import MethodSpec, spec

ROLES = ("teacher", "student_baseline", "student_kd")


def as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def fmt(x) -> str:
    """A number as it appears in a name: 2.0 -> '2', 0.25 -> '0.25'.

    Python's shortest round-trip form of the float, so two different values
    never share a name (2.0000001 stays '2.0000001')."""
    text = repr(float(x))
    return text[:-2] if text.endswith(".0") else text


@dataclass(frozen=True)
class Arm:
    """One model of every seed: the record a job is planned, trained,
    evaluated and aggregated by (see the module docstring for the paths)."""

    path: str
    role: str                                  # one of ROLES
    model: str
    # The training section (teacher or student, `model` set to this arm's).
    training: dict = field(hash=False, compare=False)
    method: Optional[str] = None               # distilled students only
    setting: Optional[str] = None
    # Every knob of the method (kdflow.distill.methods), by config key, exact values.
    values: dict = field(default_factory=dict, hash=False, compare=False)

    def record(self) -> dict:
        """Plain data: a job's parameter, stored in its checkpoint and metrics
        (a knob added later is left out at its default: methods.recorded)."""
        values = methods.recorded(self.method, self.values) if self.method else self.values
        return {"path": self.path, "role": self.role, "model": self.model,
                "training": self.training, "method": self.method, "setting": self.setting,
                "values": values}

    @classmethod
    def from_record(cls, record: dict) -> "Arm":
        if record.get("method"):
            record = {**record, "values": methods.complete(record["method"], record["values"])}
        return cls(**record)


def _kd_value(kd: dict, key: str):
    """The config value of a knob: kd[key], or kd[section][name] for a
    dotted key."""
    node = kd
    for part in key.split("."):
        node = node[part]
    return node


def _knob_text(knob, value) -> str:
    if isinstance(value, bool):
        return knob.tag if value else f"no{knob.tag}"
    return f"{knob.tag}{fmt(value)}"


def _shown(method: MethodSpec, values: dict):
    """(knob, value) of the knobs a setting's name shows: each primary
    knob, then each other knob whose value differs from its schema default
    (so a newly swept knob leaves the names of existing settings as they
    were)."""
    for knob in method.knobs:
        value = values[knob.key]
        if knob.primary or value != schema.default(f"kd.{knob.key}"):
            yield knob, value


def setting_name(method: MethodSpec, values: dict) -> str:
    """The name of one setting, from its exact values: T2_w0.25, T2_w0.25_ls."""
    return "_".join(_knob_text(k, v) for k, v in _shown(method, values)) or "default"


def label(arm: Arm) -> str:
    """How the report names a model: "teacher", "CE only", or a distilled
    setting's method and the values its name shows, "KD (Hinton) T=2,
    w=0.25, ls"."""
    if arm.role == "teacher":
        return "teacher"
    if arm.role == "student_baseline":
        return "CE only"
    method = spec(arm.method)
    parts = [k.tag if isinstance(v, bool) and v else
             f"no {k.tag}" if isinstance(v, bool) else f"{k.tag}={fmt(v)}"
             for k, v in _shown(method, arm.values)]
    return f"{method.label} {', '.join(parts)}".strip()


def students(config: dict) -> list[str]:
    return as_list(config["student"]["model"])


def settings(config: dict) -> list[tuple[str, str, dict]]:
    """(method, setting name, values) of every distilled setting the
    config's lists expand to, in config order (methods, then each knob's
    values in the order of the method's knobs)."""
    kd = config["kd"]
    out = []
    for name in as_list(kd["method"]):
        method = spec(name)
        keys = [k.key for k in method.knobs]
        for combo in itertools.product(*(as_list(_kd_value(kd, k)) for k in keys)):
            values = dict(zip(keys, combo))
            methods.check(name, values)
            out.append((name, setting_name(method, values), values))
    seen = set()
    for name, setting, _ in out:
        if (name, setting) in seen:  # e.g. 1 and 1.0 in one list
            raise KdflowError(f"invalid config: two {name} settings are both named "
                              f"{setting!r}; list each value once")
        seen.add((name, setting))
    return out


def plan(config: dict) -> list[Arm]:
    """Every model of one seed: the teacher, then per student its baseline
    and its distilled settings."""
    teacher = config["teacher"]
    out = [Arm("teacher", "teacher", teacher["model"], dict(teacher))]
    for s in students(config):
        training = {**config["student"], "model": s}
        out.append(Arm(f"{s}/ce", "student_baseline", s, training))
        for method, setting, values in settings(config):
            out.append(Arm(f"{s}/{method}/{setting}", "student_kd", s, training, method,
                           setting, values))
    return out


def warnings(arms) -> list[str]:
    """What a study's settings will not do as their names suggest: a DKD
    setting whose warm-up (dkd.warmup_epochs) outlasts its student's
    training keeps the distillation term below full weight to the end (at
    most epochs / warmup_epochs of it). `arms`: Arm records, each setting
    once. Said at planning and in the report."""
    out = []
    for a in arms:
        warm = a.values.get("dkd.warmup_epochs") if a.method == "dkd" else None
        epochs = a.training.get("epochs")
        if warm and epochs and warm > epochs:
            out.append(f"{a.path}: dkd.warmup_epochs is {warm} but the student trains {epochs} "
                       f"epochs, so DKD's term never reaches full weight (at most "
                       f"{epochs / warm:.0%} of it, in the last epoch); set kd.dkd.warmup_epochs "
                       f"to at most {epochs}")
    return out


def lookup(config: dict, path: str) -> Arm:
    """The planned Arm at `path`, or a clear error naming the planned ones."""
    for arm in plan(config):
        if arm.path == path:
            return arm
    raise KdflowError(f"{path!r} is not a model of this config's study; it plans "
                      f"{', '.join(a.path for a in plan(config))}")


def distilled_arms(config: dict) -> list[Arm]:
    return [a for a in plan(config) if a.role == "student_kd"]


def confirmation_fixed_arms(config: dict) -> list[Arm]:
    """The arms every confirmation seed trains whatever the choice: the
    teacher and each student's plain twin (none without confirm_seeds)."""
    if not config.get("confirm_seeds"):
        return []
    return [a for a in plan(config) if a.role != "student_kd"]


def choose(candidates: list[dict]) -> dict[str, dict]:
    """Per student, the distilled arm with the highest mean validation
    accuracy over the selection seeds: the one rule the choose step and the
    aggregate both apply.

    `candidates`: one dict per arm with keys arm, student, order (the arm's
    index in kdflow.study.planner.plan), val_correct ({seed: validation images right
    at its best epoch}) and val_images ({seed: validation images}); extra
    keys are kept. The means are compared
    as exact fractions, so two steps that list seeds or arms in another
    order choose alike (float sums in different orders can break a tie
    differently). Ties go to the arm planned first (kdflow.study.planner.plan: the
    config's order of students, methods and values); candidates may come in
    any order. Test accuracy never enters: only validation numbers are
    passed in."""
    best: dict[str, dict] = {}
    for c in sorted(candidates, key=lambda c: c["order"]):
        c = {**c, "val_accuracy_mean": float(val_mean(c))}
        if c["student"] not in best or val_mean(c) > val_mean(best[c["student"]]):
            best[c["student"]] = c
    return best


def val_mean(candidate: dict) -> Fraction:
    """Exact mean over seeds of a candidate's validation accuracy."""
    seeds = sorted(candidate["val_correct"], key=str)
    if not seeds or set(map(str, seeds)) != set(map(str, candidate["val_images"])):
        raise KdflowError(f"{candidate['arm']}: validation counts and sizes cover different "
                          "seeds")
    images = {str(s): n for s, n in candidate["val_images"].items()}
    return sum((Fraction(int(candidate["val_correct"][s]), int(images[str(s)])) for s in seeds),
               Fraction(0)) / len(seeds)


def headline_student(choice: dict[str, dict]) -> str:
    """The student whose chosen setting leads on validation (exactly; the
    one planned first on ties)."""
    ranked = sorted(choice.values(), key=lambda c: c["order"])
    top = ranked[0]
    for c in ranked[1:]:
        if val_mean(c) > val_mean(top):
            top = c
    return top["student"]


def write_choice(checkpoints: list[str], runs: list[dict], out: str) -> dict:
    """The choice of the selection stage, from the checkpoints' best
    validation counts only, written as JSON to `out`.

    runs[i] = {seed, arm, student, order} of checkpoints[i] (the workflow
    passes both in one order; `order` is the arm's index in the plan).
    """
    from kdflow.models import checkpoint  # deferred: the rest of this module is plain Python

    if len(checkpoints) != len(runs):
        raise KdflowError("choose needs one checkpoint per (seed, arm)")
    per_arm: dict[str, dict] = {}
    for path, run in zip(checkpoints, runs):
        ckpt = checkpoint.load(path)
        correct, images, _ = checkpoint.validation_counts(ckpt, path)
        entry = per_arm.setdefault(run["arm"], {
            "arm": run["arm"], "student": run["student"], "order": run["order"],
            "val_correct": {}, "val_images": {}})
        entry["val_correct"][str(run["seed"])] = correct
        entry["val_images"][str(run["seed"])] = images
    candidates = [{**e, "val_accuracy_mean": float(val_mean(e))} for e in per_arm.values()]
    chosen = choose(candidates)
    record = {
        "selected_on": "mean best validation accuracy over the selection seeds (exact; "
                       "ties to the setting planned first)",
        "selection_seeds": sorted({r["seed"] for r in runs}),
        "students": {s: {"arm": c["arm"], "val_accuracy_mean": c["val_accuracy_mean"]}
                     for s, c in chosen.items()},
        "headline_student": headline_student(chosen),
        "candidates": candidates,
    }
    atomic.write_json(out, record)
    return record


def chosen_arms_of(choice_path: str | os.PathLike) -> list[str]:
    """The distilled arms a choice file confirms, one per student."""
    record = json.loads(Path(choice_path).read_text())
    return [c["arm"] for c in record["students"].values()]
