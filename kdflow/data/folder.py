"""Image-folder datasets: your own PNG or JPEG images as train/ and test/ trees.

The layout is train/<class>/<image> and test/<class>/<image>, classes sorted
by name and the same in both; a single top-level directory around train/
and test/ (as packing a folder usually makes) is accepted. The source is a
directory, read in place, or a .tar, .tar.gz or .zip of such a tree, read in
memory and never extracted, so no member name can write anywhere; absolute
or `..` names and links are refused all the same, and member count, class
count, member size and unpacked size are capped as for the CIFAR archives,
each before what it counts is held in memory (kdflow.data.archives reads
both: a zip's entries are counted from its own records before any ZipFile
lists them; tar members stream).
Each image is decoded once, with Pillow (kdflow.data.images): turned
upright by its EXIF orientation, any transparency composited on white, as
RGB, then its shorter side resized to data.image_size and its centre cropped
square, as torchvision's Resize + CenterCrop: never squashed, so images of
any size and shape can share a tree (kdflow.data.preprocessing records
these steps in the .npz). Before any is decoded, the images are counted
from the listing and a tree whose arrays would not fit in the memory
available is refused (kdflow.data.memory).
Dot-names, Thumbs.db, desktop.ini and __MACOSX/ are skipped everywhere: file
managers and the Finder's Compress add them to every tree.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Iterator

import numpy as np

from kdflow import KdflowError
from kdflow.data import archives
from kdflow.data.archives import HEADER_SLACK
from kdflow.data.arrays import IMAGE_SIZE, Images
from kdflow.data.images import decode_rgb, square
# memory_needed and its two terms are re-exported: the folder reader's own
# estimate, as its callers and tests know it.
from kdflow.data.memory import (PER_IMAGE_OVERHEAD, WORKING_ROOM,  # noqa: F401
                                available_memory, check_disk, check_memory, disk_needed,
                                free_disk, memory_needed)
from kdflow.data.store import ScratchImages

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
SPLITS = ("train", "test")
# Caps for packed trees, far above any dataset meant for small-image
# training (CIFAR-10 as JPEGs: 60,022 members, 19 MB) yet bounding what a
# hostile archive can cost: the bytes of the largest member, the time to
# inflate and walk every header. No per-member header object is kept (zip
# directories are listed in parts, tar members stream); what the decoded
# images will hold is checked against the memory available before the
# first is decoded (kdflow.data.memory). Read at each call (`_caps`), so a
# caller or test that lowers one is obeyed.
MAX_MEMBERS = 2_000_000
MAX_IMAGE_BYTES = 32 << 20
MAX_UNPACKED = 8 << 30
# Class directories per split (ImageNet-21k has 21,841): each costs a dict
# entry, and a hostile tree can be nothing but empty class directories.
MAX_CLASSES = 100_000
# Between two tar members (their data aside) MAX_IMAGE_BYTES and
# HEADER_SLACK (kdflow.data.archives' value, a setting here as the caps are).


def _bad(source, problem: str) -> KdflowError:
    return KdflowError(
        f"{source}: {problem}. data.dataset folder expects train/<class>/<image> and "
        "test/<class>/<image> (PNG or JPEG), the same classes in both; fix the tree "
        "(or data.url)")


def _caps() -> archives.Caps:
    """This reader's caps and refusals for kdflow.data.archives, built at
    each call from the settings above."""
    between = MAX_IMAGE_BYTES + HEADER_SLACK
    cap = "the cap for an image tree archive; check data.url"
    return archives.Caps(
        members=MAX_MEMBERS, unpacked=MAX_UNPACKED, between=between,
        too_many=lambda archive, declared: (
            f"{archive} has more than {MAX_MEMBERS:,} members"
            f"{'' if declared is None else f' ({declared:,} by its directory)'}, {cap}"),
        too_large=lambda archive: f"{archive} unpacks to more than {MAX_UNPACKED:,} bytes, {cap}",
        crowded=lambda archive: (
            f"{archive}: more than {between:,} bytes between two members (an oversized "
            "pax or long-name header, or a member larger than it declares); no image tree "
            "needs that. Refusing the archive: check data.url, or repack the tree with "
            "plain `tar czf`"),
        zip_advice=("An image tree .zip must be unencrypted and stored or deflated (bzip2 "
                    "and lzma also work), as `zip -r` and the usual Compress commands make "
                    "it; repack the tree, or check data.url and data.md5"))


# --------------------------------------------------------------------------
# Walking a source: (relative name, bytes or None for a directory)
# --------------------------------------------------------------------------

def _skipped(name: str) -> bool:
    """Names no one means as data: dot-files and dot-directories
    (.DS_Store, .ipynb_checkpoints, ._x.png), Thumbs.db and desktop.ini,
    and the __MACOSX/ folder that the Finder's Compress adds. Skipped in directories and archives alike."""
    return name.startswith(".") or name == "__MACOSX" or name.lower() in _JUNK


