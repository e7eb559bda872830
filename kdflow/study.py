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
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from kdflow import KdflowError

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
    """A number as it appears in a path: 2.0 -> '2', 0.25 -> '0.25'."""
    return f"{float(x):g}"


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
