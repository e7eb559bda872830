"""Fuzzing the archive reader: hundreds of damaged variants of a small archive.

Each variant must either convert to valid arrays or raise KdflowError:
never another exception, never a crash, never much memory. The variants are
converted in one child process, so a segfault shows as a signal instead of
killing pytest, and the child's memory can be capped and measured. Besides
random damage, some variants hold a crafted pickle of a kind that exhausted
memory before (huge memo indices and lengths, floods of opcodes, values
whose repr explodes, shared lists, shared array bytes): each of those must
be refused with its own clear one-line error.
"""

from __future__ import annotations

from tests.helpers.childmem import MAX_PEAK, run_capped
from tests.conftest import build_archive

VARIANTS = 320
SEED = 20240611
MAX_RSS = MAX_PEAK      # bytes, the whole child (imports included)
MAX_GROWTH = 256 << 20  # bytes above what the imports took

CHILD_IMPORTS = r'''
import gzip, hashlib, io, os, random, re, struct, tarfile, traceback
from pathlib import Path

import numpy as np
from kdflow import KdflowError
from kdflow.data.datasets import convert as convert_archive
from kdflow.data.unpickle import MAX_OPCODES
from tests.helpers.hostile import (BUILD, DTYPE, FALSE, NONE, REDUCE, TRUE, array, by, dct,
                                   dtype, get, integer, lst, new_array, pickled, plain_dtype,
                                   put, shared_lists, text, tup)
'''

