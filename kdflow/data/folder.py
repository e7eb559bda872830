"""Image-folder datasets: your own PNG or JPEG images as train/ and test/ trees.

The layout is train/<class>/<image> and test/<class>/<image>, classes sorted
by name and the same in both; a single top-level directory around train/
and test/ (as packing a folder usually makes) is accepted. The source is a
directory, read in place, or a .tar, .tar.gz or .zip of such a tree, read in
memory and never extracted, so no member name can write anywhere; absolute
or `..` names and links are refused all the same, and member count, class
count, member size and unpacked size are capped as for the CIFAR archives,
each before what it counts is held in memory (a zip's entries are counted
from its own records before any ZipFile lists them; tar members stream).
Each image is decoded once, here, with Pillow (RGB), turned upright by its
EXIF orientation, and resized (bicubic) to data.image_size when all images
share another size; mixed sizes are refused, not silently squashed. Before
any is decoded, the images are counted from the listing and a tree whose
arrays would not fit in the memory available is refused (`memory_needed`).
Dot-names, Thumbs.db, desktop.ini and __MACOSX/ are skipped everywhere: file
managers and the Finder's Compress add them to every tree.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import lzma
import os
import stat
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Iterator

import numpy as np

from kdflow import KdflowError
from kdflow.data.arrays import IMAGE_SIZE, Images

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
SPLITS = ("train", "test")
# Caps for packed trees, far above any dataset meant for small-image
# training (CIFAR-10 as JPEGs: 60,022 members, 19 MB) yet bounding what a
# hostile archive can cost: the bytes of the largest member, the time to
# inflate and walk every header. No per-member header object is kept (zip
# directories are listed in parts, tar members stream); what the decoded
# images will hold is checked against the memory available before the
# first is decoded (`memory_needed`).
MAX_MEMBERS = 2_000_000
MAX_IMAGE_BYTES = 32 << 20
MAX_UNPACKED = 8 << 30
# Class directories per split (ImageNet-21k has 21,841): each costs a dict
# entry, and a hostile tree can be nothing but empty class directories.
MAX_CLASSES = 100_000
# With MAX_IMAGE_BYTES, the header bytes and read-ahead allowed between two
# tar members (their data aside): tarfile reads 10 KiB blocks, and honest
# pax headers (long names, times, extended attributes) are rarely more
# than a few kilobytes.
HEADER_SLACK = 1 << 20
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
    under `root`, sorted. The one set of rules for converting and for the
    fingerprint, so they always see the same files: dot-names and
    __MACOSX skipped; links followed only while they stay inside the tree,
    checked before descending (a link to / is refused, not walked); a
    directory reached a second time (a link loop such as class/up -> ..)
    is listed by name but not entered, so the walk ends."""
    real_root = root.resolve()
    seen = {real_root}
    for here, dirs, files in os.walk(root, followlinks=True):
        here = Path(here)
        rel = here.relative_to(root)
        keep = []
        for d in sorted(dirs):
            if _skipped(d):
                continue
            parts = (rel / d).parts
            if len(parts) > 1 and not _in_tree(parts):
                continue
            path = here / d
            real = path.resolve()
            if real != real_root and real_root not in real.parents:
                raise _bad(path, f"a link leads out of the tree (to {real}); links "
                                 "may only point inside it. Copy the files in instead")
            if _in_tree(parts):     # a top-level one may only be a wrapper
                yield (rel / d).as_posix(), path, True
            if real not in seen:    # else a loop or a second way in: not entered
                seen.add(real)
                keep.append(d)
        dirs[:] = keep
        for f in sorted(files):
            if _skipped(f) or not _in_tree((rel / f).parts):
                continue
            path = here / f
            target = path.resolve()
            if real_root not in target.parents:
                raise _bad(path, f"a link leads out of the tree (to {target}); links "
                                 "may only point inside it. Copy the files in instead")
            yield (rel / f).as_posix(), path, False


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


