"""Weights from outside kdflow: a teacher to distil from, or a start to fine-tune."""

from __future__ import annotations

import os
import pickle
import re

import torch
from torch import nn

from kdflow import KdflowError
from kdflow.models import checkpoint
from kdflow.models.zoo import build_model, model_name, state_module

# Where RepDistiller, mdistiller and most training scripts put the weights
# in the dict they save ({"model": state_dict, "epoch": ..., ...}).
WRAPPER_KEYS = ("state_dict", "model")

SAVE_WEIGHTS = "save model.state_dict() with torch.save instead"


def read_state(path: str | os.PathLike) -> dict:
    """A kdflow checkpoint as it is, or the plain state dict the file holds
    (unwrapped from "state_dict" or "model"); never runs code from the file."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise KdflowError(f"weights file {path} does not exist") from None
    except Exception as e:
        # weights_only refuses every class and function the file would import
        # by name (a pickle's GLOBAL); other failures are files torch.save
        # did not write, or truncated ones, and fail in many ways.
        found = re.search(r"GLOBAL ([\w.]+)", str(e)) \
            if isinstance(e, pickle.UnpicklingError) else None
        if found:
            raise KdflowError(f"{path} holds pickled objects ({found.group(1)}), not only "
                              "tensors: kdflow loads weights only and never runs code from a "
                              f"file; {SAVE_WEIGHTS}") from None
        raise KdflowError(f"cannot read {path}: it is no file torch.save wrote, or a truncated "
                          f"one ({type(e).__name__}); {SAVE_WEIGHTS}") from None
    if _is_checkpoint(obj):
        return obj
    state = _state_dict(obj)
    if state is None:
        raise KdflowError(f"{path} holds {_describe(obj)}, not weights: kdflow reads a kdflow "
                          "checkpoint, a state dict (a dict of tensors) or a dict holding one "
                          f"under {' or '.join(map(repr, WRAPPER_KEYS))}; {SAVE_WEIGHTS}")
    if all(k.startswith("module.") for k in state):
        # nn.DataParallel and DistributedDataParallel save their module's keys under "module.".
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_teacher(path: str | os.PathLike, *, model: str, num_classes: int,
                 image_size: int) -> tuple[nn.Module, dict]:
    """The file's weights as architecture `model` for `num_classes` classes
    and image_size x image_size images, in eval mode on the CPU, and what
    was loaded: {"kind": "kdflow" or "state_dict"}, with a kdflow
    checkpoint's model, num_classes, image_size and class names."""
    state = read_state(path)
    if _is_checkpoint(state):
        ckpt = state
        size = ckpt.get("image_size", 32)  # older kdflow trained on 32x32 only
        if ckpt["model"] != model:
            raise KdflowError(f"{path} is a kdflow checkpoint of {ckpt['model']}, but the teacher "
                              f"is configured as {model}: set teacher.model to {ckpt['model']}, "
                              f"or name a {model} checkpoint")
        if ckpt["num_classes"] != num_classes:
            raise KdflowError(f"{path} was trained for {ckpt['num_classes']} classes, the dataset "
                              f"has {num_classes}: name a teacher trained on this dataset's classes")
        if size != image_size:
            raise KdflowError(f"{path} was trained on {size}x{size} images, the dataset's are "
                              f"{image_size}x{image_size}: set data.image_size to {size}, or name "
                              f"a teacher trained on {image_size}x{image_size} images")
        info = {"kind": "kdflow", "model": ckpt["model"], "num_classes": ckpt["num_classes"],
                "image_size": size, "classes": ckpt.get("classes")}
        state = ckpt["state_dict"]
    else:
        info = {"kind": "state_dict"}
    net = build_model(model, num_classes, image_size)
    _load(net, state, path, name=model, image_size=image_size, replace_head=False)
    return net.to(memory_format=torch.channels_last).eval(), info


def init_from(model: nn.Module, path: str | os.PathLike, *, num_classes: int) -> dict:
    """Load the file's weights into the freshly built `model` (a zoo model
    for `num_classes` classes) to fine-tune it. A classifier head for
    another class count is left as built (random) and everything else
    loaded; the result says so: {"kind", "head_replaced", and when
    replaced "head", "from_classes", "to_classes"; a kdflow checkpoint's
    model, num_classes and image_size}."""
    name = model_name(model)
    _, head = _head(model)
    if head.out_features != num_classes:
        raise ValueError(f"{name} was built for {head.out_features} classes, not {num_classes}")
    state = read_state(path)
    if _is_checkpoint(state):
        if state["model"] != name:
            raise KdflowError(f"{path} is a kdflow checkpoint of {state['model']}, not of {name}: "
                              f"name a {name} checkpoint, or set the model to {state['model']}")
        info = {"kind": "kdflow", "model": state["model"], "num_classes": state["num_classes"],
                "image_size": state.get("image_size", 32)}
        state = state["state_dict"]
    else:
        info = {"kind": "state_dict"}
    return {**info, **_load(model, state, path, name=name, image_size=None, replace_head=True)}


