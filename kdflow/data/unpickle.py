"""The restricted unpickler: pickles read with only what CIFAR batches contain.

The official CIFAR archives hold pickled batches. Pickle can run arbitrary
code, and numpy's own array unpickling trusts the bytes it is given, so
batches are read with an unpickler in which numpy's names are stand-ins of
ours: they accept only what CIFAR batches contain (uint8 images, integer
labels) and build the arrays themselves. kdflow.data.cifar then checks
what came out against the dataset's layout.
"""

from __future__ import annotations

import io
import math
import pickle
import pickletools

import numpy as np

from kdflow import KdflowError

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


# The opcodes pickle (Python 2's and 3's, protocols 2 to 4) writes for a
# CIFAR batch or meta file: dicts, lists, tuples, small ints, strings, None,
# bools, numpy's globals and their calls, and the memo. APPEND and SETITEM
# are what a list or dict of one item gets (or a 1000-item chunk's
# remainder), LONG_BINGET a reference past 256 memo entries, LONG1 an int
# beyond 2**31 (never a real label, but then refused as one). Nothing else
# is read: no floats, sets, other object builders or extensions, and no
# 8-byte lengths (no CIFAR member is near 4 GB).
ALLOWED_OPCODES = frozenset({
    "PROTO", "FRAME", "STOP", "MARK",
    "EMPTY_DICT", "SETITEM", "SETITEMS", "EMPTY_LIST", "APPEND", "APPENDS",
    "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "NONE", "NEWTRUE", "NEWFALSE",
    "BININT", "BININT1", "BININT2", "LONG1",
    "SHORT_BINSTRING", "BINSTRING", "SHORT_BINBYTES", "BINBYTES",
    "SHORT_BINUNICODE", "BINUNICODE",
    "GLOBAL", "STACK_GLOBAL", "REDUCE", "BUILD",
    "BINPUT", "LONG_BINPUT", "MEMOIZE", "BINGET", "LONG_BINGET",
})
# The largest official member, CIFAR-100's train (50,000 images with two
# labels and a file name each), has about 200,000 opcodes; the cap bounds
# what the unpickler can build (each opcode makes at most one small object
# beyond the bytes it carries) to ~100 MB.
MAX_OPCODES = 1 << 20
_MEMO_INDEXED = {"BINPUT", "LONG_BINPUT", "BINGET", "LONG_BINGET"}
# Argument layouts, from pickletools' own table: a fixed size, a length
# prefix (its struct size and signedness), or text lines.
_PREFIX = {pickletools.TAKEN_FROM_ARGUMENT1: (1, False),
           pickletools.TAKEN_FROM_ARGUMENT4: (4, True),
           pickletools.TAKEN_FROM_ARGUMENT4U: (4, False)}
_NAMES = {op.code.encode("latin-1")[0]: op.name for op in pickletools.opcodes}
_LAYOUT = {op.code.encode("latin-1")[0]: (
    op.name, 0 if op.arg is None else op.arg.n,
    2 if op.arg is not None and op.arg.name == "stringnl_noescape_pair" else 1)
    for op in pickletools.opcodes if op.name in ALLOWED_OPCODES}


def _scan(payload: bytes, source: str) -> None:
    """Check a pickle's opcodes before anything is unpickled.

    CPython's unpickler believes what it reads: a memo index makes it grow its
    memo table to that size (LONG_BINPUT 2**26 in a 9-byte pickle: 1 GB) and
    a length prefix makes it allocate that many bytes before reading them.
    Here only the opcodes above pass, each length must fit in what is left
    of the member, memo indices stay below the opcode cap (a memo table of
    at most 16 MB), and the opcode count is capped. Nothing is built:
    arguments are skipped, not decoded. Truncation raises ValueError
    (reported by the caller as an unreadable batch).
    """
    pos, end = 0, len(payload)
    for _ in range(MAX_OPCODES):
        if pos >= end:
            raise ValueError("the pickle ends before its STOP opcode")
        code = payload[pos]
        layout = _LAYOUT.get(code)
        if layout is None:
            if code not in _NAMES:   # garbled rather than crafted
                raise ValueError(f"byte 0x{code:02x} at offset {pos:,} is no pickle opcode")
            raise _refuse(source, f"the pickle opcode {_NAMES[code]} (at offset {pos:,})")
        name, n, lines = layout
        pos += 1
        if n == pickletools.UP_TO_NEWLINE:
            for _ in range(lines):
                nl = payload.find(b"\n", pos)
                if nl < 0:
                    raise ValueError(f"{name} at offset {pos - 1:,} lacks its newline")
                pos = nl + 1
            continue
        if n in _PREFIX:
            size, signed = _PREFIX[n]
            n = int.from_bytes(payload[pos:pos + size], "little", signed=signed)
            pos += size
            if n < 0:
                raise ValueError(f"{name} at offset {pos - size - 1:,} has length {n}")
        if pos + n > end:
            raise ValueError(f"{name} at offset {pos - 1:,} needs {n:,} bytes, only "
                             f"{max(end - pos, 0):,} remain")
        if name in _MEMO_INDEXED:
            # Picklers number memo entries as they store them (from 0, or 1
            # in Python 2's cPickle), so no index reaches the opcode count.
            index = int.from_bytes(payload[pos:pos + n], "little")
            if index >= MAX_OPCODES:
                raise _refuse(source, f"memo index {index:,} ({name}), beyond what a pickle "
                                      f"of at most {MAX_OPCODES:,} opcodes can use")
        elif name == "FRAME":
            # The frame's opcodes follow and are scanned like any others.
            frame = int.from_bytes(payload[pos:pos + n], "little")
            if pos + n + frame > end:
                raise ValueError(f"a frame at offset {pos - 1:,} of {frame:,} bytes, only "
                                 f"{end - pos - n:,} remain")
        pos += n
        if name == "STOP":
            return
    raise _refuse(source, f"a pickle of more than {MAX_OPCODES:,} opcodes")


