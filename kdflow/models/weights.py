"""Weights from outside kdflow: a teacher to distil from, or a start to fine-tune.

A file is loaded as weights only and checked against what it will be used
with: the architecture (its keys and shapes), the class count, and, where
the file records them, the class names in the order of the logits, the
image size and the normalisation of the inputs. Every check made and every
one that could not be made (a plain state dict records no class names and
no normalisation; a globally pooled net's weights fit any image size) is
returned as two lists of short strings, `checked` and `unchecked`, which
the teacher's `source` or `init` record keeps and the report shows.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import re
from typing import Sequence

import torch
from torch import nn

from kdflow import KdflowError
from kdflow.models import checkpoint
from kdflow.models.zoo import build_model, model_name, state_module

log = logging.getLogger(__name__)

# Where RepDistiller, mdistiller and most training scripts put the weights
# in the dict they save ({"model": state_dict, "epoch": ..., ...}).
WRAPPER_KEYS = ("state_dict", "model")

# What wrappers put before every key of the model they hold:
# nn.DataParallel and DistributedDataParallel "module.", torch.compile
# "_orig_mod.", a Lightning module that keeps the net as self.model
# "model.". They nest (a compiled model in DDP saves "module._orig_mod.").
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")

# Per-channel statistics (0..1 scale) closer than this are the same
# normalisation: statistics published to four decimals (CIFAR-10's 0.4914)
# beside the six kdflow computes differ by up to 5e-5, float32 round trips
# by far less, while those of two different datasets (CIFAR-10 and -100, or
# ImageNet) differ by 5e-3 and more.
NORMALISATION_TOLERANCE = 1e-4

SAVE_WEIGHTS = "save model.state_dict() with torch.save instead"
OLDER = "an older kdflow checkpoint records none"
PLAIN = "a plain state dict"


def read_state(path: str | os.PathLike) -> dict:
    """A kdflow checkpoint as it is, or the plain state dict the file holds
    (unwrapped from "state_dict" or "model", keys without WRAPPER_PREFIXES);
    never runs code from the file. Weights with NaN or inf are refused here:
    a model trained into NaN would otherwise pass every check and fail
    only far downstream (its export, checked against PyTorch)."""
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
        _refuse_non_finite(obj.get("state_dict"), path)
        return obj
    state = _state_dict(obj)
    if state is None:
        raise KdflowError(f"{path} holds {_describe(obj)}, not weights: kdflow reads a kdflow "
                          "checkpoint, a state dict (a dict of tensors) or a dict holding one "
                          f"under {' or '.join(map(repr, WRAPPER_KEYS))}; {SAVE_WEIGHTS}")
    state = _unprefixed(state)
    _refuse_non_finite(state, path)
    return state


def load_teacher(path: str | os.PathLike, *, model: str, classes: Sequence[str],
                 image_size: int, normalisation: dict) -> tuple[nn.Module, dict]:
    """The file's weights as architecture `model` for the data's `classes`
    (their names, in label order), image_size x image_size images and
    `normalisation` ({"mean", "std"}, see checkpoint.normalisation), in
    eval mode on the CPU, and what was loaded: {"kind": "kdflow" or
    "state_dict", a kdflow checkpoint's model, num_classes and image_size;
    "checked", "unchecked"}.

    An imported teacher is used as it is, so every recorded fact must match
    and each misfit is one KdflowError: another architecture, class count
    or image size; other class names or order (its logits would name other
    classes); another normalisation (beyond NORMALISATION_TOLERANCE): a
    teacher trained with other per-channel statistics sees every input
    shifted and scaled and would teach from a distribution it never saw,
    with nothing but a lower accuracy to show for it, so it is refused, not
    warned about (fine-tuning from it, teacher.init, adapts it instead)."""
    classes = [str(c) for c in classes]
    state = read_state(path)
    checked, unchecked = ["architecture", "class count"], []
    if _is_checkpoint(state):
        ckpt = state
        size = ckpt.get("image_size", 32)  # older kdflow trained on 32x32 only
        if ckpt["model"] != model:
            raise KdflowError(f"{path} is a kdflow checkpoint of {ckpt['model']}, but the teacher "
                              f"is configured as {model}: set teacher.model to {ckpt['model']}, "
                              f"or name a {model} checkpoint")
        if ckpt["num_classes"] != len(classes):
            raise KdflowError(f"{path} was trained for {ckpt['num_classes']} classes, the dataset "
                              f"has {len(classes)}: name a teacher trained on this dataset's "
                              "classes")
        if size != image_size:
            raise KdflowError(f"{path} was trained on {size}x{size} images, the dataset's are "
                              f"{image_size}x{image_size}: set data.image_size to {size}, or name "
                              f"a teacher trained on {image_size}x{image_size} images")
        theirs, norm = _recorded(ckpt, path)
        if theirs is None:
            unchecked.append(f"class names and order ({OLDER})")
        elif theirs != classes:
            raise KdflowError(
                f"{path} was trained on other classes than this dataset's (same count, "
                f"{len(classes)}): {_class_difference(theirs, classes)}; its logits would "
                "mean other classes: name a teacher trained on this dataset's classes, or "
                "fine-tune from it instead (teacher.init: its head then starts fresh)")
        else:
            checked.append("class names")
        checked.append("image size")
        if norm is None:
            unchecked.append(f"normalisation ({OLDER})")
        elif not _same_normalisation(norm, normalisation):
            raise KdflowError(
                f"{path} was trained on inputs normalised with {_stats(norm)}, this dataset's "
                f"are normalised with {_stats(normalisation)}: it would see every image "
                "shifted; name a teacher trained on this dataset's training images, or "
                "fine-tune from it instead (teacher.init)")
        else:
            checked.append("normalisation")
        info = {"kind": "kdflow", "model": ckpt["model"], "num_classes": ckpt["num_classes"],
                "image_size": size}
        state = ckpt["state_dict"]
    else:
        info = {"kind": "state_dict"}
        unchecked.append(f"class names and order ({PLAIN} has none)")
    net = build_model(model, len(classes), image_size)
    _load(net, state, path, name=model, image_size=image_size, replace_head=False)
    if info["kind"] == "state_dict":
        _size_check(net, model, checked, unchecked)
        unchecked.append(f"normalisation ({PLAIN} records none)")
    return (net.to(memory_format=torch.channels_last).eval(),
            {**info, "checked": checked, "unchecked": unchecked})


def init_from(model: nn.Module, path: str | os.PathLike, *, classes: Sequence[str],
              image_size: int, normalisation: dict, described: dict | None = None) -> dict:
    """Load the file's weights into the freshly built `model` (a zoo model
    for the data's `classes`, image_size x image_size images normalised
    with `normalisation`) to fine-tune it.

    Fine-tuning adapts the weights to the data, so only what cannot be
    adapted is refused (another architecture, another layer shape). A
    classifier head for another class count, or, in a kdflow checkpoint,
    for the same count of other class names or order, is left as built
    (random) and everything else loaded. Another image size or
    normalisation than the data's is loaded as it is and noted (in
    `notes` and the log): the first epochs then adapt the weights to
    the new inputs. The result: {"kind", "head_replaced", and when
    replaced "head", "from_classes", "to_classes"; a kdflow checkpoint's
    model, num_classes and image_size; "checked", "unchecked", "notes"}.

    `described`: what the publisher of a plain state dict says of it
    ({"classes", "normalisation", "image_size"}, any of them; torchvision's
    weights, kdflow.models.pretrained.described), checked as a kdflow
    checkpoint's records are: the training always normalises with the
    data's statistics (`normalisation`), so other published ones are noted."""
    classes = [str(c) for c in classes]
    name = model_name(model)
    _, head = _head(model)
    if head.out_features != len(classes):
        raise ValueError(f"{name} was built for {head.out_features} classes, not {len(classes)}")
    state = read_state(path)
    checked, unchecked, notes = ["architecture", "class count"], [], []
    fresh_head = False
    if _is_checkpoint(state):
        ckpt = state
        if ckpt["model"] != name:
            raise KdflowError(f"{path} is a kdflow checkpoint of {ckpt['model']}, not of {name}: "
                              f"name a {name} checkpoint, or set the model to {ckpt['model']}")
        size = ckpt.get("image_size", 32)
        theirs, norm = _recorded(ckpt, path)
        if theirs is None:
            unchecked.append(f"class names and order ({OLDER})")
        else:
            checked.append("class names")
            if ckpt["num_classes"] == len(classes) and theirs != classes:
                # Its head's rows are other classes' than the data's labels.
                fresh_head = True
                notes.append(f"class names: {_class_difference(theirs, classes)}")
        checked.append("image size")
        if size != image_size:
            notes.append(f"image size: {size}x{size} there, {image_size}x{image_size} here")
        if norm is None:
            unchecked.append(f"normalisation ({OLDER})")
        else:
            checked.append("normalisation")
            if not _same_normalisation(norm, normalisation):
                notes.append(f"normalisation: {_stats(norm)} there, {_stats(normalisation)} here")
        info = {"kind": "kdflow", "model": ckpt["model"], "num_classes": ckpt["num_classes"],
                "image_size": size}
        state = ckpt["state_dict"]
    else:
        info = {"kind": "state_dict"}
        fresh_head = _published(described or {}, classes, image_size, normalisation,
                                checked, unchecked, notes)
    loaded = _load(model, state, path, name=name, image_size=image_size, replace_head=True,
                   fresh_head=fresh_head)
    if info["kind"] == "state_dict":
        _size_check(model, name, checked, unchecked)
        if not (described or {}).get("normalisation"):
            unchecked.append(f"normalisation ({PLAIN} records none)")
    for note in notes:
        log.info("fine-tuning from %s: the file differs from the data in %s", path, note)
    return {**info, **loaded, "checked": checked, "unchecked": unchecked, "notes": notes}


