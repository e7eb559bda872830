"""Hostile and damaged archives: crafted pickles, odd members, broken gzip.

The crafted pickles are written opcode by opcode (tests.helpers.hostile'
assembler), not with numpy's pickler, so they stay the same whatever numpy
does to its own pickles.
"""

from __future__ import annotations

import dataclasses
import gc
import gzip
import hashlib
import io
import os
import pickle
import pickletools
import re
import struct
import subprocess
import sys
import tarfile
import weakref
from pathlib import Path

import numpy as np
import pytest

from kdflow import KdflowError
from kdflow.data.datasets import DATASETS, convert
from kdflow.data.cifar import parse_batch
from kdflow.data.unpickle import ALLOWED_OPCODES, RestrictedUnpickler, UnsafePickleError, safe_unpickle
from tests.helpers.hostile import (BUILD, DTYPE, EMPTY_DICT, FALSE, MARK, NDARRAY, NONE,
                                   RECONSTRUCT, REDUCE, SETITEMS, TRUE, array, batch, by, dct,
                                   dtype, get, glob, images, integer, labels, lst, pickled,
                                   plain_dtype, put, py2str, shared_lists, text, tup)
from tests.helpers.childmem import run_capped
from tests.conftest import CLASSES, REPO, build_archive


# --------------------------------------------------------------------------
# The two payloads of the issue
# --------------------------------------------------------------------------

def void_object_payload(n: int = 2) -> bytes:
    """Labels whose dtype is a void with an object field, flags set to 0.

    With numpy's own unpickling the 8 bytes per label ('AAAAAAAA') become
    object pointers; converting the labels to int64 dereferences them.
    """
    obj = dtype("O8", tup(integer(3), text("|"), NONE, NONE, NONE,
                          integer(-1), integer(-1), integer(63)))
    fields = EMPTY_DICT + MARK + text("f0") + tup(obj, integer(0)) + SETITEMS
    void = dtype("V8", tup(integer(3), text("|"), NONE, tup(text("f0")), fields,
                           integer(8), integer(1), integer(0)))
    return batch(images(n), array((n,), void, b"A" * 8 * n))


def no_data_payload(n: int = 700_000) -> bytes:
    """_reconstruct asked for n images and n labels, and never given data."""
    data = RECONSTRUCT + tup(NDARRAY, tup(integer(n), integer(3072)), by(b"B")) + REDUCE
    lab = RECONSTRUCT + tup(NDARRAY, tup(integer(n)), by(b"<i8")) + REDUCE
    return batch(data, lab)


# --------------------------------------------------------------------------
# The assembler writes what numpy reads, and genuine batches pass
# --------------------------------------------------------------------------

def test_the_assembler_writes_genuine_numpy_pickles():
    # Without this, a hostile payload could be refused merely for being garbled.
    payload = batch(images(2, fill=9), labels(3, 4))
    plain = pickle.loads(payload)
    assert plain[b"data"].dtype == np.uint8 and plain[b"data"].shape == (2, 3072)
    x, y = parse_batch(payload, "data_batch_1")
    assert x.shape == (2, 3, 32, 32) and (x == 9).all() and y.tolist() == [3, 4]
    assert x.flags.writeable   # a copy, not a read-only view of the pickle's bytes


def batch_as_python2_wrote_it() -> bytes:
    # Protocol 2, str as BINSTRING, dtype('u1', 0, 1) with ints for flags:
    # the form of the published CIFAR batches.
    u1 = dtype("u1", tup(integer(3), py2str(b"|"), NONE, NONE, NONE,
                         integer(-1), integer(-1), integer(0)),
               args=integer(0) + integer(1))
    data = RECONSTRUCT + tup(NDARRAY, tup(integer(0)), py2str(b"b")) + REDUCE + tup(
        integer(1), tup(integer(2), integer(3072)), u1, FALSE,
        py2str(bytes(range(256)) * 24)) + BUILD
    return pickled(dct({b"data": data, b"labels": labels(0, 9),
                        b"batch_label": py2str(b"training batch 1 of 5")}, key=py2str),
                   proto=2)


def test_a_batch_as_python2_wrote_it_is_read():
    x, y = parse_batch(batch_as_python2_wrote_it(), "data_batch_1")
    assert x.reshape(2, -1)[0, :256].tolist() == list(range(256)) and y.tolist() == [0, 9]