# Run under tests.helpers.childmem's cap: 512 MiB of address space above what the
# imports took, so a parser that believed a size field fails (MemoryError)
# rather than swaps. (The base archive comes from the parent: tests.conftest
# imports torch, which alone would take that much.)
CHILD = r'''
work, n_variants, seed = Path(ARGS[0]), int(ARGS[1]), int(ARGS[2])

# Peak resident memory so far: the imports (torch is most of it).
result = {"n": 0, "ok": 0, "refused": 0, "other": [], "invalid": [], "leftover": [],
          "hostile": [], "imports_rss": peak_rss()}
base = work / "base.tar.gz"
raw = base.read_bytes()
with tarfile.open(base, "r:gz") as t:
    members = [(m.name, t.extractfile(m).read()) for m in t.getmembers()]
plain_tar = gzip.decompress(raw)
rng = random.Random(seed)


def pack(ms):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name, data in ms:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return gzip.compress(buf.getvalue(), compresslevel=1)


def flip(data, lo=0, hi=None):
    data = bytearray(data)
    hi = len(data) if hi is None else min(hi, len(data))
    for _ in range(rng.randint(1, 4)):
        data[rng.randrange(lo, hi)] ^= rng.randrange(1, 256)
    return bytes(data)


def pick():
    return rng.randrange(len(members))


def with_member(i, data):
    return [(n, data if j == i else d) for j, (n, d) in enumerate(members)]


def v_flip_anywhere():
    i = pick(); return pack(with_member(i, flip(members[i][1])))
def v_flip_structure():
    # The first and last bytes of a batch hold its structure (opcodes, the
    # dtype, the labels); the middle is mostly pixels.
    i = pick(); d = members[i][1]
    lo, hi = (0, 400) if rng.random() < 0.5 else (max(0, len(d) - 600), len(d))
    return pack(with_member(i, flip(d, lo, hi)))
def v_truncate_pickle():
    i = pick(); d = members[i][1]; return pack(with_member(i, d[:rng.randrange(len(d))]))
def v_drop():
    i = pick(); return pack([m for j, m in enumerate(members) if j != i])
def v_duplicate():
    i = pick(); ms = list(members); ms.insert(rng.randrange(len(ms) + 1), members[i]); return pack(ms)
def v_rename():
    i = pick(); name = members[i][0]
    new = rng.choice([members[pick()][0], name + "x", name.upper(), "../" + name,
                      name.replace("cifar-10-batches-py", "cifar-100-python"), "readme.html"])
    return pack([(new if j == i else n, d) for j, (n, d) in enumerate(members)])
def v_swap():
    i, j = pick(), pick(); ms = list(members)
    ms[i], ms[j] = (ms[i][0], members[j][1]), (ms[j][0], members[i][1]); return pack(ms)
def v_truncate_gzip():
    return raw[:rng.randrange(len(raw))]
def v_flip_gzip():
    return flip(raw)
def v_truncate_tar():
    return gzip.compress(plain_tar[:rng.randrange(len(plain_tar))], compresslevel=1)


# Crafted pickles, written opcode by opcode (tests.helpers.hostile, protocol 3).
def images(n): return array((n, 3072), plain_dtype("u1"), bytes(n * 3072))
def pick_batch():   # not the meta file, whose own checks would speak first
    return rng.choice([i for i, (n, _) in enumerate(members) if not n.endswith(".meta")])


def v_memo_index():
    # A memo index (or a length) the unpickler would have allocated for.
    prefix = b"".join(rng.choice([b"N", b"}", b"]", b"K\x05"]) for _ in range(rng.randrange(1, 4)))
    if rng.random() < 0.7:
        op = rng.choice([b"r", b"j"]) + struct.pack("<I", rng.randrange(MAX_OPCODES, 1 << 32))
    else:
        op = rng.choice([b"B", b"X"]) + struct.pack("<I", rng.randrange(1 << 29, 1 << 32)) + b"xyz"
    return pack(with_member(pick(), pickled(prefix + op)))
def v_opcode_flood():
    op = rng.choice([b"}", b"]", b"N", b"(", b"K\x01"])
    return pack(with_member(pick(), pickled(op * rng.randrange(MAX_OPCODES + 1, 4 * MAX_OPCODES))))
def v_repr_bomb():
    # A value whose repr is 0.6-4 GB, where an error message describes it.
    bomb = shared_lists(rng.randrange(100, 160), 4, rng.randrange(1000))
    n = rng.randrange(1, 4)
    where = rng.randrange(4)
    if where == 0:      # the dtype's state
        data = array((n, 3072), dtype("u1", tup(integer(3), text("|"), bomb, NONE, NONE,
                                                integer(-1), integer(-1), integer(0))),
                     bytes(n * 3072))
    elif where == 1:    # the array's state
        data = new_array() + tup(integer(1), bomb, plain_dtype("u1"), FALSE, by(b"")) + BUILD
    elif where == 2:    # the dtype's code
        data = array((n, 3072), DTYPE + tup(bomb, FALSE + TRUE) + REDUCE, bytes(n * 3072))
    else:
        data = images(n)
    labels = lst(bomb) if where == 3 else lst(*[integer(0)] * n)
    return pack(with_member(pick_batch(), pickled(dct({b"data": data, b"labels": labels}))))
def v_shared_lists():
    # k keys naming one list of k references to one list of k Nones: k**3
    # slots (>= 512 MB) if rebuilt per reference.
    k = rng.randrange(400, 520)
    body = b"}(" + integer(0) + shared_lists(k, 2, 0) + put(k)
    body += b"".join((integer(i) if rng.random() < 0.5 else by(b"k%d" % i)) + get(k)
                     for i in range(1, k))
    if rng.random() < 0.3:
        body += by(b"data") + get(k)
    return pack(with_member(pick_batch(), pickled(body + b"u")))
def v_shared_bytes():
    # Many arrays whose states name one run of bytes: a copy each (>= 600 MB).
    n = rng.randrange(200, 400)
    shape = tup(integer(n), integer(3072))
    first = new_array() + tup(integer(1), shape, plain_dtype("u1") + put(0), FALSE,
                              by(bytes(n * 3072)) + put(1)) + BUILD
    again = new_array() + tup(integer(1), shape, get(0), FALSE, get(1)) + BUILD
    copies = (600 << 20) // (n * 3072) + rng.randrange(50)
    return pack(with_member(pick(), pickled(dct({b"data": first,
                                                 b"labels": lst(*[integer(0)] * n),
                                                 b"filenames": lst(*[again] * copies)}))))


# The refusal each crafted kind must get (nothing else: no MemoryError).
HOSTILE = {
    "v_memo_index": r"refusing memo index [\d,]+ \(LONG_BIN(PUT|GET)\)|needs [\d,]+ bytes, only",
    "v_opcode_flood": f"refusing a pickle of more than {MAX_OPCODES:,} opcodes",
    "v_repr_bomb": r"(state \(.*|dtype |found )a list of [\d,]+ items",
    "v_shared_lists": r"lacks the 'data' entry|'data' must be a uint8 array .* got a list",
    "v_shared_bytes": r"arrays holding more bytes than the pickle itself",
}
kinds = [v_flip_anywhere, v_flip_structure, v_truncate_pickle, v_drop, v_duplicate,
         v_rename, v_swap, v_truncate_gzip, v_flip_gzip, v_truncate_tar,
         v_memo_index, v_opcode_flood, v_repr_bomb, v_shared_lists, v_shared_bytes]
out_dir = work / "out"
out_dir.mkdir()
archive = work / "cifar-10-python.tar.gz"
for k in range(n_variants):
    kind = kinds[k % len(kinds)]
    data = kind()
    archive.write_bytes(data)
    md5 = hashlib.md5(data).hexdigest()    # past the md5 check: the reader must cope
    out = out_dir / "cifar10.npz"
    print(f"variant {k} {kind.__name__}", file=sys.stderr, flush=True)
    result["n"] += 1
    try:
        convert_archive(archive, out, md5=md5)
    except KdflowError as e:
        result["refused"] += 1
        if os.listdir(out_dir):
            result["leftover"].append((k, kind.__name__, os.listdir(out_dir)))
        msg = str(e)
        if kind.__name__ in HOSTILE and not (
                re.search(HOSTILE[kind.__name__], msg) and "\n" not in msg and len(msg) < 600):
            result["hostile"].append((k, kind.__name__, msg[:600]))
    except BaseException as e:
        result["other"].append((k, kind.__name__, repr(e)[:300], traceback.format_exc()[-1500:]))
    else:
        result["ok"] += 1
        if kind.__name__ in HOSTILE:
            result["hostile"].append((k, kind.__name__, "accepted"))
        with np.load(out) as d:
            x, y, xt, yt = d["x_train"], d["y_train"], d["x_test"], d["y_test"]
            valid = (x.dtype == np.uint8 and x.shape[1:] == (3, 32, 32) and len(y) == len(x)
                     and xt.dtype == np.uint8 and xt.shape[1:] == (3, 32, 32)
                     and len(yt) == len(xt) and y.dtype == np.int64
                     and 0 <= min(y.min(), yt.min()) and max(y.max(), yt.max()) < 10
                     and len(d["classes"]) == 10)
        if not valid:
            result["invalid"].append((k, kind.__name__))
    for f in os.listdir(out_dir):
        os.unlink(out_dir / f)
result["maxrss"] = peak_rss()
report(**result)
'''


