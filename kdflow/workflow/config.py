"""Config validation against config/schema.yaml, with defaults filled in."""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import jsonschema

from kdflow import KdflowError
from kdflow.distill import methods
from kdflow.core import schema as _schema
from kdflow.study import planner
from kdflow.data.datasets import complete_config
from kdflow.models import zoo

SCHEMA_PATH = _schema.SCHEMA_PATH


def load_schema(path: str | Path = SCHEMA_PATH) -> dict:
    return _schema.load(path)


def _coerce(schema_type, value):
    """`snakemake --config key={a: 1}` parses nested values as strings
    (YAML BaseLoader): turn them back into the numbers the schema asks for."""
    if schema_type == "number" and isinstance(value, int) and not isinstance(value, bool):
        # One value, one representation: 1 and 1.0 are the same setting, and
        # a job's parameters must not change with how a number was written.
        return float(value)
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


def _complete(schema: dict, value, root: dict, path: str = "", problems: list | None = None):
    """Fill defaults and coerce types recursively, following `$ref`s.

    `problems` collects what JSON Schema cannot say: a number that is not
    finite (nan, inf pass its `number` type) and a float where an integer is
    meant (JSON Schema counts 10.0 as an integer; a later `range()` or a
    seed{seed} path would not)."""
    problems = [] if problems is None else problems
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        schema = {**root["$defs"][name], **{k: v for k, v in schema.items() if k != "$ref"}}
    kind = schema.get("type")
    if isinstance(kind, list):  # "a number or a list of numbers"
        if isinstance(value, list) and "array" in kind:
            kind = "array"
        else:
            kind = next(k for k in kind if k != "array")
    if kind == "object" and isinstance(value, dict):
        for key, sub in schema.get("properties", {}).items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                value[key] = _complete(sub, value[key], root, f"{path}.{key}".lstrip("."),
                                       problems)
    elif kind == "array" and isinstance(value, list) and "items" in schema:
        value = [_complete(schema["items"], v, root, f"{path}.{i}", problems)
                 for i, v in enumerate(value)]
    else:
        value = _coerce(kind, value)
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(f"  {path}: {value} is not a finite number")
        elif kind == "integer" and isinstance(value, float):
            problems.append(f"  {path}: {value!r} is not an integer; write "
                            f"{int(value) if value.is_integer() else 'a whole number'}")
    return value


def _message(error: jsonschema.ValidationError) -> str:
    """For "one of these forms" errors, the most telling reason (e.g. the
    allowed names) instead of "not valid under any of the given schemas"."""
    if error.validator in ("anyOf", "oneOf") and error.context:
        named = [e for e in error.context if e.validator == "enum"]
        # The deepest one names the offending list item, not the whole list.
        named.sort(key=lambda e: len(e.path), reverse=True)
        # "null or a form": that the value is not null tells nothing.
        reasons = [e for e in error.context
                   if not (e.validator == "type" and e.validator_value == "null")]
        return (named[0] if named else
                jsonschema.exceptions.best_match(reasons or error.context)).message
    return error.message


# The keys that name a file of weights ({url, md5}, $defs.weights_file):
# the teacher's both; a student's init only (STUDENT_HAS_NONE), which, as
# the teacher's, may also name torchvision's weights ($defs.torchvision_weights).
WEIGHTS_FILES = ("checkpoint", "init")
TORCHVISION_KEYS = ("torchvision", "url")
# A string init that looks like a weights enum member (IMAGENET1K_V1, DEFAULT).
WEIGHTS_MEMBER = re.compile(r"[A-Z][A-Z0-9_]*")
WEIGHTS_KEYS = ("url", "md5")
MD5 = re.compile(r"[0-9a-fA-F]{32}")
GET_MD5 = "get it with `md5sum FILE`"