# What file managers leave in every folder they show (Windows' thumbnail
# cache and folder settings), as .DS_Store on a Mac.
_JUNK = {"thumbs.db", "desktop.ini"}


def _in_tree(parts: tuple[str, ...]) -> bool:
    """Whether a path (as parts) can belong to train/ or test/, directly or
    under one wrapping directory; anything else (a README, a folder of
    originals beside the tree) is never read, so never walked either."""
    return bool(parts) and (parts[0] in SPLITS or (len(parts) > 1 and parts[1] in SPLITS))


def _dir_entries(root: Path) -> Iterator[tuple[str, Path, bool]]:
    """(relative name, path, is a directory) for what conversion reads
    under `root`, sorted (kdflow.data.archives.dir_entries). The one set of
    rules for converting and for the fingerprint, so they always see the
    same files: dot-names and __MACOSX skipped, and nothing beside the
    tree; a top-level directory is entered, as it may be the wrapper."""
    def entered(parts: tuple[str, ...]) -> bool:
        return not _skipped(parts[-1]) and (len(parts) == 1 or _in_tree(parts))

    def listed(parts: tuple[str, ...]) -> bool:
        return not _skipped(parts[-1]) and _in_tree(parts)

    return archives.dir_entries(root, listed, entered, _bad)


def _is_image_name(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES


def _image_stat(path: Path) -> os.stat_result:
    st = path.stat()
    # A FIFO or device named x.png would block the read or never end.
    if not stat.S_ISREG(st.st_mode):
        raise _bad(path, "not a regular file (a FIFO, socket or device); an image "
                         "tree holds plain image files only. Remove it or replace it "
                         "with the image itself")
    return st


def _walk_dir(root: Path, read: bool = True) -> Iterator[tuple[str, bytes | None]]:
    """Files and directories under `root` (see _dir_entries), with the bytes
    of each image file (b"" for all files unless `read`)."""
    for name, path, is_dir in _dir_entries(root):
        if is_dir:
            yield name, None
        elif not _is_image_name(name) or not read:
            yield name, b""         # judged by name alone
        else:
            size = _image_stat(path).st_size
            if size > MAX_IMAGE_BYTES:
                raise _bad(path, f"{size:,} bytes, more than the {MAX_IMAGE_BYTES:,} "
                                 "allowed for one image")
            yield name, path.read_bytes()


def _safe_name(archive: Path, name: str) -> str:
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts or (p.parts and ":" in p.parts[0]):
        raise KdflowError(
            f"{archive}: member {name!r} has an absolute path or '..'; an image tree "
            "archive holds only relative names inside it. Refusing it: check data.url")
    return p.as_posix()


def _walk_tar(archive: Path, read: bool = True) -> Iterator[tuple[str, bytes | None]]:
    for tar, info in archives.tar_members(archive, _caps()):
        name = _safe_name(archive, info.name)
        if info.isdir():
            yield name, None
            continue
        if not info.isfile() or info.issparse():
            raise KdflowError(
                f"{archive}: member {info.name} is not a regular file (tar type "
                f"{info.type!r}); links and devices are refused in an image tree "
                "archive. Pack the files themselves")
        # Skipped before the size check, as in a .zip: a big ._x.png or
        # .git pack is never read into memory, only skipped over.
        if any(_skipped(p) for p in PurePosixPath(name).parts):
            yield name, b""     # ._x.png, __MACOSX/...: never decoded
            continue
        if info.size > MAX_IMAGE_BYTES:
            raise _bad(f"{archive}: {info.name}", f"{info.size:,} bytes, more than "
                       f"the {MAX_IMAGE_BYTES:,} allowed for one image")
        # Unread, a member's data is skipped over (inflated, not kept).
        yield name, tar.extractfile(info).read() if read else b""


def _walk_zip(archive: Path, read: bool = True) -> Iterator[tuple[str, bytes | None]]:
    caps = _caps()
    with open(archive, "rb") as f:
        total = 0
        for zf in archives.zip_parts(archive, f, caps):
            for info in zf.infolist():
                name = _safe_name(archive, info.filename)
                if info.is_dir():
                    yield name, None
                    continue
                if any(_skipped(p) for p in PurePosixPath(name).parts):
                    yield name, b""     # __MACOSX/..., .DS_Store: never inflated
                    continue
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise KdflowError(f"{archive}: member {info.filename} is a link; links "
                                      "are refused in an image tree archive. Pack the files "
                                      "themselves")
                if info.flag_bits & 0x1:    # refused before zipfile asks for a password
                    raise archives.zip_error(archive, info.filename, RuntimeError("encrypted"),
                                             caps)
                if info.file_size > MAX_IMAGE_BYTES:
                    raise _bad(f"{archive}: {info.filename}", f"{info.file_size:,} bytes, "
                               f"more than the {MAX_IMAGE_BYTES:,} allowed for one image")
                if not read:
                    yield name, b""
                    continue
                # The declared size may lie: read at most one byte past it.
                try:
                    with zf.open(info) as member:
                        payload = member.read(MAX_IMAGE_BYTES + 1)
                except archives.ZIP_ERRORS as e:
                    raise archives.zip_error(archive, info.filename, e, caps) from None
                total += len(payload)
                if len(payload) > MAX_IMAGE_BYTES or total > MAX_UNPACKED:
                    raise KdflowError(f"{archive} unpacks to more than its members declare "
                                      "or than the caps allow; check data.url")
                yield name, payload


def _walk(source: Path, read: bool = True) -> Iterator[tuple[str, bytes | None]]:
    """(name, bytes) of everything under `source`, None for a directory;
    with `read` False, b"" for every file: the listing alone, as cheap as
    the source allows (a directory's names, a zip's directory, a tar's
    headers), under the same checks and caps."""
    if source.is_dir():
        return _walk_dir(source, read)
    if not source.is_file():
        raise KdflowError(f"image folder source {source} does not exist; check data.url")
    if zipfile.is_zipfile(source):
        return _walk_zip(source, read)
    return _walk_tar(source, read)


# --------------------------------------------------------------------------
# The tree
# --------------------------------------------------------------------------

def _in_split(parts: tuple[str, ...]) -> tuple[str, tuple[str, ...]] | None:
    """(wrapping directory or "", the parts from the split on) of a path
    under train/ or test/, directly or under one wrapper; None beside the
    tree (a README): not ours."""
    if parts and parts[0] in SPLITS:
        return "", parts
    if len(parts) > 1 and parts[1] in SPLITS:
        return parts[0], parts[1:]
    return None


def _is_tree_image(name: str) -> bool:
    """Whether conversion decodes this file: <split>/<class>/<image>,
    named as an image, skipped by no rule."""
    parts = PurePosixPath(name).parts
    where = None if any(_skipped(p) for p in parts) else _in_split(parts)
    return where is not None and len(where[1]) == 3 and _is_image_name(name)


class _Tree:
    """The tree in two passes: its listing, whose layout is checked and
    whose images are given their place in the arrays (sorted by class, then
    file name), then its images, each decoded straight into its place, so
    the pixels are held once."""

    def __init__(self, source: Path, image_size: int):
        self.source = source
        self.image_size = image_size
        self.wrapper: str | None = None
        # (split, class) -> member names of its images, from the listing
        self.listed: dict[tuple[str, str], list[str]] = {}
        self.classes = dict.fromkeys(SPLITS, 0)
        self.slots: dict[str, tuple[int, int]] = {}     # member -> (split, index)
        self.labels: list[np.ndarray] = []      # per split
        self.arrays: list[tuple[np.ndarray, np.ndarray]] = []
        self.class_names: list[str] = []

    def _where(self, name: str) -> str:
        return f"{self.source}/{name}" if self.source.is_dir() else f"{self.source}: {name}"

    def _relative(self, name: str) -> tuple[str, ...] | None:
        where = _in_split(PurePosixPath(name).parts)
        if where is None:
            return None
        wrapper, rel = where
        if self.wrapper is None:
            self.wrapper = wrapper
        elif wrapper != self.wrapper:
            raise _bad(self.source, f"train/ and test/ both under {self.wrapper or 'the top'!r} "
                                    f"and under {wrapper or 'the top'!r}; keep one tree")
        return rel

    def note(self, name: str, payload: bytes | None) -> None:
        """One entry of the listing (payload None for a directory)."""
        if any(_skipped(p) for p in PurePosixPath(name).parts):
            return      # .DS_Store, __MACOSX/..., .ipynb_checkpoints/...
        rel = self._relative(name)
        if rel is None:
            return
        if payload is None:           # a directory
            if len(rel) == 2:
                self._class(rel[0], rel[1])
            elif len(rel) > 2:
                raise _bad(self._where(name), "a directory inside a class directory; "
                                              "images sit directly in train/<class>/")
            return
        if len(rel) != 3:
            raise _bad(self._where(name), "a file outside train/<class>/ and test/<class>/")
        if PurePosixPath(rel[2]).suffix.lower() not in IMAGE_SUFFIXES:
            raise _bad(self._where(name), "not a .png, .jpg or .jpeg file")
        self._class(rel[0], rel[1]).append(name)

    def _class(self, split: str, name: str) -> list[str]:
        """The images of a class so far; a new class is counted against
        MAX_CLASSES as it comes, not once the whole tree is listed."""
        images = self.listed.get((split, name))
        if images is None:
            self.classes[split] += 1
            if self.classes[split] > MAX_CLASSES:
                raise _bad(self.source, f"more than {MAX_CLASSES:,} class directories under "
                                        f"{split}/, the cap for an image tree")
            images = self.listed[split, name] = []
        return images

    def plan(self) -> int:
        """Check the layout the listing shows and give each image its place;
        the number of images."""
        by_split = {s: sorted(c for (sp, c) in self.listed if sp == s) for s in SPLITS}
        root = f"{self.source}/{self.wrapper}" if self.wrapper else str(self.source)
        if not by_split["train"]:
            raise _bad(root, "no class directories under train/")
        classes = by_split["train"]
        missing = sorted(set(classes) - set(by_split["test"]))
        extra = sorted(set(by_split["test"]) - set(classes))
        if missing:
            raise _bad(root, f"class(es) {missing} have no directory under test/")
        if extra:
            raise _bad(root, f"class(es) {extra} are under test/ but not under train/")
        for s in SPLITS:
            for c in classes:
                if not self.listed[s, c]:
                    raise _bad(f"{root}/{s}/{c}", "an empty class directory")
        labels = []
        for k, s in enumerate(SPLITS):
            ys = []
            for label, c in enumerate(classes):
                # By file name: the order of a tar's members is no one's choice.
                for name in sorted(self.listed.pop((s, c)), key=lambda n: n.rsplit("/", 1)[-1]):
                    if name in self.slots:      # a zip or tar may list a name twice
                        raise _bad(self._where(name), "listed twice in the archive; "
                                                      "repack the tree")
                    self.slots[name] = (k, len(ys))
                    ys.append(label)
            labels.append(np.array(ys, dtype=np.int64))
        self.class_names, self.labels = classes, labels
        return len(self.slots)

    def allocate(self, scratch: Path) -> None:
        """The scratch files in `scratch` the images are decoded into (once
        memory and disk are checked): on disk, so that no number of images
        is held in memory."""
        side = self.image_size
        self.arrays = [(ScratchImages(scratch, len(y), (3, side, side)), y)
                       for y in self.labels]

    def add(self, name: str, payload: bytes | None) -> None:
        """One entry of the second pass: an image is decoded into its place."""
        if payload is None or not _is_tree_image(name):
            return      # checked from the listing
        slot = self.slots.pop(name, None)
        if slot is None:
            raise _bad(self._where(name), "an image that was not there when the tree was "
                                          "listed: it changed during conversion; rerun")
        k, i = slot
        self.arrays[k][0][i] = self._decode(name, payload)

    def _decode(self, name: str, payload: bytes) -> np.ndarray:
        # Each image on its own: a shorter side resized and a centre crop
        # need no size shared across the tree.
        where = self._where(name)
        rgb = square(decode_rgb(payload, where, _bad), self.image_size, where, _bad)
        return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)

    def finish(self) -> Images:
        if self.slots:
            name = next(iter(self.slots))
            raise _bad(self._where(name), "listed but gone when read: the tree changed "
                                          "during conversion; rerun")
        # Read back from the scratch files, which are removed now: the
        # readers keep them open until the .npz is written.
        (x_train, y_train), (x_test, y_test) = [(x.stored(), y) for x, y in self.arrays]
        for x, _ in self.arrays:
            x.close()
        return Images(x_train, y_train, x_test, y_test, self.class_names)


