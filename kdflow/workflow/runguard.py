"""One run of a checkout at a time, and a killed run leaves no process behind.

`make run` starts its command through this guard:

    python -m kdflow.workflow.runguard LOCK COMMAND...

Two processes do the guarding:

- The *launcher*, which make starts in its own process group, takes a kernel
  lock (flock on LOCK). The descriptor is close-on-exec, so no process of the
  run inherits it: one of them alive in another session, or still dying,
  cannot keep the lock of a run that is over.
- The *guardian*, forked by the launcher, leaves make's session (a SIGKILL of
  make's process group spares it), becomes the run's child subreaper (an
  orphaned process of the run is re-parented to it, so none escapes by
  starting its own session or double-forking) and runs COMMAND in a process
  group of its own. It shares the launcher's lock and holds it until the last
  process of the run is gone. When the launcher dies (only an uncatchable
  signal ends it: a SIGKILL of make's process group), every process of the
  run gets SIGKILL at once; when COMMAND ends, any process it left gets
  SIGTERM, then SIGKILL after GRACE_S.

SIGINT, SIGTERM and SIGHUP that reach the launcher (Ctrl-C, make passing on a
SIGTERM, a closed terminal) are passed to COMMAND's process group, which ends
as it did when it was in make's group. Every process of the run carries
RUN_ENV=LOCK's absolute path in its environment; a new run, once it holds the
lock, SIGKILLs any process still marked so (left behind by a guardian killed
on its own) before it starts COMMAND.

A run that finds the lock held refuses at once (exit 75) while the holder's
launcher lives. If that launcher is dead or dying, the holder is a killed
run's guardian ending its processes: the new run waits for the lock (at most
WAIT_S), so "after any kill, just `make run` again" holds however fast one
types.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import select
import signal
import sys
import time

from kdflow import KdflowError

RUN_ENV = "KDFLOW_RUN_LOCK"
BUSY_EXIT = 75  # EX_TEMPFAIL: try again later
WAIT_S = 300.0  # a killed GPU job can take a while to free its device
GRACE_S = 30.0  # time a process left by COMMAND has to save its state on SIGTERM
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_PR_SET_CHILD_SUBREAPER = 36
_PF_EXITING = 0x4
_SIGKILL_BIT = 1 << (signal.SIGKILL - 1)


class Busy(KdflowError):
    """Another live run of this checkout holds the lock."""


# ---------------------------------------------------------------------------
# Processes, from /proc
# ---------------------------------------------------------------------------

def _stat(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/PID/stat (state first), or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def start_time(pid: int) -> int | None:
    """When PID started (clock ticks since boot): with the pid, names one process."""
    fields = _stat(pid)
    return int(fields[19]) if fields else None


def running(pid: int, started: int) -> bool:
    """Whether process (PID, started) exists and is not dead or dying: no
    zombie, not exiting, no SIGKILL pending."""
    fields = _stat(pid)
    if not fields or int(fields[19]) != started or fields[0] in "ZXx":
        return False
    if int(fields[6]) & _PF_EXITING:
        return False
    try:
        with open(f"/proc/{pid}/status") as f:
            pending = [int(line.split()[1], 16) for line in f
                       if line.startswith(("SigPnd:", "ShdPnd:"))]
    except OSError:
        return False
    return not any(p & _SIGKILL_BIT for p in pending)


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def descendants(root: int) -> set[int]:
    """Every process below ROOT (zombies included), walking parent links."""
    children: dict[int, list[int]] = {}
    for pid in _pids():
        fields = _stat(pid)
        if fields:
            children.setdefault(int(fields[1]), []).append(pid)
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def marked(lock: str) -> set[int]:
    """Processes (other than this one) whose environment says they belong to a
    run of LOCK's checkout."""
    mark = f"{RUN_ENV}={lock}".encode()
    found = set()
    for pid in _pids():
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if mark in f.read().split(b"\0"):
                    found.add(pid)
        except OSError:  # gone, a zombie, or another user's
            pass
    return found - {os.getpid()}


def _reap() -> dict[int, int]:
    """Collect every finished child (the subreaper inherits the run's
    orphans); their wait statuses by pid."""
    done = {}
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return done
        if pid == 0:
            return done
        done[pid] = status


