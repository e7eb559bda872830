"""CIFAR-10 and CIFAR-100: fetch and verify the archive, read it safely,
split, load.

The official archives (cifar-10-python.tar.gz, cifar-100-python.tar.gz) hold
pickled batches. Pickle can run arbitrary code, so batches are read with an unpickler that accepts
only what CIFAR batches contain. torchvision's CIFAR10 is not used: it checks
each batch against the official md5s and so refuses any mirror.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import tarfile
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdflow import KdflowError

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class DatasetSpec:
    """Where a CIFAR python archive keeps its batches and what they hold."""

    archive: str              # official file name, also its name under results/data
    url: str
    md5: str
    root: str                 # folder inside the archive
    train: tuple[str, ...]    # training batches
    test: str
    meta: str
    label_key: str            # labels in each batch
    names_key: str            # class names in the meta file
    # Each dataset's own channel statistics over its training images. (The
    # PyTorch tutorial uses ImageNet's, a known slip.)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


DATASETS: dict[str, DatasetSpec] = {
    "cifar10": DatasetSpec(
        archive="cifar-10-python.tar.gz",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        root="cifar-10-batches-py",
        train=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test="test_batch", meta="batches.meta",
        label_key="labels", names_key="label_names",
        mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
    ),
    # Fine labels (100 classes), as every CIFAR-100 distillation table uses.
    "cifar100": DatasetSpec(
        archive="cifar-100-python.tar.gz",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        root="cifar-100-python",
        train=("train",), test="test", meta="meta",
        label_key="fine_labels", names_key="fine_label_names",
        mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
    ),
}
CIFAR10_MEAN = DATASETS["cifar10"].mean
CIFAR10_STD = DATASETS["cifar10"].std


def dataset_spec(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise KdflowError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}") from None


# --------------------------------------------------------------------------
# Fetch and verify
# --------------------------------------------------------------------------

def md5sum(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _open_source(url: str):
    """Open an http(s)/file URL or a plain path; returns (stream, size or None)."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme in ("", "file"):
        path = urllib.parse.unquote(parsed.path) if parsed.scheme == "file" else url
        if not os.path.isfile(path):
            raise KdflowError(
                f"CIFAR archive not found at {path!r} (from data.url {url!r}); "
                "set data.url to an existing file, a file:// URL or an http(s) URL"
            )
        return open(path, "rb"), os.path.getsize(path)
    if parsed.scheme in ("http", "https"):
        try:
            resp = urllib.request.urlopen(url, timeout=60)
        except OSError as e:
            raise KdflowError(
                f"could not download {url}: {e}. Without internet access, build or "
                "copy the archive and point data.url at it (file:///path/to/"
                "cifar-10-python.tar.gz) with its data.md5"
            ) from None
        size = resp.headers.get("Content-Length")
        return resp, int(size) if size else None
    raise KdflowError(
        f"data.url {url!r} has unsupported scheme {parsed.scheme!r}; "
        "use http(s)://, file:// or a plain path"
    )