def _load(net: nn.Module, state: dict, path, *, name: str, image_size: int | None,
          replace_head: bool, fresh_head: bool = False) -> dict:
    """Load `state` into `net`, or into its state_module (a plain torchvision
    file), after checking that it fits; each misfit is one KdflowError.
    `image_size` (the data's) only words the message of a flattened-map
    classifier built for another size. `fresh_head`: leave the head as
    built even where its shape fits (it was trained for other classes)."""
    target = net if state.keys() == net.state_dict().keys() else state_module(net)
    own = target.state_dict()
    # BatchNorm files from before PyTorch 0.4.1 lack the batch counter (used
    # only with momentum=None, which no zoo model has); loading fills it in.
    # Counters are left out of both lists alike: counted on one side only,
    # they made the two counts of one misfit incomparable.
    missing = [k for k in own if k not in state and not _counter(k)]
    unexpected = [k for k in state if k not in own and not _counter(k)]
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

    # Batch counters the net has no place for (left out of `unexpected`
    # above) carry nothing the net uses.
    state = {k: v for k, v in state.items() if k in own}
    prefix, head = _head(target)
    head_keys = [k for k in (f"{prefix}.weight", f"{prefix}.bias") if k in own]
    result = {"head_replaced": False}
    file_head = state[head_keys[0]].shape
    if fresh_head and head_keys[0] not in wrong:
        state = {k: v for k, v in state.items() if k not in head_keys}
        result = {"head_replaced": True, "head": prefix, "from_classes": file_head[0],
                  "to_classes": head.out_features}
    elif head_keys[0] in wrong and file_head[1:] == head.weight.shape[1:]:
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


