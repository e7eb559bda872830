"""Image-folder datasets: your own PNG or JPEG images as train/ and test/ trees.

The layout is train/<class>/<image> and test/<class>/<image>, classes sorted
by name and the same in both; a single top-level directory around train/
and test/ (as packing a folder usually makes) is accepted. The source is a
directory, read in place, or a .tar, .tar.gz or .zip of such a tree, read in
memory and never extracted, so no member name can write anywhere; absolute
or `..` names and links are refused all the same, and member count, member
size and unpacked size are capped as for the CIFAR archives. Each image is
decoded once, here, with Pillow (RGB), and resized to IMAGE_SIZE when all
images share another size; mixed sizes are refused, not silently squashed.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Iterator

import numpy as np

from kdflow import KdflowError
from kdflow.data import IMAGE_SIZE, Images

if TYPE_CHECKING:
    from kdflow.datasets import Dataset

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
SPLITS = ("train", "test")
# Caps for packed trees, far above any dataset meant for 32x32 training
# (CIFAR-10 as JPEGs: 60,022 members, 19 MB) yet bounding what a hostile
# archive can cost: a header object per member, the bytes of the largest
# member, the time to inflate.
MAX_MEMBERS = 2_000_000
MAX_IMAGE_BYTES = 32 << 20
MAX_UNPACKED = 8 << 30
# Pixels of one image: a tiny PNG can declare a gigapixel canvas (a
# decompression bomb); refused before it is decoded.
MAX_PIXELS = 4096 * 4096


def _bad(source, problem: str) -> KdflowError:
    return KdflowError(
        f"{source}: {problem}. data.dataset folder expects train/<class>/<image> and "
        "test/<class>/<image> (PNG or JPEG), the same classes in both; fix the tree "
        "(or data.url)")


# --------------------------------------------------------------------------
# Walking a source: (relative name, bytes or None for a directory)
# --------------------------------------------------------------------------

def _walk_dir(root: Path) -> Iterator[tuple[str, bytes | None]]:
    """Files and directories under `root`, sorted. Links are followed only
    while they stay inside the tree."""
    real_root = root.resolve()
    seen = set()
    for here, dirs, files in os.walk(root, followlinks=True):
        real = Path(here).resolve()
        if real != real_root and real_root not in real.parents:
            raise _bad(here, f"a link leads out of the tree (to {real})")
        if real in seen:    # a link loop
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        rel = Path(here).relative_to(root)
        for d in dirs:
            yield (rel / d).as_posix(), None
        for f in sorted(files):
            path = Path(here) / f
            target = path.resolve()
            if real_root not in target.parents:
                raise _bad(path, f"a link leads out of the tree (to {target})")
            if f.startswith(".") or Path(f).suffix.lower() not in IMAGE_SUFFIXES:
                yield (rel / f).as_posix(), b""  # judged by name alone
                continue
            if path.stat().st_size > MAX_IMAGE_BYTES:
                raise _bad(path, f"{path.stat().st_size:,} bytes, more than the "
                                 f"{MAX_IMAGE_BYTES:,} allowed for one image")
            yield (rel / f).as_posix(), path.read_bytes()


def _safe_name(archive: Path, name: str) -> str:
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts or (p.parts and ":" in p.parts[0]):
        raise KdflowError(
            f"{archive}: member {name!r} has an absolute path or '..'; an image tree "
            "archive holds only relative names inside it. Refusing it: check data.url")
    return p.as_posix()


class _Counted:
    """A stream as tarfile reads it, counted and capped (a "zip bomb"
    inflating to gigabytes costs seconds, not the disk)."""

    def __init__(self, raw, archive: Path):
        self.raw, self.archive, self.n = raw, archive, 0

    def read(self, size: int = -1) -> bytes:
        room = MAX_UNPACKED - self.n + 1
        block = self.raw.read(room if size is None or size < 0 else min(size, room))
        self.n += len(block)
        if self.n > MAX_UNPACKED:
            raise KdflowError(f"{self.archive} unpacks to more than {MAX_UNPACKED:,} bytes, "
                              "the cap for an image tree archive; check data.url")
        return block


def _walk_tar(archive: Path) -> Iterator[tuple[str, bytes | None]]:
    with open(archive, "rb") as raw:
        gz = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if gz else raw
        counted = _Counted(stream, archive)
        # Stream mode: one pass, no seeking back.
        with tarfile.open(fileobj=counted, mode="r|") as tar:
            for i, info in enumerate(tar):
                if i >= MAX_MEMBERS:
                    raise KdflowError(f"{archive} has more than {MAX_MEMBERS:,} members, "
                                      "the cap for an image tree archive; check data.url")
                name = _safe_name(archive, info.name)
                if info.isdir():
                    yield name, None
                    continue
                if not info.isfile() or info.issparse():
                    raise KdflowError(
                        f"{archive}: member {info.name} is not a regular file (tar type "
                        f"{info.type!r}); links and devices are refused in an image tree "
                        "archive. Pack the files themselves")
                if info.size > MAX_IMAGE_BYTES:
                    raise _bad(f"{archive}: {info.name}", f"{info.size:,} bytes, more than "
                               f"the {MAX_IMAGE_BYTES:,} allowed for one image")
                yield name, tar.extractfile(info).read()
        # The gzip's CRC and length are checked only at its end.
        while counted.read(1 << 20):
            pass


def _walk_zip(archive: Path) -> Iterator[tuple[str, bytes | None]]:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        if len(infos) > MAX_MEMBERS:
            raise KdflowError(f"{archive} has more than {MAX_MEMBERS:,} members, the cap "
                              "for an image tree archive; check data.url")
        total = 0
        for info in infos:
            name = _safe_name(archive, info.filename)
            if info.is_dir():
                yield name, None
                continue
            if stat.S_ISLNK(info.external_attr >> 16):
                raise KdflowError(f"{archive}: member {info.filename} is a link; links are "
                                  "refused in an image tree archive. Pack the files themselves")
            if info.file_size > MAX_IMAGE_BYTES:
                raise _bad(f"{archive}: {info.filename}", f"{info.file_size:,} bytes, more "
                           f"than the {MAX_IMAGE_BYTES:,} allowed for one image")
            # The declared size may lie: read at most one byte past it.
            with zf.open(info) as f:
                payload = f.read(MAX_IMAGE_BYTES + 1)
            total += len(payload)
            if len(payload) > MAX_IMAGE_BYTES or total > MAX_UNPACKED:
                raise KdflowError(f"{archive} unpacks to more than its members declare or "
                                  "than the caps allow; check data.url")
            yield name, payload


def _walk(source: Path) -> Iterator[tuple[str, bytes | None]]:
    if source.is_dir():
        return _walk_dir(source)
    if not source.is_file():
        raise KdflowError(f"image folder source {source} does not exist; check data.url")
    if zipfile.is_zipfile(source):
        return _walk_zip(source)
    return _walk_tar(source)


# --------------------------------------------------------------------------
# The tree
# --------------------------------------------------------------------------

class _Tree:
    """Collects decoded images by split and class, checking the layout."""

    def __init__(self, source: Path):
        self.source = source
        self.wrapper: str | None = None
        self.images: dict[tuple[str, str], list[tuple[str, np.ndarray]]] = {}
        self.size: tuple[str, tuple[int, int]] | None = None

    def _where(self, name: str) -> str:
        return f"{self.source}/{name}" if self.source.is_dir() else f"{self.source}: {name}"

    def _relative(self, name: str) -> tuple[str, ...] | None:
        parts = PurePosixPath(name).parts
        if parts and parts[0] in SPLITS:
            wrapper, rel = "", parts
        elif len(parts) > 1 and parts[1] in SPLITS:
            wrapper, rel = parts[0], parts[1:]
        else:
            return None     # beside the tree (a README): not ours
        if self.wrapper is None:
            self.wrapper = wrapper
        elif wrapper != self.wrapper:
            raise _bad(self.source, f"train/ and test/ both under {self.wrapper or 'the top'!r} "
                                    f"and under {wrapper or 'the top'!r}; keep one tree")
        return rel

    def add(self, name: str, payload: bytes | None) -> None:
        rel = self._relative(name)
        if rel is None:
            return
        if payload is None:           # a directory
            if len(rel) == 2:
                self.images.setdefault((rel[0], rel[1]), [])
            elif len(rel) > 2:
                raise _bad(self._where(name), "a directory inside a class directory; "
                                              "images sit directly in train/<class>/")
            return
        if rel[-1].startswith("."):    # .DS_Store and the like
            return
        if len(rel) != 3:
            raise _bad(self._where(name), "a file outside train/<class>/ and test/<class>/")
        if PurePosixPath(rel[2]).suffix.lower() not in IMAGE_SUFFIXES:
            raise _bad(self._where(name), "not a .png, .jpg or .jpeg file")
        image = self._decode(name, payload)
        self.images.setdefault((rel[0], rel[1]), []).append((rel[2], image))

    def _decode(self, name: str, payload: bytes) -> np.ndarray:
        from PIL import Image  # only the convert step decodes

        where = self._where(name)
        try:
            with Image.open(io.BytesIO(payload)) as img:
                if img.format not in ("PNG", "JPEG"):
                    raise _bad(where, f"a {img.format} image; PNG or JPEG only")
                if img.width * img.height > MAX_PIXELS:
                    raise _bad(where, f"{img.width}x{img.height} pixels, more than the "
                                      f"{MAX_PIXELS:,} allowed")
                rgb = img.convert("RGB")
        except KdflowError:
            raise
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise _bad(where, f"unreadable or corrupt image ({type(e).__name__}: {e})") from None
        if self.size is None:
            self.size = (where, rgb.size)
        elif rgb.size != self.size[1]:
            (w0, h0), (w, h) = self.size[1], rgb.size
            raise _bad(where, f"{w}x{h} pixels, but {self.size[0]} is {w0}x{h0}; all images "
                              "must share one size (resize them beforehand)")
        if rgb.size != (IMAGE_SIZE, IMAGE_SIZE):
            rgb = rgb.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
        return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)

    def finish(self) -> Images:
        by_split = {s: sorted(c for (sp, c) in self.images if sp == s) for s in SPLITS}
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
                if not self.images[s, c]:
                    raise _bad(f"{root}/{s}/{c}", "an empty class directory")
        arrays = []
        for s in SPLITS:
            xs, ys = [], []
            for label, c in enumerate(classes):
                # By file name: the order of a tar's members is no one's choice.
                for _, image in sorted(self.images[s, c], key=lambda t: t[0]):
                    xs.append(image)
                    ys.append(label)
            arrays += [np.stack(xs), np.array(ys, dtype=np.int64)]
        return Images(*arrays, classes)


def read_folder(source: Path, entry: Dataset | None = None) -> Images:
    """The converter of the `folder` entry (kdflow.datasets): a directory or
    a .tar/.tar.gz/.zip of train/<class>/ and test/<class>/ images."""
    tree = _Tree(Path(source))
    try:
        for name, payload in _walk(Path(source)):
            tree.add(name, payload)
    except (EOFError, zlib.error, tarfile.TarError, zipfile.BadZipFile) as e:
        raise KdflowError(
            f"{source}: archive truncated or corrupt: {type(e).__name__}: {e}; fetch it "
            "again, and check data.url and data.md5") from None
    except OSError as e:
        raise KdflowError(f"{source}: could not be read ({type(e).__name__}: {e}); check "
                          "data.url") from None
    return tree.finish()


def fingerprint(root: Path) -> str:
    """A digest of every file's relative path, size and modification time
    under `root`: stat calls only, no reading, so it is cheap enough for
    every Snakemake start (60,000 files: a fraction of a second)."""
    h = hashlib.sha256()
    for here, dirs, files in os.walk(root, followlinks=True):
        dirs.sort()
        for f in sorted(files):
            path = Path(here) / f
            try:
                st = path.stat()
            except OSError:     # a dangling link: conversion will say so
                continue
            h.update(f"{path.relative_to(root).as_posix()}\0{st.st_size}\0"
                     f"{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]
