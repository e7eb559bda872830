"""The config schema (config/schema.yaml): loaded once, and its defaults by key.

The schema is the one place a config key's default is written; code that
needs a default (a setting's name leaves out knobs at their defaults) asks
here instead of repeating the value.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import fields
from pathlib import Path

import yaml

from kdflow import KdflowError

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "config" / "schema.yaml"


@functools.lru_cache(maxsize=None)
def _load(path: str) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def load(path: str | Path = SCHEMA_PATH) -> dict:
    """The schema as a dict (a copy: callers may change it)."""
    return copy.deepcopy(_load(str(path)))


def node(key: str, root: dict | None = None) -> dict:
    """The schema of a dotted config key ("kd.dkd.beta"), `$ref`s followed."""
    root = root or _load(str(SCHEMA_PATH))
    here = root
    for part in key.split("."):
        if "$ref" in here:
            here = {**root["$defs"][here["$ref"].rsplit("/", 1)[-1]], **here}
        try:
            here = here["properties"][part]
        except KeyError:
            raise KeyError(f"config/schema.yaml has no key {key!r}") from None
    return here


def default(key: str):
    """The schema's default of a dotted config key."""
    return copy.deepcopy(node(key)["default"])


def fields_of(cls, section: dict, where: str) -> dict:
    """The values of `cls`'s fields from a config section, every one required:
    the defaults live in config/schema.yaml alone, and kdflow.workflow.config.validate
    fills them in."""
    names = [f.name for f in fields(cls)]
    missing = [k for k in names if k not in section]
    if missing:
        raise KdflowError(f"{where} lacks {', '.join(missing)}: pass a config section "
                          "validated by kdflow.workflow.config.validate (it fills in the defaults)")
    return {k: section[k] for k in names}
