"""Reading archives without trusting them: one capped stream, and walkers for tar, zip and directories.

Both readers of packed data use these: the CIFAR python archives
(kdflow.data.cifar) and image trees (kdflow.data.folder). Each brings its
own `Caps` (its limits, and the words it refuses with) and its own rules
for names and members; this module holds what reading any archive safely
takes, so both get every guard: the bytes inflated are counted and capped
(a "zip bomb" costs seconds, not the disk), so are the header bytes
between two tar members and the member count, each before what it counts
is held in memory; tar members stream and none is kept; a zip's central
directory is counted from its own records and listed in parts; a
directory is walked with links kept inside it. Nothing is ever extracted
to disk, so no member name can write anywhere.
"""

from __future__ import annotations

import gzip
import io
import lzma
import os
import struct
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from kdflow import KdflowError

# Header bytes and read-ahead allowed between two tar members beyond the
# data the first declares: tarfile reads 10 KiB blocks, and honest pax
# headers (long names, times, extended attributes) are rarely more than a
# few kilobytes.
HEADER_SLACK = 1 << 20


@dataclass(frozen=True)
class Caps:
    """What one reader allows an archive, and how it says no: a CIFAR
    archive and an image tree differ in both. The messages take the
    archive's path (and, for `too_many`, the count a zip's directory
    declares, None where the members were counted one by one)."""

    members: int        # members in all
    unpacked: int       # bytes inflated in all, skipped members' included
    between: int        # bytes read between two tar members beyond the first's data
    too_many: Callable[[Path, int | None], str]
    too_large: Callable[[Path], str]
    crowded: Callable[[Path], str]      # more than `between` bytes between two members
    # What a refused or unreadable zip should be instead (only image trees
    # come as zips).
    zip_advice: str = ""


class Counted:
    """A stream as tarfile reads it, counted and capped.

    Besides the total, the bytes read between two members beyond the data
    the first one declares (`since`, set by `tar_members` as each member is
    handed out) are capped: tarfile reads a pax extended header or a GNU
    long name whole, into memory, while looking for the next member, before
    any per-member size check can run, so a small .tar.gz could otherwise
    hold a header of gigabytes. A member's own data never counts here,
    whether it is read or skipped (its size is checked from its header, or
    it is never kept); the total cap bounds all the bytes read, skipped
    ones included."""

    def __init__(self, raw, archive: Path, caps: Caps):
        self.raw, self.archive, self.caps, self.n, self.since = raw, archive, caps, 0, 0
        self.members_done = False   # past the tar's end only the total cap applies

    def read(self, size: int = -1) -> bytes:
        room = self.caps.unpacked - self.n + 1
        block = self.raw.read(room if size is None or size < 0 else min(size, room))
        self.n += len(block)
        self.since += len(block)
        if self.n > self.caps.unpacked:
            raise KdflowError(self.caps.too_large(self.archive))
        if not self.members_done and self.since > self.caps.between:
            raise KdflowError(self.caps.crowded(self.archive))
        return block


