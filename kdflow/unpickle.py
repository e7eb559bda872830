"""The restricted unpickler and CIFAR batch parsing.

The official CIFAR archives hold pickled batches. Pickle can run arbitrary
code, and numpy's own array unpickling trusts the bytes it is given, so
batches are read with an unpickler in which numpy's names are stand-ins of
ours: they accept only what CIFAR batches contain (uint8 images, integer
labels) and build the arrays themselves. `parse_batch` and `class_names`
then check what came out against the dataset's layout.
"""

from __future__ import annotations

import io
import math
import pickle

import numpy as np

from kdflow import KdflowError
from kdflow.data import IMAGE_SIZE

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
    side = IMAGE_SIZE  # CIFAR's own layout: 32x32 RGB planes, 3072 bytes a row
    batch = safe_unpickle(payload, source)
    if not isinstance(batch, dict):
        raise KdflowError(f"{source} is not a CIFAR batch (a {type(batch).__name__})")
    data = _key(batch, "data", source)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3 * side * side:
        raise KdflowError(f"{source}: 'data' must be a uint8 array of shape (N, 3072), "
                          f"got {_describe(data)}")
    labels = _labels(_key(batch, label_key, source), data.shape[0], classes, source)
    return data.reshape(-1, 3, side, side), labels


def class_names(payload: bytes, source: str, names_key: str, count: int) -> list[str]:
    """The `count` class names listed under `names_key` in a CIFAR meta file."""
    meta = safe_unpickle(payload, source)
    if not isinstance(meta, dict):
        raise KdflowError(f"{source} is not a CIFAR meta file (a {type(meta).__name__})")
    names = _key(meta, names_key, source)
    if not (isinstance(names, list) and len(names) == count
            and all(isinstance(n, (bytes, str)) for n in names)):
        raise KdflowError(f"{source}: {names_key!r} must list the {count} "
                          f"class names, got {_describe(names)} of length "
                          f"{len(names) if isinstance(names, list) else '-'}")
    return [_text(n) for n in names]
