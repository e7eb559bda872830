"""Config validation against config/schema.yaml, with defaults filled in."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import yaml

from kdflow import KdflowError

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "config" / "schema.yaml"


def load_schema(path: str | Path = SCHEMA_PATH) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def _coerce(schema_type, value):
    """`snakemake --config key={a: 1}` parses nested values as strings
    (YAML BaseLoader): turn them back into the numbers the schema asks for."""
    if not isinstance(value, str):
        return value
    try:
        if schema_type == "integer":
            return int(value)
        if schema_type == "number":
            return float(value)
    except ValueError:
        pass  # left as is: validation then names the key and the bad value
    if schema_type == "boolean" and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return value


def _complete(schema: dict, value, root: dict):
    """Fill defaults and coerce types recursively, following `$ref`s."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        schema = {**root["$defs"][name], **{k: v for k, v in schema.items() if k != "$ref"}}
    kind = schema.get("type")
    if kind == "object" and isinstance(value, dict):
        for key, sub in schema.get("properties", {}).items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                value[key] = _complete(sub, value[key], root)
    elif kind == "array" and isinstance(value, list) and "items" in schema:
        value = [_complete(schema["items"], v, root) for v in value]
    else:
        value = _coerce(kind, value)
    return value


def _where(error: jsonschema.ValidationError) -> str:
    path = ".".join(str(p) for p in error.absolute_path)
    return path or "(top level)"


def validate(config: dict, schema: dict | None = None) -> dict:
    """Return the config with defaults filled in, or raise KdflowError naming
    the offending key, its value and what is allowed."""
    schema = schema or load_schema()
    config = _complete(schema, copy.deepcopy(dict(config)), schema)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        lines = []
        for e in errors:
            if e.validator == "additionalProperties":
                lines.append(f"  {_where(e)}: {e.message} (a typo? see config/schema.yaml)")
            else:
                lines.append(f"  {_where(e)}: {e.message}")
        raise KdflowError(
            "invalid config (see config/schema.yaml for every key and its allowed "
            "values):\n" + "\n".join(lines)
        )
    return config
