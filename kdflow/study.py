"""A study: the config's lists expanded into the models to train.

Every model of a seed has an *arm*, a path under results/seed{seed}/:

    teacher                          the teacher
    {student}/ce                     a plain (cross-entropy) student
    {student}/{method}/{setting}     a distilled student

with settings `T{T}_w{w}` (kd), `T{T}` (dkd) and `w{w}` (cosine, hint). A
setting's values live in its name, so adding or changing one value of a list
adds or renames only that setting's jobs: the others keep their paths, their
parameters and their results. Plain students do not depend on any
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

import re
from dataclasses import dataclass, field
from typing import Optional

import json
import os
from pathlib import Path

from kdflow import KdflowError, atomic

METHODS = ("kd", "dkd", "cosine", "hint")
# Which swept values each method uses (the rest of its settings are fixed
# in the config and passed as parameters).
USES_TEMPERATURE = {"kd", "dkd"}
USES_WEIGHT = {"kd", "cosine", "hint"}
METHOD_LABELS = {
    "kd": "KD (Hinton)",
    "dkd": "DKD",
    "cosine": "cosine (features)",
    "hint": "hint (FitNets)",
}

_SETTING = re.compile(r"^(?:T(?P<T>[0-9.e+-]+))?_?(?:w(?P<w>[0-9.e+-]+))?$")


def as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def fmt(x: float) -> str:
    """A number as it appears in a path: 2.0 -> '2', 0.25 -> '0.25'.

    Python's shortest round-trip form of the float, so two different values
    never share a name (2.0000001 stays '2.0000001') and the name reads back
    to exactly the value."""
    text = repr(float(x))
    return text[:-2] if text.endswith(".0") else text


def setting_name(method: str, temperature: Optional[float] = None,
                 weight: Optional[float] = None) -> str:
    parts = []
    if method in USES_TEMPERATURE:
        parts.append(f"T{fmt(temperature)}")
    if method in USES_WEIGHT:
        parts.append(f"w{fmt(weight)}")
    return "_".join(parts)


def parse_setting(method: str, setting: str) -> dict:
    """{'temperature': T, 'weight': w} (those the method uses) from a name."""
    if method not in METHODS:
        raise KdflowError(f"unknown distillation method {method!r}; choose one of {METHODS}")
    m = _SETTING.match(setting)
    want_t, want_w = method in USES_TEMPERATURE, method in USES_WEIGHT
    if not m or (m["T"] is not None) != want_t or (m["w"] is not None) != want_w:
        example = setting_name(method, 2, 0.25)
        raise KdflowError(f"setting {setting!r} of method {method!r} must look like {example!r}")
    try:
        out = {}
        if want_t:
            out["temperature"] = float(m["T"])
        if want_w:
            out["weight"] = float(m["w"])
    except ValueError:
        raise KdflowError(f"setting {setting!r}: not a number") from None
    if setting_name(method, out.get("temperature"), out.get("weight")) != setting:
        # e.g. T2.0 for T2: one setting must have one name, or it would train twice.
        canonical = setting_name(method, out.get("temperature"), out.get("weight"))
        raise KdflowError(f"setting {setting!r} is written {canonical!r}")
    return out


@dataclass(frozen=True)
class Arm:
    """One model of every seed; see the module docstring for the paths."""

    path: str
    role: str                          # teacher | student_baseline | student_kd
    model: str
    method: Optional[str] = None       # distilled students only
    setting: Optional[str] = None
    values: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def temperature(self) -> Optional[float]:
        return self.values.get("temperature")

    @property
    def weight(self) -> Optional[float]:
        return self.values.get("weight")


def describe(path: str) -> Arm:
    """The Arm of a path (inverse of the layout above)."""
    parts = path.split("/")
    if parts == ["teacher"]:
        return Arm(path, "teacher", "")
    if len(parts) == 2 and parts[1] == "ce":
        return Arm(path, "student_baseline", parts[0])
    if len(parts) == 3:
        return Arm(path, "student_kd", parts[0], parts[1], parts[2],
                   parse_setting(parts[1], parts[2]))
    raise KdflowError(f"{path!r} is not an arm (teacher, STUDENT/ce or STUDENT/METHOD/SETTING)")


def students(config: dict) -> list[str]:
    return as_list(config["student"]["model"])


def settings(config: dict) -> list[tuple[str, str]]:
    """(method, setting) pairs the config's lists expand to, in config order."""
    kd = config["kd"]
    temps, weights = as_list(kd["temperature"]), as_list(kd["soft_target_weight"])
    out = []
    for method in as_list(kd["method"]):
        for t in temps if method in USES_TEMPERATURE else [None]:
            for w in weights if method in USES_WEIGHT else [None]:
                out.append((method, setting_name(method, t, w)))
    seen = set()
    for pair in out:
        if pair in seen:  # e.g. 1 and 1.0 in one list
            raise KdflowError(f"invalid config: two {pair[0]} settings are both named "
                              f"{pair[1]!r}; list each value once")
        seen.add(pair)
    return out