def _listed(source: Path, image_size: int) -> _Tree:
    """The tree with its listing read and its layout checked, nothing decoded."""
    tree = _Tree(source, image_size)
    for name, payload in _walk(source, read=False):
        tree.note(name, payload)
    tree.plan()
    return tree


@contextlib.contextmanager
def _reading(source: Path):
    """A damaged archive or an unreadable file as a one-line error naming
    the source, whichever pass (listing or reading) meets it."""
    try:
        yield
    except (EOFError, zlib.error, tarfile.TarError, zipfile.BadZipFile) as e:
        raise KdflowError(
            f"{source}: archive truncated or corrupt: {type(e).__name__}: {e}; fetch it "
            "again, and check data.url and data.md5") from None
    except OSError as e:
        raise KdflowError(f"{source}: could not be read ({type(e).__name__}: {e}); check "
                          "data.url") from None


def count_images(source: Path) -> int:
    """How many images conversion would decode, from the listing alone (a
    directory's names, a zip's directory, a tar's headers), under the same
    checks and caps as the reading."""
    return sum(map(len, listed_labels(source)))


def listed_labels(source: Path) -> tuple[np.ndarray, np.ndarray]:
    """The labels of the train and test images, from the listing alone, as
    conversion will give them (nothing decoded; the same checks and caps)."""
    source = Path(source)
    with _reading(source):
        return tuple(_listed(source, IMAGE_SIZE).labels)


