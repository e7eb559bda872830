"""Building archives for the tests: crafted pickles, image trees, and archives whose listing is hostile.

Shared by the archive tests (tests/test_hostile_archives.py,
tests/test_fuzz_archives.py, tests/test_folder_dataset.py) and by the
children they run under tests.helpers.childmem, which import it too: so it
imports nothing heavy (no torch, no tests.conftest; Pillow only where an
image is drawn).

The pickles are written opcode by opcode with the small assembler below,
not with numpy's pickler, so they stay the same whatever numpy does to its
own pickles; they use only the names a CIFAR batch needs (numpy's
_reconstruct, ndarray and dtype), which any CIFAR reader must allow.
"""

from __future__ import annotations

import gzip
import io
import struct
import tarfile
from pathlib import Path

import numpy as np

# --------------------------------------------------------------------------
# A tiny pickle assembler
# --------------------------------------------------------------------------

MARK, STOP, TUPLE, REDUCE, BUILD = b"(", b".", b"t", b"R", b"b"
EMPTY_DICT, EMPTY_LIST, SETITEMS, APPENDS = b"}", b"]", b"u", b"e"
NONE, TRUE, FALSE = b"N", b"\x88", b"\x89"


def glob(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def by(x: bytes) -> bytes:          # BINBYTES (Python 3)
    return b"B" + struct.pack("<I", len(x)) + x


def py2str(x: bytes) -> bytes:      # BINSTRING: a Python 2 str
    return b"T" + struct.pack("<i", len(x)) + x


def text(x: str) -> bytes:          # BINUNICODE
    raw = x.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def integer(n: int) -> bytes:
    if -2**31 <= n < 2**31:
        return b"J" + struct.pack("<i", n)
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def tup(*items: bytes) -> bytes:
    return MARK + b"".join(items) + TUPLE


def lst(*items: bytes) -> bytes:
    return EMPTY_LIST + MARK + b"".join(items) + APPENDS


def dct(items: dict[bytes, bytes], key=by) -> bytes:
    return EMPTY_DICT + MARK + b"".join(key(k) + v for k, v in items.items()) + SETITEMS


RECONSTRUCT = glob("numpy.core.multiarray", "_reconstruct")
NDARRAY, DTYPE = glob("numpy", "ndarray"), glob("numpy", "dtype")


def dtype(code: str, state: bytes, args: bytes = FALSE + TRUE) -> bytes:
    """numpy.dtype(code, align, copy), then BUILD with `state`."""
    return DTYPE + tup(text(code), args) + REDUCE + state + BUILD


def plain_dtype(code: str, order: str = "|") -> bytes:
    return dtype(code, tup(integer(3), text(order), NONE, NONE, NONE,
                           integer(-1), integer(-1), integer(0)))


def new_array() -> bytes:
    """_reconstruct(ndarray, (0,), b'b'): an array without its state yet."""
    return RECONSTRUCT + tup(NDARRAY, tup(integer(0)), by(b"b")) + REDUCE


def array(shape: tuple[int, ...], dt: bytes, raw: bytes | None, data=by) -> bytes:
    """new_array(), then BUILD (1, shape, dtype, False, raw) unless `raw`
    is None."""
    out = new_array()
    if raw is not None:
        out += tup(integer(1), tup(*map(integer, shape)), dt, FALSE, data(raw)) + BUILD
    return out


def pickled(body: bytes, proto: int = 3) -> bytes:
    return b"\x80" + bytes([proto]) + body + STOP


def batch(data: bytes, labels: bytes) -> bytes:
    return pickled(dct({b"data": data, b"labels": labels}))


def images(n: int, fill: int = 7) -> bytes:
    return array((n, 3072), plain_dtype("u1"), bytes([fill]) * (n * 3072))


def labels(*values: int) -> bytes:
    return lst(*map(integer, values))


def put(i: int) -> bytes:           # LONG_BINPUT: store the top of the stack
    return b"r" + struct.pack("<I", i)


def get(i: int) -> bytes:           # LONG_BINGET: push a stored object again
    return b"j" + struct.pack("<I", i)


def shared_lists(width: int, depth: int, memo: int = 0) -> bytes:
    """A list of `width` references to one list of `width` references to ...
    `depth` levels, Nones at the bottom: width**depth Nones reached through
    ~5 * width * depth bytes of pickle (memo entries from `memo` on)."""
    if depth == 1:
        return EMPTY_LIST + MARK + NONE * width + APPENDS
    inner = shared_lists(width, depth - 1, memo + 1)
    return EMPTY_LIST + MARK + inner + put(memo) + get(memo) * (width - 1) + APPENDS


# --------------------------------------------------------------------------
# Image trees, and archives of them whose listing alone costs memory
# --------------------------------------------------------------------------

TREE_CLASSES = [f"c{i}" for i in range(10)]


def image_bytes(label: int, i: int, size: int = 32, fmt: str = "PNG") -> bytes:
    """A small image whose colour depends on the class, so a model can learn it."""
    from PIL import Image   # here: the children that import this module draw none

    rng = np.random.default_rng(label * 1000 + i)
    x = rng.normal(60 + 15 * label, 25, (size, size, 3))
    x[:, :, label % 3] += 60
    buf = io.BytesIO()
    Image.fromarray(np.clip(x, 0, 255).astype(np.uint8)).save(buf, fmt)
    return buf.getvalue()


def make_tree(root: Path, train: int = 12, test: int = 4, size: int = 32,
              fmt: str = "PNG", classes=TREE_CLASSES) -> Path:
    """train/<class>/ and test/<class>/ under `root`, `train` and `test`
    images a class (image_bytes)."""
    ext = ".png" if fmt == "PNG" else ".jpg"
    for split, n in (("train", train), ("test", test)):
        for label, c in enumerate(classes):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                (d / f"{i:03d}{ext}").write_bytes(image_bytes(label, i + 100 * (split == "test"),
                                                              size, fmt))
    return root


def hostile_zip_directory(out: Path, entries: int, declared: int | None = None,
                          cd_size: int | None = None) -> Path:
    """A zip that is only a central directory: `entries` entries of 47 bytes
    (all naming one member "x"), written in slices so this process never
    holds it, then zip64 end records declaring `declared` entries (default:
    all) and `cd_size` bytes of directory (default: the real size).
    ZipFile() reads each entry into a ZipInfo of ~550 bytes before any count
    can be checked."""
    entry = struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, 0, 0, 0, 0, 0, 0,
                        1, 0, 0, 0, 0, 0, 0) + b"x"
    size = len(entry) * entries
    declared = entries if declared is None else declared
    with open(out, "wb") as f:
        for start in range(0, entries, 100_000):
            f.write(entry * min(100_000, entries - start))
        f.write(struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, declared, declared,
                            size if cd_size is None else cd_size, 0))
        f.write(struct.pack("<4sLQL", b"PK\x06\x07", 0, size, 1))
        f.write(struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF,
                            0xFFFFFFFF, 0))
    return out


def tar_with_long_names(tree: Path, out: Path, copies: int, length: int = 256 << 10) -> Path:
    """tree as a .tar.gz under "t", then `copies` empty members beside the
    tree, each a GNU long name of `length` bytes (under the header cap) that
    are not UTF-8, and one emoji: tarfile decodes such a name with
    surrogateescape into a string of 4 bytes a character (1 MiB for
    256 KiB), and in stream mode it keeps every TarInfo, name and all. The
    copies are one gzip member written again and again (a gzip stream may
    be several), so building it costs nothing."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
        t.add(tree, arcname="t")
        members = buf.getvalue()    # before close() adds the end-of-archive blocks
    long = tarfile.TarInfo("\udcff" * length + "\U0001F600")
    one = gzip.compress(long.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape"), 1)
    with open(out, "wb") as f:
        f.write(gzip.compress(members, 1))
        for _ in range(copies):
            f.write(one)
        f.write(gzip.compress(b"\0" * tarfile.RECORDSIZE, 1))
    return out
