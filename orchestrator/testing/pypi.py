"""A PEP 503 "simple" package index on loopback, over a directory of wheels (a test double).

Tests that build a host environment point the host's pip and uv at this index alone, so no
test traffic leaves the machine. The wheels come from a wheelhouse filled once when CI sets up
(`.ci/run`: `pip download ... -d "$ORCHESTRATE_TEST_WHEELHOUSE"`); tests never download.

- `/simple/` lists the projects, `/simple/<normalized-name>/` their files (links carry
  `#sha256=` fragments, pip and uv check them), `/files/<filename>` serves a file;
- a name that is not normalized is redirected to the normalized one (PEP 503), an unknown
  project is a 404;
- `LocalIndex.requests` keeps every path asked for, so a test can see what was fetched.

Fixtures (bind one into a test module: `local_index = pypi.local_index`):
- `local_index`: one index over the wheelhouse per test session; a test skips with a one-line
  reason when the wheelhouse is missing or empty;
- `loopback_index`: the same when there is a wheelhouse, else an index with no projects: enough
  for a host whose interpreter already has every requirement (pip and uv ask nothing of it, the
  payload's reachability probe gets its answer), so such a test runs without the wheelhouse.
"""
from __future__ import annotations

import hashlib
import html
import os
import re
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

WHEELHOUSE_ENV = "ORCHESTRATE_TEST_WHEELHOUSE"
DEFAULT_WHEELHOUSE = Path(__file__).resolve().parents[2] / ".ci-wheelhouse"
_SUFFIXES = (".whl", ".tar.gz", ".zip")
_CONTENT_TYPES = {".whl": "application/octet-stream", ".tar.gz": "application/gzip", ".zip": "application/zip"}
_HTML = "text/html; charset=utf-8"