def brief(v, nested: bool = False) -> str:
    """A few words for an unpickled value in an error message.

    Never its repr: that is built whole before any slicing, and memo
    references let a few kilobytes of pickle stand for gigabytes of repr. A
    tuple shows its first level (a dtype or array state); containers
    otherwise show type and length only.
    """
    t = type(v)
    if v is None or t is bool:
        return repr(v)
    if t is int:
        return repr(v) if v.bit_length() <= 64 else f"an int of {v.bit_length():,} bits"
    if t in (str, bytes):
        return repr(v) if len(v) <= 32 else f"a {t.__name__} of length {len(v):,}"
    if t is tuple and not nested and len(v) <= 9:
        return "(" + ", ".join(brief(x, True) for x in v) + ("," if len(v) == 1 else "") + ")"
    if t in (tuple, list, dict):
        return f"a {t.__name__} of {len(v):,} items"
    if t is _PickledDtype:
        return f"a numpy dtype {brief(v.code)}"
    if t is _PickledArray:
        return "a numpy array"
    return describe(v)


def _ascii(v) -> str | None:
    if isinstance(v, bytes):
        try:
            return v.decode("ascii")
        except UnicodeDecodeError:
            return None
    return v if isinstance(v, str) else None


def is_int(v) -> bool:
    return type(v) is int   # not bool, not a numpy scalar


def _is_flag(v) -> bool:
    # Python 2 pickles write booleans as the ints 0 and 1.
    return type(v) is bool or (is_int(v) and v in (0, 1))


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
            raise _refuse(source, f"a numpy dtype {brief(code)}")

    def __setstate__(self, state) -> None:
        # (version, byte order, subarray, names, fields, elsize, alignment,
        # flags[, metadata]): what numpy writes for a plain integer type.
        # Version 4 adds metadata, which must be empty.
        orders = {"|", "<"} if self.code[1] == "1" else {"<"}
        ok = (isinstance(state, tuple) and len(state) in (8, 9) and not self.built
              and (state[0], len(state)) in ((3, 8), (4, 9)) and is_int(state[0])
              and _ascii(state[1]) in orders   # Python 2 pickles: b"|"
              and all(v is None for v in state[2:5])
              and all(is_int(v) for v in state[5:8]) and state[5:8] == (-1, -1, 0)
              and (len(state) == 8 or state[8] is None or state[8] == {}))
        if not ok:
            raise _refuse(self.source, f"numpy dtype state {brief(state)}")
        self.built = True

    def numpy(self) -> np.dtype:
        return np.dtype("<" + self.code)