def test_integer_label_arrays_are_read():
    lab = array((3,), plain_dtype("i8", "<"), np.array([1, 0, 9], "<i8").tobytes())
    _, y = parse_batch(batch(images(3), lab), "test_batch")
    assert y.dtype == np.int64 and y.tolist() == [1, 0, 9]


# --------------------------------------------------------------------------
# The two payloads of the issue
# --------------------------------------------------------------------------

# Converts an archive in a child, with numpy's own array unpickling replaced
# by a trap: a crash there kills the child, not pytest, and any use of
# numpy's _reconstruct (what pickle.loads would call) shows.
NUMPY_TRAPPED = r'''
import sys
import numpy._core.multiarray as multiarray

def trap(*args):
    print("numpy's own _reconstruct was called"); sys.exit(5)

multiarray._reconstruct = trap
from kdflow import KdflowError
from kdflow.data.datasets import convert
try:
    convert(sys.argv[1], sys.argv[2])
except KdflowError as e:
    print(type(e).__name__, e); sys.exit(0)
print("converted"); sys.exit(4)
'''


def test_void_dtype_with_object_field_is_refused_before_numpy_sees_it(tmp_path):
    """Payload (a) is an attack on numpy's own unpickling, as an older reader
    used it: there its labels become object pointers, and a numpy that does
    not check them dies of a signal converting them (one that checks
    refuses them). Whatever numpy does, kdflow's reader refuses the batch
    itself with its one-line error: numpy never unpickles it, and the
    process lives on."""
    archive = tmp_path / "cifar-10-python.tar.gz"
    build_archive(archive, n_train=50, n_test=20, members={"data_batch_2": void_object_payload()})
    out = tmp_path / "out.npz"
    proc = subprocess.run([sys.executable, "-c", NUMPY_TRAPPED, str(archive), str(out)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr[-1500:])
    message = proc.stdout.strip()
    assert re.fullmatch(r"UnsafePickleError refusing a numpy dtype '(V8|O8)' in "
                        r"cifar-10-batches-py/data_batch_2: CIFAR batches hold only .*"
                        r"Check data.url and data.md5 and fetch it again", message), message
    assert not out.exists() and not out.with_name(out.name + ".part").exists()


def test_void_dtype_with_object_field_is_refused(tmp_path):
    payload = void_object_payload()
    assert len(payload) < 7000
    with pytest.raises(UnsafePickleError, match="refusing a numpy dtype '(V8|O8)' in data_batch_2"):
        parse_batch(payload, "data_batch_2")
    # Inside an archive: refused, and nothing written.
    archive = tmp_path / "cifar-10-python.tar.gz"
    build_archive(archive, n_train=50, n_test=20, members={"data_batch_2": payload})
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UnsafePickleError, match="cifar-10-batches-py/data_batch_2"):
        convert(archive, out / "cifar10.npz")
    assert os.listdir(out) == []


def test_a_shape_without_data_is_refused():
    payload = no_data_payload()
    assert len(payload) < 250   # 700,000 images claimed in a few hundred bytes
    with pytest.raises(UnsafePickleError, match="shape but no data"):
        parse_batch(payload, "data_batch_1")
    # Given state, the bytes must match the shape exactly.
    short = batch(array((700_000, 3072), plain_dtype("u1"), b""), labels())
    with pytest.raises(UnsafePickleError, match=r"shape \(700000, 3072\).* in 0 bytes"):
        parse_batch(short, "data_batch_1")


# --------------------------------------------------------------------------
# Other things a pickle may try
# --------------------------------------------------------------------------

OBJECT_STATE = tup(integer(3), text("|"), NONE, NONE, NONE, integer(-1), integer(-1),
                   integer(63))


