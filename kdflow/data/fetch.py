"""Downloads: copy an http(s)/file URL or a path to a file, verify its checksum.

Every dataset source that is a single file (a CIFAR python archive, an image
folder packed as .tar/.tar.gz/.zip) comes through `fetch_archive`: retries
with backoff for transient failures, HTTP Range resume of a partial file, a
size cap against servers that never stop, a deadline for the whole transfer
against servers that trickle, and a checksum before the file gets its final
name: the md5 a config gives, or the SHA-256 prefix torchvision publishes in
its weights' file names (kdflow.models.pretrained). Nothing here knows what
the file holds.
"""

from __future__ import annotations

import http.client
import logging
import math
import os
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from kdflow import KdflowError
from kdflow.core.atomic import atomic_path
from kdflow.core.hashing import file_digest

log = logging.getLogger(__name__)

MB = 1e6
# A server streaming without end is cut off here unless the caller (the
# dataset table, which knows its archives' sizes) gives a bound of its own.
MAX_DOWNLOAD = 1 << 30
# The per-read timeout never fires on a server that trickles a byte now and
# then, so the whole download (all attempts) has a deadline too: DEADLINE_BASE_S
# for connecting, retries and their backoff, plus the size cap at MIN_RATE.
# For CIFAR-10 (cap 4 x 170 MB) that is about 2 h 4 min: the 170 MB archive
# arrives in time over any link averaging 23 kB/s (0.2 Mbit/s) or more.
MIN_RATE = 100_000  # bytes/s
DEADLINE_BASE_S = 600.0


def transfer_deadline(cap: int) -> float:
    """Seconds the whole download of at most `cap` bytes may take."""
    return DEADLINE_BASE_S + cap / MIN_RATE


def _size(n: int) -> str:
    return f"{n / MB:,.0f} MB" if n >= 10 * MB else f"{n:,} bytes"


class _Transient(Exception):
    """A download attempt failed in a way a later attempt may not:
    a dropped connection, a timeout, an HTTP 5xx."""


_CHUNK = 1 << 20
# Statuses a server uses for "not now": worth another attempt.
_RETRY_STATUS = {408, 429}


def _offline_error(url: str, reason, key: str = "data") -> KdflowError:
    return KdflowError(
        f"could not download {url}: {reason}. Without internet access, copy the "
        f"file here and point {key}.url at it (file:///path/to/the/file or "
        f"a plain path) with its {key}.md5"
    )


