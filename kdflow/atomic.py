"""Every output file is written whole or not at all.

Each writer writes to `NAME.part` beside its target and renames it into place
only when the write has finished (a rename within one directory is atomic),
so a crash, a kill or a full disk never leaves a truncated file under the
final name, where Snakemake or a later step would take it for a complete
one. On failure the `.part` file is removed and a full disk or a file-size
limit becomes one clear KdflowError naming the file.
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


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = part_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
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