class _Counted:
    """A stream as tarfile reads it, counted and capped (a "zip bomb"
    inflating to gigabytes costs seconds, not the disk).

    Besides the total, the bytes read between two members beyond the data
    the first one declares (`since`, set by the reader as each member is
    handed out) are capped: tarfile reads a pax extended header or a GNU
    long name whole, into memory, while looking for the next member, before
    any per-member size check can run, so a small .tar.gz could otherwise
    hold a header of gigabytes. A member's own data never counts here,
    whether it is read or skipped (its size is checked from its header, or
    it is never kept); the total cap bounds all the bytes read, skipped
    ones included."""

    def __init__(self, raw, archive: Path):
        self.raw, self.archive, self.n, self.since = raw, archive, 0, 0
        self.members_done = False   # past the tar's end only the total cap applies

    def read(self, size: int = -1) -> bytes:
        room = MAX_UNPACKED - self.n + 1
        block = self.raw.read(room if size is None or size < 0 else min(size, room))
        self.n += len(block)
        self.since += len(block)
        if self.n > MAX_UNPACKED:
            raise KdflowError(f"{self.archive} unpacks to more than {MAX_UNPACKED:,} bytes, "
                              "the cap for an image tree archive; check data.url")
        if not self.members_done and self.since > MAX_IMAGE_BYTES + HEADER_SLACK:
            raise KdflowError(
                f"{self.archive}: more than {MAX_IMAGE_BYTES + HEADER_SLACK:,} bytes between "
                "two members (an oversized pax or long-name header, or a member larger "
                "than it declares); no image tree needs that. Refusing the archive: "
                "check data.url, or repack the tree with plain `tar czf`")
        return block


