"""Converted datasets: the uint8 .npz, its subset and split, loading for training.

Every dataset of the table (kdflow.data.datasets) converts to the same .npz:
x_train/x_test uint8 (N, 3, S, S), y_train/y_test int64, class names, and
the per-channel statistics of its training images; S is CIFAR's 32, or
data.image_size for a folder, and every later step reads it from the
arrays (x.shape[-1]). From there on nothing depends on where the images
came from: this module draws the optional class-balanced subset (a first
look in minutes), carves the validation split and loads the result for
training (`Splits`, `Normalizer`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:  # annotations only; see Splits
    import torch

from kdflow import KdflowError
from kdflow.core.atomic import write_with
from kdflow.data.preprocessing import NPZ_KEY

log = logging.getLogger(__name__)

# CIFAR's image side and array shape (what its archives hold). Other
# datasets have their own size (data.image_size); nothing after conversion
# assumes this one.
IMAGE_SIZE = 32
IMAGE_SHAPE = (3, IMAGE_SIZE, IMAGE_SIZE)

# CIFAR-10's published channel statistics: only for .npz files written
# before the statistics were recorded in them, and as the Normalizer's
# default for callers without a dataset (benchmarks, tests).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def savez(path: Path, **arrays) -> None:
    """An uncompressed .npz of `arrays` (numpy arrays, or StoredImages and
    kdflow.data.store.ScratchImages read back, copied in chunks), so that
    jobs can read its images in place (kdflow.data.store). Through a file
    object: np.savez would append ".npz" to a NAME.part path."""
    from kdflow.data.store import NpzWriter, chunks_of

    with open(path, "wb") as f, NpzWriter(f) as w:
        for key, a in arrays.items():
            if len(getattr(a, "shape", ())) == 4:   # images: in chunks
                w.add_chunks(key, a.dtype, tuple(a.shape), chunks_of(a))
            else:
                w.add(key, a)


def pixel_stats(x: np.ndarray, chunk_values: int = 1 << 21) -> tuple[tuple, tuple]:
    """Per-channel mean and (population) std of uint8 NCHW images, on the
    0..1 scale: how every dataset's statistics are obtained, from its
    training images. Summed in float64 in chunks of about `chunk_values`
    values (16 MiB, twice), so any number of images of any size costs no
    more than that."""
    if len(x) == 0:
        raise KdflowError("no training images to compute channel statistics from")
    from kdflow.data.store import chunks_of

    s = np.zeros(x.shape[1])
    s2 = np.zeros(x.shape[1])
    # Sums of integers in float64 are exact (below 2**53), so the chunking
    # (and the order) changes no digit.
    for block in chunks_of(x, chunk_values):
        block = block.astype(np.float64)
        s += block.sum(axis=(0, 2, 3))
        s2 += (block * block).sum(axis=(0, 2, 3))
    n = len(x) * x.shape[2] * x.shape[3]
    mean = s / n
    std = np.sqrt(np.maximum(s2 / n - mean * mean, 0.0))
    return tuple(round(float(v) / 255, 6) for v in mean), \
        tuple(round(float(v) / 255, 6) for v in std)


def write_dataset(out: str | os.PathLike, dataset: str, x_train: np.ndarray,
                  y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                  classes: list[str], mean=None, std=None, preprocessing=None) -> None:
    """Write the converted .npz, atomically. The statistics default to those
    of `x_train`; a subset keeps its full set's, so a subset run normalises
    exactly as the full run does. `preprocessing` (a dict,
    kdflow.data.preprocessing) is stored with the images: see
    preprocessing_entry."""
    if mean is None:
        mean, std = pixel_stats(x_train)
    write_with(out, lambda tmp: savez(
        tmp, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
        classes=np.array(classes), dataset=np.array(dataset),
        mean=np.array(mean), std=np.array(std), **preprocessing_entry(preprocessing)))


def preprocessing_entry(preprocessing: dict | None) -> dict:
    """The .npz entry holding how the images were prepared: a JSON string
    (a 0-d unicode array, which np.load reads without pickle), so the record
    travels with the pixels and every copy of them (a subset copies every
    entry). None: no entry."""
    if preprocessing is None:
        return {}
    return {NPZ_KEY: np.array(json.dumps(preprocessing, sort_keys=True))}


def recorded_preprocessing(d) -> dict | None:
    """The preparation stored in a converted .npz (preprocessing_entry);
    None for a file written before it was recorded."""
    if NPZ_KEY not in d.files:
        return None
    return json.loads(str(d[NPZ_KEY]))


def channel_stats(d) -> tuple[tuple, tuple]:
    """(mean, std) recorded in a converted .npz (CIFAR-10's for older files)."""
    if "mean" in d.files:
        return tuple(d["mean"].tolist()), tuple(d["std"].tolist())
    return CIFAR10_MEAN, CIFAR10_STD


# --------------------------------------------------------------------------
# Subset: a first look in minutes
# --------------------------------------------------------------------------

def balanced_pick(labels: np.ndarray, size: int, rng: np.random.Generator,
                  what: str, setting: str, *, leave: int = 0) -> np.ndarray:
    """Sorted indices of `size` items, class-balanced: each class gives
    size // C (the first size % C classes, in label order, one more), drawn
    by `rng` class by class. The one stratified draw, for the subset
    (`leave` 0) and the validation split (`leave` 1); `what` and `setting`
    name the images and the config key in its errors."""
    picks = []
    for members, k in _per_class(labels, size, what, setting, leave):
        picks.append(rng.choice(members, size=k, replace=False))
    return np.sort(np.concatenate(picks))


def _per_class(labels: np.ndarray, size: int, what: str, setting: str,
               leave: int) -> list[tuple[np.ndarray, int]]:
    """(the indices of a class, how many it gives) for each class in label
    order, refusing a size some class cannot give while keeping `leave` of
    its images out of the draw.

    Why `leave`: a subset may take every image of a class (k equal to its
    count: the class whole), but the validation split may not, or the class
    would have no training image left: the model would be scored on a class
    it never trained on. So the draw refuses k > count - leave, that is
    k > count for the subset and k >= count for the split: each edge is
    right for its caller, and one function keeps them from drifting."""
    labels = np.asarray(labels)
    classes = np.unique(labels)
    if size < len(classes):
        raise KdflowError(
            f"{setting} = {size} leaves some of the {len(classes)} classes without "
            f"{what} images; use at least {len(classes)}")
    base, extra = divmod(size, len(classes))
    out = []
    for i, c in enumerate(classes):
        members = np.flatnonzero(labels == c)
        k = base + (1 if i < extra else 0)
        if k > len(members) - leave:
            # The split says what the class has (its training images) and
            # that only lowering helps; a subset's setting also takes 0 (all).
            has, fix = ((f"{len(members)} training images", f"lower {setting}") if leave else
                        (f"{len(members)}", f"lower {setting} (or set it to 0 for all images)"))
            raise KdflowError(f"{setting} = {size} needs {k} {what} images of class {c} but "
                              f"it has only {has}; {fix}")
        out.append((members, k))
    return out


def check_draws(y_train: np.ndarray, y_test: np.ndarray, val_size: int,
                subset_train: int = 0, subset_test: int = 0) -> None:
    """Refuse, from the labels alone, what write_subset and write_split
    would refuse (data.subset.train, data.subset.test, data.val_size, in
    their order), with their errors: so a source too small for them is told
    before its images are converted. The split is judged on what it will be
    drawn from: the subset's class counts (fixed by its size) when there is
    one."""
    y_train = np.asarray(y_train)
    if subset_train:
        drawn = _per_class(y_train, subset_train, "train", "data.subset.train", 0)
        y_train = np.repeat([y_train[m[0]] for m, _ in drawn], [k for _, k in drawn])
    if subset_test:
        _per_class(y_test, subset_test, "test", "data.subset.test", 0)
    _per_class(y_train, val_size, "validation", "data.val_size", 1)


def write_subset(dataset: str | os.PathLike, out: str | os.PathLike,
                 train: int, test: int, seed: int) -> dict:
    """A class-balanced subset of the converted dataset (0 = all images of
    that set), drawn with generators seeded with (`seed`, part): the same
    dataset, sizes and seed always give the same images, and the test images
    do not depend on the train size. The full training set's
    channel statistics are kept."""
    from kdflow.data.store import StoredImages

    with np.load(dataset) as d:
        arrays = {k: d[k] for k in d.files if not k.startswith("x_")}
    for part in ("train", "test"):
        # The images are read in chunks when written, never held whole.
        arrays[f"x_{part}"] = StoredImages.from_npz(dataset, f"x_{part}") \
            or np.load(dataset)[f"x_{part}"]
    # One generator per part, so the test subset does not depend on how many
    # training images were drawn before it: changing data.subset.train keeps
    # the test images, and the scores stay comparable.
    for stream, (part, size, setting) in enumerate((("train", train, "data.subset.train"),
                                                    ("test", test, "data.subset.test"))):
        if size:
            rng = np.random.default_rng([seed, stream])
            idx = balanced_pick(arrays[f"y_{part}"], size, rng, part, setting)
            x = arrays[f"x_{part}"]
            arrays[f"x_{part}"] = x.view(idx) if isinstance(x, StoredImages) else x[idx]
            arrays[f"y_{part}"] = arrays[f"y_{part}"][idx]
    write_with(out, lambda tmp: savez(tmp, **arrays))
    info = {"train": len(arrays["y_train"]), "test": len(arrays["y_test"])}
    log.info("subset: %d train, %d test images (seed %d)", info["train"], info["test"], seed)
    return info


# --------------------------------------------------------------------------
# Validation split
# --------------------------------------------------------------------------

def make_split(labels: np.ndarray, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class-balanced validation indices carved from the training set.

    Each class gives val_size // C images (the first val_size % C classes one
    more), drawn by a generator seeded with `seed` (balanced_pick, leaving
    every class at least one training image): the same labels, size and
    seed always give the same split. Returns sorted (train_idx, val_idx).
    """
    val_idx = balanced_pick(labels, val_size, np.random.default_rng(seed), "validation",
                            "data.val_size", leave=1)
    train_idx = np.setdiff1d(np.arange(len(labels)), val_idx)
    return train_idx, val_idx


def write_split(dataset: str | os.PathLike, out: str | os.PathLike,
                val_size: int, seed: int) -> None:
    with np.load(dataset) as d:
        labels = d["y_train"]
    train_idx, val_idx = make_split(labels, val_size, seed)
    write_with(out, lambda tmp: savez(tmp, train_idx=train_idx, val_idx=val_idx,
                                       val_size=np.int64(val_size), seed=np.int64(seed)))
    log.info("split: %d train, %d validation (seed %d)", len(train_idx), len(val_idx), seed)


# --------------------------------------------------------------------------
# In-memory dataset for training
# --------------------------------------------------------------------------

# torch is imported inside the two classes below that use it: the workflow
# imports this module to validate its config, and every Snakemake start (each
# dry run, each cluster job) would otherwise pay seconds for torch.
class Splits:
    """Train/val/test images as uint8 NCHW with int64 labels.

    Images stay uint8 (a quarter of float32's memory); batches are converted
    and normalised on the device, see `Normalizer`. Where they are held is
    the config's placement section (kdflow.data.store.open_images): resident
    as tensors on the training device, or streamed, read from the .npz a
    batch at a time so the job's memory does not grow with the dataset. The
    two give the same batches: a fixed seed trains to the same weights.
    """

    def __init__(self, dataset: str | os.PathLike, split: str | os.PathLike,
                 device: torch.device | str = "cpu", placement: dict | None = None):
        # placement: the config's section; None (callers outside the
        # workflow) takes the schema's defaults.
        import torch

        from kdflow.data.store import open_images

        with np.load(dataset) as d, np.load(split) as s:
            tr, va = s["train_idx"], s["val_idx"]
            y = d["y_train"]
            self.classes = [str(c) for c in d["classes"]]
            self.mean, self.std = channel_stats(d)

            def t(a):
                return torch.from_numpy(np.ascontiguousarray(a)).to(device)

            self.train_y, self.val_y, self.test_y = t(y[tr]), t(y[va]), t(d["y_test"])
        (self.train_x, self.val_x, self.test_x), self.placement = open_images(
            dataset, [("x_train", tr), ("x_train", va), ("x_test", None)], device,
            placement if placement is not None else {})
        log.info("%s", self.placement)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


class Normalizer:
    """uint8 NCHW -> float, normalised per channel (CIFAR-10's statistics
    unless given), channels_last.

    channels_last makes the CPU and cuDNN convolution kernels faster for these
    small-channel convolutions.
    """

    def __init__(self, device, mean=CIFAR10_MEAN, std=CIFAR10_STD):
        import torch

        self.memory_format = torch.channels_last
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255

    def __call__(self, x_uint8: torch.Tensor) -> torch.Tensor:
        x = (x_uint8.float() - self.mean) / self.std
        return x.contiguous(memory_format=self.memory_format)


class Images(NamedTuple):
    """What every dataset's converter returns: uint8 NCHW images, all of
    one square size, int64 labels indexing `classes`."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: list[str]