def _open_source(url: str, offset: int = 0, timeout: float = 60.0, key: str = "data"):
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
                f"source not found at {path!r} (from {key}.url {url!r}); "
                f"set {key}.url to an existing file, a file:// URL or an http(s) URL"
            )
        return open(path, "rb"), os.path.getsize(path), 0
    if parsed.scheme not in ("http", "https"):
        raise KdflowError(
            f"{key}.url {url!r} has unsupported scheme {parsed.scheme!r}; "
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
            return _open_source(url, 0, timeout, key)
        if e.code >= 500 or e.code in _RETRY_STATUS:
            raise _Transient(f"HTTP {e.code} {e.reason}") from None
        raise KdflowError(f"could not download {url}: HTTP {e.code} {e.reason}; "
                          f"check {key}.url") from None
    except urllib.error.URLError as e:
        # No name resolution usually means no network at all, and a bad
        # certificate will not get better: neither is worth waiting for.
        if isinstance(e.reason, (socket.gaierror, ssl.SSLCertVerificationError)):
            raise _offline_error(url, e.reason, key) from None
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
            return _open_source(url, 0, timeout, key)
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


class _Deadline:
    """The whole download's deadline, and what arrived before it."""

    def __init__(self, seconds: float, cap: int, url: str, key: str = "data"):
        self.seconds, self.cap, self.url, self.key = seconds, cap, url, key
        self.t0, self.received = time.monotonic(), 0

    def check(self) -> None:
        elapsed = time.monotonic() - self.t0
        if elapsed > self.seconds:
            raise KdflowError(
                f"{self.url} sent {_size(self.received)} in {elapsed:,.0f} s, below the "
                f"minimum rate a download needs (at most {_size(self.cap)} within "
                f"{self.seconds:,.0f} s; kdflow.data.fetch.MIN_RATE); nothing was kept. The "
                "server or the link is too slow: try a mirror, or download the file "
                f"another way and point {self.key}.url at a file:// copy")


def _copy(src, out, start: int, total: int | None, cap: int, url: str,
          deadline: _Deadline, key: str = "data") -> None:
    """Append `src` to `out` (which holds `start` bytes), at most `cap` in all."""
    if total is not None and total > cap:
        raise KdflowError(
            f"{url} is {_size(total)}, more than the {_size(cap)} allowed for this "
            f"file, so it is not the file {key}.url should name: check {key}.url")
    done, progress = start, _Progress(total, start)
    while True:
        try:
            # read1: what has arrived, up to a chunk. read() would wait for a
            # whole chunk, and a trickling server would never get to the
            # deadline check below.
            block = src.read1(_CHUNK)
        except (OSError, http.client.HTTPException) as e:
            raise _Transient(f"connection lost after {done / MB:.1f} MB "
                             f"({type(e).__name__}: {e})") from None
        if not block:
            break
        if done + len(block) > cap:
            raise KdflowError(
                f"{url} sent more than {_size(cap)} without ending (more than this "
                f"file can be), so it is not the file {key}.url should name; nothing was "
                f"kept. Check {key}.url")
        out.write(block)
        done += len(block)
        deadline.received += len(block)
        progress.update(done)
        # After each read: a read blocks at most the per-read timeout, so
        # the deadline is overshot by no more than that.
        deadline.check()
    # http.client returns a short body, without an error, when the server
    # closes the connection early: only the announced size tells.
    if total is not None and done < total:
        raise _Transient(f"connection closed after {done / MB:.1f} of {total / MB:.1f} MB")
    log.info("downloaded %.1f MB (%.1f MB/s)", done / MB, progress.rate(done))


def fetch_archive(url: str, md5: str | None, dest: str | os.PathLike, *,
                  max_bytes: int | None = None, retries: int = 5,
                  backoff: float = 2.0, timeout: float = 60.0,
                  deadline: float | None = None, key: str = "data",
                  sha256: str | None = None, mismatch: str | None = None) -> None:
    """Copy/download `url` to `dest` and verify its md5, or, with `sha256`,
    that its SHA-256 starts with those hex digits (as torch.hub's
    check_hash does; the whole digest is a prefix of itself).

    `key` is the config section the url and md5 come from (data, or a
    model's weights), named in every error. `mismatch`: what a checksum
    mismatch's one line says after the hashes (default: the fix for a
    config's md5).

    The bytes go to `dest.part`, renamed to `dest` only once the md5 matches,
    so a failed, corrupt or oversized download never sits under the final
    name. A dropped connection, a timeout or an HTTP 5xx is retried up to
    `retries` times after `backoff`, 2x`backoff`, 4x`backoff`... seconds,
    resuming the `.part` with an HTTP Range request where the server allows
    it. Any failure handled here removes the `.part`; only a run killed
    outright (SIGKILL, power loss) leaves one, and the next run resumes it.
    At most `max_bytes` are accepted (default MAX_DOWNLOAD; the dataset
    table gives each dataset its own bound), so a server streaming without
    end is cut off; and all attempts together may take at most `deadline`
    seconds (default transfer_deadline(cap): the cap at MIN_RATE, plus
    DEADLINE_BASE_S), so a server trickling bytes slower than the per-read
    `timeout` is cut off too.
    """
    dest = Path(dest)
    cap = max_bytes or MAX_DOWNLOAD
    clock = _Deadline(transfer_deadline(cap) if deadline is None else deadline, cap, url, key)
    last = None
    with atomic_path(dest) as part:
        for attempt in range(retries + 1):
            if attempt:
                delay = backoff * 2 ** (attempt - 1)
                log.warning("download of %s failed (%s); attempt %d of %d in %.1f s",
                            url, last, attempt + 1, retries + 1, delay)
                time.sleep(delay)
                clock.check()
            offset = part.stat().st_size if part.exists() else 0
            try:
                src, total, start = _open_source(url, offset, timeout, key)
                if start:
                    log.info("resuming %s at %.1f MB", url, start / MB)
                with src, open(part, "ab" if start else "wb") as out:
                    _copy(src, out, start, total, cap, url, clock, key)
                break
            except _Transient as e:
                last = e
        else:
            raise KdflowError(
                f"could not download {url} in {retries + 1} attempts (last: {last}); "
                f"nothing was kept. Check the network and {key}.url, or copy the file "
                f"here and point {key}.url at it (file:///path/to/the/file)")
        algo, want = ("sha256", sha256.lower()) if sha256 else ("md5", md5.lower())
        got = file_digest(part, algo)
        # torchvision publishes a prefix only (8+ digits of the file name).
        matches = got.startswith(want) if sha256 else got == want
        if not matches:
            found = got[:len(want)] if sha256 else got
            raise KdflowError(
                f"{algo} mismatch for {url}: expected {want}, got {found}. " + (mismatch or (
                    "The file is corrupt, truncated or a different file; fetch it again, or "
                    f"if it is a trusted copy set {key}.md5 to its checksum")))
    log.info("verified %s (%s %s) -> %s", url, algo, got, dest)