@pytest.mark.parametrize("payload, error", [
    (batch(images(1), array((1,), dtype("O8", OBJECT_STATE), b"\0" * 8)), "dtype 'O8'"),
    (batch(images(1), array((1,), plain_dtype("f8", "<"), b"\0" * 8)), "dtype 'f8'"),
    (batch(images(1), array((1,), plain_dtype("b1"), b"\1")), "dtype 'b1'"),
    (batch(images(1), array((1,), plain_dtype("i8", ">"), b"\0" * 8)), "dtype state"),
    (batch(images(1), array((1,), dtype("i8", tup(
        integer(3), text("<"), NONE, NONE, NONE, integer(-1), integer(-1), integer(63))),
        b"\0" * 8)), "dtype state"),
    # numpy.ndarray called directly: a shape with uninitialised memory.
    (batch(NDARRAY + tup(tup(integer(700_000), integer(3072)), by(b"B")) + REDUCE,
           labels()), "ndarray called directly"),
    # BUILD on the global itself, to change it for later pickles.
    (pickled(DTYPE + dct({b"x": NONE}) + BUILD), "setting the state of numpy.dtype"),
    (pickled(RECONSTRUCT + tup(DTYPE, tup(integer(0)), by(b"b")) + REDUCE),
     "_reconstruct of something other than ndarray"),
    (pickled(glob("builtins", "eval") + tup(text("1")) + REDUCE), "builtins.eval"),
    (pickled(glob("numpy", "frombuffer") + tup(by(b"x")) + REDUCE), "numpy.frombuffer"),
    # Opcodes no CIFAR batch has, refused before anything is unpickled.
    (batch(images(1), lst(b"G" + struct.pack(">d", 1.0))), "pickle opcode BINFLOAT"),
    (pickled(NONE + b"2"), "pickle opcode DUP"),
    (pickled(b"\x82\x01"), "pickle opcode EXT1"),
])
def test_crafted_pickles_are_refused(payload, error):
    with pytest.raises(UnsafePickleError, match=error):
        parse_batch(payload, "data_batch_1")


@pytest.mark.parametrize("payload, error", [
    (batch(images(2), labels(1)), "1 labels for 2 images"),
    (batch(images(2), labels(1, 10)), r"labels outside 0\.\.9"),
    (batch(images(2), labels(-1, 0)), r"labels outside 0\.\.9"),
    (batch(images(1), labels(2**70)), r"labels outside 0\.\.9"),
    (batch(images(2), lst(TRUE, FALSE)), "labels must be integers, found True"),
    (batch(images(1), lst(by(b"1"))), r"found b'1' \(a bytes\)"),
    (batch(images(1), by(b"\x01")), "labels must be a list"),
    (batch(array((1, 3071), plain_dtype("u1"), b"\0" * 3071), labels(0)),
     r"shape \(N, 3072\), got a uint8 array of shape \(1, 3071\)"),
    (batch(array((1, 3072), plain_dtype("i2", "<"), b"\0" * 6144), labels(0)),
     "must be a uint8 array"),
    (batch(labels(0), labels(0)), "must be a uint8 array.*got a list"),
    (pickled(labels(1, 2)), "not a CIFAR batch"),
    (pickled(dct({b"labels": labels(0)})), "lacks the 'data' entry"),
])
def test_batches_are_checked_against_the_spec(payload, error):
    with pytest.raises(KdflowError, match=error):
        parse_batch(payload, "data_batch_1")


def test_a_pickle_cannot_change_the_stand_ins_for_later_pickles():
    # BUILD with a slot state on a stand-in: refused, and the next genuine
    # batch reads as before.
    attempt = pickled(DTYPE + tup(NONE, dct({b"call": NONE})) + BUILD)
    with pytest.raises(UnsafePickleError):
        safe_unpickle(attempt, "batches.meta")
    x, _ = parse_batch(batch(images(1), labels(0)), "data_batch_1")
    assert x.shape == (1, 3, 32, 32)


def test_the_unpickler_is_freed_without_the_garbage_collector():
    # Its memo holds the batch's raw bytes (31 MB per CIFAR-10 batch): a
    # reference cycle would keep every batch's bytes until a collection.
    gc.disable()
    try:
        unpickler = RestrictedUnpickler(io.BytesIO(batch(images(1), labels(0))), "data_batch_1")
        unpickler.load()
        ref = weakref.ref(unpickler)
        del unpickler
        assert ref() is None
    finally:
        gc.enable()


# --------------------------------------------------------------------------
# Pickles that exhaust memory: parsed in a child whose address space is
# capped, so a regression fails (MemoryError, or growth seen in VmHWM)
# instead of swapping the machine
# --------------------------------------------------------------------------

CAP = 512 << 20          # address space the child may add for one member
MAX_GROWTH = 64 << 20    # resident memory parsing one refused member may add

CAPPED_PARSE = r'''
payload = open(ARGS[0], "rb").read()
before = status("VmHWM")
try:
    parse_batch(payload, "cifar-10-batches-py/data_batch_1")
    error = None
except BaseException as e:  # MemoryError included: the failure looked for
    error = [type(e).__name__, str(e)[:2000]]
report(error=error, growth=status("VmHWM") - before)
'''


