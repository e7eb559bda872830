"""CIFAR-10 and CIFAR-100: fetch, verify, safely unpickle, split and load.

The official archives (cifar-10-python.tar.gz, cifar-100-python.tar.gz) hold
pickled batches. Pickle can run arbitrary code, and numpy's own array
unpickling trusts the bytes it is given, so batches are read with an
unpickler in which numpy's names are stand-ins of ours: they accept only
what CIFAR batches contain (uint8 images, integer labels) and build the
arrays themselves. torchvision's CIFAR10 is not used: it checks each batch
against the official md5s and so refuses any mirror.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import logging
import math
import os
import pickle
import socket
import ssl
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # annotations only; see CifarSplits
    import torch

from kdflow import KdflowError
from kdflow.atomic import atomic_path, write_with

log = logging.getLogger(__name__)

MB = 1e6


@dataclass(frozen=True)
class DatasetSpec:
    """Where a CIFAR python archive keeps its batches and what they hold."""

    archive: str              # official file name, also its name under results/data
    url: str
    md5: str
    root: str                 # folder inside the archive
    train: tuple[str, ...]    # training batches
    test: str
    meta: str
    label_key: str            # labels in each batch
    names_key: str            # class names in the meta file
    # Each dataset's own channel statistics over its training images. (The
    # PyTorch tutorial uses ImageNet's, a known slip.)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_classes: int
    # The official image counts: an archive may hold fewer (a subset, as the
    # tests' tiny archives do) but never more.
    train_size: int
    test_size: int
    archive_size: int         # bytes of the official archive, bounds a download
    # A little above the largest official member, so a member's size is
    # refused before a single byte of it is read into memory.
    max_member: int


DATASETS: dict[str, DatasetSpec] = {
    "cifar10": DatasetSpec(
        archive="cifar-10-python.tar.gz",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        root="cifar-10-batches-py",
        train=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test="test_batch", meta="batches.meta",
        label_key="labels", names_key="label_names",
        mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
        num_classes=10, train_size=50_000, test_size=10_000,
        archive_size=170_498_071,
        max_member=32 << 20,      # each batch is 31,035,704 bytes
    ),
    # Fine labels (100 classes), as every CIFAR-100 distillation table uses.
    "cifar100": DatasetSpec(
        archive="cifar-100-python.tar.gz",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        root="cifar-100-python",
        train=("train",), test="test", meta="meta",
        label_key="fine_labels", names_key="fine_label_names",
        mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
        num_classes=100, train_size=50_000, test_size=10_000,
        archive_size=169_001_437,
        max_member=160 << 20,     # 'train' is 155,249,918 bytes
    ),
}
CIFAR10_MEAN = DATASETS["cifar10"].mean
CIFAR10_STD = DATASETS["cifar10"].std

# Both official archives unpack to about 186 MB of tar. Reading stops past
# this, so a small gzip that inflates to gigabytes (a "zip bomb") costs
# seconds, not the disk or the afternoon.
MAX_UNPACKED = 200 << 20
# A genuine archive has 7 (CIFAR-100: 4) members; thousands of tiny ones
# would each keep a header object in memory.
MAX_MEMBERS = 64
# A download may be a few times the official size (a mirror may pack
# differently) but a server that streams without end is cut off here.
MAX_DOWNLOAD = 4 * max(s.archive_size for s in DATASETS.values())


def dataset_spec(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise KdflowError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}") from None


# --------------------------------------------------------------------------
# Fetch and verify
# --------------------------------------------------------------------------

def md5sum(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _size(n: int) -> str:
    return f"{n / MB:,.0f} MB" if n >= 10 * MB else f"{n:,} bytes"


class _Transient(Exception):
    """A download attempt failed in a way a later attempt may not:
    a dropped connection, a timeout, an HTTP 5xx."""


_CHUNK = 1 << 20
# Statuses a server uses for "not now": worth another attempt.
_RETRY_STATUS = {408, 429}


def _offline_error(url: str, reason) -> KdflowError:
    return KdflowError(
        f"could not download {url}: {reason}. Without internet access, build or "
        "copy the archive and point data.url at it (file:///path/to/"
        "cifar-10-python.tar.gz) with its data.md5"
    )


def _open_source(url: str, offset: int = 0, timeout: float = 60.0):
    """Open an http(s)/file URL or a plain path at byte `offset`.

    Returns (stream, total size or None, start): `start` is where the stream
    begins, `offset` when an HTTP server honoured the Range request (206) and
    0 when it sent the whole file again (200) or for local files. Raises
    _Transient for failures worth retrying, KdflowError for the others.
    """
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme in ("", "file"):
        path = urllib.parse.unquote(parsed.path) if parsed.scheme == "file" else url
        if not os.path.isfile(path):
            raise KdflowError(
                f"CIFAR archive not found at {path!r} (from data.url {url!r}); "
                "set data.url to an existing file, a file:// URL or an http(s) URL"
            )
        return open(path, "rb"), os.path.getsize(path), 0
    if parsed.scheme not in ("http", "https"):
        raise KdflowError(
            f"data.url {url!r} has unsupported scheme {parsed.scheme!r}; "
            "use http(s)://, file:// or a plain path"
        )
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                      timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416 and offset:
            # The partial file is no prefix of what the server has now.
            return _open_source(url, 0, timeout)
        if e.code >= 500 or e.code in _RETRY_STATUS:
            raise _Transient(f"HTTP {e.code} {e.reason}") from None
        raise KdflowError(f"could not download {url}: HTTP {e.code} {e.reason}; "
                          "check data.url") from None
    except urllib.error.URLError as e:
        # No name resolution usually means no network at all, and a bad
        # certificate will not get better: neither is worth waiting for.
        if isinstance(e.reason, (socket.gaierror, ssl.SSLCertVerificationError)):
            raise _offline_error(url, e.reason) from None
        raise _Transient(str(e.reason)) from None
    except (OSError, http.client.HTTPException) as e:
        raise _Transient(f"{type(e).__name__}: {e}") from None
    if resp.status == 206:
        # "bytes START-END/TOTAL"; a server resuming elsewhere than asked
        # would splice the file wrongly, so start over instead.
        unit, _, rng = resp.headers.get("Content-Range", "").partition(" ")
        first, _, total = rng.partition("/")
        if unit != "bytes" or first.split("-")[0] != str(offset):
            resp.close()
            return _open_source(url, 0, timeout)
        return resp, int(total) if total.isdigit() else None, offset
    size = resp.headers.get("Content-Length")
    return resp, int(size) if size and size.isdigit() else None, 0


class _Progress:
    """A few log lines per download, not one per chunk: every quarter when
    the size is known, every 64 MB when it is not."""

    def __init__(self, total: int | None, start: int):
        self.total, self.start, self.t0 = total, start, time.monotonic()
        # The next quarter (or 64 MB step) above what a resumed file has.
        self.next = (math.floor(start / total * 4) + 1) / 4 if total \
            else (start // (64 * MB) + 1) * 64 * MB

    def rate(self, done: int) -> float:
        return (done - self.start) / MB / max(time.monotonic() - self.t0, 1e-6)

    def update(self, done: int) -> None:
        if self.total:
            frac = done / self.total
            if frac >= self.next:
                log.info("downloaded %3.0f%% (%.1f of %.1f MB, %.1f MB/s)",
                         100 * frac, done / MB, self.total / MB, self.rate(done))
                self.next = (math.floor(frac * 4) + 1) / 4
        elif done >= self.next:
            log.info("downloaded %.1f MB (%.1f MB/s)", done / MB, self.rate(done))
            self.next += 64 * MB


def _copy(src, out, start: int, total: int | None, cap: int, url: str) -> None:
    """Append `src` to `out` (which holds `start` bytes), at most `cap` in all."""
    if total is not None and total > cap:
        raise KdflowError(
            f"{url} is {_size(total)}, more than the {_size(cap)} allowed (a CIFAR "
            "python archive is about 170 MB), so it is not the archive: check data.url")
    done, progress = start, _Progress(total, start)
    while True:
        try:
            block = src.read(_CHUNK)
        except (OSError, http.client.HTTPException) as e:
            raise _Transient(f"connection lost after {done / MB:.1f} MB "
                             f"({type(e).__name__}: {e})") from None
        if not block:
            break
        if done + len(block) > cap:
            raise KdflowError(
                f"{url} sent more than {_size(cap)} without ending (a CIFAR python "
                "archive is about 170 MB), so it is not the archive; nothing was kept. "
                "Check data.url")
        out.write(block)
        done += len(block)
        progress.update(done)
    # http.client returns a short body, without an error, when the server
    # closes the connection early: only the announced size tells.
    if total is not None and done < total:
        raise _Transient(f"connection closed after {done / MB:.1f} of {total / MB:.1f} MB")
    log.info("downloaded %.1f MB (%.1f MB/s)", done / MB, progress.rate(done))


def fetch_archive(url: str, md5: str, dest: str | os.PathLike, *,
                  max_bytes: int | None = None, retries: int = 5,
                  backoff: float = 2.0, timeout: float = 60.0) -> None:
    """Copy/download `url` to `dest` and verify its md5.

    The bytes go to `dest.part`, renamed to `dest` only once the md5 matches,
    so a failed, corrupt or oversized download never sits under the final
    name. A dropped connection, a timeout or an HTTP 5xx is retried up to
    `retries` times after `backoff`, 2x`backoff`, 4x`backoff`... seconds,
    resuming the `.part` with an HTTP Range request where the server allows
    it. Any failure handled here removes the `.part`; only a run killed
    outright (SIGKILL, power loss) leaves one, and the next run resumes it.
    At most `max_bytes` (default MAX_DOWNLOAD, 4x the official archive) are
    accepted, so a server streaming without end is cut off.
    """
    dest = Path(dest)
    cap = max_bytes or MAX_DOWNLOAD
    last = None
    with atomic_path(dest) as part:
        for attempt in range(retries + 1):
            if attempt:
                delay = backoff * 2 ** (attempt - 1)
                log.warning("download of %s failed (%s); attempt %d of %d in %.1f s",
                            url, last, attempt + 1, retries + 1, delay)
                time.sleep(delay)
            offset = part.stat().st_size if part.exists() else 0
            try:
                src, total, start = _open_source(url, offset, timeout)
                if start:
                    log.info("resuming %s at %.1f MB", url, start / MB)
                with src, open(part, "ab" if start else "wb") as out:
                    _copy(src, out, start, total, cap, url)
                break
            except _Transient as e:
                last = e
        else:
            raise KdflowError(
                f"could not download {url} in {retries + 1} attempts (last: {last}); "
                "nothing was kept. Check the network and data.url, or copy the archive "
                "here and point data.url at it (file:///path/to/cifar-10-python.tar.gz)")
        got = md5sum(part)
        if got != md5.lower():
            raise KdflowError(
                f"md5 mismatch for {url}: expected {md5}, got {got}. The file is "
                "corrupt, truncated or a different archive; fetch it again, or if it "
                "is a trusted mirror set data.md5 to its checksum"
            )
    log.info("verified %s (md5 %s) -> %s", url, got, dest)


# --------------------------------------------------------------------------
# Safe reading of the pickled batches
# --------------------------------------------------------------------------

class UnsafePickleError(KdflowError):
    pass


def _refuse(source: str, what: str) -> UnsafePickleError:
    return UnsafePickleError(
        f"refusing {what} in {source}: CIFAR batches hold only uint8 images, integer "
        "labels, lists and strings, so this archive is not a genuine CIFAR python "
        "archive. Check data.url and data.md5 and fetch it again"
    )


# Integer dtype codes as numpy pickles them (dtype('u1', False, True)); no
# bools, floats, objects, strings or structured types.
_INT_CODES = {"u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8"}
_NUMPY_RECONSTRUCT = {("numpy.core.multiarray", "_reconstruct"),   # numpy 1 pickles
                      ("numpy._core.multiarray", "_reconstruct")}  # numpy 2


def _ascii(v) -> str | None:
    if isinstance(v, bytes):
        try:
            return v.decode("ascii")
        except UnicodeDecodeError:
            return None
    return v if isinstance(v, str) else None


def _is_int(v) -> bool:
    return type(v) is int   # not bool, not a numpy scalar


def _is_flag(v) -> bool:
    # Python 2 pickles write booleans as the ints 0 and 1.
    return type(v) is bool or (_is_int(v) and v in (0, 1))


class _PickledDtype:
    """Stands in for a numpy.dtype while unpickling.

    numpy's dtype.__setstate__ takes byte order, fields and flags from the
    pickle as given: a void type whose field is an object with its flags set
    to 0 makes numpy read raw bytes as object pointers (a crash, or worse).
    This one knows only plain little-endian integers.
    """

    __slots__ = ("code", "source", "built")

    def __init__(self, source: str, code, align=False, copy=True):
        self.source, self.built = source, False
        self.code = _ascii(code)
        if self.code not in _INT_CODES or not _is_flag(align) or not _is_flag(copy):
            raise _refuse(source, f"a numpy dtype {code!r}")

    def __setstate__(self, state) -> None:
        # (version, byte order, subarray, names, fields, elsize, alignment,
        # flags[, metadata]): what numpy writes for a plain integer type.
        # Version 4 adds metadata, which must be empty.
        orders = {"|", "<"} if self.code[1] == "1" else {"<"}
        ok = (isinstance(state, tuple) and len(state) in (8, 9) and not self.built
              and (state[0], len(state)) in ((3, 8), (4, 9)) and _is_int(state[0])
              and _ascii(state[1]) in orders   # Python 2 pickles: b"|"
              and all(v is None for v in state[2:5])
              and all(_is_int(v) for v in state[5:8]) and state[5:8] == (-1, -1, 0)
              and (len(state) == 8 or state[8] is None or state[8] == {}))
        if not ok:
            raise _refuse(self.source, f"numpy dtype state {state!r:.200}")
        self.built = True

    def numpy(self) -> np.dtype:
        return np.dtype("<" + self.code)


class _PickledArray:
    """Stands in for a numpy.ndarray while unpickling; holds the real array
    once the pickle has given its state.

    numpy's own _reconstruct allocates any shape asked for with no data
    behind it (a 200-byte pickle becomes 700,000 images of whatever memory
    held), so here nothing exists until the state arrives, and the state's
    bytes must be exactly the shape's size.
    """

    __slots__ = ("source", "array")

    def __init__(self, source: str):
        self.source, self.array = source, None

    def __setstate__(self, state) -> None:
        if self.array is not None:
            raise _refuse(self.source, "an array given its contents twice")
        if not (isinstance(state, tuple) and len(state) == 5):
            raise _refuse(self.source, f"numpy array state {state!r:.200}")
        version, shape, dtype, fortran, raw = state
        if not (_is_int(version) and version == 1 and isinstance(shape, tuple)
                and 1 <= len(shape) <= 4 and all(_is_int(s) and s >= 0 for s in shape)
                and isinstance(dtype, _PickledDtype) and _is_flag(fortran)
                and isinstance(raw, bytes)):
            raise _refuse(self.source, f"numpy array state {state!r:.200}")
        dt = dtype.numpy()
        need = math.prod(shape) * dt.itemsize
        if len(raw) != need:
            raise _refuse(self.source, f"an array of shape {shape} ({need} bytes) "
                                       f"stored in {len(raw)} bytes")
        self.array = np.frombuffer(raw, dt).reshape(
            shape, order="F" if fortran else "C").copy()


class _Global:
    """What the unpickler hands out for a numpy name: a callable of ours.

    A pickle can also BUILD (set the state of) any object it holds, globals
    included; for these that is refused, so a pickle cannot alter them.
    """

    __slots__ = ("name", "call", "source")

    def __init__(self, name: str, call, source: str):
        self.name, self.call, self.source = name, call, source

    def __call__(self, *args):
        return self.call(*args)

    def __setstate__(self, state):
        raise _refuse(self.source, f"setting the state of {self.name}")


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, ints, strings/bytes and integer numpy arrays
    only; numpy itself never sees the pickle."""

    def __init__(self, file, source: str):
        super().__init__(file, encoding="bytes")
        self.source = source
        # The closures below use these locals, never `self`: a reference
        # cycle through the unpickler would keep its memo (the batch's raw
        # bytes) alive until the garbage collector happened to run.
        arrays: list[_PickledArray] = []

        def refuse_ndarray(*args):
            raise _refuse(source, "numpy.ndarray called directly")

        def reconstruct(subtype, shape=None, code=None):
            # numpy writes _reconstruct(ndarray, (0,), b'b'), then the state.
            if subtype is not ndarray:
                raise _refuse(source, "_reconstruct of something other than ndarray")
            arr = _PickledArray(source)
            arrays.append(arr)
            return arr

        # Fresh stand-ins for every pickle: nothing one pickle does to them
        # can carry over to the next.
        ndarray = _Global("numpy.ndarray", refuse_ndarray, source)
        self.arrays = arrays
        self.globals = {("numpy", "ndarray"): ndarray,
                        ("numpy", "dtype"): _Global(
                            "numpy.dtype", lambda *a: _PickledDtype(source, *a), source)}
        for key in _NUMPY_RECONSTRUCT:
            self.globals[key] = _Global(".".join(key), reconstruct, source)

    def find_class(self, module: str, name: str):
        if (module, name) in self.globals:
            return self.globals[module, name]
        raise UnsafePickleError(
            f"refusing to unpickle {module}.{name} in {self.source}: CIFAR batches "
            "hold only numpy arrays, lists, ints and strings, so this archive is not "
            "a genuine CIFAR python archive. Check data.url and data.md5"
        )

    def persistent_load(self, pid):
        raise UnsafePickleError(f"refusing persistent id in {self.source}")

    def finish(self, obj, depth: int = 3):
        """`obj` with each array stand-in replaced by its array.

        Only the few levels a CIFAR batch has are searched ({key: array or
        list}); a stand-in deeper down stays an inert object nobody reads.
        """
        if isinstance(obj, _PickledArray):
            return obj.array
        if depth == 0:
            return obj
        if isinstance(obj, dict):
            return {k: self.finish(v, depth - 1) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self.finish(v, depth - 1) for v in obj]
        if isinstance(obj, tuple):
            return tuple(self.finish(v, depth - 1) for v in obj)
        return obj


