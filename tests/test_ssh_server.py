"""The reusable test sshd (orchestrator.testing.sshd): a real OpenSSH server on 127.0.0.1."""
from __future__ import annotations

import os
import socket
import time

import paramiko
import pytest

from orchestrator.testing.sshd import SSHServer, sshd_server  # noqa: F401  (fixture)

pytestmark = pytest.mark.sshd


def _client(srv: SSHServer, **kw) -> paramiko.SSHClient:
    c = paramiko.SSHClient()
    c.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    if "password" not in kw:
        kw["key_filename"] = str(srv.client_key_path)
    c.connect(srv.host, srv.port, srv.user, look_for_keys=False, allow_agent=False, timeout=10, **kw)
    return c


def _run(c: paramiko.SSHClient, cmd: str) -> str:
    _, out, _ = c.exec_command(cmd, timeout=10)
    return out.read().decode()


def _refuses(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_fixture_serves_key_auth_and_reports_host_key(sshd_server: SSHServer) -> None:
    c = _client(sshd_server)
    try:
        assert _run(c, "echo $((6*7))").strip() == "42"
        key = c.get_transport().get_remote_server_key()
        assert sshd_server.host_key_public == f"{key.get_name()} {key.get_base64()}"
    finally:
        c.close()
    assert sshd_server.host == "127.0.0.1" and sshd_server.port > 0
    assert (sshd_server.dir / "sshd_config").read_text().count(f"Port {sshd_server.port}") == 1


def test_password_auth_and_wrong_password_refused(tmp_path) -> None:
    shadow_before = open("/etc/shadow").read()
    with SSHServer(password="pw-Corr3ct-horse", base_dir=tmp_path) as srv:
        c = _client(srv, password="pw-Corr3ct-horse")
        assert _run(c, "echo ok").strip() == "ok"
        c.close()
        with pytest.raises(paramiko.AuthenticationException):
            _client(srv, password="wrong-password")
    assert open("/etc/shadow").read() == shadow_before   # the real account is untouched


def test_restart_new_port_drops_sessions_keeps_detached(sshd_server: SSHServer, tmp_path) -> None:
    c = _client(sshd_server)
    pid = int(_run(c, f"setsid -f sh -c 'echo $$ > {tmp_path}/pid; exec sleep 60' "
                      f">/dev/null 2>&1 </dev/null; sleep 0.3; cat {tmp_path}/pid"))
    old_port, old_key = sshd_server.port, sshd_server.host_key_public
    assert sshd_server.session_pids()
    sshd_server.restart(new_port=True)
    try:
        assert sshd_server.port != old_port
        assert _refuses(old_port)
        with pytest.raises(Exception):
            _run(c, "echo still-here")
        assert os.path.exists(f"/proc/{pid}")         # detached work survives the restart
        c2 = _client(sshd_server)
        assert _run(c2, "echo back").strip() == "back"
        assert sshd_server.host_key_public == old_key
        c2.close()
    finally:
        os.kill(pid, 9)


def test_kill_sessions_keeps_listener(sshd_server: SSHServer) -> None:
    c = _client(sshd_server)
    assert _run(c, "echo 1").strip() == "1"
    assert sshd_server.kill_sessions() >= 1
    deadline = time.monotonic() + 5
    while c.get_transport().is_active() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not c.get_transport().is_active()
    c2 = _client(sshd_server)
    assert _run(c2, "echo 2").strip() == "2"
    c2.close()


def test_restart_with_new_host_key_same_port(sshd_server: SSHServer) -> None:
    port, key = sshd_server.port, sshd_server.host_key_public
    sshd_server.restart(new_port=False, new_host_key=True)
    assert sshd_server.port == port
    assert sshd_server.host_key_public != key
    c = _client(sshd_server)
    served = c.get_transport().get_remote_server_key()
    assert f"{served.get_name()} {served.get_base64()}" == sshd_server.host_key_public
    c.close()


def test_stop_frees_port(tmp_path) -> None:
    srv = SSHServer(base_dir=tmp_path).start()
    port = srv.port
    srv.stop()
    assert not srv.running and _refuses(port)


def test_sessions_get_a_plain_rc_and_this_python(sshd_server: SSHServer) -> None:
    import sys
    rc = os.path.expanduser("~/.bashrc")
    before = open(rc).read() if os.path.exists(rc) else None
    c = _client(sshd_server)
    try:
        assert _run(c, "command -v python").strip() == os.path.join(os.path.dirname(sys.executable), "python")
        t0 = time.monotonic()
        for _ in range(3):
            assert _run(c, "echo x").strip() == "x"
        assert time.monotonic() - t0 < 6     # no per-session shell init (pyenv rehash) to wait for
    finally:
        c.close()
    assert (open(rc).read() if os.path.exists(rc) else None) == before   # the real rc untouched