def fetch_archive(url: str, md5: str, dest: str | os.PathLike) -> None:
    """Copy/download `url` to `dest` and verify its md5.

    Writes to a temporary file beside `dest` and renames it only once the
    checksum matches, so a failed or corrupt download leaves nothing behind.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    h = hashlib.md5()
    try:
        src, size = _open_source(url)
        with src, open(part, "wb") as out:
            done, next_report = 0, 0.0
            while block := src.read(1 << 20):
                out.write(block)
                h.update(block)
                done += len(block)
                if size and done / size >= next_report:
                    log.info("fetched %5.1f%% of %.1f MB", 100 * done / size, size / 1e6)
                    next_report += 0.25
        got = h.hexdigest()
        if got != md5.lower():
            raise KdflowError(
                f"md5 mismatch for {url}: expected {md5}, got {got}. The file is "
                "corrupt, truncated or a different archive; fetch it again, or if it "
                "is a trusted mirror set data.md5 to its checksum"
            )
        os.replace(part, dest)
        log.info("verified %s (md5 %s) -> %s", url, got, dest)
    finally:
        if part.exists():
            part.unlink()


# --------------------------------------------------------------------------
# Safe reading of the pickled batches
# --------------------------------------------------------------------------

class UnsafePickleError(KdflowError):
    pass


# The only globals a CIFAR batch needs: numpy's array reconstruction
# (module renamed numpy.core -> numpy._core in numpy 2).
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, ints, strings/bytes and numpy arrays only."""

    def __init__(self, file, source: str):
        super().__init__(file, encoding="bytes")
        self.source = source

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"refusing to unpickle {module}.{name} in {self.source}: CIFAR batches "
            "hold only numpy arrays, lists, ints and strings, so this archive is not "
            "a genuine CIFAR python archive. Check data.url and data.md5"
        )

    def persistent_load(self, pid):
        raise UnsafePickleError(f"refusing persistent id in {self.source}")


def safe_unpickle(payload: bytes, source: str = "pickle"):
    try:
        return RestrictedUnpickler(io.BytesIO(payload), source).load()
    except UnsafePickleError:
        raise
    except Exception as e:  # truncated or garbled bytes
        raise KdflowError(f"{source} is not a readable CIFAR batch ({e})") from None


def _key(d: dict, name: str, source: str):
    for k in (name.encode(), name):
        if k in d:
            return d[k]
    raise KdflowError(f"{source} lacks the {name!r} entry of a CIFAR batch")


def _text(v) -> str:
    return v.decode("latin1") if isinstance(v, bytes) else str(v)


def parse_batch(payload: bytes, source: str,
                label_key: str = "labels") -> tuple[np.ndarray, np.ndarray]:
    """Images as uint8 (N, 3, 32, 32) and labels as int64 (N,)."""
    batch = safe_unpickle(payload, source)
    if not isinstance(batch, dict):
        raise KdflowError(f"{source} is not a CIFAR batch (a {type(batch).__name__})")
    data = _key(batch, "data", source)
    labels = _key(batch, label_key, source)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3 * 32 * 32:
        raise KdflowError(f"{source}: 'data' must be a uint8 array of shape (N, 3072)")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (data.shape[0],):
        raise KdflowError(f"{source}: {len(labels)} labels for {data.shape[0]} images")
    return data.reshape(-1, 3, 32, 32), labels


def convert_archive(archive: str | os.PathLike, out: str | os.PathLike,
                    dataset: str = "cifar10") -> dict:
    """Read the archive's batches into one compact .npz of uint8 images.

    The archive is read member by member in memory: nothing is extracted to
    disk, so a hostile member name cannot write outside the results folder.
    The .npz records the dataset's name and channel statistics, so every
    later step normalises with the right ones.
    """
    spec = dataset_spec(dataset)
    try:
        tar = tarfile.open(archive, "r:gz")
    except (tarfile.TarError, OSError) as e:
        raise KdflowError(f"{archive} is not a gzipped tar archive ({e})") from None
    with tar:
        def member(name: str) -> bytes:
            path = f"{spec.root}/{name}"
            try:
                f = tar.extractfile(path)
            except KeyError:
                f = None
            if f is None:
                raise KdflowError(
                    f"{archive} lacks {path}; is it the {dataset} *python* archive "
                    f"({spec.archive})? Check data.dataset and data.url"
                )
            return f.read()

        meta = safe_unpickle(member(spec.meta), spec.meta)
        classes = [_text(c) for c in _key(meta, spec.names_key, spec.meta)]
        parts = [parse_batch(member(b), b, spec.label_key) for b in spec.train]
        x_test, y_test = parse_batch(member(spec.test), spec.test, spec.label_key)
    x_train = np.concatenate([p[0] for p in parts])
    y_train = np.concatenate([p[1] for p in parts])
    for split, y in (("train", y_train), ("test", y_test)):
        if y.min() < 0 or y.max() >= len(classes):
            raise KdflowError(f"{split} labels outside 0..{len(classes) - 1}")
    out = Path(out)
    tmp = out.with_name(out.stem + ".part.npz")
    np.savez(tmp, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
             classes=np.array(classes), dataset=np.array(dataset),
             mean=np.array(spec.mean), std=np.array(spec.std))
    os.replace(tmp, out)
    info = {"train": len(y_train), "test": len(y_test), "classes": classes}
    log.info("converted %s (%s): %d train, %d test images, %d classes",
             archive, dataset, len(y_train), len(y_test), len(classes))
    return info