def safe_unpickle(payload: bytes, source: str = "pickle"):
    unpickler = RestrictedUnpickler(io.BytesIO(payload), source)
    try:
        obj = unpickler.load()
    except KdflowError:
        raise
    except Exception as e:  # truncated or garbled bytes, absurd sizes
        raise KdflowError(f"{source} is not a readable CIFAR batch ({type(e).__name__}: "
                          f"{e}); the archive is damaged or not a CIFAR python archive: "
                          "fetch it again, and check data.url and data.md5") from None
    if any(a.array is None for a in unpickler.arrays):
        raise _refuse(source, "a numpy array with a shape but no data")
    return unpickler.finish(obj)


def _key(d: dict, name: str, source: str):
    for k in (name.encode(), name):
        if k in d:
            return d[k]
    raise KdflowError(f"{source} lacks the {name!r} entry of a CIFAR batch; the archive "
                      "is damaged or not a CIFAR python archive: check data.url")


def _text(v) -> str:
    return v.decode("latin1") if isinstance(v, bytes) else str(v)


def _describe(v) -> str:
    if isinstance(v, np.ndarray):
        return f"a {v.dtype} array of shape {v.shape}"
    return f"a {type(v).__name__}"


def _labels(labels, n: int, classes: int, source: str) -> np.ndarray:
    """Labels as int64 (n,), each in [0, classes)."""
    if isinstance(labels, np.ndarray):
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise KdflowError(f"{source}: labels must be integers, got {_describe(labels)}")
        lo, hi = (int(labels.min()), int(labels.max())) if len(labels) else (0, 0)
    elif isinstance(labels, list):
        if not all(_is_int(v) for v in labels):
            bad = next(v for v in labels if not _is_int(v))
            raise KdflowError(f"{source}: labels must be integers, found {bad!r:.40} "
                              f"(a {type(bad).__name__})")
        lo, hi = (min(labels), max(labels)) if labels else (0, 0)
    else:
        raise KdflowError(f"{source}: labels must be a list of integers, got {_describe(labels)}")
    if len(labels) != n:
        raise KdflowError(f"{source}: {len(labels)} labels for {n} images")
    # Checked before the conversion: a huge Python int would overflow int64.
    if lo < 0 or hi >= classes:
        raise KdflowError(f"{source}: labels outside 0..{classes - 1} (from {lo} to {hi})")
    return np.asarray(labels, dtype=np.int64)