def _load(net: nn.Module, state: dict, path, *, name: str, image_size: int | None,
          replace_head: bool) -> dict:
    """Load `state` into `net`, or into its state_module (a plain torchvision
    file), after checking that it fits; each misfit is one KdflowError.
    `image_size` (the data's) only words the message of a flattened-map
    classifier built for another size."""
    target = net if state.keys() == net.state_dict().keys() else state_module(net)
    own = target.state_dict()
    # BatchNorm files from before PyTorch 0.4.1 lack the batch counter (used
    # only with momentum=None, which no zoo model has); loading fills it in.
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    fix = f"name weights saved from a {name}, or set the model to the architecture they come from"
    if missing or unexpected:
        parts = [_few(what, keys) for what, keys in (("missing", missing),
                                                      ("unexpected", unexpected)) if keys]
        raise KdflowError(f"{path} does not fit {name}: {'; '.join(parts)}; {fix}")
    wrong = {k: (tuple(state[k].shape), tuple(v.shape)) for k, v in own.items()
             if k in state and state[k].shape != v.shape}

    first = _first_classifier_key(net, target)
    if first in wrong and wrong[first][0][0] == wrong[first][1][0]:
        (_, got), (_, want) = wrong[first]
        built_for = type(net).image_size_for(got)
        size = image_size or type(net).image_size_for(want)
        if built_for is not None:
            raise KdflowError(
                f"{path} holds a {name} built for {built_for}x{built_for} images (its first "
                f"classifier layer takes {got} inputs, {want} at {size}x{size}): set "
                f"data.image_size to {built_for}, or name weights for {size}x{size} images")

    prefix, head = _head(target)
    head_keys = [k for k in (f"{prefix}.weight", f"{prefix}.bias") if k in own]
    result = {"head_replaced": False}
    file_head = state[head_keys[0]].shape
    if head_keys[0] in wrong and file_head[1:] == head.weight.shape[1:]:
        if not replace_head:
            raise KdflowError(f"{path}'s classifier head ({prefix}) gives {file_head[0]} classes, "
                              f"the dataset has {head.out_features}: name weights trained for "
                              f"{head.out_features} classes")
        for k in head_keys:
            wrong.pop(k, None)
        state = {k: v for k, v in state.items() if k not in head_keys}
        result = {"head_replaced": True, "head": prefix, "from_classes": file_head[0],
                  "to_classes": head.out_features}
    if wrong:
        k, (got, want) = next(iter(wrong.items()))
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise KdflowError(f"{path} does not fit {name}: {k} is {list(got)} in the file, "
                          f"{list(want)} in {name}{more}; {fix}")
    loaded = target.load_state_dict(state, strict=False)
    left = [k for k in loaded.missing_keys if not k.endswith("num_batches_tracked")]
    assert not loaded.unexpected_keys and left == (head_keys if result["head_replaced"] else [])
    return result


def _is_checkpoint(obj) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("format"), str) \
        and obj["format"] == checkpoint.FORMAT


def _is_state(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _state_dict(obj) -> dict | None:
    if _is_state(obj):
        return obj
    if isinstance(obj, dict):
        for key in WRAPPER_KEYS:
            if _is_state(obj.get(key)):
                return obj[key]
    return None


def _head(module: nn.Module) -> tuple[str, nn.Linear]:
    """The classifier head: the last Linear layer, which gives the logits
    in every zoo model (tests/test_weights.py checks each)."""
    name, head = [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear)][-1]
    return name, head


def _first_classifier_key(net: nn.Module, target: nn.Module) -> str | None:
    """The weight of a flattened-map classifier's first layer (DeepNN,
    LightNN: sized by the image size), or None for globally pooled nets."""
    if not hasattr(type(net), "image_size_for"):
        return None
    layer = net.classifier[0]
    return next(f"{n}.weight" for n, m in target.named_modules() if m is layer)


def _few(what: str, keys: list[str], shown: int = 3) -> str:
    more = f" (and {len(keys) - shown} more)" if len(keys) > shown else ""
    return f"{what} keys {', '.join(keys[:shown])}{more}"


def _describe(obj) -> str:
    if isinstance(obj, dict):
        keys = [repr(k) for k in list(obj)[:4]]
        more = ", ..." if len(obj) > 4 else ""
        return f"a dict with keys {', '.join(keys)}{more}" if obj else "an empty dict"
    return f"a {type(obj).__name__}"