def _tar_members(tar: tarfile.TarFile, counted: _Counted, archive: Path
                 ) -> Iterator[tarfile.TarInfo]:
    """The members one at a time, none kept: in stream mode TarFile appends
    every TarInfo to `.members` (a few hundred bytes each, a pax header's
    whole dict), which would grow with the member count, not the images."""
    count = 0
    while (info := tar.next()) is not None:
        tar.members.clear()
        count += 1
        if count > MAX_MEMBERS:
            raise KdflowError(f"{archive} has more than {MAX_MEMBERS:,} members, "
                              "the cap for an image tree archive; check data.url")
        # What tarfile reads from here to the next header: this member's data
        # (padded to 512-byte blocks, read or skipped), then headers.
        counted.since = -((info.size + 511) // 512 * 512) if info.isreg() else 0
        yield info


def _walk_tar(archive: Path, read: bool = True) -> Iterator[tuple[str, bytes | None]]:
    with open(archive, "rb") as raw:
        gz = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if gz else raw
        counted = _Counted(stream, archive)
        # Stream mode: one pass, no seeking back.
        with tarfile.open(fileobj=counted, mode="r|") as tar:
            for info in _tar_members(tar, counted, archive):
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
        # The gzip's CRC and length are checked only at its end.
        counted.members_done = True
        while counted.read(1 << 20):
            pass


def _zip_error(archive: Path, member: str | None, e: Exception) -> KdflowError:
    what = f"member {member}" if member else "its directory"
    if isinstance(e, RuntimeError) and "encrypted" in str(e):
        problem = "is encrypted (password protected)"
    elif isinstance(e, NotImplementedError):
        problem = f"uses a compression method Python cannot read ({e})"
    else:
        problem = f"is corrupt or unreadable ({type(e).__name__}: {e})"
    return KdflowError(
        f"{archive}: {what} {problem}. An image tree .zip must be unencrypted and "
        "stored or deflated (bzip2 and lzma also work), as `zip -r` and the usual "
        "Compress commands make it; repack the tree, or check data.url and data.md5")


# What zipfile raises on a bad or unsupported archive or member: a password
# (RuntimeError), a compression method it lacks (NotImplementedError), broken
# headers or CRCs (BadZipFile), ZIP64 trouble (LargeZipFile), broken streams.
_ZIP_ERRORS = (RuntimeError, NotImplementedError, zipfile.BadZipFile, zipfile.LargeZipFile,
               EOFError, zlib.error, lzma.LZMAError, OSError)


# The zip records read here, as APPNOTE.TXT lays them out (sections 4.3.12-16).
_CD = struct.Struct("<4s24xHHH12x")        # central directory entry: name, extra, comment lengths
_EOCD = struct.Struct("<4s4H2LH")           # end of central directory
_EOCD64 = struct.Struct("<4sQ2H2L4Q")       # zip64 end of central directory
_LOCATOR = struct.Struct("<4sLQL")          # zip64 end of central directory locator
_ZIP32_LIMIT = 0xFFFFFFFF                   # offsets from here on need the zip64 records
# Central directory entries handed to one ZipFile at a time (and at most
# about this many bytes of them): ZipFile keeps a ZipInfo of ~550 bytes per
# entry for as long as it is open.
_ZIP_CHUNK, _ZIP_CHUNK_BYTES = 4096, 1 << 20


def _zip_directory(archive: Path, f) -> tuple[int, int, int]:
    """(central directory start, its size, its offset as recorded) from the
    end records of an open zip, read here, before any ZipFile: ZipFile reads
    the whole central directory into ZipInfos (its size, not its count, says
    how far), so a huge one must be refused before ZipFile runs. The entry
    count the records declare is refused over the cap here; the entries
    themselves are counted by _zip_entries."""
    def corrupt(why: str) -> KdflowError:
        return _zip_error(archive, None, zipfile.BadZipFile(why))

    size = f.seek(0, 2)
    tail_at = max(0, size - _EOCD.size - 0xFFFF)    # the comment is at most 64 KiB
    f.seek(tail_at)
    tail = f.read()
    at = tail.rfind(b"PK\x05\x06")      # the last one, as zipfile takes it
    if at < 0 or len(tail) - at < _EOCD.size:
        raise corrupt("no end of central directory record")
    _, disk, cd_disk, _, count, cd_size, cd_offset, _ = _EOCD.unpack_from(tail, at)
    end = tail_at + at      # where the central directory (or the zip64 records) ends
    if tail[max(at - _LOCATOR.size, 0):at][:4] == b"PK\x06\x07":
        _, locator_disk, _, disks = _LOCATOR.unpack_from(tail, at - _LOCATOR.size)
        end -= _LOCATOR.size + _EOCD64.size
        f.seek(max(end, 0))
        record = f.read(_EOCD64.size)
        if end < 0 or record[:4] != b"PK\x06\x06" or len(record) < _EOCD64.size:
            raise corrupt("no zip64 end of central directory record before its locator")
        _, _, _, _, disk, cd_disk, _, count, cd_size, cd_offset = _EOCD64.unpack(record)
        disk = disk or locator_disk or disks > 1
    if disk or cd_disk:
        raise corrupt("a zip split over several disks")
    if count > MAX_MEMBERS:
        raise KdflowError(f"{archive} has more than {MAX_MEMBERS:,} members ({count:,} by "
                          "its directory), the cap for an image tree archive; check data.url")
    start = end - cd_size
    if start < 0 or start < cd_offset:     # before the file, or before its own offset
        raise corrupt(f"a central directory of {cd_size:,} bytes at offset {cd_offset:,} "
                      "that does not fit the file")
    return start, cd_size, cd_offset


def _zip_entries(archive: Path, f, start: int, size: int) -> Iterator[bytes]:
    """The central directory's entries one at a time, read from the file
    (an entry is 46 bytes and three lengths), counted and capped as they
    come: the end record's count is not what ZipFile goes by, and old tools
    wrap it at 65,536."""
    f.seek(start)
    done = seen = 0
    while done < size:
        head = f.read(_CD.size)
        if len(head) < _CD.size or head[:4] != b"PK\x01\x02":
            raise _zip_error(archive, None, zipfile.BadZipFile(
                f"central directory entry {seen + 1:,} is truncated or has a bad signature"))
        rest = sum(_CD.unpack(head)[1:])
        entry = head + f.read(rest)
        done += len(entry)
        if len(entry) < _CD.size + rest or done > size:
            raise _zip_error(archive, None, zipfile.BadZipFile(
                f"central directory entry {seen + 1:,} runs past the directory"))
        seen += 1
        if seen > MAX_MEMBERS:
            raise KdflowError(f"{archive} has more than {MAX_MEMBERS:,} members, the cap "
                              "for an image tree archive; check data.url")
        yield entry


def _end_records(count: int, size: int, offset: int, at: int, concat: int) -> bytes:
    """End records for `count` central directory entries of `size` bytes
    placed at `at` in the file, which the archive's own numbering calls
    `offset` (`concat` bytes precede the zip); zip64 ones once the offset
    needs them."""
    if offset < _ZIP32_LIMIT:
        return _EOCD.pack(b"PK\x05\x06", 0, 0, count, count, size, offset, 0)
    return (_EOCD64.pack(b"PK\x06\x06", _EOCD64.size - 12, 45, 45, 0, 0, count, count,
                         size, offset)
            + _LOCATOR.pack(b"PK\x06\x07", 0, at + size - concat, 1)
            + _EOCD.pack(b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0))


class _ZipView(io.RawIOBase):
    """The zip's bytes up to its central directory, then `tail` (a part of
    that directory and end records for it) in its place: what ZipFile reads
    to list only that part, while its members are read from the file."""

    def __init__(self, f, start: int, tail: bytes):
        self.f, self.start, self.tail, self.pos = f, start, tail, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        base = (0, self.pos, self.start + len(self.tail))[whence]
        if base + pos < 0:
            raise OSError("seek before the start of the zip")
        self.pos = base + pos
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        end = self.start + len(self.tail)
        stop = end if n is None or n < 0 else min(end, self.pos + n)
        out = b""
        if self.pos < min(stop, self.start):
            self.f.seek(self.pos)
            out = self.f.read(min(stop, self.start) - self.pos)
            self.pos += len(out)
            if self.pos < min(stop, self.start):
                return out      # the file ended early
        if self.pos >= self.start and stop > self.pos:
            out += self.tail[self.pos - self.start:stop - self.start]
            self.pos = stop
        return out


def _zip_parts(archive: Path, f) -> Iterator[zipfile.ZipFile]:
    """The zip as ZipFiles over consecutive parts of its central directory,
    each open while its members are read: the listing's memory is that of
    one part, whatever the entry count. The whole directory is walked (and
    counted) once before the first part, so a zip over the member cap is
    refused before any member is read."""
    start, size, offset = _zip_directory(archive, f)
    for _ in _zip_entries(archive, f, start, size):
        pass
    concat = start - offset         # bytes before the zip (a self-extractor's stub)
    at = start                      # where the part being gathered starts
    part: list[bytes] = []
    nbytes = 0
    entries = _zip_entries(archive, f, start, size)
    while True:
        entry = next(entries, None)
        if entry is not None:
            part.append(entry)
            nbytes += len(entry)
        if part and (entry is None or len(part) == _ZIP_CHUNK or nbytes >= _ZIP_CHUNK_BYTES):
            block = b"".join(part)
            tail = block + _end_records(len(part), len(block), at - concat, at, concat)
            resume = f.tell()
            try:
                zf = zipfile.ZipFile(_ZipView(f, at, tail))
            except _ZIP_ERRORS as e:
                raise _zip_error(archive, None, e) from None
            with zf:
                yield zf
            f.seek(resume)
            at += len(block)
            part, nbytes = [], 0
        if entry is None:
            return


def _walk_zip(archive: Path, read: bool = True) -> Iterator[tuple[str, bytes | None]]:
    with open(archive, "rb") as f:
        total = 0
        for zf in _zip_parts(archive, f):
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
                    raise _zip_error(archive, info.filename, RuntimeError("encrypted"))
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
                except _ZIP_ERRORS as e:
                    raise _zip_error(archive, info.filename, e) from None
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
        self.size: tuple[str, tuple[int, int]] | None = None
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

    def allocate(self) -> None:
        """The arrays the images are decoded into (once their memory is checked)."""
        side = self.image_size
        self.arrays = [(np.empty((len(y), 3, side, side), np.uint8), y) for y in self.labels]

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
        from PIL import Image, ImageOps  # only the convert step decodes

        where = self._where(name)
        try:
            with Image.open(io.BytesIO(payload)) as img:
                # MPO is how Pillow names the JPEGs many phones write (a JPEG
                # with extra frames appended); the first frame is the photo.
                if img.format not in ("PNG", "JPEG", "MPO"):
                    raise _bad(where, f"a {img.format} image; PNG or JPEG only")
                if img.width * img.height > MAX_PIXELS:
                    raise _bad(where, f"{img.width}x{img.height} pixels, more than the "
                                      f"{MAX_PIXELS:,} allowed")
                # 16-bit grey PNGs open as I;16/I (F for float data); convert()
                # clips them to 0..255 instead of scaling, so most come out
                # white. Refused rather than silently wrong.
                if img.mode.startswith(("I", "F")):
                    raise _bad(where, f"a 16-bit or 32-bit image (Pillow mode {img.mode}), "
                                      "which would be clipped, not scaled, to 8 bits; save "
                                      "it as an 8-bit PNG or a JPEG")
                # Phones store the pixels as the sensor saw them and the way to
                # hold the photo in the EXIF Orientation tag; every viewer
                # applies it, so the image the user knows is the turned one.
                # Before the size checks below: a portrait photo is its turned size.
                rgb = ImageOps.exif_transpose(img).convert("RGB")
        except KdflowError:
            raise
        # A damaged EXIF block can also raise TypeError or struct.error.
        except (OSError, SyntaxError, ValueError, TypeError, struct.error,
                Image.DecompressionBombError) as e:
            raise _bad(where, f"unreadable or corrupt image ({type(e).__name__}: {e})") from None
        if self.size is None:
            self.size = (where, rgb.size)
        elif rgb.size != self.size[1]:
            (w0, h0), (w, h) = self.size[1], rgb.size
            raise _bad(where, f"{w}x{h} pixels, but {self.size[0]} is {w0}x{h0}; all images "
                              "must share one size (resize them beforehand)")
        side = self.image_size
        if rgb.size != (side, side):
            rgb = rgb.resize((side, side), Image.Resampling.BICUBIC)
        return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)

    def finish(self) -> Images:
        if self.slots:
            name = next(iter(self.slots))
            raise _bad(self._where(name), "listed but gone when read: the tree changed "
                                          "during conversion; rerun")
        (x_train, y_train), (x_test, y_test) = self.arrays
        return Images(x_train, y_train, x_test, y_test, self.class_names)


