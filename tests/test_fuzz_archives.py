"""Fuzzing the archive reader: hundreds of damaged variants of a small archive.

Each variant must either convert to valid arrays or raise KdflowError:
never another exception, never a crash, never much memory. The variants are
converted in one child process, so a segfault shows as a signal instead of
killing pytest, and the child's memory can be capped and measured.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO

VARIANTS = 320
SEED = 20240611
MAX_RSS = 1 << 30       # bytes, the whole child (imports included)
MAX_GROWTH = 256 << 20  # bytes above what the imports took

CHILD = r'''
import gzip, hashlib, io, json, os, random, resource, sys, tarfile, traceback
from pathlib import Path

repo, work, n_variants, seed = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
sys.path.insert(0, repo)
import numpy as np
from kdflow import KdflowError
from kdflow.datasets import convert as convert_archive
from tests.conftest import build_archive

# Allow 1 GiB of address space above what the imports took: a parser that
# believed a size field would fail here (as MemoryError) rather than swap.
vm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize:"))
hard = resource.getrlimit(resource.RLIMIT_AS)[1]
soft = vm + (1 << 30)
resource.setrlimit(resource.RLIMIT_AS, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))

def peak_rss():
    # VmHWM, this process's own high-water mark. Not ru_maxrss: Linux carries
    # that over from the parent across fork + exec, so under a large pytest
    # process it would report the parent's memory.
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status")
                if l.startswith("VmHWM:"))


# Peak resident memory so far: the imports (torch is most of it).
result = {"n": 0, "ok": 0, "refused": 0, "other": [], "invalid": [], "leftover": [],
          "imports_rss": peak_rss()}
base = work / "base.tar.gz"
build_archive(base, n_train=50, n_test=20)
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


kinds = [v_flip_anywhere, v_flip_structure, v_truncate_pickle, v_drop, v_duplicate,
         v_rename, v_swap, v_truncate_gzip, v_flip_gzip, v_truncate_tar]
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
    except KdflowError:
        result["refused"] += 1
        if os.listdir(out_dir):
            result["leftover"].append((k, kind.__name__, os.listdir(out_dir)))
    except BaseException as e:
        result["other"].append((k, kind.__name__, repr(e)[:300], traceback.format_exc()[-1500:]))
    else:
        result["ok"] += 1
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
print(json.dumps(result))
'''


def test_damaged_archives_convert_or_fail_cleanly(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(REPO), str(tmp_path), str(VARIANTS), str(SEED)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    last = proc.stderr.strip().splitlines()[-3:]
    assert proc.returncode == 0, (
        f"the fuzzing child ended with {proc.returncode} "
        f"({'killed by signal ' + str(-proc.returncode) if proc.returncode < 0 else 'an error'}) "
        f"at: {last}\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["n"] == VARIANTS >= 300
    assert result["other"] == [], "exceptions other than KdflowError:\n" + "\n".join(
        f"variant {k} ({kind}): {err}\n{tb}" for k, kind, err, tb in result["other"])
    assert result["invalid"] == [] and result["leftover"] == []
    # Both outcomes occur: flips inside pixel data are still valid archives
    # (after the md5 passes, pixels cannot be checked), the rest are refused.
    assert result["ok"] > 0 and result["refused"] > VARIANTS // 2, result
    peak, growth = result["maxrss"], result["maxrss"] - result["imports_rss"]
    assert peak < MAX_RSS and growth < MAX_GROWTH, \
        f"peak memory {peak / 2**20:.0f} MiB, {growth / 2**20:.0f} MiB above the imports"