def channel_stats(d) -> tuple[tuple, tuple]:
    """(mean, std) recorded in a converted .npz (CIFAR-10's for older files)."""
    if "mean" in d.files:
        return tuple(d["mean"].tolist()), tuple(d["std"].tolist())
    return CIFAR10_MEAN, CIFAR10_STD


# --------------------------------------------------------------------------
# Validation split
# --------------------------------------------------------------------------

def make_split(labels: np.ndarray, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class-balanced validation indices carved from the training set.

    Each class gives val_size // C images (the first val_size % C classes one
    more), drawn by a generator seeded with `seed`: the same labels, size and
    seed always give the same split. Returns sorted (train_idx, val_idx).
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)
    n_classes = len(classes)
    if val_size < n_classes:
        raise KdflowError(
            f"data.val_size = {val_size} leaves some of the {n_classes} classes "
            f"without validation images; use at least {n_classes}"
        )
    rng = np.random.default_rng(seed)
    base, extra = divmod(val_size, n_classes)
    picks = []
    for i, c in enumerate(classes):
        members = np.flatnonzero(labels == c)
        k = base + (1 if i < extra else 0)
        if k >= len(members):
            raise KdflowError(
                f"data.val_size = {val_size} needs {k} validation images of class "
                f"{c} but it has only {len(members)} training images; lower data.val_size"
            )
        picks.append(rng.choice(members, size=k, replace=False))
    val_idx = np.sort(np.concatenate(picks))
    train_idx = np.setdiff1d(np.arange(len(labels)), val_idx)
    return train_idx, val_idx


def write_split(dataset: str | os.PathLike, out: str | os.PathLike,
                val_size: int, seed: int) -> None:
    with np.load(dataset) as d:
        labels = d["y_train"]
    train_idx, val_idx = make_split(labels, val_size, seed)
    out = Path(out)
    tmp = out.with_name(out.stem + ".part.npz")
    np.savez(tmp, train_idx=train_idx, val_idx=val_idx,
             val_size=np.int64(val_size), seed=np.int64(seed))
    os.replace(tmp, out)
    log.info("split: %d train, %d validation (seed %d)", len(train_idx), len(val_idx), seed)


# --------------------------------------------------------------------------
# In-memory dataset for training
# --------------------------------------------------------------------------

class CifarSplits:
    """Train/val/test images as uint8 NCHW tensors with int64 labels.

    Kept as uint8 (a quarter of float32's memory) on the training device;
    batches are converted and normalised there, see `Normalizer`.
    """

    def __init__(self, dataset: str | os.PathLike, split: str | os.PathLike,
                 device: torch.device | str = "cpu"):
        with np.load(dataset) as d, np.load(split) as s:
            x, y = d["x_train"], d["y_train"]
            tr, va = s["train_idx"], s["val_idx"]
            self.classes = [str(c) for c in d["classes"]]
            self.mean, self.std = channel_stats(d)

            def t(a):
                return torch.from_numpy(np.ascontiguousarray(a)).to(device)

            self.train_x, self.train_y = t(x[tr]), t(y[tr])
            self.val_x, self.val_y = t(x[va]), t(y[va])
            self.test_x, self.test_y = t(d["x_test"]), t(d["y_test"])

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
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255

    def __call__(self, x_uint8: torch.Tensor) -> torch.Tensor:
        x = (x_uint8.float() - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last)