def parse_batch(payload: bytes, source: str, label_key: str = "labels",
                classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Images as uint8 (N, 3, 32, 32) and labels as int64 (N,) in [0, classes)."""
    batch = safe_unpickle(payload, source)
    if not isinstance(batch, dict):
        raise KdflowError(f"{source} is not a CIFAR batch (a {type(batch).__name__})")
    data = _key(batch, "data", source)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3 * 32 * 32:
        raise KdflowError(f"{source}: 'data' must be a uint8 array of shape (N, 3072), "
                          f"got {_describe(data)}")
    labels = _labels(_key(batch, label_key, source), data.shape[0], classes, source)
    return data.reshape(-1, 3, 32, 32), labels


def _class_names(payload: bytes, source: str, spec: DatasetSpec) -> list[str]:
    meta = safe_unpickle(payload, source)
    if not isinstance(meta, dict):
        raise KdflowError(f"{source} is not a CIFAR meta file (a {type(meta).__name__})")
    names = _key(meta, spec.names_key, source)
    if not (isinstance(names, list) and len(names) == spec.num_classes
            and all(isinstance(n, (bytes, str)) for n in names)):
        raise KdflowError(f"{source}: {spec.names_key!r} must list the {spec.num_classes} "
                          f"class names, got {_describe(names)} of length "
                          f"{len(names) if isinstance(names, list) else '-'}")
    return [_text(n) for n in names]


class _Inflated:
    """The archive's gzip stream as tarfile reads it, counted and capped."""

    def __init__(self, gz: gzip.GzipFile, archive: Path):
        self.gz, self.archive, self.limit, self.n = gz, archive, MAX_UNPACKED, 0

    def read(self, size: int = -1) -> bytes:
        room = self.limit - self.n + 1
        block = self.gz.read(room if size is None or size < 0 else min(size, room))
        self.n += len(block)
        if self.n > self.limit:
            raise KdflowError(
                f"{self.archive} unpacks to more than {_size(self.limit)}, far more "
                "than a CIFAR python archive (about 186 MB); it is not one. Check data.url")
        return block

    def drain(self) -> None:
        """Read to the end of the gzip stream: only there are its CRC and
        length checked (tarfile stops at the end-of-archive marker, so a
        truncated gzip would otherwise pass)."""
        while self.read(_CHUNK):
            pass


def _read_members(archive: Path, spec: DatasetSpec) -> dict[str, bytes]:
    """The raw bytes of the meta file and the batches, after checking the
    whole archive is intact (so damage is reported as such, not as an odd
    pickle). Nothing is extracted to disk, so a hostile member name cannot
    write anywhere."""
    wanted = {f"{spec.root}/{n}": n for n in (spec.meta, *spec.train, spec.test)}
    found: dict[str, bytes] = {}
    try:
        with open(archive, "rb") as raw, gzip.GzipFile(fileobj=raw, mode="rb") as gz:
            stream = _Inflated(gz, archive)
            # Stream mode: one pass through the archive, no seeking back.
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for i, info in enumerate(tar):
                    if i >= MAX_MEMBERS:
                        raise KdflowError(f"{archive} has more than {MAX_MEMBERS} members; "
                                          "it is not a CIFAR python archive. Check data.url")
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
                            f"{spec.max_member:,} allowed for any {spec.archive} member; "
                            "it is not a CIFAR batch. Check data.url and data.dataset")
                    found[name] = tar.extractfile(info).read()
            stream.drain()
    except (EOFError, OSError, zlib.error, tarfile.TarError) as e:
        raise KdflowError(
            f"{archive}: archive truncated or corrupt: {type(e).__name__}: {e}; fetch it "
            f"again (delete {archive} and rerun: the download step fetches and verifies "
            "it anew)") from None
    for path, name in wanted.items():
        if name not in found:
            raise KdflowError(
                f"{archive} lacks {path}; is it the {spec.archive.split('-python')[0]} "
                f"*python* archive ({spec.archive})? Check data.dataset and data.url")
    return found