def _weights_file_problems(where: str, value) -> list[str]:
    """What is wrong with the {url, md5} of a weights file at `where` (e.g.
    teacher.checkpoint), one line each. JSON Schema can only say of any
    mistake that the value "is not of type 'null'" (the other form)."""
    form = f"give {{url: ..., md5: <32 hex digits>}} ({GET_MD5})"
    init = where.endswith(".init")
    if init and isinstance(value, dict) and "torchvision" in value:
        return _torchvision_problems(where, value)
    if not isinstance(value, dict):
        if init and isinstance(value, str) and WEIGHTS_MEMBER.fullmatch(value):
            return [f"{where} must be a mapping, not a string: write {{torchvision: "
                    f"{value}}} for torchvision's {value} weights of the architecture"]
        if isinstance(value, str):
            return [f"{where} must be {{url, md5}}, not a string: write "
                    f"{{url: {value!r}, md5: <32 hex digits>}} (get the md5 with "
                    "`md5sum FILE`), or null"]
        return [f"{where} must be {{url, md5}} or null, not {_kind(value)} {value!r}: {form}"]
    problems = []
    unknown = [k for k in value if k not in WEIGHTS_KEYS]
    if unknown:
        problems.append(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} "
                        f"{', '.join(map(repr, unknown))} (a typo?): it takes url and md5 only"
                        + (", or torchvision (a weights name) and an optional url" if init
                           else ""))
    url = value.get("url")
    if "url" not in value:
        problems.append(f"{where}: url is missing: give {{url: <an http(s):// or file:// URL, "
                        "or a path>, md5: ...}")
    elif not isinstance(url, str) or not url:
        problems.append(f"{where}.url {url!r} is not a URL or path: give an http(s):// or "
                        "file:// URL, or a path, as a string")
    md5 = value.get("md5")
    if "md5" not in value:
        problems.append(f"{where}: md5 is missing: {form}")
    elif not isinstance(md5, str):
        # YAML reads an md5 of digits only as a number (and 1e5... as a float).
        problems.append(f"{where}.md5 {md5!r} is not 32 hex digits (YAML read it as "
                        f"{_kind(md5)}: quote it); {GET_MD5}")
    elif not MD5.fullmatch(md5):
        problems.append(f"{where}.md5 {md5!r} is not 32 hex digits; {GET_MD5}")
    return problems


def _torchvision_problems(where: str, value: dict) -> list[str]:
    """What is wrong with the form of {torchvision: NAME, url?} at `where`
    (whether the architecture has such weights: _init_problems)."""
    problems = []
    unknown = [k for k in value if k not in TORCHVISION_KEYS]
    if unknown:
        problems.append(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} "
                        f"{', '.join(map(repr, unknown))}: torchvision's weights take "
                        "torchvision (a weights name) and an optional url (a local copy) only; "
                        "their hash is torchvision's, so no md5")
    name = value["torchvision"]
    if not isinstance(name, str) or not WEIGHTS_MEMBER.fullmatch(name):
        problems.append(f"{where}.torchvision {name!r} is not a weights name: give one of the "
                        "architecture's weights (e.g. IMAGENET1K_V1), or DEFAULT")
    url = value.get("url")
    if "url" in value and (not isinstance(url, str) or not url):
        problems.append(f"{where}.url {url!r} is not a URL or path: give a local copy's path "
                        "or file:// URL (or a mirror's http(s):// URL), or leave url out")
    return problems


def _init_problems(config: dict) -> list[str]:
    """A torchvision weights name the architecture lacks, and one {url, md5}
    file named for several student architectures (one file fits one).
    Resolving imports torchvision (seconds), so only configs that name
    torchvision weights pay it."""
    from kdflow.models import pretrained

    found = []
    for section in ("teacher", "student"):
        spec = config[section]["init"]
        named = config[section]["model"]
        models = named if isinstance(named, list) else [named]
        if pretrained.is_torchvision(spec):
            for model in models:
                if not zoo.is_model(model):
                    continue  # said by _model_problems
                try:
                    pretrained.resolve(spec, model)
                except KdflowError as e:
                    found.append(f"  {section}.init: {e}")
        elif spec is not None and len(models) > 1:
            found.append(f"  student.init {{url, md5}} is one file, which fits one "
                         f"architecture, and student.model lists {len(models)}: give "
                         "{torchvision: NAME} (resolved for each architecture), or list one "
                         "student model")
    return found


FP32_REQUIRED = (
    "export.formats: {value!r} lacks fp32, which is required: the fp32 ONNX model is "
    "always exported (it is the file checked against PyTorch, and int8 is quantised "
    "from it); write [fp32, int8], or [fp32] to skip quantisation (export.enabled: "
    "false skips export altogether)")