# --------------------------------------------------------------------------
# Memory: a tree too large is refused before the first image is decoded
# --------------------------------------------------------------------------

# Held besides the pixels: per image, its name and place from the listing
# (a few hundred bytes); once, the image being decoded at its own size (up
# to MAX_PIXELS, in a few copies as it is turned, converted and resized)
# and the channel statistics' float64 chunks.
PER_IMAGE_OVERHEAD = 1 << 10
WORKING_ROOM = 256 << 20


def memory_needed(images: int, image_size: int) -> int:
    """Bytes converting `images` images to image_size x image_size holds at
    its peak: their uint8 pixels once (each image is decoded into its place
    in the arrays, which are then written in chunks), with the room above."""
    return images * (3 * image_size * image_size + PER_IMAGE_OVERHEAD) + WORKING_ROOM


def available_memory(meminfo: Path = Path("/proc/meminfo"),
                     cgroups: Path = Path("/sys/fs/cgroup"),
                     own: Path = Path("/proc/self/cgroup")) -> int | None:
    """Bytes this process can still take: the kernel's MemAvailable, or
    less where a memory cgroup (v2 or v1; a container's, a Slurm job's)
    leaves less; None where none of it can be read (not Linux)."""
    rooms = []
    try:
        rooms.append(next(int(line.split()[1]) * 1024 for line in meminfo.read_text().splitlines()
                          if line.startswith("MemAvailable:")))
    except (OSError, StopIteration, ValueError, IndexError):
        try:
            rooms.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (OSError, ValueError, AttributeError):
            pass
    rooms += _cgroup_rooms(cgroups, own)
    return min(rooms) if rooms else None


