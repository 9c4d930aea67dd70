"""The `ssh` provider (hand-rented hosts) and connect_ssh with a real ledger and a real sshd."""
from __future__ import annotations

import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from orchestrator.config import HostConfig
from orchestrator.errors import ConfigError, HostKeyMismatch, ProviderError
from orchestrator.ledger import Ledger
from orchestrator.providers import make_provider
from orchestrator.providers.base import Endpoint, InstanceSpec, InstanceState, Provider
from orchestrator.providers.ssh import SHUTDOWN_COMMAND, SSHProvider
from orchestrator.secrets import read_secret
from orchestrator.testing.hosts import make_host
from orchestrator.testing.sshd import SSHServer, sshd_server  # noqa: F401  (fixture)
from orchestrator.transport import connect
from orchestrator.transport.endpoint import is_this_machine, parse_endpoint


def host(**kw: Any) -> HostConfig:
    return make_host("ssh", **{"name": "rented", "gpu": "H100", "price_per_hour": 15.0, "currency": "CNY", **kw})


@pytest.mark.parametrize("text,expected", [
    ("root@1.2.3.4:22022\n", Endpoint("1.2.3.4", 22022, "root")),
    ("ubuntu@gpu.example.com:2200", Endpoint("gpu.example.com", 2200, "ubuntu")),
    ("10.0.0.5:40001", Endpoint("10.0.0.5", 40001, "root")),
    ("\n  admin@box  \n", Endpoint("box", 22, "admin")),
    ("ssh -p 34567 root@region-9.example.net", Endpoint("region-9.example.net", 34567, "root")),
    ("ssh root@h.example -p 2222 -o StrictHostKeyChecking=no", Endpoint("h.example", 2222, "root")),
    ("user@[2001:db8::1]:2022", Endpoint("2001:db8::1", 2022, "user")),
])
def test_parse_endpoint(text: str, expected: Endpoint) -> None:
    assert parse_endpoint(text) == expected


@pytest.mark.parametrize("bad", ["", "   \n", "root@host:notaport", "root@host:70000"])
def test_parse_endpoint_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_endpoint(bad)


def test_config_errors_are_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="exactly one of host, ssh_alias, endpoint_command"):
        SSHProvider(host(), home=tmp_path)
    with pytest.raises(ConfigError, match=r"got host, endpoint_command"):
        SSHProvider(host(host="a", endpoint_command="echo a:1"), home=tmp_path)
    with pytest.raises(ConfigError, match="price_per_hour is required"):
        SSHProvider(host(host="a", price_per_hour=None), home=tmp_path)


def test_registry_and_protocol(tmp_path: Path) -> None:
    p = make_provider(host(host="gpu.example", port=2222), home=tmp_path)
    assert isinstance(p, SSHProvider) and isinstance(p, Provider)
    assert p.transport_kind == "ssh"
    assert p.offers("H100")[0].price_per_hour == 15.0 and p.offers("H100")[0].currency == "CNY"


def test_endpoint_command_rerun_at_every_describe(tmp_path: Path) -> None:
    src = tmp_path / "endpoint.txt"
    src.write_text("root@127.0.0.1:40001\n")
    p = SSHProvider(host(endpoint_command=f"cat {src}"), home=tmp_path)
    iid = p.create(InstanceSpec(label="orch-r1-j1", gpu="H100"))
    assert p.describe(iid).endpoint == Endpoint("127.0.0.1", 40001, "root")
    src.write_text("ubuntu@127.0.0.1:40777\n")            # the platform restarted it elsewhere
    info = p.describe(iid)
    assert info.endpoint == Endpoint("127.0.0.1", 40777, "ubuntu")
    assert info.state is InstanceState.RUNNING and info.price_per_hour == 15.0
    assert [i.instance_id for i in p.list("orch-r1")] == [iid] and p.list("orch-r2") == []


