"""Hosts behind a jump host (`proxy_jump:`, or ProxyJump from `ssh -G` for an alias).

Two real sshds on loopback: the target and the jump. Loopback cannot hide the target from the
controller, so the tests show the path instead: the jump sshd logs the direct-tcpip channel it
opened to the target's port, and with the jump stopped the target cannot be reached.
"""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.config import HostConfig
from orchestrator.errors import ConnectError
from orchestrator.providers.ssh import SSHProvider
from orchestrator.testing import pypi
from orchestrator.testing.pypi import LocalIndex
from orchestrator.testing.sshd import SSHServer, find_sshd
from orchestrator.testing.stockhost import index_env, set_env
from orchestrator.transport.endpoint import Endpoint
from orchestrator.transport.jump import parse_jump
from orchestrator.transport.ssh import SSHAuth, SSHTransport

pytestmark = [pytest.mark.sshd, pytest.mark.skipif(find_sshd() is None, reason="sshd not installed")]

loopback_index = pypi.loopback_index     # the fixture: pip and uv on the host ask loopback only


@pytest.fixture
def pair(tmp_path: Path, loopback_index: LocalIndex):
    target = SSHServer(base_dir=tmp_path / "target", extra_config=set_env(**index_env(loopback_index.url)))
    jump = SSHServer(base_dir=tmp_path / "jump", extra_config={"LogLevel": "DEBUG1"})
    with target, jump:
        jump.authorize_key(target.client_public_key)     # one key for both, as with rented hosts
        yield target, jump


def forwarded_to(jump: SSHServer, port: int) -> bool:
    text = jump.log_path.read_text(errors="replace")
    return f"target 127.0.0.1 port {port}" in text and "direct-tcpip" in text


def test_parse_jump() -> None:
    assert parse_jump("bastion", "root") == Endpoint("bastion", 22, "root")
    assert parse_jump("ops@10.0.0.1:2222", "root") == Endpoint("10.0.0.1", 2222, "ops")
    assert parse_jump("ssh://ops@[fe80::1]:22", "root") == Endpoint("fe80::1", 22, "ops")
    with pytest.raises(ConnectError, match="only one jump host"):
        parse_jump("a,b", "root")


@pytest.mark.timeout(120)
def test_transport_runs_and_transfers_through_the_jump(pair, tmp_path: Path) -> None:
    target, jump = pair
    ep = Endpoint("127.0.0.1", target.port, target.user, jump=f"{jump.user}@127.0.0.1:{jump.port}")
    auth = SSHAuth(identity_file=str(target.client_key_path), allow_agent=False, look_for_keys=False)
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("through the jump\n")
    with SSHTransport(lambda: ep, root=str(tmp_path / "root"), auth=auth, reconnect_deadline_s=5) as t:
        assert t.run("echo $SSH_CONNECTION").stdout.split()[2:] == ["127.0.0.1", str(target.port)]
        t.put(src, "dst")
        assert t.read_text("dst/a.txt") == "through the jump\n"
        assert t.pinned_key == target.host_key_public     # the target's key, not the jump's
    assert forwarded_to(jump, target.port)
    jump.stop()
    with SSHTransport(lambda: ep, root=str(tmp_path / "root"), auth=auth, reconnect_deadline_s=2) as t2:
        with pytest.raises(ConnectError, match="cannot connect"):
            t2.run("true")


def test_alias_proxyjump_comes_from_ssh_g(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "ssh_config"
    cfg.write_text("Host rented-box\n  HostName 10.1.2.3\n  Port 2200\n  User ubuntu\n"
                   "  ProxyJump ops@bastion.example:2222\n")
    monkeypatch.setenv("ORCHESTRATE_SSH_CONFIG", str(cfg))

    host = HostConfig(name="boxed", provider="ssh", ssh_alias="rented-box", price_per_hour=1.0)
    ep = SSHProvider(host, home=tmp_path).resolve_endpoint()
    assert ep == Endpoint("10.1.2.3", 2200, "ubuntu", jump="ops@bastion.example:2222")


@pytest.mark.timeout(900)
def test_orchestrate_run_through_a_jump_host(pair, tmp_path: Path, loopback_index: LocalIndex) -> None:
    target, jump = pair
    (tmp_path / "experiments.yaml").write_text(f"""\
name: jump
hosts:
  hidden:
    provider: ssh
    host: 127.0.0.1
    port: {target.port}
    user: {target.user}
    proxy_jump: {jump.user}@127.0.0.1:{jump.port}
    identity_file: {target.client_key_path}
    gpu: cpu
    price_per_hour: 1.0
    python: {sys.executable}
    root: {tmp_path / 'hostroot'}
    stop_command: "true"
datasets:
  demo: {{generate: {{size: 16, seed: 0}}}}
experiments:
  - name: ngp
    steps: 4
""")
    env = {**os.environ, **index_env(loopback_index.url), "ORCHESTRATE_HOME": str(tmp_path / "home")}
    res = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", "experiments.yaml", "--yes",
                          "--runs-dir", str(tmp_path / "runs")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=800)
    assert res.returncode == 0, res.stderr[-3000:]
    con = sqlite3.connect(tmp_path / "home" / "ledger.sqlite")
    [(status, out_dir)] = con.execute("SELECT status, out_dir FROM jobs").fetchall()
    con.close()
    assert status == "succeeded"
    assert json.loads((Path(out_dir) / "summary.json").read_text())["steps"] == 4
    assert forwarded_to(jump, target.port)