def test_damaged_archives_convert_or_fail_cleanly(tmp_path):
    build_archive(tmp_path / "base.tar.gz", n_train=50, n_test=20)
    result = run_capped(CHILD_IMPORTS, CHILD, tmp_path, VARIANTS, SEED, cwd=tmp_path,
                        margin=512 << 20)
    assert result["n"] == VARIANTS >= 300
    assert result["other"] == [], "exceptions other than KdflowError:\n" + "\n".join(
        f"variant {k} ({kind}): {err}\n{tb}" for k, kind, err, tb in result["other"])
    assert result["invalid"] == [] and result["leftover"] == []
    assert result["hostile"] == [], "crafted pickles not refused as they should be:\n" + "\n".join(
        f"variant {k} ({kind}): {msg}" for k, kind, msg in result["hostile"])
    # Both outcomes occur: flips inside pixel data are still valid archives
    # (after the md5 passes, pixels cannot be checked), the rest are refused.
    assert result["ok"] > 0 and result["refused"] > VARIANTS // 2, result
    peak, growth = result["maxrss"], result["maxrss"] - result["imports_rss"]
    assert peak < MAX_RSS and growth < MAX_GROWTH, \
        f"peak memory {peak / 2**20:.0f} MiB, {growth / 2**20:.0f} MiB above the imports"


