"""A real HTTP mirror on loopback for tests and benchmarks: Range requests, a request log, and
misbehaviour on demand (token-bucket throttling, a stall mid-file, a truncated body, no Range).

    with MirrorServer({"/data.zip": payload}, MirrorBehaviour(rate_bytes_per_s=2e6)) as m:
        url = m.url("/data.zip")
        ...
        m.requests   # [RequestRecord(method, path, range, status, bytes_sent), ...]
"""
from __future__ import annotations

import re
import select
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


@dataclass(frozen=True, slots=True)
class MirrorBehaviour:
    rate_bytes_per_s: float | None = None    # shared token bucket over all connections
    stall_at_byte: int | None = None         # stop sending at this offset and hold the connection
    stall_hold_s: float = 30.0               # ... for at most this long (or until the server closes)
    truncate_at_byte: int | None = None      # close the connection at this offset (full Content-Length sent)
    ignore_range: bool = False               # always answer 200 with the whole file
    status: int | None = None                # answer every request with this status (e.g. 503)


@dataclass(slots=True)
class RequestRecord:
    """One request, logged when it arrives; `status` and `bytes_sent` are filled in as it is served."""
    method: str
    path: str
    range: str | None
    status: int = 0
    bytes_sent: int = 0
    authorization: str | None = None


class _Bucket:
    """Token bucket: `take(n)` sleeps until n bytes may be sent at `rate` bytes/s."""

    def __init__(self, rate: float, burst_s: float = 0.02) -> None:
        self.rate = rate
        self.capacity = max(rate * burst_s, 16 * 1024)
        self.tokens = 0.0
        self.last = time.monotonic()
        self.lock = threading.Lock()

    def take(self, n: int) -> float:
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
            self.last = now
            self.tokens -= n
            return -self.tokens / self.rate if self.tokens < 0 else 0.0


class MirrorServer:
    """ThreadingHTTPServer on 127.0.0.1 serving `files` (URL path → bytes or a file Path)."""

    def __init__(self, files: dict[str, bytes | Path], behaviour: MirrorBehaviour | None = None,
                 chunk_bytes: int = 64 * 1024, redirects: dict[str, str] | None = None) -> None:
        self.files = dict(files)
        self.redirects = dict(redirects or {})   # URL path → absolute URL answered with 302
        self.behaviour = behaviour or MirrorBehaviour()
        self.chunk_bytes = chunk_bytes
        self.requests: list[RequestRecord] = []
        self._log_lock = threading.Lock()
        self._closing = threading.Event()
        self._bucket = _Bucket(self.behaviour.rate_bytes_per_s) if self.behaviour.rate_bytes_per_s else None
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def gets(self, path: str | None = None) -> list[RequestRecord]:
        with self._log_lock:
            return [r for r in self.requests if r.method == "GET" and (path is None or r.path == path)]

    def start(self) -> MirrorServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True, name=f"mirror-{self.port}")
        self._thread.start()
        return self

    def close(self) -> None:
        self._closing.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread:
            self._thread.join(timeout=5)

    def __enter__(self) -> MirrorServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _record(self, method: str, path: str, rng: str | None, auth: str | None) -> RequestRecord:
        rec = RequestRecord(method, path, rng, authorization=auth)
        with self._log_lock:
            self.requests.append(rec)
        return rec

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:   # noqa: A002 - quiet
                pass

            def do_HEAD(self) -> None:
                self._serve(body=False)

            def do_GET(self) -> None:
                self._serve(body=True)

            def _serve(self, body: bool) -> None:
                path = self.path.split("?", 1)[0]
                rng = self.headers.get("Range")
                b = server.behaviour
                data = server.files.get(path)
                rec = server._record(self.command, path, rng, self.headers.get("Authorization"))
                if path in server.redirects:
                    rec.status = 302
                    self.send_response(302)
                    self.send_header("Location", server.redirects[path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if b.status is not None or data is None:
                    rec.status = b.status or 404
                    self.send_response(rec.status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                total = data.stat().st_size if isinstance(data, Path) else len(data)
                start, end, status = 0, total - 1, 200
                m = _RANGE.match(rng or "")
                if m and not b.ignore_range:
                    start = int(m.group(1))
                    end = min(int(m.group(2)), total - 1) if m.group(2) else total - 1
                    if start >= total:
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{total}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        rec.status = 416
                        return
                    status = 206
                self.send_response(status)
                self.send_header("Accept-Ranges", "none" if b.ignore_range else "bytes")
                self.send_header("Content-Length", str(end - start + 1))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{total}")
                self.end_headers()
                rec.status = status
                if body:
                    self._send_body(data, start, end + 1, rec)

            def _wait_for_client_to_leave(self, hold_s: float) -> None:
                deadline = time.monotonic() + hold_s
                while not server._closing.is_set() and time.monotonic() < deadline:
                    readable, _, _ = select.select([self.connection], [], [], 0.05)
                    if readable:
                        try:
                            if not self.connection.recv(1, socket.MSG_PEEK):
                                return
                        except OSError:
                            return
                        time.sleep(0.05)

            def _send_body(self, data: bytes | Path, start: int, stop: int, rec: RequestRecord) -> None:
                b = server.behaviour
                pos = start
                fh = open(data, "rb") if isinstance(data, Path) else None
                try:
                    if fh:
                        fh.seek(start)
                    while pos < stop and not server._closing.is_set():
                        if b.truncate_at_byte is not None and pos >= b.truncate_at_byte:
                            self.close_connection = True
                            break
                        if b.stall_at_byte is not None and pos >= b.stall_at_byte:
                            self._wait_for_client_to_leave(b.stall_hold_s)
                            self.close_connection = True
                            break
                        limit = stop
                        for cut in (b.truncate_at_byte, b.stall_at_byte):
                            if cut is not None and cut > pos:
                                limit = min(limit, cut)
                        n = min(server.chunk_bytes, limit - pos)
                        chunk = fh.read(n) if fh else data[pos:pos + n]   # type: ignore[index]
                        if server._bucket is not None:
                            delay = server._bucket.take(len(chunk))
                            if delay > 0:
                                time.sleep(delay)
                        self.wfile.write(chunk)
                        pos += len(chunk)
                        rec.bytes_sent = pos - start
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True
                finally:
                    if fh:
                        fh.close()

        return Handler