def _savez(path: Path, **arrays) -> None:
    # Through a file object: np.savez would append ".npz" to a NAME.part path.
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def convert_archive(archive: str | os.PathLike, out: str | os.PathLike,
                    dataset: str = "cifar10", *, md5: str | None = None) -> dict:
    """Read the archive's batches into one compact .npz of uint8 images.

    With `md5` (the workflow passes data.md5) the archive is checked against
    it first, so what is read is what the download step verified. Every batch
    is checked against the dataset: N x 3072 uint8 images, N integer labels
    below the class count, no more images than the official sets. The .npz
    records the dataset's name and channel statistics, so every later step
    normalises with the right ones.
    """
    spec = dataset_spec(dataset)
    archive = Path(archive)
    if md5 is not None:
        got = md5sum(archive)
        if got != md5.lower():
            raise KdflowError(
                f"{archive} has md5 {got}, not data.md5 {md5}: it changed or was damaged "
                "after download. Delete it and rerun (the download step fetches and "
                "verifies it again), or, for a trusted mirror, set data.md5 to its checksum")
        log.info("%s still has md5 %s (data.md5)", archive, got)
    payloads = _read_members(archive, spec)
    classes = _class_names(payloads.pop(spec.meta), f"{spec.root}/{spec.meta}", spec)

    def batch(name: str):
        # pop: each raw batch is freed as soon as it is parsed.
        return parse_batch(payloads.pop(name), f"{spec.root}/{name}", spec.label_key,
                           spec.num_classes)

    parts = [batch(b) for b in spec.train]
    x_test, y_test = batch(spec.test)
    x_train = np.concatenate([p[0] for p in parts])
    y_train = np.concatenate([p[1] for p in parts])
    for split, n, most in (("train", len(y_train), spec.train_size),
                           ("test", len(y_test), spec.test_size)):
        if not 0 < n <= most:
            raise KdflowError(
                f"{archive}: {n} {split} images, but {dataset} has at most {most} (and a "
                "subset needs at least one); it is not a genuine archive. Check data.url")
    write_with(out, lambda tmp: _savez(
        tmp, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
        classes=np.array(classes), dataset=np.array(dataset),
        mean=np.array(spec.mean), std=np.array(spec.std)))
    info = {"train": len(y_train), "test": len(y_test), "classes": classes}
    log.info("converted %s (%s): %d train, %d test images, %d classes",
             archive, dataset, len(y_train), len(y_test), len(classes))
    return info


