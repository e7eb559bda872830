"""The CIFAR python archives: their layout, their batches parsed and checked, and the converter of both.

An official archive (cifar-10-python.tar.gz, cifar-100-python.tar.gz) is a
gzipped tar of pickled batches and a meta file. It is read in memory and
never extracted (kdflow.data.archives, under the caps below), each pickle
through the restricted unpickler (kdflow.data.unpickle), and what comes
out is checked against the layout: N x 3072 uint8 images, N integer labels
below the class count, the class names, no more images than the official
sets. `read_cifar` is the cifar10/cifar100 entries' converter
(kdflow.data.datasets).
"""

from __future__ import annotations

import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdflow import KdflowError
from kdflow.data import archives
from kdflow.data.arrays import IMAGE_SIZE, Images
from kdflow.data.fetch import _size
from kdflow.data.unpickle import brief, describe, is_int, safe_unpickle


@dataclass(frozen=True)
class CifarLayout:
    """Where a CIFAR python archive keeps its batches and what they hold."""

    root: str                 # folder inside the archive
    train: tuple[str, ...]    # training batches
    test: str
    meta: str
    label_key: str            # labels in each batch
    names_key: str            # class names in the meta file
    num_classes: int
    # The official image counts: an archive may hold fewer (a subset, as the
    # tests' tiny archives do) but never more.
    train_size: int
    test_size: int
    # A little above the largest official member, so a member's size is
    # refused before a single byte of it is read into memory.
    max_member: int

# Both official archives unpack to about 186 MB of tar. Reading stops past
# this, so a small gzip that inflates to gigabytes (a "zip bomb") costs
# seconds, not the disk or the afternoon.
MAX_UNPACKED = 200 << 20
# A genuine archive has 7 (CIFAR-100: 4) members: more, and it is not one,
# refused before thousands of tiny members are walked.
MAX_MEMBERS = 64


def _caps() -> archives.Caps:
    """The caps above and their refusals, built at each call (a caller or
    test that lowers a cap is obeyed). Between two members no more than
    archives.HEADER_SLACK: the official archives have plain tar headers."""
    return archives.Caps(
        members=MAX_MEMBERS, unpacked=MAX_UNPACKED, between=archives.HEADER_SLACK,
        too_many=lambda archive, _: (f"{archive} has more than {MAX_MEMBERS} members; it "
                                     "is not a CIFAR python archive. Check data.url"),
        too_large=lambda archive: (
            f"{archive} unpacks to more than {_size(MAX_UNPACKED)}, far more than a CIFAR "
            "python archive (about 186 MB); it is not one. Check data.url"),
        crowded=lambda archive: (
            f"{archive}: more than {archives.HEADER_SLACK:,} bytes of headers between two "
            "members (an oversized pax or long-name header); a genuine CIFAR python "
            "archive has none. Check data.url"))


def _read_members(archive: Path, spec: CifarLayout, official: str) -> dict[str, bytes]:
    """The raw bytes of the meta file and the batches, after checking the
    whole archive is intact (so damage is reported as such, not as an odd
    pickle). Nothing is extracted to disk, so a hostile member name cannot
    write anywhere."""
    wanted = {f"{spec.root}/{n}": n for n in (spec.meta, *spec.train, spec.test)}
    found: dict[str, bytes] = {}
    try:
        for tar, info in archives.tar_members(archive, _caps(), gzipped=True):
            if info.isdir():
                continue
            if not info.isfile() or info.issparse():
                # Links and devices: nothing a CIFAR archive needs.
                raise KdflowError(
                    f"{archive}: member {info.name} is not a regular file (tar type "
                    f"{info.type!r}); a genuine CIFAR archive holds only its folder "
                    "and plain files. Check data.url")
            name = wanted.get(info.name)
            if name is None:
                continue   # e.g. readme.html
            if name in found:
                raise KdflowError(f"{archive} holds {info.name} twice; it is not a "
                                  "genuine CIFAR python archive. Check data.url")
            if not 0 <= info.size <= spec.max_member:
                raise KdflowError(
                    f"{archive}: {info.name} is {info.size:,} bytes, more than the "
                    f"{spec.max_member:,} allowed for any {official} member; "
                    "it is not a CIFAR batch. Check data.url and data.dataset")
            found[name] = tar.extractfile(info).read()
    except (EOFError, OSError, zlib.error, tarfile.TarError) as e:
        raise KdflowError(
            f"{archive}: archive truncated or corrupt: {type(e).__name__}: {e}; fetch it "
            f"again (delete {archive} and rerun: the download step fetches and verifies "
            "it anew)") from None
    for path, name in wanted.items():
        if name not in found:
            raise KdflowError(
                f"{archive} lacks {path}; is it the {official.split('-python')[0]} "
                f"*python* archive ({official})? Check data.dataset and data.url")
    return found