def _formats_problems(export) -> list[str]:
    """export.formats without fp32: the schema's `contains` can only say
    "does not contain items matching the given schema"."""
    formats = export.get("formats") if isinstance(export, dict) else None
    if isinstance(formats, list) and formats and "fp32" not in formats:
        return [FP32_REQUIRED.format(value=formats)]
    return []


def _kind(value) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, list):
        return "a list"
    return f"a {type(value).__name__}"


def _lower_md5s(config: dict) -> None:
    """md5s in lower case, in place: the digest is the same in either case,
    but a job's params are compared as written, and an md5 in capitals
    would refetch and rerun everything after it."""
    if isinstance(config["data"].get("md5"), str):
        config["data"]["md5"] = config["data"]["md5"].lower()
    for section, key in (("teacher", "checkpoint"), ("teacher", "init"), ("student", "init")):
        ref = config[section].get(key)
        if isinstance(ref, dict) and isinstance(ref.get("md5"), str):
            ref["md5"] = ref["md5"].lower()


def _where(error: jsonschema.ValidationError) -> str:
    path = ".".join(str(p) for p in error.absolute_path)
    return path or "(top level)"


def validate(config: dict, schema: dict | None = None) -> dict:
    """Return the config with defaults filled in, or raise KdflowError naming
    the offending key, its value and what is allowed."""
    schema = schema or load_schema()
    named = schema["$defs"]["method"]["enum"]
    if list(named) != list(methods.METHODS):
        # The schema documents the method table (kdflow.distill.methods); a method in
        # one and not the other would fail later, in a job.
        raise KdflowError(f"config/schema.yaml's $defs.method.enum {named} and the method "
                          f"table in kdflow/distill/methods.py {list(methods.METHODS)} differ; "
                          "list each method in both, in the same order")
    problems: list[str] = []
    config = _complete(schema, copy.deepcopy(dict(config)), schema, "", problems)
    # Said here, not by the schema's "is not of type 'null'" (see
    # _weights_file_problems); their schema errors are left out below.
    told = set()
    for section in ("teacher", "student"):
        part = config.get(section)
        for key in WEIGHTS_FILES:
            if not isinstance(part, dict) or part.get(key) is None:
                continue
            found = (_weights_file_problems(f"{section}.{key}", part[key])
                     if section == "teacher" or key == "init"
                     else [STUDENT_HAS_NONE.format(key=key)])
            problems += [f"  {line}" for line in found]
            told |= {(section, key)} if found else set()
    problems += [f"  {line}" for line in _formats_problems(config.get("export"))]
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted((e for e in validator.iter_errors(config)
                     if tuple(e.absolute_path)[:2] not in told
                     # Said by _formats_problems, not as "does not contain
                     # items matching the given schema".
                     and not (e.validator == "contains"
                              and tuple(e.absolute_path) == ("export", "formats"))),
                    key=lambda e: list(e.absolute_path))
    problems += _model_problems(config) + _range_problems(config)
    if errors or problems:
        lines = list(problems)
        for e in errors:
            if e.validator == "additionalProperties":
                lines.append(f"  {_where(e)}: {e.message} (a typo? see config/schema.yaml)")
            else:
                lines.append(f"  {_where(e)}: {_message(e)}")
        raise KdflowError(
            "invalid config (see config/schema.yaml for every key and its allowed "
            "values):\n" + "\n".join(lines)
        )
    if not isinstance(config["teacher"]["model"], str):
        raise KdflowError(
            f"invalid config: teacher.model must be one architecture, got "
            f"{config['teacher']['model']!r}; list several students under student.model"
        )
    _check_teacher(config)
    init_problems = _init_problems(config)
    if init_problems:
        raise KdflowError("invalid config:\n" + "\n".join(init_problems))
    planner.settings(config)  # refuses two settings of one name
    _check_confirmation(config)
    # The source defaults to the dataset's official archive (kdflow.data.datasets).
    complete_config(config["data"])
    _check_subset(config["data"])
    _lower_md5s(config)
    return config