def tar_members(archive: Path, caps: Caps, gzipped: bool | None = None
                ) -> Iterator[tuple[tarfile.TarFile, tarfile.TarInfo]]:
    """(the tar, a member) for each member of a .tar or .tar.gz, one at a
    time, in one pass (stream mode: no seeking back); `gzipped` None: as
    its first bytes say. A member's data is read with
    tar.extractfile(member) before the next is asked for, or skipped over
    (inflated, not kept). None is kept: in stream mode TarFile appends every
    TarInfo to `.members` (a few hundred bytes each, a pax header's whole
    dict), which would grow with the member count, not the data. Walked to
    its end, the gzip stream is read to its last byte, where alone its CRC
    and length are checked (tarfile stops at the end-of-archive marker, so
    a truncated gzip would otherwise pass)."""
    with open(archive, "rb") as raw:
        if gzipped is None:
            gzipped = raw.read(2) == b"\x1f\x8b"
            raw.seek(0)
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if gzipped else raw
        counted = Counted(stream, archive, caps)
        with tarfile.open(fileobj=counted, mode="r|") as tar:
            count = 0
            while (info := tar.next()) is not None:
                tar.members.clear()
                count += 1
                if count > caps.members:
                    raise KdflowError(caps.too_many(archive, None))
                # What tarfile reads from here to the next header: this member's
                # data (padded to 512-byte blocks, read or skipped), then headers.
                counted.since = -((info.size + 511) // 512 * 512) if info.isreg() else 0
                yield tar, info
        counted.members_done = True
        while counted.read(1 << 20):
            pass


# --------------------------------------------------------------------------
# Zip: the central directory counted from its own records, listed in parts
# --------------------------------------------------------------------------

# What zipfile raises on a bad or unsupported archive or member: a password
# (RuntimeError), a compression method it lacks (NotImplementedError), broken
# headers or CRCs (BadZipFile), ZIP64 trouble (LargeZipFile), broken streams.
ZIP_ERRORS = (RuntimeError, NotImplementedError, zipfile.BadZipFile, zipfile.LargeZipFile,
              EOFError, zlib.error, lzma.LZMAError, OSError)


def zip_error(archive: Path, member: str | None, e: Exception, caps: Caps) -> KdflowError:
    """The refusal of a zip, or of one member (None: its directory), that
    zipfile cannot read, or that it would only read with a password."""
    what = f"member {member}" if member else "its directory"
    if isinstance(e, RuntimeError) and "encrypted" in str(e):
        problem = "is encrypted (password protected)"
    elif isinstance(e, NotImplementedError):
        problem = f"uses a compression method Python cannot read ({e})"
    else:
        problem = f"is corrupt or unreadable ({type(e).__name__}: {e})"
    return KdflowError(f"{archive}: {what} {problem}. {caps.zip_advice}")


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


def _zip_directory(archive: Path, f, caps: Caps) -> tuple[int, int, int]:
    """(central directory start, its size, its offset as recorded) from the
    end records of an open zip, read here, before any ZipFile: ZipFile reads
    the whole central directory into ZipInfos (its size, not its count, says
    how far), so a huge one must be refused before ZipFile runs. The entry
    count the records declare is refused over the cap here; the entries
    themselves are counted by _zip_entries."""
    def corrupt(why: str) -> KdflowError:
        return zip_error(archive, None, zipfile.BadZipFile(why), caps)

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
    if count > caps.members:
        raise KdflowError(caps.too_many(archive, count))
    start = end - cd_size
    if start < 0 or start < cd_offset:     # before the file, or before its own offset
        raise corrupt(f"a central directory of {cd_size:,} bytes at offset {cd_offset:,} "
                      "that does not fit the file")
    return start, cd_size, cd_offset


def _zip_entries(archive: Path, f, start: int, size: int, caps: Caps) -> Iterator[bytes]:
    """The central directory's entries one at a time, read from the file
    (an entry is 46 bytes and three lengths), counted and capped as they
    come: the end record's count is not what ZipFile goes by, and old tools
    wrap it at 65,536."""
    f.seek(start)
    done = seen = 0
    while done < size:
        head = f.read(_CD.size)
        if len(head) < _CD.size or head[:4] != b"PK\x01\x02":
            raise zip_error(archive, None, zipfile.BadZipFile(
                f"central directory entry {seen + 1:,} is truncated or has a bad signature"),
                caps)
        rest = sum(_CD.unpack(head)[1:])
        entry = head + f.read(rest)
        done += len(entry)
        if len(entry) < _CD.size + rest or done > size:
            raise zip_error(archive, None, zipfile.BadZipFile(
                f"central directory entry {seen + 1:,} runs past the directory"), caps)
        seen += 1
        if seen > caps.members:
            raise KdflowError(caps.too_many(archive, None))
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


def zip_parts(archive: Path, f, caps: Caps) -> Iterator[zipfile.ZipFile]:
    """The open zip `f` as ZipFiles over consecutive parts of its central
    directory, each open while its members are read: the listing's memory
    is that of one part, whatever the entry count. The whole directory is
    walked (and counted) once before the first part, so a zip over the
    member cap is refused before any member is read."""
    start, size, offset = _zip_directory(archive, f, caps)
    for _ in _zip_entries(archive, f, start, size, caps):
        pass
    concat = start - offset         # bytes before the zip (a self-extractor's stub)
    at = start                      # where the part being gathered starts
    part: list[bytes] = []
    nbytes = 0
    entries = _zip_entries(archive, f, start, size, caps)
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
            except ZIP_ERRORS as e:
                raise zip_error(archive, None, e, caps) from None
            with zf:
                yield zf
            f.seek(resume)
            at += len(block)
            part, nbytes = [], 0
        if entry is None:
            return


# --------------------------------------------------------------------------
# Directories: what a tree read in place holds, links kept inside it
# --------------------------------------------------------------------------

def dir_entries(root: Path, listed: Callable[[tuple[str, ...]], bool],
                entered: Callable[[tuple[str, ...]], bool],
                bad: Callable[[Path, str], KdflowError]) -> Iterator[tuple[str, Path, bool]]:
    """(relative name, path, is a directory) under `root`, sorted, for each
    file and directory whose relative parts `listed` accepts; a directory
    is descended into if `entered` accepts it. Links are followed only
    while they stay inside the tree, checked before descending (a link to
    / is refused with `bad`, not walked); a directory reached a second time
    (a link loop such as class/up -> ..) is listed but not entered, so the
    walk ends."""
    real_root = root.resolve()
    seen = {real_root}
    outside = "a link leads out of the tree (to {}); links may only point inside it. " \
              "Copy the files in instead"
    for here, dirs, files in os.walk(root, followlinks=True):
        here = Path(here)
        rel = here.relative_to(root)
        keep = []
        for d in sorted(dirs):
            parts = (rel / d).parts
            if not entered(parts):
                continue
            path = here / d
            real = path.resolve()
            if real != real_root and real_root not in real.parents:
                raise bad(path, outside.format(real))
            if listed(parts):
                yield (rel / d).as_posix(), path, True
            if real not in seen:    # else a loop or a second way in: not entered
                seen.add(real)
                keep.append(d)
        dirs[:] = keep
        for f in sorted(files):
            if not listed((rel / f).parts):
                continue
            path = here / f
            target = path.resolve()
            if real_root not in target.parents:
                raise bad(path, outside.format(target))
            yield (rel / f).as_posix(), path, False