def channel_stats(d) -> tuple[tuple, tuple]:
    """(mean, std) recorded in a converted .npz (CIFAR-10's for older files)."""
    if "mean" in d.files:
        return tuple(d["mean"].tolist()), tuple(d["std"].tolist())
    return CIFAR10_MEAN, CIFAR10_STD


# --------------------------------------------------------------------------
# Validation split
# --------------------------------------------------------------------------

def make_split(labels: np.ndarray, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class-balanced validation indices carved from the training set.

    Each class gives val_size // C images (the first val_size % C classes one
    more), drawn by a generator seeded with `seed`: the same labels, size and
    seed always give the same split. Returns sorted (train_idx, val_idx).
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)
    n_classes = len(classes)
    if val_size < n_classes:
        raise KdflowError(
            f"data.val_size = {val_size} leaves some of the {n_classes} classes "
            f"without validation images; use at least {n_classes}"
        )
    rng = np.random.default_rng(seed)
    base, extra = divmod(val_size, n_classes)
    picks = []
    for i, c in enumerate(classes):
        members = np.flatnonzero(labels == c)
        k = base + (1 if i < extra else 0)
        if k >= len(members):
            raise KdflowError(
                f"data.val_size = {val_size} needs {k} validation images of class "
                f"{c} but it has only {len(members)} training images; lower data.val_size"
            )
        picks.append(rng.choice(members, size=k, replace=False))
    val_idx = np.sort(np.concatenate(picks))
    train_idx = np.setdiff1d(np.arange(len(labels)), val_idx)
    return train_idx, val_idx