def _model_problems(config: dict) -> list[str]:
    """Unknown architecture names, and feature-based methods asked of
    architectures whose feature maps kdflow does not split (the schema
    leaves the names to the model table, kdflow.models.zoo)."""
    found, models = [], []
    for section in ("teacher", "student"):
        named = (config.get(section) or {}).get("model")
        for name in named if isinstance(named, list) else [named]:
            if isinstance(name, str) and name:
                models.append((section, name))
                if not zoo.is_model(name):
                    found.append(f"  {section}.model: {name!r} is not one of kdflow's models; "
                                 + zoo.unknown_model(name).split(": ", 1)[1])
    asked = (config.get("kd") or {}).get("method")
    asked = asked if isinstance(asked, list) else [asked]
    feature = [m for m in asked if m in methods.METHODS and not methods.spec(m).logits_only]
    for section, name in models:
        if feature and zoo.is_model(name) and not zoo.has_features(name):
            found.append(
                f"  kd.method: {', '.join(feature)} distil feature maps, and kdflow does not know "
                f"where {name}'s ({section}.model) last feature map is; use a logit method "
                f"(kd, dkd, dist) for it, or an architecture of a family kdflow splits "
                "(kdflow's own, torchvision's ResNets, MobileNets, EfficientNets, ShuffleNets, "
                "RegNets, ConvNeXts, VGGs, DenseNets, MNASNets)")
    return found


def _range_problems(config: dict) -> list[str]:
    """Ranges written [low, high] the wrong way round (the schema checks each end alone)."""
    found = []
    for section in ("teacher", "student"):
        rc = ((config.get(section) or {}).get("augment") or {}).get("resized_crop")
        for key in ("scale", "ratio"):
            pair = rc.get(key) if isinstance(rc, dict) else None
            if isinstance(pair, list) and len(pair) == 2 and all(
                    isinstance(v, (int, float)) for v in pair) and pair[0] > pair[1]:
                found.append(f"  {section}.augment.resized_crop.{key}: {pair} is [high, low]; "
                             f"write it [low, high]: [{pair[1]}, {pair[0]}]")
    return found


TEACHER_ONLY = ("checkpoint", "shared")
STUDENT_HAS_NONE = (
    "student.{key} is a teacher key; students are always trained here (both from the "
    "same initial weights, student.init's if given): remove it, or move it under teacher")


def _check_teacher(config: dict) -> None:
    """A teacher from outside: checkpoint or init, not both; students never
    a checkpoint nor a shared teacher (their init: _init_problems).
    An imported checkpoint is one model, so it is the shared teacher."""
    student = config["student"]
    given = [k for k in TEACHER_ONLY if student.get(k) not in (None, False)]
    if given:
        raise KdflowError("invalid config: " + STUDENT_HAS_NONE.format(key=given[0]))
    teacher = config["teacher"]
    if teacher["checkpoint"] is not None and teacher["init"] is not None:
        raise KdflowError(
            "invalid config: teacher.checkpoint (use a trained teacher as it is) and "
            "teacher.init (start training from these weights) exclude each other: keep one")
    if teacher["checkpoint"] is not None:
        teacher["shared"] = True


def _check_subset(data: dict) -> None:
    """A training subset must leave images to train on beside data.val_size."""
    train = data["subset"]["train"]
    if train and data["val_size"] >= train:
        raise KdflowError(
            f"invalid config: data.subset.train = {train} leaves no training images beside "
            f"the data.val_size = {data['val_size']} validation images carved from it; "
            "raise data.subset.train or lower data.val_size")


def _check_confirmation(config: dict) -> None:
    """confirm_seeds: disjoint from seeds, and only where there is a choice."""
    confirm = config["confirm_seeds"]
    if not confirm:
        return
    shared = sorted(set(confirm) & set(config["seeds"]))
    if shared:
        raise KdflowError(
            f"invalid config: confirm_seeds and seeds share {shared}; a confirmation seed must "
            "not have taken part in the choice it confirms: give confirm_seeds seeds of their own")
    if len(planner.settings(config)) < 2:
        raise KdflowError(
            "invalid config: confirm_seeds is set but there is only one distillation setting, "
            "so nothing is chosen to confirm; add these seeds to `seeds` instead (or sweep "
            "kd.method or any knob of a method, such as kd.temperature)")