# (directory under the cgroup mount, limit, usage, the page cache the kernel
# reclaims before it refuses memory) for cgroup v2 and v1.
_CGROUP_FILES = (("", "memory.max", "memory.current", "inactive_file"),
                 ("memory", "memory.limit_in_bytes", "memory.usage_in_bytes",
                  "total_inactive_file"))


def _cgroup_rooms(cgroups: Path, own: Path) -> list[int]:
    """What each memory limit over this process leaves: its own cgroup's
    and its ancestors' up to the mount (inside a container, the mount is
    the container's own cgroup)."""
    try:
        lines = own.read_text().splitlines()
    except OSError:
        lines = []
    rooms = []
    for sub, limit, usage, cache in _CGROUP_FILES:
        mount = cgroups / sub
        here = mount / _own_cgroup(lines, sub).strip().lstrip("/")
        for d in (here, *here.parents):
            room = _cgroup_room(d, limit, usage, cache)
            if room is not None:
                rooms.append(room)
            if d == mount:
                break
    return rooms


def _own_cgroup(lines: list[str], sub: str) -> str:
    """This process's cgroup in /proc/self/cgroup's lines: "0::/path" for
    v2, "4:memory:/path" for v1's memory controller ("/" if not listed)."""
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3 and (parts[1] == "" if not sub else sub in parts[1].split(",")):
            return parts[2]
    return "/"