def end(find, grace: float = 0.0) -> None:
    """Until `find()` returns no process: SIGTERM each (when `grace` > 0), then
    SIGKILL once it has had `grace` seconds."""
    told: dict[int, float] = {}
    while True:
        _reap()
        pids = find()
        if not pids:
            return
        now = time.monotonic()
        for pid in pids:
            first = told.setdefault(pid, now)
            sig = signal.SIGTERM if now - first < grace else signal.SIGKILL
            if sig == signal.SIGTERM and first != now:
                continue  # told already; its grace is running
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(0.02)


# ---------------------------------------------------------------------------
# The lock
# ---------------------------------------------------------------------------

def _holder(fd: int) -> tuple[int, int, int] | None:
    """(launcher pid, its start time, guardian pid) as the holder wrote them."""
    try:
        launcher, started, guardian = map(int, os.pread(fd, 100, 0).split())
    except ValueError:  # empty (not written yet) or torn
        return None
    return launcher, started, guardian


def acquire(lock: str) -> int:
    """The lock's descriptor, locked; Busy while a live run holds it."""
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    deadline = None
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            pass
        holder = _holder(fd)
        if holder and running(holder[0], holder[1]):
            os.close(fd)
            raise Busy(f"another run of this checkout is in progress ({lock} is held); "
                       "wait for it to end")
        # The holder's launcher is gone (or has not written its name yet): a
        # killed run's guardian is ending its processes.
        if deadline is None:
            print(f"kdflow: waiting for the processes of a killed run to end ({lock})",
                  file=sys.stderr)
            deadline = time.monotonic() + WAIT_S
        elif time.monotonic() > deadline:
            os.close(fd)
            who = f"its guardian, pid {holder[2]}, " if holder else ""
            raise Busy(f"a killed run of this checkout still holds {lock} after {WAIT_S:.0f} s "
                       f"({who}is ending processes that do not exit); see `ps` and rerun")
        time.sleep(0.05)


def _record(fd: int, guardian: int) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {start_time(os.getpid())} {guardian}\n".encode(), 0)


# ---------------------------------------------------------------------------
# Launcher and guardian
# ---------------------------------------------------------------------------

def _exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code  # killed by signal N: 128 + N, as a shell says


def _send(kill) -> None:
    try:
        kill()
    except ProcessLookupError:  # already gone: nothing left to tell
        pass


def _guard(command: list[str], lock: str, launcher_gone: int) -> int:
    os.setsid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    end(lambda: marked(lock))  # left by an earlier run whose guardian was killed
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    child = os.posix_spawnp(command[0], command, {**os.environ, RUN_ENV: lock},
                            setpgroup=0)
    for sig in FORWARDED:
        signal.signal(sig, lambda s, _: _send(lambda: os.killpg(child, s)))
    me = os.getpid()
    while True:
        ready, _, _ = select.select([launcher_gone, wake_r], [], [], 5.0)
        if wake_r in ready:
            os.read(wake_r, 512)
        if launcher_gone in ready:  # EOF: the launcher died, so the run was killed
            end(lambda: descendants(me))
            return 128 + signal.SIGKILL
        done = _reap()
        if child in done:
            end(lambda: descendants(me), grace=GRACE_S)
            return _exit_code(done[child])


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: python -m kdflow.workflow.runguard LOCK COMMAND...", file=sys.stderr)
        return 2
    shown, command = argv[0], argv[1:]
    lock = os.path.abspath(shown)
    try:
        fd = acquire(shown)
    except Busy as e:
        print(f"kdflow: {e}", file=sys.stderr)
        return BUSY_EXIT
    gone_r, gone_w = os.pipe()  # the guardian sees EOF when the launcher dies
    guardian = os.fork()
    if guardian == 0:
        os.close(gone_w)
        code = 70
        try:
            code = _guard(command, lock, gone_r)
        except BaseException as e:  # noqa: BLE001 - a forked child must never return
            print(f"kdflow: the run's guardian failed: {e!r}", file=sys.stderr)
        finally:
            os._exit(code)
    os.close(gone_r)
    _record(fd, guardian)
    for sig in FORWARDED:
        signal.signal(sig, lambda s, _: _send(lambda: os.kill(guardian, s)))
    _, status = os.waitpid(guardian, 0)
    if os.WIFSIGNALED(status):  # the guardian itself was killed: end what it could not
        end(lambda: marked(lock))
    return _exit_code(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