def refused_within_the_cap(payload: bytes, tmp_path: Path, error: str) -> None:
    member = tmp_path / "data_batch_1"
    member.write_bytes(payload)
    result = run_capped("from kdflow.data.cifar import parse_batch\n", CAPPED_PARSE, member,
                        cwd=tmp_path, margin=CAP)
    assert result["error"] is not None, "accepted"
    kind, message = result["error"]
    assert kind in ("KdflowError", "UnsafePickleError"), (kind, message[:500])
    assert re.search(error, message), message[:500]
    assert "cifar-10-batches-py/data_batch_1" in message, message[:500]
    assert "\n" not in message and len(message) < 500, message[:500]
    assert result["growth"] < MAX_GROWTH, f"{result['growth'] / 2**20:.0f} MiB to refuse it"


@pytest.mark.parametrize("payload, error", [
    # 9 bytes: CPython's unpickler would grow its memo table to 2**27
    # entries (1 GB) for index 2**26, to 64 GB for 2**32 - 1.
    (pickled(NONE + put(1 << 26), proto=2), r"memo index 67,108,864 \(LONG_BINPUT\)"),
    (pickled(NONE + put(2**32 - 1), proto=2), r"memo index 4,294,967,295 \(LONG_BINPUT\)"),
    (pickled(get(1 << 30)), r"memo index 1,073,741,824 \(LONG_BINGET\)"),
    # A length the member does not hold: the unpickler allocates it first.
    (pickled(b"B" + struct.pack("<I", 2**32 - 1) + b"abc"),
     r"not a readable CIFAR batch \(ValueError: BINBYTES .* needs 4,294,967,295 bytes, only 4"),
    # Opcodes past the cap: each would be one more object.
    (pickled(EMPTY_DICT * 1_100_000), "more than 1,048,576 opcodes"),
])
def test_memo_indices_lengths_and_counts_are_checked_before_unpickling(payload, error, tmp_path):
    refused_within_the_cap(payload, tmp_path, error)


REPR_BOMB = shared_lists(120, 4)    # 2 kB whose repr would be 1.2 GB


@pytest.mark.parametrize("payload, error", [
    (batch(images(1), array((1,), dtype("u1", tup(integer(3), text("|"), REPR_BOMB, NONE, NONE,
                                                  integer(-1), integer(-1), integer(0))),
                            b"\0")),
     r"numpy dtype state \(3, '\|', a list of 120 items, None, None, -1, -1, 0\) in"),
    (batch(images(1), RECONSTRUCT + tup(NDARRAY, tup(integer(0)), by(b"b")) + REDUCE
           + tup(integer(1), REPR_BOMB, plain_dtype("u1"), FALSE, by(b"\0")) + BUILD),
     r"numpy array state \(1, a list of 120 items, a numpy dtype 'u1', False, b'\\x00'\)"),
    (batch(images(1), lst(REPR_BOMB)), r"labels must be integers, found a list of 120 items"),
    (batch(images(1), array((1,), DTYPE + tup(REPR_BOMB, FALSE, TRUE) + REDUCE, b"\0")),
     r"refusing a numpy dtype a list of 120 items"),
])
def test_error_messages_describe_values_without_their_repr(payload, error, tmp_path):
    assert len(payload) < 12_000
    refused_within_the_cap(payload, tmp_path, error)


def test_shared_lists_are_rebuilt_once(tmp_path):
    # {0: L, 1: L, ... 449: L}, L 450 references to one list of 450 Nones:
    # 7 kB, which rebuilt per reference would be 91 million slots (730 MB).
    k = 450
    body = EMPTY_DICT + MARK + integer(0) + shared_lists(k, 2) + put(k)
    body += b"".join(integer(i) + get(k) for i in range(1, k)) + SETITEMS
    payload = pickled(body)
    assert len(payload) < 8_000
    refused_within_the_cap(payload, tmp_path, "lacks the 'data' entry")
    # What the pickle shares stays shared: one rebuilt list, not 450.
    out = safe_unpickle(payload)
    assert len(out) == k and len({id(v) for v in out.values()}) == 1