def write_split(dataset: str | os.PathLike, out: str | os.PathLike,
                val_size: int, seed: int) -> None:
    with np.load(dataset) as d:
        labels = d["y_train"]
    train_idx, val_idx = make_split(labels, val_size, seed)
    write_with(out, lambda tmp: _savez(tmp, train_idx=train_idx, val_idx=val_idx,
                                       val_size=np.int64(val_size), seed=np.int64(seed)))
    log.info("split: %d train, %d validation (seed %d)", len(train_idx), len(val_idx), seed)


# --------------------------------------------------------------------------
# In-memory dataset for training
# --------------------------------------------------------------------------

# torch is imported inside the two classes below that use it: the workflow
# imports this module to validate its config, and every Snakemake start (each
# dry run, each cluster job) would otherwise pay seconds for torch.
class CifarSplits:
    """Train/val/test images as uint8 NCHW tensors with int64 labels.

    Kept as uint8 (a quarter of float32's memory) on the training device;
    batches are converted and normalised there, see `Normalizer`.
    """

    def __init__(self, dataset: str | os.PathLike, split: str | os.PathLike,
                 device: torch.device | str = "cpu"):
        import torch

        with np.load(dataset) as d, np.load(split) as s:
            x, y = d["x_train"], d["y_train"]
            tr, va = s["train_idx"], s["val_idx"]
            self.classes = [str(c) for c in d["classes"]]
            self.mean, self.std = channel_stats(d)

            def t(a):
                return torch.from_numpy(np.ascontiguousarray(a)).to(device)

            self.train_x, self.train_y = t(x[tr]), t(y[tr])
            self.val_x, self.val_y = t(x[va]), t(y[va])
            self.test_x, self.test_y = t(d["x_test"]), t(d["y_test"])

    @property
    def num_classes(self) -> int:
        return len(self.classes)


class Normalizer:
    """uint8 NCHW -> float, normalised per channel (CIFAR-10's statistics
    unless given), channels_last.

    channels_last makes the CPU and cuDNN convolution kernels faster for these
    small-channel convolutions.
    """

    def __init__(self, device, mean=CIFAR10_MEAN, std=CIFAR10_STD):
        import torch

        self.memory_format = torch.channels_last
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255

    def __call__(self, x_uint8: torch.Tensor) -> torch.Tensor:
        x = (x_uint8.float() - self.mean) / self.std
        return x.contiguous(memory_format=self.memory_format)
