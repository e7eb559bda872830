"""Tiny CIFAR-10/100-format archives, in the official layouts
(cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta;
cifar-100-python/train, test, meta; all pickled dicts), from synthetic images
whose colour depends on the class, so models can learn something in one epoch."""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np

CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
           "dog", "frog", "horse", "ship", "truck"]


def synthetic_images(n: int, rng: np.random.Generator,
                     k: int = 10) -> tuple[np.ndarray, list[int]]:
    """n images (N, 3072) uint8, class-balanced over k classes, colour and
    stripes by class."""
    labels = [i % k for i in range(n)]
    rng.shuffle(labels)
    base = np.linspace(40, 215, k)
    imgs = np.empty((n, 3, 32, 32), np.float32)
    for i, c in enumerate(labels):
        img = rng.normal(0, 30, (3, 32, 32))
        img[c % 3] += base[c]
        img[:, :: 2 + c % 4, :] += 40  # class-dependent stripes
        imgs[i] = img + 60
    return np.clip(imgs, 0, 255).astype(np.uint8).reshape(n, -1), labels


def _add(tar: tarfile.TarFile, name: str, payload: bytes,
         root: str = "cifar-10-batches-py") -> None:
    info = tarfile.TarInfo(f"{root}/{name}")
    info.size, info.mode = len(payload), 0o644
    tar.addfile(info, io.BytesIO(payload))


def build_archive(path: Path, n_train: int = 300, n_test: int = 100, seed: int = 0,
                  members: dict[str, bytes] | None = None) -> str:
    """Write a CIFAR-10 python archive at `path`; returns its md5.

    `members` replaces or adds raw members (for malicious-pickle tests).
    """
    rng = np.random.default_rng(seed)
    x, y = synthetic_images(n_train, rng)
    xt, yt = synthetic_images(n_test, rng)
    payloads = {"batches.meta": pickle.dumps(
        {b"label_names": [c.encode() for c in CLASSES],
         b"num_cases_per_batch": n_train // 5, b"num_vis": 3072}, protocol=4)}
    for i, idx in enumerate(np.array_split(np.arange(n_train), 5), 1):
        payloads[f"data_batch_{i}"] = pickle.dumps(
            {b"batch_label": f"training batch {i} of 5".encode(), b"data": x[idx],
             b"labels": [y[j] for j in idx],
             b"filenames": [f"img{j}.png".encode() for j in idx]}, protocol=4)
    payloads["test_batch"] = pickle.dumps(
        {b"batch_label": b"testing batch 1 of 1", b"data": xt, b"labels": yt,
         b"filenames": [f"t{j}.png".encode() for j in range(n_test)]}, protocol=4)
    payloads.update(members or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in payloads.items():
            _add(tar, name, payload)
    return hashlib.md5(path.read_bytes()).hexdigest()


def build_archive_100(path: Path, n_train: int = 400, n_test: int = 200,
                      seed: int = 0) -> str:
    """Write a CIFAR-100 python archive (fine and coarse labels) at `path`;
    returns its md5."""
    rng = np.random.default_rng(seed)
    x, y = synthetic_images(n_train, rng, k=100)
    xt, yt = synthetic_images(n_test, rng, k=100)
    fine = [f"class_{i:02d}".encode() for i in range(100)]
    coarse = [f"super_{i:02d}".encode() for i in range(20)]

    def batch(label, data, labels):
        return pickle.dumps({b"batch_label": label, b"data": data, b"fine_labels": labels,
                             b"coarse_labels": [c // 5 for c in labels],
                             b"filenames": [f"i{j}.png".encode() for j in range(len(labels))]},
                            protocol=4)

    payloads = {
        "meta": pickle.dumps({b"fine_label_names": fine, b"coarse_label_names": coarse},
                             protocol=4),
        "train": batch(b"training batch 1 of 1", x, y),
        "test": batch(b"testing batch 1 of 1", xt, yt),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in payloads.items():
            _add(tar, name, payload, root="cifar-100-python")
    return hashlib.md5(path.read_bytes()).hexdigest()
