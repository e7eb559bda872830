"""Downloads against a local HTTP server (127.0.0.1 only) that misbehaves:
drops the connection, answers 503, streams without end."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kdflow import KdflowError
from kdflow.data.fetch import fetch_archive
from tests.helpers.archives import build_archive


class Handler(BaseHTTPRequestHandler):
    """Serves `server.body`, honouring `Range: bytes=N-`, after the test's
    `server.script` has had its say for this request (by number)."""

    def do_GET(self):
        srv = self.server
        n = len(srv.requests)
        srv.requests.append(self.headers.get("Range"))
        act = srv.script(n, self)
        if act == "done":
            return
        body, start = srv.body, 0
        m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if m and srv.ranges:
            start = int(m[1])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if act == "half":     # announce it all, send half, hang up
            self.wfile.write(body[start:start + (len(body) - start) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    # A proxy from the environment must not see these requests.
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.requests, srv.ranges, srv.body = [], True, b""
    srv.script = lambda n, handler: None
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/cifar-10-python.tar.gz"
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=10)


@pytest.fixture
def archive(tmp_path):
    src = tmp_path / "src" / "src.tar.gz"   # beside, not in, the download folder
    md5 = build_archive(src, n_train=50, n_test=20)
    return src.read_bytes(), md5


@pytest.fixture
def dest(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    return folder / "cifar-10-python.tar.gz"


def fetch(server, md5, dest, timeout=10.0, **kw):
    fetch_archive(server.url, md5, dest, backoff=0.01, timeout=timeout, **kw)


def test_a_dropped_connection_is_resumed_with_range(server, archive, dest, caplog, monkeypatch):
    server.body, md5 = archive
    server.script = lambda n, h: "half" if n == 0 else None
    monkeypatch.setattr("kdflow.data.fetch._CHUNK", 2048)   # ~100 chunks
    with caplog.at_level(logging.INFO, logger="kdflow.data.fetch"):
        fetch(server, md5, dest)
    assert dest.read_bytes() == server.body
    half = len(server.body) // 2
    # The second request asked for the rest only, and the file verifies.
    assert server.requests == [None, f"bytes={half}-"]
    assert os.listdir(dest.parent) == [dest.name]
    assert "connection closed after" in caplog.text and "attempt 2 of 6" in caplog.text
    # Progress: a few lines (quarters, MB, MB/s), not one per chunk.
    progress = [r.message for r in caplog.records if r.message.startswith("downloaded")]
    assert 3 <= len(progress) <= 8 and "100% (" in progress[-2] and "MB/s" in progress[-1]


def test_a_server_ignoring_range_starts_over(server, archive, dest):
    server.body, md5 = archive
    server.ranges = False
    server.script = lambda n, h: "half" if n == 0 else None
    fetch(server, md5, dest)
    assert dest.read_bytes() == server.body and len(server.requests) == 2


def test_503_is_retried(server, archive, dest, caplog):
    server.body, md5 = archive

    def script(n, h):
        if n < 2:
            h.send_error(503, "busy")
            return "done"

    server.script = script
    fetch(server, md5, dest)
    assert dest.read_bytes() == server.body and len(server.requests) == 3
    assert caplog.text.count("HTTP 503") == 2


def test_a_timeout_is_retried(server, archive, dest):
    server.body, md5 = archive
    gate = threading.Event()

    def script(n, h):
        if n == 0:           # say nothing until the client has given up
            gate.wait(5)
            return "done"

    server.script = script
    try:
        fetch(server, md5, dest, timeout=0.3)
    finally:
        gate.set()
    assert dest.read_bytes() == server.body and len(server.requests) == 2


def test_giving_up_after_retries_is_a_clear_error(server, dest):
    server.script = lambda n, h: h.send_error(503, "busy") or "done"
    with pytest.raises(KdflowError, match=r"in 3 attempts \(last: HTTP 503.*nothing was kept"):
        fetch(server, "0" * 32, dest, retries=2)
    assert len(server.requests) == 3 and os.listdir(dest.parent) == []


def test_404_is_not_retried(server, dest):
    server.script = lambda n, h: h.send_error(404) or "done"
    with pytest.raises(KdflowError, match="HTTP 404.*check data.url"):
        fetch(server, "0" * 32, dest)
    assert len(server.requests) == 1 and os.listdir(dest.parent) == []


def test_an_endless_stream_is_cut_off(server, dest):
    def endless(n, h):
        h.send_response(200)   # no Content-Length: the body runs until the server stops
        h.end_headers()
        chunk = os.urandom(1 << 16)
        try:
            for _ in range(2000):   # 128 MB at most, should the client never stop
                h.wfile.write(chunk)
        except OSError:
            pass
        return "done"

    server.script = endless
    with pytest.raises(KdflowError, match="sent more than 2,000,000 bytes without ending.*nothing was kept"):
        fetch(server, "0" * 32, dest, max_bytes=2_000_000)
    assert len(server.requests) == 1 and os.listdir(dest.parent) == []


def test_an_announced_size_over_the_cap_is_refused_before_downloading(server, archive, dest):
    server.body, _ = archive
    with pytest.raises(KdflowError, match="more than the 1,000 bytes allowed"):
        fetch(server, "0" * 32, dest, max_bytes=1000)
    assert os.listdir(dest.parent) == []


def test_md5_is_checked_after_a_resumed_download(server, archive, dest):
    server.body, md5 = archive
    server.script = lambda n, h: "half" if n == 0 else None
    with pytest.raises(KdflowError, match="md5 mismatch"):
        fetch(server, hashlib.md5(b"other").hexdigest(), dest)
    assert os.listdir(dest.parent) == []


def test_a_part_left_by_a_killed_run_is_resumed(server, archive, dest):
    server.body, md5 = archive
    (dest.parent / (dest.name + ".part")).write_bytes(server.body[:1000])
    fetch(server, md5, dest)
    assert server.requests == ["bytes=1000-"] and dest.read_bytes() == server.body
    assert os.listdir(dest.parent) == [dest.name]


def test_a_trickling_server_is_cut_off_at_the_deadline(server, dest):
    sent = []

    def trickle(n, h):
        if n:                  # no second chance (the deadline ends it all)
            h.send_error(404)
            return "done"
        h.send_response(200)
        h.send_header("Content-Length", str(5_000_000))
        h.end_headers()
        try:
            # 10 bytes every 50 ms, each read well inside the per-read
            # timeout; 8 s at most, should the client never stop.
            for _ in range(160):
                h.wfile.write(b"x" * 10)
                h.wfile.flush()
                sent.append(10)
                threading.Event().wait(0.05)
        except OSError:
            pass
        return "done"

    server.script = trickle
    with pytest.raises(KdflowError, match=r"sent \d+ bytes in \d+ s, below the minimum rate "
                       r"a download needs \(at most 5,000,000 bytes within 1 s.*nothing was "
                       r"kept.*try a mirror.*file:// copy") as e:
        fetch(server, "0" * 32, dest, timeout=5.0, max_bytes=5_000_000, deadline=1.0)
    got = int(re.search(r"sent (\d+) bytes", str(e.value))[1])
    assert 0 < got < 5_000_000
    assert len(server.requests) == 1 and os.listdir(dest.parent) == []
