"""Running test code in a child process whose memory is capped and measured.

Peak memory is VmHWM, the child's own high-water mark (not ru_maxrss: Linux
carries that over from the parent across fork + exec, so under a large
pytest process it would report the parent's memory). The address space is
capped at a margin above what the child's imports took, so code that
believed a size field fails there (as MemoryError) instead of swapping.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.helpers.workflow import REPO

MAX_PEAK = 512 << 20    # bytes: the peak a hostile archive may cost, imports included

_PRELUDE = r'''
import json, resource, sys
sys.path.insert(0, sys.argv[1])
ARGS = sys.argv[2:]

def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status")
                if l.startswith(key + ":"))

def peak_rss():
    return status("VmHWM")

def report(**result):
    print(json.dumps({**result, "peak": peak_rss()}))

'''

_CAP = r'''
_hard = resource.getrlimit(resource.RLIMIT_AS)[1]
_soft = status("VmSize") + MARGIN
resource.setrlimit(resource.RLIMIT_AS, (_soft if _hard == resource.RLIM_INFINITY
                                        else min(_soft, _hard), _hard))
'''


def run_capped(imports: str, body: str, *args: str, cwd: Path, margin: int = 1 << 30,
               timeout: int = 300) -> dict:
    """Run `imports` and then, under an address-space cap of `margin` bytes
    above what they took, `body`, with ARGS, status(), peak_rss() and
    report(**result) defined; the JSON of the last report() (with "peak",
    the child's VmHWM) is returned. A child that crashes fails the test with
    its last lines of stderr."""
    code = _PRELUDE + imports + f"\nMARGIN = {margin}\n" + _CAP + body
    proc = subprocess.run([sys.executable, "-c", code, str(REPO), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=cwd)
    assert proc.returncode == 0, (
        f"the child ended with {proc.returncode} "
        f"({'killed by signal ' + str(-proc.returncode) if proc.returncode < 0 else 'an error'})"
        f":\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
