"""Converted images on disk: read a batch at a time from the .npz, written a chunk at a time.

A converted dataset is one uncompressed .npz (numpy's savez stores its
members as they are), so each array's bytes sit at a fixed offset in the
file. `StoredImages` reads the images a batch needs with positional reads
(os.pread) at those offsets: a job holds the batches in flight, not the
set, whatever N is, while the kernel's page cache keeps the file hot and
shares it between the jobs that read it. Positional reads rather than a
memory map because a mapped page counts in the process's resident size as
long as it stays mapped: an epoch touches every image, and the job's RSS
would climb to the set's size (reclaimable, but what a scheduler or the
OOM killer sees). `NpzWriter` writes the same format member by member and
chunk by chunk, so conversion and the subset never hold a whole array.
"""

from __future__ import annotations

import os
import struct
import threading
import zipfile
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

from kdflow import KdflowError

_LOCAL_HEADER = struct.Struct("<4s22xHH")   # signature, ..., name length, extra length
_LOCAL_SIGNATURE = b"PK\x03\x04"

# Bytes per chunk when arrays are copied or written (conversion, subset).
CHUNK_BYTES = 4 << 20


def member_layout(path: str | os.PathLike, key: str) -> Optional[tuple[int, np.dtype, tuple]]:
    """(byte offset of the data, dtype, shape) of array `key` of the .npz at
    `path` when it is stored uncompressed in C order, so it can be read in
    place; None otherwise (a compressed or Fortran-ordered member: read it
    whole, np.load)."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(f"{key}.npy")
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        signature, name_len, extra_len = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
        if signature != _LOCAL_SIGNATURE:
            raise KdflowError(f"{path}: not a readable .npz (member {key} has no local "
                              "header); convert the dataset again")
        f.seek(info.header_offset + _LOCAL_HEADER.size + name_len + extra_len)
        version = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(f)
        if fortran or dtype.hasobject:
            return None
        return f.tell(), dtype, tuple(shape)


class StoredImages:
    """One array of a converted .npz (uint8 images, N x C x H x W), read on
    demand. Indexed like the tensor it stands for: `images[i:j]` or
    `images[idx]` (a tensor or array of indices, any order) gives a uint8
    tensor on `device`, rows in the order asked. Reads are batched into one
    pread per run of consecutive rows, so a sequential pass (evaluation) is
    a few large reads and a shuffled batch one read per image."""

    def __init__(self, path: str | os.PathLike, offset: int, dtype, shape: tuple,
                 device="cpu", *, rows: Optional[np.ndarray] = None, pin: bool = False):
        # No torch here: conversion reads its scratch files back with this
        # class, and it runs without torch (seconds and memory it needs not).
        self.path, self._offset, self.dtype = Path(path), int(offset), np.dtype(dtype)
        self._stored = int(shape[0])
        self._row = int(np.prod(shape[1:], dtype=np.int64)) * self.dtype.itemsize
        # A view of some rows of the array (the training or validation part
        # of x_train), in their order; None: all of them.
        self._rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        n = self._stored if self._rows is None else len(self._rows)
        self.shape = (n, *(int(d) for d in shape[1:]))
        self._device, self._pin = device, pin
        self._fd = os.open(self.path, os.O_RDONLY)

    @classmethod
    def from_npz(cls, path: str | os.PathLike, key: str, device="cpu", *,
                 rows: Optional[np.ndarray] = None, pin: bool = False) -> "StoredImages":
        """Array `key` of a converted .npz (None if it cannot be read in place)."""
        layout = member_layout(path, key)
        if layout is None:
            return None
        offset, dtype, shape = layout
        return cls(path, offset, dtype, shape, device, rows=rows, pin=pin)

    @property
    def device(self):
        import torch

        return torch.device(self._device)

    @property
    def pin(self) -> bool:
        # Pinned (page-locked) host buffers let the copy to a GPU run
        # asynchronously, overlapping the step that is computing.
        return self._pin and self.device.type == "cuda"

    def view(self, rows: np.ndarray) -> "StoredImages":
        """The images `rows` of this array (indices into it), in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        if self._rows is not None:
            rows = self._rows[rows]
        return StoredImages(self.path, self._offset, self.dtype,
                            (self._stored, *self.shape[1:]), self._device, rows=rows,
                            pin=self._pin)

    @property
    def nbytes(self) -> int:
        return len(self) * self._row

    def __len__(self) -> int:
        return self.shape[0]

    def __del__(self):
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)

    def __getstate__(self):
        raise TypeError("StoredImages holds an open file; pass its path instead")

    def read(self, rows) -> np.ndarray:
        """The rows `rows` (an int array, any order, or a slice) as a numpy array."""
        if isinstance(rows, slice):
            rows = np.arange(len(self))[rows]
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"row out of range for {len(self)} images")
        if self._rows is not None:
            rows = self._rows[rows]
        out = np.empty((len(rows), *self.shape[1:]), self.dtype)
        flat = out.reshape(len(rows), -1).view(np.uint8)
        order = np.argsort(rows, kind="stable")
        ordered = rows[order]
        # Runs of consecutive rows: one read each.
        breaks = np.flatnonzero(np.diff(ordered) != 1) + 1
        for run in np.split(np.arange(len(ordered)), breaks):
            if not len(run):
                continue
            first, count = int(ordered[run[0]]), len(run)
            offset = self._offset + first * self._row
            places = order[run]
            if count == 1 or np.all(np.diff(places) == 1):
                # Straight into the output: no intermediate buffer (a batch
                # of bytes allocated and freed per read fragments the heap,
                # and the job's memory would creep up batch after batch).
                _pread_into(self._fd, flat[places[0]:places[0] + count], offset, self.path)
            else:
                block = np.empty((count, self._row), np.uint8)
                _pread_into(self._fd, block, offset, self.path)
                flat[places] = block
        return out

    def __getitem__(self, rows):
        import torch

        if isinstance(rows, torch.Tensor):
            rows = rows.cpu().numpy()
        x = torch.from_numpy(self.read(rows))
        device = self.device
        if device.type == "cpu":
            return x
        if self.pin:
            x = x.pin_memory()
        return x.to(device, non_blocking=self.pin)

    def batches(self, index_chunks: Iterable) -> Iterator:
        """The images of each chunk of indices in turn, each read (and, on
        CUDA, copied to pinned memory) by a helper thread while the caller
        computes on the one before: the read of batch k+1 overlaps step k.
        The batches and their order are exactly `self[chunk]`'s."""
        chunks = iter(index_chunks)
        box: dict = {}

        def load(chunk):
            try:
                box["next"] = self[chunk]
            except BaseException as e:      # re-raised in the caller's thread
                box["error"] = e

        def start():
            chunk = next(chunks, None)
            if chunk is None:
                return None
            t = threading.Thread(target=load, args=(chunk,), daemon=True)
            t.start()
            return t

        pending = start()
        while pending is not None:
            pending.join()
            if "error" in box:
                raise box.pop("error")
            x = box.pop("next")
            pending = start()
            yield x