def test_arrays_cannot_share_one_run_of_bytes(tmp_path):
    # 600 arrays whose states all name the same 1 MB of bytes (memo
    # references): as many copies, 640 MB, from a 1 MB pickle.
    n = 350
    shape = tup(integer(n), integer(3072))
    first = RECONSTRUCT + tup(NDARRAY, tup(integer(0)), by(b"b")) + REDUCE + tup(
        integer(1), shape, plain_dtype("u1") + put(0), FALSE, by(bytes(n * 3072)) + put(1)) + BUILD
    again = RECONSTRUCT + tup(NDARRAY, tup(integer(0)), by(b"b")) + REDUCE + tup(
        integer(1), shape, get(0), FALSE, get(1)) + BUILD
    payload = pickled(dct({b"data": first, b"labels": labels(*[0] * n),
                           b"filenames": lst(*[again] * 600)}))
    assert len(payload) < (n * 3072) * 1.1
    refused_within_the_cap(payload, tmp_path, "arrays holding more bytes than the pickle itself")


def test_the_opcode_scan_allows_what_genuine_pickles_use(tmp_path):
    """The allowed opcodes are exactly those pickle writes for CIFAR's files
    (protocols 3 and 4 here, Python 2's in the assembled batch), and each
    such file passes."""
    build_archive(tmp_path / "a.tar.gz", n_train=50, n_test=20)
    genuine = [d for _, d in members_of(tmp_path / "a.tar.gz")]
    genuine += [pickle.dumps(pickle.loads(d, encoding="bytes"), protocol=3) for d in genuine]
    python2 = batch_as_python2_wrote_it()
    for payload in genuine + [python2]:
        safe_unpickle(payload, "data_batch_1")
    edges = [pickle.dumps({b"labels": [1]}, protocol=3),        # SETITEM, APPEND
             pickle.dumps([i.to_bytes(2, "little") for i in range(300)] * 2,
                          protocol=3),                            # LONG_BINGET
             pickle.dumps([2**70], protocol=3),                  # LONG1
             pickled(b"U\x06labels", proto=2)]                   # Python 2's short str
    used = {op.name for p in genuine + [python2] + edges for op, _, _ in pickletools.genops(p)}
    assert used == ALLOWED_OPCODES


# --------------------------------------------------------------------------
# Archive members
# --------------------------------------------------------------------------

def members_of(archive: Path) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    with tarfile.open(archive, "r:gz") as tar:
        return [(m, tar.extractfile(m).read() if m.isfile() else None)
                for m in tar.getmembers()]


def write_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> str:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return hashlib.md5(path.read_bytes()).hexdigest()


def convert_fails(archive: Path, tmp_path: Path, error: str, **kw) -> None:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    with pytest.raises(KdflowError, match=error):
        convert(archive, out / "cifar10.npz", **kw)
    assert os.listdir(out) == []     # no .npz, no .part


@pytest.fixture
def small(tmp_path) -> Path:
    archive = tmp_path / "small.tar.gz"
    build_archive(archive, n_train=50, n_test=20)
    return archive


def test_a_link_in_place_of_a_batch_is_refused(small, tmp_path):
    members = [(m, d) for m, d in members_of(small) if not m.name.endswith("data_batch_1")]
    link = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
    link.type, link.linkname = tarfile.SYMTYPE, "cifar-10-batches-py/data_batch_2"
    write_tar(tmp_path / "link.tar.gz", members + [(link, None)])
    convert_fails(tmp_path / "link.tar.gz", tmp_path, "data_batch_1 is not a regular file")


def test_a_duplicated_batch_is_refused(small, tmp_path):
    members = members_of(small)
    write_tar(tmp_path / "dup.tar.gz", members + [members[1]])
    convert_fails(tmp_path / "dup.tar.gz", tmp_path, f"holds {members[1][0].name} twice")


def test_member_size_is_capped_before_reading(small, tmp_path, monkeypatch):
    monkeypatch.setitem(DATASETS, "cifar10",
                        dataclasses.replace(DATASETS["cifar10"], layout=dataclasses.replace(
                            DATASETS["cifar10"].layout, max_member=20_000)))
    convert_fails(small, tmp_path, r"data_batch_1 is [\d,]+ bytes, more than the 20,000")