def test_endpoint_command_failure_is_redacted(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ORCH_TEST_PLATFORM_TOKEN", "tok-9f8e7d6c5b4a")
    token = read_secret(env="ORCH_TEST_PLATFORM_TOKEN", what="platform token")
    p = SSHProvider(host(endpoint_command=f"echo denied for {token} >&2; exit 3"), home=tmp_path)
    iid = p.create(InstanceSpec(label="orch-r-j", gpu="H100"))
    with pytest.raises(ProviderError) as err:
        p.describe(iid)
    assert "exit 3" in str(err.value) and token not in str(err.value) and "***" in str(err.value)
    garbage = SSHProvider(host(name="g", endpoint_command="echo 'not an endpoint at all'"), home=tmp_path)
    gid = garbage.create(InstanceSpec(label="orch-r-j", gpu="H100"))
    with pytest.raises(ProviderError, match="not user@host:port"):
        garbage.describe(gid)


def test_ssh_alias_resolved_by_openssh_each_time(tmp_path: Path, monkeypatch) -> None:
    cfg = tmp_path / "user_ssh_config"
    cfg.write_text("Host my-h100\n    HostName 127.0.0.1\n    Port 41001\n    User ubuntu\n")
    monkeypatch.setenv("ORCHESTRATE_SSH_CONFIG", str(cfg))
    p = SSHProvider(host(ssh_alias="my-h100"), home=tmp_path)
    iid = p.create(InstanceSpec(label="orch-a-b", gpu="H100"))
    assert p.describe(iid).endpoint == Endpoint("127.0.0.1", 41001, "ubuntu")
    cfg.write_text("Host my-h100\n    HostName 127.0.0.1\n    Port 41999\n    User ubuntu\n")
    assert p.describe(iid).endpoint.port == 41999


def test_stop_command_and_lifecycle(tmp_path: Path) -> None:
    marker = tmp_path / "stopped-by-platform"
    p = SSHProvider(host(host="127.0.0.1", port=2222, stop_command=f"echo stop >> {marker}"),
                    home=tmp_path)
    iid = p.create(InstanceSpec(label="orch-x-y", gpu="H100"))
    p.stop(iid)
    assert marker.read_text() == "stop\n"
    info = p.describe(iid)
    assert info.state is InstanceState.STOPPED and info.endpoint is None
    p.destroy(iid)                                           # already stopped: not stopped twice
    assert marker.read_text() == "stop\n"
    assert p.describe(iid).state is InstanceState.TERMINATED
    failing = SSHProvider(host(name="f", host="127.0.0.1", stop_command="exit 9"), home=tmp_path)
    fid = failing.create(InstanceSpec(label="orch-x-z", gpu="H100"))
    with pytest.raises(ProviderError, match="exit 9"):
        failing.stop(fid)
    assert failing.describe(fid).state is InstanceState.RUNNING   # not marked stopped on failure


def _own_address() -> str | None:
    out = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    return out[0] if out else None


def test_this_machine_detection() -> None:
    assert is_this_machine("127.0.0.1") and is_this_machine("localhost") and is_this_machine("::1")
    assert is_this_machine("127.3.4.5")
    own = _own_address()
    if own:
        assert is_this_machine(own)
    assert not is_this_machine("192.0.2.10")                 # TEST-NET-1: never ours
    assert not is_this_machine("no-such-host.invalid")


@pytest.mark.parametrize("address", ["127.0.0.1", "localhost", "own"])
def test_shutdown_refused_on_this_machine(tmp_path: Path, address: str) -> None:
    address = _own_address() if address == "own" else address
    if address is None:
        pytest.skip("this machine has no non-loopback address")
    p = SSHProvider(host(host=address, port=22, shutdown_on_host=True), home=tmp_path)
    iid = p.create(InstanceSpec(label="orch-s-d", gpu="H100"))
    assert p.self_stop_command(iid) is None
    with pytest.raises(ProviderError, match="refusing `shutdown -h now`.*this machine") as err:
        p.host_shutdown_command(iid)        # what release() asks before it would run it over SSH
    assert err.value.hint
    assert p.describe(iid).state is InstanceState.RUNNING


def test_self_stop_command_for_a_remote_host(tmp_path: Path) -> None:
    p = SSHProvider(host(host="192.0.2.10", shutdown_on_host=True), home=tmp_path)
    assert p.self_stop_command("any") == SHUTDOWN_COMMAND
    q = SSHProvider(host(host="192.0.2.10", stop_command="platform-cli stop x"), home=tmp_path)
    assert q.self_stop_command("any") is None


@pytest.mark.sshd
def test_connect_ssh_pins_in_ledger_and_follows_port(sshd_server: SSHServer, tmp_path: Path) -> None:
    endpoint_file = tmp_path / "ep"
    endpoint_file.write_text(f"{sshd_server.user}@127.0.0.1:{sshd_server.port}\n")
    cfg = host(endpoint_command=f"cat {endpoint_file}", identity_file=str(sshd_server.client_key_path),
               root=str(tmp_path / "root"))
    p = SSHProvider(cfg, home=tmp_path / "home")
    ledger = Ledger.open(tmp_path / "home")
    row = ledger.record_intent(run_id="r1", job_id="j1", host_name="rented", provider="ssh",
                               label="orch-r1-j1", gpu="H100", price_per_hour=15, currency="CNY")
    iid = p.create(InstanceSpec(label="orch-r1-j1", gpu="H100"))
    ledger.instance_created(row, iid)
    tr = connect(p, iid, cfg, ledger=ledger, instance_row=row)
    assert tr.run("echo $((2+3))").stdout == "5\n"
    assert ledger.host_key(row) == sshd_server.host_key_public
    assert ledger.instance(row).endpoint == f"{sshd_server.user}@127.0.0.1:{sshd_server.port}"
    sshd_server.restart(new_port=True)
    endpoint_file.write_text(f"{sshd_server.user}@127.0.0.1:{sshd_server.port}\n")
    assert tr.run("echo again").stdout == "again\n"
    assert ledger.instance(row).endpoint.endswith(f":{sshd_server.port}")
    tr.close()
    # a later connection (e.g. after a controller restart) uses the pin from the ledger
    sshd_server.restart(new_port=False, new_host_key=True)
    marker = tmp_path / "root" / "marker"
    tr2 = connect(p, iid, cfg, ledger=ledger, instance_row=ledger.instance(row))
    with pytest.raises(HostKeyMismatch):
        tr2.run(f"touch {marker}")
    assert not marker.exists()
    assert ledger.host_key(row) != sshd_server.host_key_public   # the pin was not overwritten
    ledger.close()


def test_no_listener_on_discard_port_needed() -> None:
    # guards the unreachable-endpoint test in test_ssh_transport: port 9 must refuse here
    with socket.socket() as s:
        s.settimeout(2)
        assert s.connect_ex(("127.0.0.1", 9)) != 0