def arms(config: dict) -> list[Arm]:
    """Every model of one seed: the teacher, then per student its baseline
    and its distilled variants."""
    out = [Arm("teacher", "teacher", config["teacher"]["model"])]
    for s in students(config):
        out.append(Arm(f"{s}/ce", "student_baseline", s))
        for method, setting in settings(config):
            out.append(Arm(f"{s}/{method}/{setting}", "student_kd", s, method, setting,
                           parse_setting(method, setting)))
    return out


def student_config(config: dict, model: str) -> dict:
    """The training section of one student architecture."""
    return {**config["student"], "model": model}


def method_config(config: dict, method: str, setting: str) -> dict:
    """Exactly what a distilled job depends on: its method, its setting's
    values and that method's fixed parameters, nothing of other settings."""
    cfg = {"method": method, **parse_setting(method, setting)}
    if method == "kd":
        # The loss takes w by its established name.
        cfg["soft_target_weight"] = cfg.pop("weight")
    if method == "dkd":
        cfg.update(config["kd"]["dkd"])
    return cfg


def distilled_arms(config: dict) -> list[Arm]:
    return [a for a in arms(config) if a.role == "student_kd"]


def confirmation_fixed_arms(config: dict) -> list[Arm]:
    """The arms every confirmation seed trains whatever the choice: the
    teacher and each student's plain twin (none without confirm_seeds)."""
    if not config.get("confirm_seeds"):
        return []
    return [a for a in arms(config) if a.role != "student_kd"]


def choose(candidates: list[dict]) -> dict[str, dict]:
    """Per student, the distilled arm with the highest mean validation
    accuracy. `candidates`: one dict per arm, in config order, with keys
    arm, student and val_accuracy_mean; ties go to the first. Test accuracy
    never enters: only validation numbers are passed in."""
    best: dict[str, dict] = {}
    for c in candidates:
        if c["student"] not in best or c["val_accuracy_mean"] > best[c["student"]]["val_accuracy_mean"]:
            best[c["student"]] = c
    return best


def headline_student(choice: dict[str, dict]) -> str:
    """The student whose chosen setting leads on validation (first on ties)."""
    top = max(choice.values(), key=lambda c: c["val_accuracy_mean"])
    return top["student"]


def write_choice(checkpoints: list[str], runs: list[dict], out: str) -> dict:
    """The choice of the selection stage, from the checkpoints' best
    validation accuracies only, written as JSON to `out`.

    runs[i] = {seed, arm, student} of checkpoints[i] (the workflow passes
    both in one order).
    """
    import torch  # deferred: the rest of this module is plain Python

    if len(checkpoints) != len(runs):
        raise KdflowError("choose needs one checkpoint per (seed, arm)")
    per_arm: dict[str, dict] = {}
    for path, run in zip(checkpoints, runs):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        entry = per_arm.setdefault(run["arm"], {"arm": run["arm"], "student": run["student"],
                                                "val_accuracy": {}})
        entry["val_accuracy"][str(run["seed"])] = float(ckpt["best_val_accuracy"])
    candidates = []
    for entry in per_arm.values():
        vals = list(entry["val_accuracy"].values())
        candidates.append({**entry, "val_accuracy_mean": sum(vals) / len(vals)})
    chosen = choose(candidates)
    record = {
        "selected_on": "mean best validation accuracy over the selection seeds",
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
