"""The dataset table: every dataset kdflow can read, and how it becomes arrays.

DATASETS maps each `data.dataset` name to one entry: its default source
(the official archive's URL and md5, or none), the download bound, the
one image size it has (or none: any data.image_size), how each image is
prepared (kdflow.data.preprocessing, recorded in the .npz), and its converter,
a function from the fetched source and the image size to uint8 images,
labels and class names (kdflow.data.arrays.Images). `fetch` and `convert` are the same for all
datasets: a new dataset is a new entry with a converter of its own, never a
second copy of either. cifar10/cifar100 read the official python archives
(pickled batches, kdflow.data.cifar); folder reads an image tree
(kdflow.data.folder).
"""

from __future__ import annotations

import json
import logging
import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from kdflow import KdflowError
from kdflow.core.hashing import file_digest
from kdflow.data import folder
from kdflow.data.arrays import (IMAGE_SIZE, Images, channel_stats, check_draws,
                                recorded_preprocessing, write_dataset)
from kdflow.data.cifar import CifarLayout, read_cifar
from kdflow.data.preprocessing import folder_steps, normalisation, not_recorded, stored_steps
from kdflow.data.fetch import fetch_archive

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dataset:
    """One entry of the table."""

    # (local source, this entry, image size) -> Images; the source is the
    # downloaded file, or the directory itself for a folder read in place.
    read: Callable[[Path, "Dataset", int], Images]
    # Default data.url and data.md5 (None: the config must give them).
    url: str | None
    md5: str | None
    # Name of the downloaded file under results/data/ (None: from data.url).
    archive: str | None
    # A download may be a few times the official size (a mirror may pack
    # differently) but a server that streams without end is cut off here.
    max_download: int
    # image size -> how its converter prepares each image
    # (kdflow.data.preprocessing), stored in the .npz it writes.
    preprocessing: Callable[[int], dict]
    layout: CifarLayout | None = None
    # The side its images have, the only data.image_size it takes (CIFAR:
    # 32); None: any, the images resized to it at conversion.
    image_size: int | None = None
    # source -> (train labels, test labels) from its listing, nothing
    # decoded (None: no cheap listing; CIFAR's sizes are fixed and known).
    labels: Callable[[Path], tuple[np.ndarray, np.ndarray]] | None = None


DATASETS: dict[str, Dataset] = {
    "cifar10": Dataset(
        read=read_cifar,
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        archive="cifar-10-python.tar.gz",
        max_download=4 * 170_498_071,
        preprocessing=stored_steps,
        layout=CifarLayout(
            root="cifar-10-batches-py",
            train=tuple(f"data_batch_{i}" for i in range(1, 6)),
            test="test_batch", meta="batches.meta",
            label_key="labels", names_key="label_names",
            num_classes=10, train_size=50_000, test_size=10_000,
            max_member=32 << 20,      # each batch is 31,035,704 bytes
        ),
        image_size=IMAGE_SIZE,
    ),
    # Fine labels (100 classes), as every CIFAR-100 distillation table uses.
    "cifar100": Dataset(
        read=read_cifar,
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        archive="cifar-100-python.tar.gz",
        max_download=4 * 169_001_437,
        preprocessing=stored_steps,
        layout=CifarLayout(
            root="cifar-100-python",
            train=("train",), test="test", meta="meta",
            label_key="fine_labels", names_key="fine_label_names",
            num_classes=100, train_size=50_000, test_size=10_000,
            max_member=160 << 20,     # 'train' is 155,249,918 bytes
        ),
        image_size=IMAGE_SIZE,
    ),
    # Your own images: train/<class>/* and test/<class>/*, from a directory
    # or a .tar/.tar.gz/.zip (kdflow.data.folder), resized (shorter side)
    # and centre-cropped to data.image_size. No default source.
    "folder": Dataset(
        read=folder.read_folder, url=None, md5=None, archive=None,
        max_download=folder.MAX_UNPACKED, preprocessing=folder_steps,
        labels=folder.listed_labels,
    ),
}


def dataset_entry(name: str) -> Dataset:
    try:
        return DATASETS[name]
    except KeyError:
        raise KdflowError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}") from None


# --------------------------------------------------------------------------
# Sources: what data.url names, and where the download step puts it
# --------------------------------------------------------------------------