class ScratchImages:
    """Images written one by one, in any order, to a scratch file (os.pwrite
    at each image's place): how conversion decodes a tree without holding
    it; `stored()` then reads them back for the .npz. The file is removed
    on close (it is unlinked at once where the system allows)."""

    def __init__(self, directory: str | os.PathLike, n: int, shape: tuple, dtype=np.uint8):
        import tempfile

        self.dtype, self.shape = np.dtype(dtype), (int(n), *shape)
        self._row = int(np.prod(shape, dtype=np.int64)) * self.dtype.itemsize
        self._file = tempfile.NamedTemporaryFile(dir=directory, prefix=".kdflow-scratch-",
                                                 suffix=".bin")
        self._file.truncate(n * self._row)

    def __len__(self) -> int:
        return self.shape[0]

    def __setitem__(self, i: int, image: np.ndarray) -> None:
        block = np.ascontiguousarray(image, dtype=self.dtype)
        if block.shape != self.shape[1:]:
            raise ValueError(f"an image of shape {block.shape}, not {self.shape[1:]}")
        os.pwrite(self._file.fileno(), block.data, int(i) * self._row)

    def stored(self) -> "StoredImages":
        return StoredImages(self._file.name, 0, self.dtype, self.shape)

    def close(self) -> None:
        self._file.close()


def _pread_into(fd: int, target: np.ndarray, offset: int, path: Path) -> None:
    """Fill the contiguous uint8 array `target` from `fd` at `offset`."""
    view = memoryview(target.reshape(-1))
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if not got:
            raise KdflowError(f"{path}: ends before its images do (truncated?); convert "
                              "the dataset again")
        done += got


