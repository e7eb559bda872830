"""Every output file is written whole or not at all.

Each writer writes to `NAME.part` beside its target and renames it into place
only when the write has finished (a rename within one directory is atomic),
so a crash, a kill or a full disk never leaves a truncated file under the
final name, where Snakemake or a later step would take it for a complete
one. On failure the `.part` file is removed and a full disk or a file-size
limit becomes one clear KdflowError naming the file.

A power cut needs more than the rename: the kernel may write the rename to
disk before the file's bytes, and after the reboot the final name holds a
short or empty file. So the `.part` file is fsynced before the rename (its
bytes are on disk before any name points at them) and the directory after
(the rename itself is on disk before the writer returns, so a later step's
output never survives a cut that its input's rename did not).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from pathlib import Path
from typing import Callable, Iterator

from kdflow import KdflowError

_SPACE_ERRORS = {errno.ENOSPC: "no space left on the device",
                 errno.EFBIG: "file too large (a file-size limit was reached)",
                 errno.EDQUOT: "disk quota exceeded"}


def part_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".part")


def _space_errno(e: BaseException) -> int | None:
    """The errno of a full disk or size limit behind `e`, if any: writers
    such as torch.save wrap the OSError in an error of their own."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _SPACE_ERRORS:
            return e.errno
        e = e.__cause__ or e.__context__
    return None


def _fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    except OSError as e:
        # A few filesystems (some FUSE and network ones) cannot fsync a
        # directory; the file's own fsync, which matters most, has succeeded.
        if not (directory and e.errno in (errno.EINVAL, errno.ENOTSUP)):
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = part_path(path)
    try:
        yield tmp
        _fsync(tmp)                          # the bytes first,
        os.replace(tmp, path)                # then the name,
        _fsync(path.parent, directory=True)  # and the name on disk too
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        code = _space_errno(e)
        if code is not None:
            raise KdflowError(f"{_SPACE_ERRORS[code]} while writing {path}: free some "
                              "space (or raise the limit) and rerun; nothing was kept") from None
        raise


def write_with(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """`write(tmp)` writes the file at tmp; it then replaces `path`."""
    with atomic_path(path) as tmp:
        write(tmp)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    write_with(path, lambda tmp: tmp.write_bytes(data))


def write_text(path: str | os.PathLike, text: str) -> None:
    write_with(path, lambda tmp: tmp.write_text(text))


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def save_torch(path: str | os.PathLike, obj) -> None:
    """torch.save, atomically. Through a Python file object, so a failed
    write surfaces as the OSError behind torch's own error."""
    import torch  # only the writers of checkpoints need it

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
    write_with(path, write)