def read_cifar(archive: Path, entry, image_size: int, scratch: Path | None = None) -> Images:
    """A CIFAR python archive's batches, each checked against the layout:
    N x 3072 uint8 images, N integer labels below the class count, no more
    images than the official sets. Always 32x32 (`image_size` is checked
    against the entry's before any converter runs). `entry` is the table's
    Dataset (kdflow.data.datasets), its layout and official file name read.
    At most 60,000 small images (184 MB): held in memory, so `scratch`
    (where a large tree's images go) is unused."""
    spec = entry.layout
    payloads = _read_members(archive, spec, entry.archive)
    classes = class_names(payloads.pop(spec.meta), f"{spec.root}/{spec.meta}",
                          spec.names_key, spec.num_classes)

    def batch(name: str):
        # pop: each raw batch is freed as soon as it is parsed.
        return parse_batch(payloads.pop(name), f"{spec.root}/{name}", spec.label_key,
                           spec.num_classes)

    parts = [batch(b) for b in spec.train]
    x_test, y_test = batch(spec.test)
    x_train = np.concatenate([p[0] for p in parts])
    y_train = np.concatenate([p[1] for p in parts])
    name = entry.archive.split("-python")[0].replace("-", "")
    for split, n, most in (("train", len(y_train), spec.train_size),
                           ("test", len(y_test), spec.test_size)):
        if not 0 < n <= most:
            raise KdflowError(
                f"{archive}: {n} {split} images, but {name} has at most {most} (and a "
                "subset needs at least one); it is not a genuine archive. Check data.url")
    return Images(x_train, y_train, x_test, y_test, classes)


# --------------------------------------------------------------------------
# Batches and the meta file: what the unpickler gave, checked
# --------------------------------------------------------------------------

def _key(d: dict, name: str, source: str):
    for k in (name.encode(), name):
        if k in d:
            return d[k]
    raise KdflowError(f"{source} lacks the {name!r} entry of a CIFAR batch; the archive "
                      "is damaged or not a CIFAR python archive: check data.url")


def _text(v) -> str:
    return v.decode("latin1") if isinstance(v, bytes) else str(v)


def _labels(labels, n: int, classes: int, source: str) -> np.ndarray:
    """Labels as int64 (n,), each in [0, classes)."""
    if isinstance(labels, np.ndarray):
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise KdflowError(f"{source}: labels must be integers, got {describe(labels)}")
        lo, hi = (int(labels.min()), int(labels.max())) if len(labels) else (0, 0)
    elif isinstance(labels, list):
        if not all(is_int(v) for v in labels):
            bad = next(v for v in labels if not is_int(v))
            raise KdflowError(f"{source}: labels must be integers, found {brief(bad)} "
                              f"(a {type(bad).__name__})")
        lo, hi = (min(labels), max(labels)) if labels else (0, 0)
    else:
        raise KdflowError(f"{source}: labels must be a list of integers, got {describe(labels)}")
    if len(labels) != n:
        raise KdflowError(f"{source}: {len(labels)} labels for {n} images")
    # Checked before the conversion: a huge Python int would overflow int64.
    if lo < 0 or hi >= classes:
        raise KdflowError(f"{source}: labels outside 0..{classes - 1} (from {lo} to {hi})")
    return np.asarray(labels, dtype=np.int64)


def parse_batch(payload: bytes, source: str, label_key: str = "labels",
                classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Images as uint8 (N, 3, 32, 32) and labels as int64 (N,) in [0, classes)."""
    side = IMAGE_SIZE  # CIFAR's own layout: 32x32 RGB planes, 3072 bytes a row
    batch = safe_unpickle(payload, source)
    if not isinstance(batch, dict):
        raise KdflowError(f"{source} is not a CIFAR batch (a {type(batch).__name__})")
    data = _key(batch, "data", source)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3 * side * side:
        raise KdflowError(f"{source}: 'data' must be a uint8 array of shape (N, 3072), "
                          f"got {describe(data)}")
    labels = _labels(_key(batch, label_key, source), data.shape[0], classes, source)
    return data.reshape(-1, 3, side, side), labels


def class_names(payload: bytes, source: str, names_key: str, count: int) -> list[str]:
    """The `count` class names listed under `names_key` in a CIFAR meta file."""
    meta = safe_unpickle(payload, source)
    if not isinstance(meta, dict):
        raise KdflowError(f"{source} is not a CIFAR meta file (a {type(meta).__name__})")
    names = _key(meta, names_key, source)
    if not (isinstance(names, list) and len(names) == count
            and all(isinstance(n, (bytes, str)) for n in names)):
        raise KdflowError(f"{source}: {names_key!r} must list the {count} "
                          f"class names, got {describe(names)} of length "
                          f"{len(names) if isinstance(names, list) else '-'}")
    return [_text(n) for n in names]