def chunks_of(x, chunk_bytes: int = CHUNK_BYTES) -> Iterator[np.ndarray]:
    """Consecutive row blocks of `x` (an array, a memmap or StoredImages),
    each about `chunk_bytes`."""
    row = max(1, int(np.prod(x.shape[1:], dtype=np.int64)) * np.dtype(x.dtype).itemsize)
    step = max(1, chunk_bytes // row)
    for i in range(0, len(x), step):
        block = x.read(slice(i, i + step)) if isinstance(x, StoredImages) else x[i:i + step]
        yield np.asarray(block)


class NpzWriter:
    """Writes an .npz that np.load reads, one member at a time and each
    member in chunks (numpy's own layout: a stored zip member per array,
    holding a .npy), so no array has to be whole in memory."""

    def __init__(self, file):
        self._zip = zipfile.ZipFile(file, mode="w", compression=zipfile.ZIP_STORED,
                                    allowZip64=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._zip.close()

    def add(self, key: str, value) -> None:
        """A whole array (small ones: labels, indices, names)."""
        arr = np.asanyarray(value)
        self.add_chunks(key, arr.dtype, arr.shape, [arr] if arr.size else [])

    def add_chunks(self, key: str, dtype, shape: tuple, blocks: Iterable[np.ndarray]) -> None:
        """An array of `dtype` and `shape` given as consecutive row blocks;
        their rows must add up to shape[0]."""
        dtype = np.dtype(dtype)
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                  "shape": tuple(int(n) for n in shape)}
        want = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        written = 0
        with self._zip.open(f"{key}.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_2_0(f, header) if _header_too_long(header) \
                else np.lib.format.write_array_header_1_0(f, header)
            for block in blocks:
                block = np.ascontiguousarray(block, dtype=dtype)
                f.write(block.data if block.size else b"")
                written += block.nbytes
        if written != want:
            raise ValueError(f"{key}: {written} bytes written for a {shape} {dtype} array "
                             f"({want} bytes)")


def _header_too_long(header: dict) -> bool:
    # Version 1.0 headers hold at most 65,535 bytes (a very long shape or
    # structured dtype needs 2.0).
    return len(repr(header)) > 65000


# --------------------------------------------------------------------------
# Resident or streamed: where a job holds its images
# --------------------------------------------------------------------------

PLACEMENTS = ("auto", "resident", "streamed")


def choose_placement(nbytes: int, device, settings: dict) -> tuple[str, str]:
    """("resident" or "streamed", why) for `nbytes` of images on `device`,
    as the config's placement section says: auto keeps them resident (on
    the device, a tensor) when they take at most `gpu_share` of the GPU's
    free memory, or on a CPU `cpu_share` of what the machine has available
    (several jobs run side by side), and streams them otherwise."""
    import torch

    from kdflow.core import schema

    # Keys left out take the schema's defaults (callers outside the
    # workflow may pass {}).
    settings = {**schema.default("placement"),
                **{k: schema.default(f"placement.{k}") for k in ("images", "gpu_share",
                                                                   "cpu_share")},
                **settings}
    device = torch.device(device)
    mode = settings["images"]
    if mode not in PLACEMENTS:
        raise KdflowError(f"placement.images is {mode!r}; use one of {', '.join(PLACEMENTS)}")
    if mode != "auto":
        return mode, "placement.images"
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        share, where = settings["gpu_share"], f"the GPU's {free / 2**20:,.0f} MiB free"
    else:
        from kdflow.data.memory import available_memory

        free = available_memory()
        if free is None:
            return "resident", "auto (available memory unknown)"
        share, where = settings["cpu_share"], f"{free / 2**20:,.0f} MiB available"
    fits = nbytes <= share * free
    return ("resident" if fits else "streamed",
            f"auto: {nbytes / 2**20:,.0f} MiB {'within' if fits else 'over'} "
            f"{share:.0%} of {where}")


def open_images(path: str | os.PathLike, keys: list[tuple[str, Optional[np.ndarray]]],
                device, settings: dict) -> tuple[list, str]:
    """The image arrays `keys` ([(key, rows or None)]) of the converted .npz
    at `path`, each a tensor on `device` (resident) or a StoredImages
    (streamed), one placement for all, and a line for the log saying which
    and why. Either way a batch holds the same pixels."""
    import torch

    stored = [StoredImages.from_npz(path, key, device, rows=rows, pin=True)
              for key, rows in keys]
    if any(s is None for s in stored):      # written by something other than kdflow
        with np.load(path) as d:
            out = []
            for key, rows in keys:
                a = d[key] if rows is None else d[key][rows]
                out.append(torch.from_numpy(np.ascontiguousarray(a)).to(device))
        return out, f"images resident on {device} ({path} is compressed: read whole)"
    mode, why = choose_placement(sum(s.nbytes for s in stored), device, settings)
    if mode == "resident":
        out = [torch.from_numpy(s.read(slice(None))).to(device) for s in stored]
        return out, f"images resident on {device} ({why})"
    return stored, f"images read per batch from {path}, prefetched ({why})"


def read_rows(path: str | os.PathLike, key: str, rows) -> np.ndarray:
    """Rows `rows` of array `key` of a converted .npz, reading only those
    (the whole array only for a compressed file)."""
    stored = StoredImages.from_npz(path, key)
    if stored is None:
        with np.load(path) as d:
            return d[key][rows]
    return stored.read(rows)


def batches_of(x, index_chunks: Iterable) -> Iterator:
    """x[chunk] for each chunk in turn: StoredImages read the next batch
    while this one computes; a tensor is simply indexed."""
    if isinstance(x, StoredImages):
        return x.batches(index_chunks)
    return (x[c] for c in index_chunks)
