"""A tiny real HTTP server that answers canned replies, for testing API clients.

Routes map (METHOD, PATH) to a list of replies served in order (the last one repeats). A reply
is (status, json_body) or (status, json_body, headers), or the string "drop" to close the
connection without answering (a lost reply). Every request is recorded (method, path, query,
headers, JSON body) so tests can assert what the client sent and how many times.

    with CannedAPI({("GET", "/api/v0/instances/7/"): [(503, {}), (200, {"instances": {...}})]}) as srv:
        client = VastProvider(make_host("vastai", **{"api_base": srv.url, ...}))
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

Reply = Any   # (status, body) | (status, body, headers) | "drop" | callable(Request) -> Reply


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any


class CannedAPI:
    def __init__(self, routes: dict[tuple[str, str], list[Reply] | Reply] | None = None) -> None:
        self.routes: dict[tuple[str, str], list[Reply]] = {}
        for key, replies in (routes or {}).items():
            self.set(key[0], key[1], replies)
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None

    def set(self, method: str, path: str, replies: list[Reply] | Reply) -> None:
        self.routes[(method, path)] = list(replies) if isinstance(replies, list) else [replies]

    def calls(self, method: str, path: str) -> list[Request]:
        return [r for r in self.requests if r.method == method and r.path == path]

    @property
    def url(self) -> str:
        assert self._httpd is not None
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def _next(self, req: Request) -> Reply:
        with self._lock:
            self.requests.append(req)
            replies = self.routes.get((req.method, req.path))
            if not replies:
                return (404, {"error": f"no canned reply for {req.method} {req.path}"})
            reply = replies.pop(0) if len(replies) > 1 else replies[0]
        return reply(req) if callable(reply) else reply

    def start(self) -> CannedAPI:
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _go(self) -> None:
                parts = urlsplit(self.path)
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = raw.decode(errors="replace")
                req = Request(self.command, parts.path, {k: v[-1] for k, v in parse_qs(parts.query).items()},
                              {k.lower(): v for k, v in self.headers.items()}, body)
                reply = api._next(req)
                if reply == "drop":
                    self.close_connection = True
                    return
                status, payload, headers = (tuple(reply) + ({},))[:3]
                data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _go

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> CannedAPI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