def read_folder(source: Path, entry: object = None, image_size: int = IMAGE_SIZE,
                scratch: Path | None = None) -> Images:
    """The converter of the `folder` entry (kdflow.data.datasets): a directory or
    a .tar/.tar.gz/.zip of train/<class>/ and test/<class>/ images, each
    resized (shorter side) and centre-cropped to image_size x image_size.
    `entry` (the table's Dataset) is the converters' common signature;
    unused here. The tree is listed, its layout checked and the memory and
    disk it needs compared with what is available before the first image is
    decoded. The images are decoded to scratch files in `scratch` (the
    output's directory; the system's temporary directory by default) and
    come back as kdflow.data.store.StoredImages."""
    import tempfile

    source = Path(source)
    scratch = Path(scratch or tempfile.gettempdir())
    with _reading(source):
        tree = _listed(source, image_size)
        check_memory(source, len(tree.slots), image_size, available_memory())
        check_disk(source, len(tree.slots), image_size, scratch, free_disk(scratch))
        tree.allocate(scratch)
        for name, payload in _walk(source):
            tree.add(name, payload)
    return tree.finish()


def fingerprint(root: Path) -> str:
    """A digest of what conversion reads under `root` (the same walk,
    _dir_entries): directory names, every file name, and each image's size
    and modification time. Stat calls only, no reading, so it is cheap
    enough for every Snakemake start (60,000 files: a fraction of a second).
    Files conversion skips (.DS_Store, Thumbs.db, a README beside the tree)
    leave it unchanged, so they do not retrain everything."""
    h = hashlib.sha256()
    for name, path, is_dir in _dir_entries(root):
        if is_dir or not _is_image_name(name):
            # By name: a stray file inside a class is refused by conversion,
            # so its arrival must rerun it.
            h.update(f"{name}\0{'dir' if is_dir else 'file'}\n".encode())
            continue
        try:
            st = _image_stat(path)
        except OSError:     # a dangling link: conversion will say so
            h.update(f"{name}\0missing\n".encode())
            continue
        h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]
