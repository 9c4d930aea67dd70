"""`orchestrate ssh-config` / `orchestrate ssh`: the managed include file, read by real OpenSSH."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.ledger import Ledger
from orchestrator.testing.sshd import SSHServer, sshd_server  # noqa: F401  (fixture)
from orchestrator.transport.sshconfig import managed_path, refresh_if_present, update_ssh_config


def add_instance(ledger: Ledger, host_name: str, iid: str, endpoint: str | None,
                 key: str | None = None, job: str = "j1") -> int:
    row = ledger.record_intent(run_id="r1", job_id=job, host_name=host_name, provider="ssh",
                               label=f"orch-r1-{job}", gpu="H100", price_per_hour=1, currency="USD")
    ledger.instance_created(row, iid)
    if endpoint:
        ledger.set_endpoint(row, endpoint)
    if key:
        ledger.pin_host_key(row, key)
    return row


def ssh_g(config: Path, name: str) -> dict[str, str]:
    out = subprocess.run(["ssh", "-F", str(config), "-G", name], capture_output=True, text=True,
                         check=True, timeout=10, stdin=subprocess.DEVNULL).stdout
    return {k: v for k, _, v in (line.partition(" ") for line in out.splitlines())}


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], capture_output=True,
                          text=True, env=env, timeout=60, stdin=subprocess.DEVNULL)


@pytest.fixture
def homes(tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    user_home, orch_home = tmp_path / "user", tmp_path / "orch"
    (user_home / ".ssh").mkdir(parents=True)
    env = {**os.environ, "HOME": str(user_home), "ORCHESTRATE_HOME": str(orch_home)}
    return user_home, orch_home, env


def test_ssh_config_writes_blocks_and_include_once(homes, tmp_path: Path) -> None:
    user_home, orch_home, env = homes
    user_cfg = user_home / ".ssh" / "config"
    user_cfg.write_text("Host work\n    HostName work.example\n")
    user_cfg.chmod(0o640)
    ledger = Ledger.open(orch_home)
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOrchestrateTestKeyMaterial000000000000000"
    add_instance(ledger, "rented-h100", "rented-h100-aa11", "root@127.0.0.1:40123", key)
    add_instance(ledger, "cloud", "vast-77", None, job="j2")            # no endpoint yet: no block
    closed = add_instance(ledger, "old", "old-1", "root@10.1.1.1:22", job="j3")
    ledger.set_instance_state(closed, "destroyed")
    ledger.close()

    res = cli(env, "ssh-config", "--json")
    assert res.returncode == 0, res.stderr
    managed = managed_path(orch_home)
    text = user_cfg.read_text()
    assert text.splitlines()[1] == f'Include "{managed}"'             # at the top
    assert text.endswith("Host work\n    HostName work.example\n")    # user's content kept
    assert user_cfg.stat().st_mode & 0o777 == 0o640
    assert cli(env, "ssh-config").returncode == 0
    assert user_cfg.read_text() == text                               # not added twice

    g = ssh_g(user_cfg, "rented-h100")                                # through the Include
    assert (g["hostname"], g["port"], g["user"]) == ("127.0.0.1", "40123", "root")
    assert g["hostkeyalias"] == "orchestrate-rented-h100-aa11"
    kh = Path(g["userknownhostsfile"])
    assert kh.read_text() == f"orchestrate-rented-h100-aa11 {key}\n"
    assert g["stricthostkeychecking"] in ("true", "yes")
    assert ssh_g(user_cfg, "rented-h100-aa11")["port"] == "40123"     # instance id works too
    body = managed.read_text()
    assert "old-1" not in body and "vast-77" not in body and "10.1.1.1" not in body


def test_port_change_reaches_ssh_G(homes) -> None:
    user_home, orch_home, env = homes
    ledger = Ledger.open(orch_home)
    row = add_instance(ledger, "gpu", "gpu-1", "root@127.0.0.1:40001")
    update_ssh_config(ledger, orch_home, user_home=user_home)
    cfg = user_home / ".ssh" / "config"
    assert ssh_g(cfg, "gpu")["port"] == "40001"
    ledger.set_endpoint(row, "root@127.0.0.1:40555")                  # the host came back elsewhere
    refresh_if_present(ledger)                                        # what connect_ssh calls
    assert ssh_g(cfg, "gpu")["port"] == "40555"
    assert ssh_g(cfg, "gpu")["stricthostkeychecking"] == "accept-new"  # nothing pinned yet
    ledger.close()


def test_refresh_without_opt_in_writes_nothing(tmp_path: Path) -> None:
    ledger = Ledger.open(tmp_path / "orch")
    add_instance(ledger, "gpu", "gpu-1", "root@127.0.0.1:40001")
    refresh_if_present(ledger)
    assert not managed_path(tmp_path / "orch").exists()
    ledger.close()


@pytest.mark.sshd
def test_openssh_uses_pinned_key_and_refuses_a_changed_one(sshd_server: SSHServer, homes,
                                                           tmp_path: Path) -> None:
    user_home, orch_home, env = homes
    ledger = Ledger.open(orch_home)
    add_instance(ledger, "box", "box-1", f"{sshd_server.user}@127.0.0.1:{sshd_server.port}",
                 sshd_server.host_key_public)
    update_ssh_config(ledger, orch_home, user_home=user_home)
    ledger.close()
    agent = subprocess.run(["ssh-agent", "-s"], capture_output=True, text=True, check=True).stdout
    agent_env = dict(line.split(";")[0].split("=", 1) for line in agent.splitlines() if "=" in line.split(";")[0])
    env = {**env, **agent_env}
    try:
        subprocess.run(["ssh-add", str(sshd_server.client_key_path)], env=env, check=True,
                       capture_output=True, timeout=10)
        ok = cli(env, "ssh", "box", "--", "echo", "via-orchestrate-ssh")
        assert ok.returncode == 0, ok.stderr
        assert ok.stdout.strip() == "via-orchestrate-ssh"
        unknown = cli(env, "ssh", "nope")
        assert unknown.returncode == 2 and unknown.stderr.startswith("error: no live instance called 'nope'")
        assert "Traceback" not in unknown.stderr
        sshd_server.restart(new_port=False, new_host_key=True)
        marker = tmp_path / "marker"
        bad = cli(env, "ssh", "box", "--", "touch", str(marker))
        assert bad.returncode != 0 and "HOST IDENTIFICATION HAS CHANGED" in bad.stderr
        assert not marker.exists()
    finally:
        subprocess.run(["ssh-agent", "-k"], env=env, capture_output=True, timeout=10)