class _PickledArray:
    """Stands in for a numpy.ndarray while unpickling; holds the real array
    once the pickle has given its state.

    numpy's own _reconstruct allocates any shape asked for with no data
    behind it (a 200-byte pickle becomes 700,000 images of whatever memory
    held), so here nothing exists until the state arrives, and the state's
    bytes must be exactly the shape's size. Memo references let many
    states share one run of bytes (each array a full copy of it), so all the
    arrays of a pickle together may hold no more bytes than the pickle does:
    `budget` is what is left of that.
    """

    __slots__ = ("source", "array", "budget")

    def __init__(self, source: str, budget: _Budget):
        self.source, self.array, self.budget = source, None, budget

    def __setstate__(self, state) -> None:
        if self.array is not None:
            raise _refuse(self.source, "an array given its contents twice")
        if not (isinstance(state, tuple) and len(state) == 5):
            raise _refuse(self.source, f"numpy array state {brief(state)}")
        version, shape, dtype, fortran, raw = state
        if not (is_int(version) and version == 1 and isinstance(shape, tuple)
                and 1 <= len(shape) <= 4 and all(is_int(s) and s >= 0 for s in shape)
                and isinstance(dtype, _PickledDtype) and _is_flag(fortran)
                and isinstance(raw, bytes)):
            raise _refuse(self.source, f"numpy array state {brief(state)}")
        dt = dtype.numpy()
        need = math.prod(shape) * dt.itemsize
        if len(raw) != need:
            raise _refuse(self.source, f"an array of shape {brief(shape)} "
                                       f"({brief(need)} bytes) stored in {len(raw):,} bytes")
        if need > self.budget.left:
            raise _refuse(self.source, "arrays holding more bytes than the pickle itself "
                                       "(one array's bytes referred to again)")
        self.budget.left -= need
        self.array = np.frombuffer(raw, dt).reshape(
            shape, order="F" if fortran else "C").copy()


class _Budget:
    """Bytes the array stand-ins of one pickle may still take."""

    __slots__ = ("left",)

    def __init__(self, left: int):
        self.left = left


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
        start = file.tell()
        budget = _Budget(file.seek(0, io.SEEK_END) - start)
        file.seek(start)

        def refuse_ndarray(*args):
            raise _refuse(source, "numpy.ndarray called directly")

        def reconstruct(subtype, shape=None, code=None):
            # numpy writes _reconstruct(ndarray, (0,), b'b'), then the state.
            if subtype is not ndarray:
                raise _refuse(source, "_reconstruct of something other than ndarray")
            arr = _PickledArray(source, budget)
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
        # Names as long as the member would make a message of megabytes.
        module, name = (v if len(v) <= 80 else v[:80] + "..." for v in (module, name))
        raise UnsafePickleError(
            f"refusing to unpickle {module}.{name} in {self.source}: CIFAR batches "
            "hold only numpy arrays, lists, ints and strings, so this archive is not "
            "a genuine CIFAR python archive. Check data.url and data.md5"
        )

    def persistent_load(self, pid):
        raise UnsafePickleError(f"refusing persistent id in {self.source}")

    def finish(self, obj):
        """`obj` with each array stand-in replaced by its array.

        Only the few levels a CIFAR batch has are searched ({key: array or
        list}); a stand-in deeper down stays an inert object nobody reads.
        """
        return _finish(obj, 3, {})


def _finish(obj, depth: int, done: dict):
    # Each container is rebuilt once per depth, however often the pickle
    # refers to it: memo references let a few bytes name one list thousands
    # of times, and a copy per reference grows with the cube of the nesting
    # (a 2.4 kB pickle: 218 MB). So the work is bounded by the elements the
    # pickle holds, itself bounded by its opcodes. A module function, not a
    # closure: a closure referring to itself would be a reference cycle
    # holding the arrays until the garbage collector ran.
    if isinstance(obj, _PickledArray):
        return obj.array
    if depth == 0 or not isinstance(obj, (dict, list, tuple)):
        return obj
    key = (id(obj), depth)   # `obj` lives as long as `done`: ids stay unique
    if key not in done:
        if isinstance(obj, dict):
            done[key] = {k: _finish(v, depth - 1, done) for k, v in obj.items()}
        else:
            done[key] = type(obj)(_finish(v, depth - 1, done) for v in obj)
    return done[key]


def safe_unpickle(payload: bytes, source: str = "pickle"):
    try:
        _scan(payload, source)
        unpickler = RestrictedUnpickler(io.BytesIO(payload), source)
        obj = unpickler.load()
    except KdflowError:
        raise
    except Exception as e:  # truncated or garbled bytes, absurd sizes
        # Clipped: no unpickling error quotes the data, but none should fill a screen.
        raise KdflowError(f"{source} is not a readable CIFAR batch ({type(e).__name__}: "
                          f"{str(e)[:200]}); the archive is damaged or not a CIFAR python "
                          "archive: fetch it again, and check data.url and data.md5") from None
    if any(a.array is None for a in unpickler.arrays):
        raise _refuse(source, "a numpy array with a shape but no data")
    return unpickler.finish(obj)


def describe(v) -> str:
    """A value's type in an error message (an array's dtype and shape too)."""
    if isinstance(v, np.ndarray):
        return f"a {v.dtype} array of shape {v.shape}"
    return f"a {type(v).__name__}"