def local_path(url: str) -> str | None:
    """The file system path a file:// URL or plain path names (None for http)."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        return urllib.parse.unquote(parsed.path)
    return url if parsed.scheme == "" else None


def directory_source(url: str) -> str | None:
    """The directory data.url names, if it names one (read in place, no download)."""
    path = local_path(url)
    return path if path is not None and os.path.isdir(path) else None


def archive_name(name: str, url: str) -> str | None:
    """The file the download step writes under results/data/ for this
    dataset and source; None when the source is a directory read in place."""
    entry = dataset_entry(name)
    if entry.archive is not None:
        return entry.archive
    if directory_source(url):
        return None
    path = urllib.parse.urlparse(url).path.lower()
    for suffix in folder.ARCHIVE_SUFFIXES:
        if path.endswith(suffix):
            return f"{name}{suffix}"
    local = local_path(url)
    where = f"no directory {local!r} exists and " if local is not None else ""
    raise KdflowError(
        f"data.url {url!r}: {where}it does not end in "
        f"{', '.join(folder.ARCHIVE_SUFFIXES)}; for data.dataset {name} give a directory "
        "holding train/<class>/ and test/<class>/ (a path or file:// URL) or such a tree "
        "packed as .tar, .tar.gz or .zip")


def check_image_size(name: str, image_size: int) -> None:
    """Refuse an image size the dataset cannot give (CIFAR's are 32x32)."""
    fixed = dataset_entry(name).image_size
    if fixed is not None and image_size != fixed:
        raise KdflowError(
            f"invalid config: data.image_size = {image_size}, but {name} images are "
            f"{fixed}x{fixed} and are used as they are (data.image_size resizes "
            f"data.dataset folder images only); set data.image_size to {fixed} or leave "
            "it out")


def complete_config(data: dict) -> None:
    """Fill data.url and data.md5 from the table, in place; refuse a source
    the dataset cannot use (a folder needs data.url; an archive, data.md5)
    and an image size it cannot give."""
    name = data["dataset"]
    entry = dataset_entry(name)
    check_image_size(name, data["image_size"])
    if entry.url is not None:
        data.setdefault("url", entry.url)
        data.setdefault("md5", entry.md5)
        return
    if "url" not in data:
        raise KdflowError(
            f"invalid config: data.dataset {name} has no default source; set data.url to "
            "a directory holding train/<class>/ and test/<class>/ image folders, or to "
            "such a tree packed as .tar, .tar.gz or .zip (with its data.md5)")
    if archive_name(name, data["url"]) is not None and "md5" not in data:
        raise KdflowError(
            f"invalid config: data.url {data['url']!r} is an archive, so data.md5 is "
            "required: the download is checked against it. Compute it with "
            "`md5sum FILE` and set data.md5")


def fingerprint(name: str, url: str) -> str:
    """For a directory source, a cheap digest of its files' relative paths,
    sizes and modification times (kdflow.data.folder.fingerprint); '' otherwise.
    Snakemake cannot see inside a directory: the convert step takes this as
    a parameter, so editing the tree reruns conversion and what follows."""
    path = directory_source(url) if archive_name(name, url) is None else None
    return folder.fingerprint(Path(path)) if path else ""


# --------------------------------------------------------------------------
# Fetch and convert: the same for every dataset
# --------------------------------------------------------------------------

def fetch(name: str, url: str, md5: str, dest: str | os.PathLike) -> None:
    """Download or copy the dataset's archive to `dest`, verified (kdflow.data.fetch)."""
    fetch_archive(url, md5, dest, max_bytes=dataset_entry(name).max_download)


def convert(source: str | os.PathLike, out: str | os.PathLike, dataset: str = "cifar10",
            *, md5: str | None = None, image_size: int = IMAGE_SIZE) -> dict:
    """Convert the dataset's source into one compact .npz of uint8 images,
    (N, 3, image_size, image_size) (the workflow passes data.image_size).

    With `md5` (the workflow passes data.md5) a source file is checked
    against it first, so what is read is what the download step verified.
    The entry's converter gives the arrays; they are checked here against
    what every later step assumes, and the .npz records the dataset's name,
    how its images were prepared (the entry's preprocessing) and the channel
    statistics of its training images (kdflow.data.arrays).
    """
    entry = dataset_entry(dataset)
    check_image_size(dataset, image_size)
    source = Path(source)
    _recheck_md5(source, md5)
    # Converters that decode many images put them in scratch files beside
    # the output (kdflow.data.store), not in memory.
    images = entry.read(source, entry, image_size, scratch=Path(out).parent)
    _check(images, source, image_size)
    write_dataset(out, dataset, *images, preprocessing=entry.preprocessing(image_size))
    info = {"train": len(images.y_train), "test": len(images.y_test),
            "classes": list(images.classes)}
    log.info("converted %s (%s): %d train, %d test images, %d classes",
             source, dataset, info["train"], info["test"], len(images.classes))
    return info


def preprocessing_of(d) -> dict:
    """How the images of a converted .npz (`d`, as np.load opens it) were
    prepared, and the normalisation its statistics give: the record a
    deployment follows (export.json, kdflow.deploy.job). A file written
    before the preparation was recorded: a dataset used as stored (a fixed
    image size, CIFAR) was prepared as it is now; any other is said to be
    unrecorded, not guessed."""
    steps = recorded_preprocessing(d)
    if steps is None:
        entry = DATASETS.get(str(d["dataset"])) if "dataset" in d.files else None
        steps = (entry.preprocessing(entry.image_size)
                 if entry is not None and entry.image_size is not None else not_recorded())
    return {**steps, "normalisation": normalisation(*channel_stats(d))}


def preprocessing_params(name: str, image_size: int) -> dict:
    """The convert rule's parameter naming how images are prepared, for a
    dataset that resizes them (a folder): Snakemake reruns the conversion
    when it changes (a .npz of an older kdflow's preparation is converted
    again, not trained on). Empty for a dataset used as stored (CIFAR): its
    pixels never change, and a new parameter would rerun every job."""
    entry = dataset_entry(name)
    if entry.image_size is not None:
        return {}
    return {"preprocessing": json.dumps(entry.preprocessing(image_size), sort_keys=True)}


def _recheck_md5(source: Path, md5: str | None) -> None:
    """A source file against data.md5 (None: nothing to check), before it is read."""
    if md5 is None or source.is_dir():
        return
    got = file_digest(source, "md5")
    if got != md5.lower():
        raise KdflowError(
            f"{source} has md5 {got}, not data.md5 {md5}: it changed or was damaged "
            "after download. Delete it and rerun (the download step fetches and "
            "verifies it again), or, for a trusted mirror, set data.md5 to its checksum")
    log.info("%s still has md5 %s (data.md5)", source, got)


def check_sizes(source: str | os.PathLike, dataset: str, data: dict, *,
                md5: str | None = None) -> None:
    """Before conversion: the subset and split the later steps will draw
    (data.subset, data.val_size), checked against the source's labels from
    its listing (kdflow.data.arrays.check_draws), so a folder tree with
    fewer training images than data.val_size is told before any image is
    decoded, not once all are converted. With `md5` the source is checked
    first, as conversion checks it: a changed archive is told as that, not
    as its sizes. Datasets without a cheap listing (CIFAR) are not checked
    here."""
    entry = dataset_entry(dataset)
    if entry.labels is None:
        return
    source = Path(source)
    _recheck_md5(source, md5)
    y_train, y_test = entry.labels(source)
    check_draws(y_train, y_test, data["val_size"], data["subset"]["train"],
                data["subset"]["test"])


def _check(images: Images, source: Path, image_size: int) -> None:
    """What every converter must deliver; a slip in a new one shows here,
    not as a shape error deep in training."""
    k = len(images.classes)
    shape = (3, image_size, image_size)
    for part in ("train", "test"):
        x, y = getattr(images, f"x_{part}"), getattr(images, f"y_{part}")
        if x.dtype != np.uint8 or x.shape[1:] != shape or len(x) == 0:
            raise KdflowError(f"{source}: {part} images must be uint8 of shape (N>0, "
                              f"{', '.join(map(str, shape))}), got {x.dtype} {x.shape}")
        if y.dtype != np.int64 or y.shape != (len(x),) or y.min() < 0 or y.max() >= k:
            raise KdflowError(f"{source}: {part} labels must be {len(x)} int64 values "
                              f"in 0..{k - 1}")
