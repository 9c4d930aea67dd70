"""Look at a report in a real headless browser: for tests and reviewers, not for users.

`serve_dir` serves a directory on 127.0.0.1 (a random port) from a thread; `chromium` runs
Debian's headless chromium on a URL (`--dump-dom` or `--screenshot`); `ReportDom` reads a
dumped page back: the cells of the results table (value and shown text) and each <video>'s
attributes, including the `data-state` the page's own script sets once the browser has
decoded (or failed to load) the file.
"""
from __future__ import annotations

import functools
import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from html.parser import HTMLParser
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from .collect import ReportError

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")


def chromium_path() -> Path | None:
    found = shutil.which("chromium") or "/usr/bin/chromium"
    return Path(found) if Path(found).exists() else None


def chromium(url: str, user_dir: Path, *extra: str, virtual_time_ms: int = 8000,
             timeout_s: float = 120.0) -> str:
    """Run headless chromium on `url` with `extra` flags; return its stdout."""
    exe = chromium_path()
    if exe is None:
        raise ReportError("chromium is not installed", hint="apt-get install chromium")
    cmd = [str(exe), *CHROMIUM_FLAGS, f"--user-data-dir={user_dir}",
           f"--virtual-time-budget={virtual_time_ms}", *extra, url]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise ReportError(f"chromium exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
    return proc.stdout


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@contextmanager
def serve_dir(directory: Path) -> Iterator[str]:
    """Serve `directory` over HTTP on loopback; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                              daemon=True, name="report-http")
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


class ReportDom(HTMLParser):
    """rows: (data-run, data-job) → {column: (data-value, shown text)} of #results (the mean
    row is ("mean", "<n> jobs")); videos: each <video>'s attributes."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.rows: dict[tuple[str, str], dict[str, tuple[str | None, str]]] = {}
        self.videos: list[dict[str, str | None]] = []
        self._table: str | None = None
        self._row: tuple[str, str] | None = None
        self._cell: tuple[str, str | None] | None = None
        self._text = ""
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "table":
            self._table = a.get("id")
        elif tag == "tr" and self._table == "results" and a.get("data-job"):
            self._row = (a.get("data-run") or "", a["data-job"] or "")
            self.rows[self._row] = {}
        elif tag == "td" and self._row is not None:
            self._cell, self._text = (a.get("data-col") or "", a.get("data-value")), ""
        elif tag == "video":
            self.videos.append(a)

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._text += data

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None and self._row is not None:
            col, value = self._cell
            self.rows[self._row][col] = (value, self._text)
            self._cell = None
        elif tag == "tr":
            self._row = None
        elif tag == "table":
            self._table = None
