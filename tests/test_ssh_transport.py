"""SSHTransport against a real OpenSSH sshd on 127.0.0.1 (orchestrator.testing.sshd)."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest

from orchestrator.errors import CommandError, ConnectError, HostKeyMismatch
from orchestrator.providers.base import Endpoint
from orchestrator.secrets import read_secret
from orchestrator.testing.sshd import SSHServer, sshd_server  # noqa: F401  (fixture)
from orchestrator.transport.base import Transport
from orchestrator.transport.ssh import SSHAuth, SSHTransport

pytestmark = pytest.mark.sshd


def make_transport(srv: SSHServer, root: Path | str, **kw) -> SSHTransport:
    kw.setdefault("auth", SSHAuth(identity_file=str(srv.client_key_path), allow_agent=False,
                                  look_for_keys=False))
    return SSHTransport(lambda: Endpoint(srv.host, srv.port, srv.user), root=str(root), **kw)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_commands_results_env_and_errors(sshd_server: SSHServer, tmp_path: Path) -> None:
    tr = make_transport(sshd_server, tmp_path / "root")
    assert isinstance(tr, Transport)
    assert tr.connects == 0                              # lazy: nothing connected yet
    res = tr.run('echo "$GREETING"; pwd; echo oops >&2', env={"GREETING": "hello world"})
    assert (res.exit_code, res.ok) == (0, True)
    assert res.stdout == f"hello world\n{tmp_path / 'root'}\n"
    assert res.stderr == "oops\n" and res.duration_s > 0
    assert tr.root == str(tmp_path / "root") and tr.connects == 1
    res = tr.run("exit 7", check=False)
    assert res.exit_code == 7 and not res.ok
    with pytest.raises(CommandError) as err:
        tr.run("for i in $(seq 1 30); do echo line$i; done; exit 3")
    assert err.value.exit_code_remote == 3
    assert "exit code 3" in str(err.value) and "line30" in str(err.value) and "line1\n" not in str(err.value)
    assert tr.connects == 1                              # one connection for all of it
    tr.close()


def test_root_tilde_expanded_on_host(sshd_server: SSHServer) -> None:
    tr = make_transport(sshd_server, "~/orch-test-root-expansion")
    try:
        assert tr.root == os.path.expanduser("~/orch-test-root-expansion")
        assert tr.run("pwd").stdout.strip() == tr.root
    finally:
        tr.run(f"rmdir {tr.root}", check=False)
        tr.close()


def test_command_timeout_is_bounded(sshd_server: SSHServer, tmp_path: Path) -> None:
    tr = make_transport(sshd_server, tmp_path)
    t0 = time.monotonic()
    with pytest.raises(CommandError) as err:
        tr.run("sleep 20", timeout_s=1.0)
    assert err.value.exit_code_remote == 124
    assert time.monotonic() - t0 < 5
    tr.close()


def test_password_auth_and_redaction(tmp_path: Path, monkeypatch, caplog) -> None:
    password = "Tr0ub4dor-and-3-horses"
    monkeypatch.setenv("ORCH_TEST_SSH_PASSWORD", password)
    caplog.set_level(logging.DEBUG)
    with SSHServer(password=password, base_dir=tmp_path / "sshd") as srv:
        secret = read_secret(env="ORCH_TEST_SSH_PASSWORD", what="test password")
        tr = make_transport(srv, tmp_path / "root",
                            auth=SSHAuth(password=secret, allow_agent=False, look_for_keys=False))
        assert tr.run("echo in").stdout == "in\n"
        assert password not in repr(tr.auth)
        with pytest.raises(CommandError) as err:
            tr.run(f"echo using {password}; echo {password} >&2; exit 5")
        text = str(err.value) + err.value.command + err.value.output_tail
        assert password not in text and "***" in text and "exit code 5" in text
        bad = make_transport(srv, tmp_path / "root", reconnect_deadline_s=2,
                             auth=SSHAuth(password="not-the-password", allow_agent=False,
                                          look_for_keys=False))
        with pytest.raises(ConnectError, match="authentication"):
            bad.run("true")
        tr.close()
    assert password not in caplog.text


def test_host_key_pinned_at_first_contact_and_kept_on_new_port(sshd_server: SSHServer,
                                                                 tmp_path: Path) -> None:
    pins: list[str] = []
    tr = make_transport(sshd_server, tmp_path, on_first_key=pins.append)
    tr.run("true")
    assert pins == [sshd_server.host_key_public]
    old_port = sshd_server.port
    sshd_server.restart(new_port=True)
    assert sshd_server.port != old_port
    assert tr.run("echo again").stdout == "again\n"     # re-resolved, same key accepted
    assert tr.endpoint.port == sshd_server.port and tr.connects == 2
    assert pins == [sshd_server.host_key_public]         # not pinned twice
    tr.close()


def test_changed_host_key_refused_and_nothing_runs(sshd_server: SSHServer, tmp_path: Path) -> None:
    pinned = sshd_server.host_key_public
    sshd_server.restart(new_port=True, new_host_key=True)
    marker = tmp_path / "marker"
    tr = make_transport(sshd_server, tmp_path, pinned_key=pinned)
    with pytest.raises(HostKeyMismatch) as err:
        tr.run(f"touch {marker}")
    assert "changed" in str(err.value) and str(sshd_server.port) in str(err.value)
    assert err.value.hint
    assert not marker.exists()
    with pytest.raises(HostKeyMismatch):                  # stays refused, never retried into success
        tr.write_text(str(marker), "x")
    assert not marker.exists()


def test_unreachable_endpoint_fails_within_deadline(tmp_path: Path) -> None:
    calls: list[float] = []

    def resolve() -> Endpoint:
        calls.append(time.monotonic())
        return Endpoint("127.0.0.1", 9, "root")        # discard port: connection refused
    tr = SSHTransport(resolve, root=str(tmp_path), reconnect_deadline_s=1.5, backoff_initial_s=0.2,
                      auth=SSHAuth(allow_agent=False, look_for_keys=False))
    t0 = time.monotonic()
    with pytest.raises(ConnectError) as err:
        tr.run("true")
    assert time.monotonic() - t0 < 4
    assert len(calls) >= 3                               # resolved again before every attempt
    assert "127.0.0.1:9" in str(err.value)


def test_detached_survives_drop_and_reattaches_on_new_port(sshd_server: SSHServer,
                                                           tmp_path: Path) -> None:
    tr = make_transport(sshd_server, tmp_path)
    pid = tr.start_detached("for i in $(seq 1 40); do echo tick $i; sleep 0.1; done; echo finished",
                            log_path="jobs/j1/log.txt", env={"X_UNUSED": "1"})
    try:
        time.sleep(0.4)
        assert alive(pid)
        assert "tick 1" in tr.read_text("jobs/j1/log.txt")
        sshd_server.kill_sessions()                      # the connection drops
        assert alive(pid)
        sshd_server.restart(new_port=True)               # the host comes back on another port
        assert alive(pid)
        text = tr.read_text("jobs/j1/log.txt")           # re-resolves and reconnects
        assert tr.connects == 2 and tr.endpoint.port == sshd_server.port
        n = int(text.strip().splitlines()[-1].split()[-1])
        deadline = time.monotonic() + 30
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        final = tr.read_text("jobs/j1/log.txt")
        assert final.count("tick 1\n") == 1 and final.endswith("finished\n")   # one copy, ran through
        assert n > 1
    finally:
        if alive(pid):
            os.kill(pid, 9)
    tr.close()


def test_read_write_text_atomic(sshd_server: SSHServer, tmp_path: Path) -> None:
    tr = make_transport(sshd_server, tmp_path)
    assert tr.read_text("nope/status.json") is None
    tr.write_text("jobs/a/status.json", '{"phase": "tr\u00e4in"}\n')
    assert (tmp_path / "jobs/a/status.json").read_text() == '{"phase": "tr\u00e4in"}\n'
    assert tr.read_text("jobs/a/status.json") == '{"phase": "tr\u00e4in"}\n'
    assert os.listdir(tmp_path / "jobs/a") == ["status.json"]   # no temp file left behind
    tr.close()


def test_output_is_complete_when_the_exit_status_comes_first(sshd_server: SSHServer, tmp_path: Path) -> None:
    """sshd can send a command's exit status before its last output; reading stopped at the exit
    status lost `echo $!` now and then (a session's next job then failed with "could not read the
    pid"). Detached starts while other channels of the connection are busy all return their pid."""
    import threading
    tr = make_transport(sshd_server, tmp_path / "root")
    stop = threading.Event()
    failures: list[str] = []
    pids: list[int] = []

    def busy() -> None:       # other channels at work, as a pull beside a start is
        while not stop.is_set():
            tr.run("head -c 2000000 /dev/zero | md5sum >/dev/null")

    def starter() -> None:
        for _ in range(75):
            try:
                pids.append(tr.start_detached("sleep 0.2", log_path=str(tmp_path / "root" / "log.txt")))
            except Exception as exc:  # noqa: BLE001 - counted and shown below
                failures.append(str(exc))

    others = [threading.Thread(target=busy) for _ in range(2)]
    starters = [threading.Thread(target=starter) for _ in range(4)]
    for th in others + starters:
        th.start()
    for th in starters:
        th.join(timeout=120)
    stop.set()
    for th in others:
        th.join(timeout=60)
    assert failures == []
    assert len(pids) == 300 and all(p > 1 for p in pids)
