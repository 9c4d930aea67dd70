"""A fake cloud for tests and demos: one local HTTP server speaking the subset of the vast.ai
REST, RunPod GraphQL and Lambda Cloud v1 APIs that our clients use, with the providers' quirks
(vast's `success` flags and whitespace IPs, RunPod's errors with HTTP 200, Lambda's error
objects). Its instances are real sshd processes on 127.0.0.1, on a new port at every start.

    python -m orchestrator.testing.fakecloud --port 8790 --state /tmp/fc

    with FakeCloud(state_dir) as fc:          # a thread on 127.0.0.1, port 0 = any free port
        host_cfg = {"provider": "vastai", "api_base": fc.url, "api_key_env": ...}

Point all three providers' `api_base` at `fc.url`. The API key is `fc.api_key`; instances accept
the SSH key `fc.client_key_path`. Test-only endpoints (no auth):
  GET  /_fake/bill        per-instance GPU/storage seconds and cost by the fake's own clock
  GET  /_fake/instances   raw records            POST /_fake/faults   set fault switches (JSON)
  GET  /_fake/faults                             POST /_fake/clock    {"advance_s": S}
Fault switches (see `Faults`) also produce the providers' documented failure states: a container
that fails at boot with a `status_msg` (`boot_fail_next`), an offer rented between search and
create (`offer_lost_next`), RunPod errors with HTTP 200 (`gql_errors_next`), a private-only SSH
port (`private_ssh_next`), a 429 burst with Retry-After (`fail_next` + `fail_status: 429` +
`fail_retry_after_s`), Lambda's older instance-type list (`lambda_old_types`,
`lambda_no_capacity`), vast instances that accept only attached keys (`vast_no_account_keys`),
preemption (`preempt_after_s`, `World.preempt`: the instance is gone) and interruptible
instances: vast offers carry `min_bid` (RunPod `minimumBidPrice`), a create with a `"price"`
(RunPod `podRentInterruptable` `bidPerGpu`) below it is refused, and an outbid (`outbid_after_s`,
`World.outbid`) stops the instance while it is intended running.
Self-stop: each instance's sessions see CONTAINER_ID/CONTAINER_API_KEY (vast) and
RUNPOD_POD_ID/RUNPOD_API_KEY (RunPod); that scoped key may stop that instance and nothing else.
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ..config import HostConfig
from . import fakecloud_api as api
from .fakecloud_state import FakeCloudError, World
from .pypi import LocalIndex, wheelhouse_from_env
from .stockhost import index_env

log = logging.getLogger(__name__)

TICK_S = 0.05


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: Any) -> None:  # route to logging, not stderr
        log.debug("fakecloud %s - %s", self.address_string(), fmt % args)

    def _body(self) -> Any:
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return None

    def _send(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _dispatch(self, method: str) -> None:
        world = self.server.world
        parts = urlsplit(self.path)
        path, query = parts.path, {k: v[-1] for k, v in parse_qs(parts.query).items()}
        body = self._body()
        token = (self.headers.get("Authorization") or "").removeprefix("Bearer ").strip()
        token = token or query.get("api_key", "")
        try:
            if path.startswith("/_fake/"):
                status, reply = api.fake_admin(world, method, path, body)
            else:
                failure = world.take_failure(method)
                if failure is not None:
                    after = world.faults.fail_retry_after_s
                    self._send(failure, api.failure_body(path, failure),
                               {"Retry-After": f"{after:g}"} if after is not None else None)
                    return
                status, reply = api.route(world, method, path, query, body, token)
        except api.LostReply as lost:
            if lost.delay_s > 0:
                time.sleep(lost.delay_s)
            self.close_connection = True   # the work is done; the reply never leaves
            return
        except FakeCloudError as exc:
            status, reply = api.error_body(path, exc)
        self._send(status, reply)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    world: World

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that died mid-request (the fault tests SIGKILL controllers) is not news.
        log.debug("fakecloud: connection from %s ended abruptly", client_address, exc_info=True)


class FakeCloud:
    """The fake cloud as an object: start() serves in a background thread on 127.0.0.1."""

    def __init__(self, state_dir: Path | str, *, port: int = 0, host: str = "127.0.0.1",
                 api_key: str | None = None) -> None:
        self.world = World(Path(state_dir), api_key=api_key)
        self.host = host
        self._port = port
        self._httpd: _Server | None = None
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self.index: LocalIndex | None = None

    @property
    def port(self) -> int:
        return self._httpd.server_address[1] if self._httpd else self._port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def api_key(self) -> str:
        return self.world.api_key

    @property
    def client_key_path(self) -> Path:
        return self.world.account_key_path

    def start(self) -> FakeCloud:
        # With the CI wheelhouse, the instances' pip and uv ask a package index on loopback only,
        # so no test traffic leaves the box (without one they keep the machine's configuration).
        wheelhouse = wheelhouse_from_env()
        if wheelhouse is not None:
            self.index = LocalIndex(wheelhouse).start()
            self.world.host_env = index_env(self.index.url)
        self._httpd = _Server((self.host, self._port), _Handler)
        self._httpd.world = self.world
        self._stop.clear()
        self._threads = [threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                          name="fakecloud-http", daemon=True),
                         threading.Thread(target=self._ticker, name="fakecloud-tick", daemon=True)]
        for t in self._threads:
            t.start()
        log.info("fakecloud serving on %s (state %s)", self.url, self.world.state_dir)
        return self

    def _ticker(self) -> None:
        while not self._stop.wait(TICK_S):
            try:
                self.world.tick()
            except Exception:   # keep serving; the failure is logged with its traceback
                log.exception("fakecloud tick failed")

    def stop(self) -> None:
        """Stop serving and kill every instance's sshd (instances stay in the state file)."""
        self._stop.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        for t in self._threads:
            t.join(timeout=5)
        self.world.shutdown()
        if self.index is not None:
            self.index.stop()
            self.index = None

    def __enter__(self) -> FakeCloud:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- conveniences for tests -----------------------------------------------------------
    def bill(self) -> dict[str, Any]:
        return self.world.bill()

    def set_faults(self, **changes: Any) -> None:
        self.world.set_faults(changes)

    def running_count(self) -> int:
        return self.world.bill()["running"]

    def live_count(self) -> int:
        """Instances still costing money (running, booting or stopped)."""
        return self.world.bill()["live"]

    def wait_running(self, instance_id: str, timeout_s: float = 10.0) -> int:
        """Wait until the instance's sshd listens; returns its port."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            inst = self.world.instances.get(instance_id)
            if inst is not None and inst.status == "running" and inst.port:
                return inst.port
            time.sleep(0.02)
        raise TimeoutError(f"fake instance {instance_id} not running after {timeout_s} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.testing.fakecloud",
                                     description="a local fake of the vast.ai/RunPod/Lambda APIs")
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0 = any free)")
    parser.add_argument("--state", required=True, help="state directory (JSON state, sshd dirs, keys)")
    parser.add_argument("--api-key", default=None, help="the account API key (default: kept in the state)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    fc = FakeCloud(args.state, port=args.port, api_key=args.api_key)
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    fc.start()
    (Path(args.state) / "url").write_text(fc.url + "\n")
    print(json.dumps({"url": fc.url, "state": str(Path(args.state).resolve()),
                      "client_key": str(fc.client_key_path)}), flush=True)
    try:
        while not stopped.wait(1.0):
            pass
    finally:
        fc.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def host_config(fc: FakeCloud, provider: str, *, api_key_env: str = "FAKECLOUD_API_KEY", **extra: Any) -> dict[str, Any]:
    """Host settings (as a dict) that point a cloud provider at this fake cloud. The caller must
    export `api_key_env` = fc.api_key (the fixture below does)."""
    gpu = {"vastai": "RTX 4090", "runpod": "RTX 4090", "lambda": "A10"}[provider]
    return {"provider": provider, "gpu": gpu, "api_base": fc.url, "api_key_env": api_key_env,
            "identity_file": str(fc.client_key_path), "user": _local_user(), **extra}


def fake_host(fc: FakeCloud, provider: str, *, name: str = "cloud", **extra: Any) -> HostConfig:
    """The same settings as a typed host entry, for building a provider client directly."""
    fields = host_config(fc, provider, **extra)
    fields.pop("provider")
    return HostConfig(name=name, provider=provider, **fields)


def _local_user() -> str:
    import getpass
    return getpass.getuser()


try:  # the fixture exists where pytest is importable (a test dependency)
    import pytest
except ImportError:  # pragma: no cover
    pytest = None  # type: ignore[assignment]

if pytest is not None:
    @pytest.fixture
    def fake_cloud(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
        """A started FakeCloud on 127.0.0.1 (any port); FAKECLOUD_API_KEY is exported."""
        from .sshd import find_sshd
        if find_sshd() is None:
            pytest.skip("sshd not installed (apt-get install openssh-server)")
        fc = FakeCloud(tmp_path_factory.mktemp("fakecloud")).start()
        monkeypatch.setenv("FAKECLOUD_API_KEY", fc.api_key)
        try:
            yield fc
        finally:
            fc.stop()