def _published(described: dict, classes: list[str], image_size: int, normalisation: dict,
               checked: list, unchecked: list, notes: list) -> bool:
    """Check a plain state dict against what its publisher says of it
    (init_from's `described`); True when its head, of the data's class
    count, was trained for other class names or order (start it fresh)."""
    theirs, norm, size = (described.get(k) for k in ("classes", "normalisation", "image_size"))
    fresh_head = False
    if theirs:
        theirs = [str(c) for c in theirs]
        checked.append("class names (published with the weights)")
        if len(theirs) == len(classes) and theirs != classes:
            fresh_head = True
            notes.append(f"class names: {_class_difference(theirs, classes)}")
    else:
        unchecked.append(f"class names and order ({PLAIN} has none)")
    if size and size != image_size:
        notes.append(f"image size: {size}x{size} there (published with the weights), "
                     f"{image_size}x{image_size} here")
    if norm:
        checked.append("normalisation (published with the weights)")
        if not _same_normalisation(norm, normalisation):
            notes.append(f"normalisation: {_stats(norm)} there (published with the weights), "
                         f"{_stats(normalisation)} here (the data's, which training uses)")
    return fresh_head


def _counter(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def _unprefixed(state: dict) -> dict:
    """`state` without the WRAPPER_PREFIXES that every one of its keys has,
    however nested."""
    while True:
        prefix = next((p for p in WRAPPER_PREFIXES
                       if all(k.startswith(p) and len(k) > len(p) for k in state)), None)
        if prefix is None:
            return state
        state = {k[len(prefix):]: v for k, v in state.items()}


def _refuse_non_finite(state, path) -> None:
    if not isinstance(state, dict):
        return
    bad = [k for k, v in state.items() if isinstance(v, torch.Tensor)
           and (v.is_floating_point() or v.is_complex()) and not bool(torch.isfinite(v).all())]
    if bad:
        raise KdflowError(
            f"{path} holds weights that are not finite: {len(bad)} of its {len(state)} "
            f"tensors {'has' if len(bad) == 1 else 'have'} NaN or inf values (the first: "
            f"{bad[0]}); the training that saved them diverged: name weights saved before "
            "it did")


def _recorded(ckpt: dict, path) -> tuple[list[str] | None, dict | None]:
    """The class names and the normalisation a kdflow checkpoint records;
    None for each one an older kdflow did not record."""
    classes, norm = ckpt.get("classes"), ckpt.get("normalisation")
    if classes is not None:
        if not isinstance(classes, (list, tuple)):
            raise KdflowError(f"{path} records its classes as {_describe(classes)}, not a list "
                              "of names: it is no checkpoint kdflow wrote; re-save it")
        classes = [str(c) for c in classes]
    if norm is not None and not _is_normalisation(norm):
        raise KdflowError(f"{path} records its normalisation as {_describe(norm)}, not "
                          "{mean: [...], std: [...]}: it is no checkpoint kdflow wrote; re-save it")
    return classes, norm


def _is_normalisation(norm) -> bool:
    return isinstance(norm, dict) and all(
        isinstance(norm.get(k), (list, tuple)) and len(norm[k]) == 3
        and all(isinstance(v, (int, float)) and math.isfinite(v) for v in norm[k])
        for k in ("mean", "std"))


def _same_normalisation(a: dict, b: dict) -> bool:
    return all(abs(x - y) <= NORMALISATION_TOLERANCE
               for k in ("mean", "std") for x, y in zip(a[k], b[k], strict=True))


def _stats(norm: dict) -> str:
    def fmt(values):
        return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"
    return f"mean {fmt(norm['mean'])} std {fmt(norm['std'])}"


def _class_difference(theirs: list[str], ours: list[str]) -> str:
    """How two lists of class names of one length differ, in a few words."""
    only_there = [c for c in theirs if c not in ours]
    only_here = [c for c in ours if c not in theirs]
    if not only_there and not only_here:
        i = next(i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b)
        return (f"the same names in another order (class {i} is {theirs[i]!r} there, "
                f"{ours[i]!r} here)")
    parts = [f"{where}: {_names(names)}" for where, names in
             (("only in the file", only_there), ("only in the data", only_here)) if names]
    return "; ".join(parts)


def _names(names: list[str], shown: int = 3) -> str:
    more = f" (and {len(names) - shown} more)" if len(names) > shown else ""
    return ", ".join(map(repr, names[:shown])) + more


def _size_check(net: nn.Module, name: str, checked: list, unchecked: list) -> None:
    """What loading a plain state dict told of the image size it was
    trained on: a flattened-map classifier's first layer fits one size up
    to 3 pixels; every other zoo net pools globally and fits any size."""
    if hasattr(type(net), "image_size_for"):
        low = type(net).image_size_for(net.classifier[0].in_features)
        checked.append(f"image size ({name}'s weights fit {low} to {low + 3} alike)")
    else:
        unchecked.append(f"image size ({name}'s weights fit any size)")


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