# --------------------------------------------------------------------------
# Image-folder archives whose listing alone would cost memory
# --------------------------------------------------------------------------

# The tar variants that test the member count run under this lowered cap:
# walking the 2,000,001 headers of the real cap takes tarfile minutes (pure
# Python, ~90 us a header), and what is checked, memory that does not grow
# with the members read, is the same at any cap. The long names make it
# visible: 600 TarInfos kept would be 600 MiB.
TAR_MEMBER_CAP = 600

FOLDER_CHILD = r'''
real_cap = folder.MAX_MEMBERS
outcomes = []
for path, cap in zip(ARGS[::2], ARGS[1::2]):
    folder.MAX_MEMBERS = int(cap) if cap != "-" else real_cap
    try:
        folder.read_folder(path)
        outcome = ["converted", ""]
    except KdflowError as e:
        outcome = ["refused", str(e)]
    except BaseException as e:
        outcome = ["other", repr(e)[:300]]
    outcomes.append(outcome + [peak_rss()])
report(outcomes=outcomes)
'''


def test_folder_archives_with_costly_listings_are_refused_in_bounded_memory(tmp_path):
    """Archives that cost memory per member before any image: a zip's
    central directory (ZipFile reads it all into ZipInfos) and a tar's
    headers (tarfile keeps every TarInfo in stream mode). Each,
    under the folder download cap, is refused with a one-line error, and
    the child's peak memory stays under MAX_PEAK."""
    import re

    from kdflow.data.datasets import dataset_entry
    from kdflow.data.folder import MAX_MEMBERS
    from tests.helpers.hostile import hostile_zip_directory, make_tree, tar_with_long_names

    tree = make_tree(tmp_path / "tree", train=1, test=1, classes=["a", "b"])
    variants = {  # name: (archive, the child's member cap, "-" for the real one; error)
        "zip, a directory over the member cap": (
            hostile_zip_directory(tmp_path / "huge.zip", MAX_MEMBERS + 1), "-",
            r"huge.zip has more than 2,000,000 members \(2,000,001 by its directory\)"),
        "zip, a directory holding more than its end record declares": (
            hostile_zip_directory(tmp_path / "under.zip", MAX_MEMBERS + 1, declared=1), "-",
            r"under.zip has more than 2,000,000 members, the cap"),
        "zip, an end record claiming 2**40 entries": (
            hostile_zip_directory(tmp_path / "claims.zip", 3, declared=1 << 40), "-",
            r"claims.zip has more than 2,000,000 members \(1,099,511,627,776 by"),
        "zip, a directory larger than the file": (
            hostile_zip_directory(tmp_path / "past.zip", 3, cd_size=1 << 40), "-",
            r"past.zip: its directory is corrupt or unreadable \(BadZipFile: a central "
            r"directory of 1,099,511,627,776 bytes"),
        "tar.gz, members with long names": (
            tar_with_long_names(tree, tmp_path / "names.tar.gz", TAR_MEMBER_CAP + 1),
            str(TAR_MEMBER_CAP), rf"names.tar.gz has more than {TAR_MEMBER_CAP} members"),
        "tar.gz, many tiny members": (
            tar_with_long_names(tree, tmp_path / "tiny.tar.gz", 20 * TAR_MEMBER_CAP, length=1),
            str(TAR_MEMBER_CAP), rf"tiny.tar.gz has more than {TAR_MEMBER_CAP} members"),
    }
    cap = dataset_entry("folder").max_download
    for name, (archive, _, _) in variants.items():
        assert archive.stat().st_size < cap, name
    args = [str(x) for archive, members, _ in variants.values() for x in (archive, members)]
    result = run_capped("import kdflow.data.folder as folder\nfrom kdflow import KdflowError\n",
                        FOLDER_CHILD, *args, cwd=tmp_path)
    assert len(result["outcomes"]) == len(variants)
    for (name, (_, _, error)), (kind, message, peak) in zip(variants.items(),
                                                           result["outcomes"]):
        assert peak < MAX_PEAK, f"{name}: peak {peak / 2**20:.0f} MiB"
        assert kind == "refused" and re.search(error, message), (name, kind, message)
        assert "\n" not in message