def _cgroup_room(d: Path, limit: str, usage: str, cache: str) -> int | None:
    """What the limit in cgroup directory `d` leaves (None: no limit there),
    its reclaimable page cache counted as free."""
    try:
        text = (d / limit).read_text().strip()
        if text == "max" or int(text) >= 1 << 60:     # v1 writes "no limit" as ~2**63
            return None
        room = int(text) - int((d / usage).read_text())
    except (OSError, ValueError):
        return None
    try:
        for line in (d / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == cache:
                room += int(value)
    except (OSError, ValueError):
        pass
    return max(0, room)


def check_memory(source: Path, images: int, image_size: int,
                 available: int | None) -> None:
    """Refuse a tree whose arrays would not fit, naming the numbers."""
    need = memory_needed(images, image_size)
    if available is None or need <= available:
        return
    pixels = images * 3 * image_size * image_size
    raise KdflowError(
        f"{source}: {images:,} images at data.image_size {image_size} need "
        f"{_bytes(need)} of memory to convert ({images:,} x 3 x {image_size} x {image_size} "
        f"= {_bytes(pixels)} of pixels, plus working room), but only {_bytes(available)} "
        "is available; lower data.image_size (memory grows with its square), use fewer "
        "images in the tree, or convert on a machine with more memory")


def _bytes(n: int) -> str:
    return f"{n:,} bytes ({n / (1 << 30):.2f} GiB)"


def _listed(source: Path, image_size: int) -> _Tree:
    """The tree with its listing read and its layout checked, nothing decoded."""
    tree = _Tree(source, image_size)
    for name, payload in _walk(source, read=False):
        tree.note(name, payload)
    tree.plan()
    return tree


def count_images(source: Path) -> int:
    """How many images conversion would decode, from the listing alone (a
    directory's names, a zip's directory, a tar's headers), under the same
    checks and caps as the reading."""
    return len(_listed(Path(source), IMAGE_SIZE).slots)


def read_folder(source: Path, entry: object = None, image_size: int = IMAGE_SIZE) -> Images:
    """The converter of the `folder` entry (kdflow.data.datasets): a directory or
    a .tar/.tar.gz/.zip of train/<class>/ and test/<class>/ images, resized
    to image_size x image_size. `entry` (the table's Dataset) is the
    converters' common signature; unused here. The tree is listed, its
    layout checked and the memory its arrays need compared with what is
    available before the first image is decoded."""
    source = Path(source)
    try:
        tree = _listed(source, image_size)
        check_memory(source, len(tree.slots), image_size, available_memory())
        tree.allocate()
        for name, payload in _walk(source):
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