def normalize(name: str) -> str:
    """PEP 503's normalized project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def project_of(filename: str) -> str | None:
    """The normalized project a distribution file belongs to (None: not a distribution)."""
    if filename.endswith(".whl"):
        return normalize(filename.split("-", 1)[0])
    for suffix in (".tar.gz", ".zip"):
        if filename.endswith(suffix) and "-" in filename:
            return normalize(filename[: -len(suffix)].rsplit("-", 1)[0])
    return None


def wheelhouse_from_env() -> Path | None:
    """$ORCHESTRATE_TEST_WHEELHOUSE (unset: the repository's `.ci-wheelhouse/`, what `.ci/run`
    fills) when it is a directory holding at least one wheel."""
    value = os.environ.get(WHEELHOUSE_ENV, "").strip()
    path = Path(value) if value else DEFAULT_WHEELHOUSE
    return path if path.is_dir() and any(path.glob("*.whl")) else None


class LocalIndex:
    """`with LocalIndex(wheelhouse) as index:` → `index.url` is `http://127.0.0.1:<port>/simple/`."""

    def __init__(self, wheelhouse: Path, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.wheelhouse = Path(wheelhouse)
        self.requests: list[str] = []
        self._hashes: dict[str, tuple[int, int, str]] = {}   # filename → (size, mtime_ns, sha256)
        self._lock = threading.Lock()
        index = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                index._serve(self, body=True)

            def do_HEAD(self) -> None:
                index._serve(self, body=False)

            def log_message(self, format: str, *args: object) -> None:   # noqa: A002 (stdlib's name)
                pass                                                      # quiet: tests read .requests

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/simple/"

    def start(self) -> LocalIndex:
        self._thread = threading.Thread(target=self._server.serve_forever, name="local-index", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> LocalIndex:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what is served -------------------------------------------------------------------------
    def files(self) -> dict[str, list[str]]:
        """Normalized project → its file names (read from the directory on every request, so a
        test may add wheels while the index runs)."""
        out: dict[str, list[str]] = {}
        for p in sorted(self.wheelhouse.iterdir()):
            project = project_of(p.name) if p.is_file() and p.name.endswith(_SUFFIXES) else None
            if project:
                out.setdefault(project, []).append(p.name)
        return out

    def sha256(self, filename: str) -> str:
        """The file's sha256, computed once per (size, mtime) of the file."""
        st = (self.wheelhouse / filename).stat()
        with self._lock:
            known = self._hashes.get(filename)
            if known and known[:2] == (st.st_size, st.st_mtime_ns):
                return known[2]
        h = hashlib.sha256()
        with open(self.wheelhouse / filename, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        with self._lock:
            self._hashes[filename] = (st.st_size, st.st_mtime_ns, h.hexdigest())
        return h.hexdigest()

    def _serve(self, req: BaseHTTPRequestHandler, *, body: bool) -> None:
        path = urllib.parse.urlsplit(req.path).path
        with self._lock:
            self.requests.append(urllib.parse.unquote(path))
        parts = [urllib.parse.unquote(p) for p in path.split("/") if p]
        if parts == ["simple"]:
            if not path.endswith("/"):
                return self._redirect(req, "/simple/")
            links = "".join(f'<a href="/simple/{p}/">{html.escape(p)}</a>\n' for p in self.files())
            return self._page(req, "Simple index", links, body=body)
        if len(parts) == 2 and parts[0] == "simple":
            name = normalize(parts[1])
            if name != parts[1] or not path.endswith("/"):
                return self._redirect(req, f"/simple/{name}/")
            names = self.files().get(name)
            if not names:
                return self._status(req, 404, f"no project {name}", body=body)
            links = "".join(f'<a href="/files/{urllib.parse.quote(n)}#sha256={self.sha256(n)}">'
                            f"{html.escape(n)}</a>\n" for n in names)
            return self._page(req, f"Links for {name}", links, body=body)
        if len(parts) == 2 and parts[0] == "files":
            name = parts[1]
            project = project_of(name)
            if project is None or name not in self.files().get(project, []):
                return self._status(req, 404, f"no file {name}", body=body)
            return self._file(req, self.wheelhouse / name, body=body)
        return self._status(req, 404, "not found", body=body)

    @staticmethod
    def _page(req: BaseHTTPRequestHandler, title: str, links: str, *, body: bool) -> None:
        data = (f"<!DOCTYPE html>\n<html><head><meta name=\"pypi:repository-version\" content=\"1.0\">"
                f"<title>{html.escape(title)}</title></head><body>\n{links}</body></html>\n").encode()
        req.send_response(200)
        req.send_header("Content-Type", _HTML)
        req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        if body:
            req.wfile.write(data)

    @staticmethod
    def _file(req: BaseHTTPRequestHandler, path: Path, *, body: bool) -> None:
        suffix = next(s for s in _SUFFIXES if path.name.endswith(s))
        req.send_response(200)
        req.send_header("Content-Type", _CONTENT_TYPES[suffix])
        req.send_header("Content-Length", str(path.stat().st_size))
        req.end_headers()
        if body:
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    req.wfile.write(chunk)

    @staticmethod
    def _redirect(req: BaseHTTPRequestHandler, location: str) -> None:
        req.send_response(301)
        req.send_header("Location", location)
        req.send_header("Content-Length", "0")
        req.end_headers()

    @staticmethod
    def _status(req: BaseHTTPRequestHandler, code: int, text: str, *, body: bool) -> None:
        data = (text + "\n").encode()
        req.send_response(code)
        req.send_header("Content-Type", "text/plain; charset=utf-8")
        req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        if body:
            req.wfile.write(data)


try:
    import pytest
except ImportError:     # the controller runs without the test tools: no fixture then
    pass
else:
    @pytest.fixture(scope="session")
    def local_index() -> Iterator[LocalIndex]:
        """The wheelhouse served on a free loopback port for the test session."""
        wheelhouse = wheelhouse_from_env()
        if wheelhouse is None:
            pytest.skip(f"no wheelhouse for the loopback package index: set {WHEELHOUSE_ENV} to a "
                        "directory of wheels (`bash .ci/run` fills .ci-wheelhouse/)")
        with LocalIndex(wheelhouse) as index:
            yield index

    @pytest.fixture(scope="session")
    def loopback_index(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalIndex]:
        """The wheelhouse served on loopback, or an empty index when there is none."""
        wheelhouse = wheelhouse_from_env() or tmp_path_factory.mktemp("empty-wheelhouse")
        with LocalIndex(wheelhouse) as index:
            yield index