def test_a_huge_tar_header_is_refused_before_it_is_read_whole(small, tmp_path):
    # tarfile reads a pax header or a GNU long name whole, into memory, before
    # any check on the member: the bytes between members are capped, as for
    # an image tree (kdflow.data.archives), at the slack honest headers need.
    pax = tarfile.TarInfo("cifar-10-batches-py/readme.html")
    pax.pax_headers, pax.size = {"comment": "x" * (2 << 20)}, 3
    gnu = tarfile.TarInfo("cifar-10-batches-py/" + "n" * (2 << 20))
    gnu.size = 3
    for fmt, info in ((tarfile.PAX_FORMAT, pax), (tarfile.GNU_FORMAT, gnu)):
        archive = tmp_path / "header.tar.gz"
        with tarfile.open(archive, "w:gz", format=fmt) as tar:
            tar.addfile(info, io.BytesIO(b"abc"))
            for member, data in members_of(small):
                tar.addfile(member, io.BytesIO(data) if data is not None else None)
        convert_fails(archive, tmp_path, r"header.tar.gz: more than 1,048,576 bytes of "
                                         r"headers between two members")


def test_more_images_than_the_official_set_are_refused(small, tmp_path, monkeypatch):
    # The 20 test images stand for a test set above the official 10,000.
    monkeypatch.setitem(DATASETS, "cifar10",
                        dataclasses.replace(DATASETS["cifar10"], layout=dataclasses.replace(
                            DATASETS["cifar10"].layout, test_size=19)))
    convert_fails(small, tmp_path, "20 test images, but cifar10 has at most 19")


def test_meta_must_name_the_classes(tmp_path):
    archive = tmp_path / "meta.tar.gz"
    build_archive(archive, n_train=50, n_test=20, members={"batches.meta": pickle.dumps(
        {b"label_names": [c.encode() for c in CLASSES[:9]]}, protocol=4)})
    convert_fails(archive, tmp_path, "must list the 10 class names.*length 9")


# --------------------------------------------------------------------------
# Damaged archives
# --------------------------------------------------------------------------

def damaged(small: Path, how: str) -> bytes:
    raw = small.read_bytes()
    if how == "truncated":
        return raw[: len(raw) * 3 // 5]
    if how == "no trailer":            # the CRC and size the gzip ends with
        return raw[:-8]
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 0x10
    return bytes(flipped)


def test_tarfile_alone_accepts_an_archive_without_its_gzip_trailer(small, tmp_path):
    # Why the whole gzip stream is read: without it this archive would pass.
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(damaged(small, "no trailer"))
    assert len(members_of(bad)) == len(members_of(small))


@pytest.mark.parametrize("how, reason", [
    ("truncated", "EOFError: Compressed file ended"),
    ("no trailer", "EOFError: Compressed file ended"),
    ("flipped byte", "BadGzipFile: CRC check failed|zlib.error|error: Error -3"),
])
def test_damaged_archives_are_a_clear_error(small, tmp_path, how, reason):
    bad = tmp_path / "cifar-10-python.tar.gz"
    bad.write_bytes(damaged(small, how))
    md5 = hashlib.md5(bad.read_bytes()).hexdigest()  # past the md5 check: gzip must tell
    convert_fails(bad, tmp_path, f"archive truncated or corrupt: ({reason}).*fetch it again",
                  md5=md5)


def test_not_gzip_at_all_is_a_clear_error(tmp_path):
    bad = tmp_path / "cifar-10-python.tar.gz"
    bad.write_bytes(b"<html>404 not found</html>")
    convert_fails(bad, tmp_path, "archive truncated or corrupt: BadGzipFile")


def test_gzip_bomb_is_cut_off(tmp_path, monkeypatch):
    monkeypatch.setattr("kdflow.data.cifar.MAX_UNPACKED", 1 << 20)
    bomb = tmp_path / "cifar-10-python.tar.gz"
    bomb.write_bytes(gzip.compress(bytes(8 << 20)))   # 8 MB of zeros
    convert_fails(bomb, tmp_path, "unpacks to more than 1,048,576 bytes")


def test_convert_rechecks_the_md5(small, tmp_path):
    convert_fails(small, tmp_path, r"has md5 [0-9a-f]{32}, not data.md5 0{32}.*Delete it",
                  md5="0" * 32)
    md5 = hashlib.md5(small.read_bytes()).hexdigest()
    info = convert(small, tmp_path / "out" / "cifar10.npz", md5=md5.upper())
    assert info["train"] == 50 and os.listdir(tmp_path / "out") == ["cifar10.npz"]


def test_convert_rule_passes_data_md5():
    # The workflow is what makes the re-check happen.
    rule = (REPO / "rules" / "data.smk").read_text().split("rule convert:")[1].split("rule ")[0]
    assert "md5=config[\"data\"].get(\"md5\")" in rule   # absent only for a folder directory
    assert "md5=snakemake.params.md5" in (REPO / "scripts" / "convert.py").read_text()
