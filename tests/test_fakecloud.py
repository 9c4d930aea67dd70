"""The fake cloud: real sshd instances, port changes, its own bill, self-stop, faults, restart."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import paramiko
import pytest

from orchestrator.errors import ProviderError
from orchestrator.providers._http import RetryPolicy
from orchestrator.providers.base import InstanceSpec, InstanceState
from orchestrator.providers.lambdalabs import LambdaProvider
from orchestrator.providers.runpod import RunPodProvider
from orchestrator.providers.vastai import VastProvider
from orchestrator.testing.fakecloud import FakeCloud, fake_cloud, fake_host, host_config  # noqa: F401 (fixture)

pytestmark = pytest.mark.sshd
CLASSES = {"vastai": VastProvider, "runpod": RunPodProvider, "lambda": LambdaProvider}
FAST = RetryPolicy(deadline_s=5.0, attempt_timeout_s=2.0, backoff_s=0.02, max_backoff_s=0.1)


def provider(fc: FakeCloud, kind: str, **extra):
    return CLASSES[kind](fake_host(fc, kind, **extra), policy=FAST)


def wait_state(p, iid: str, state: InstanceState, timeout_s: float = 10.0, need_endpoint: bool = True):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = p.describe(iid)
        if info.state == state and (info.endpoint is not None or not need_endpoint or state != InstanceState.RUNNING):
            return info
        time.sleep(0.05)
    raise AssertionError(f"{iid} not {state} after {timeout_s} s: {info}")


def ssh_run(fc: FakeCloud, info, command: str) -> str:
    c = paramiko.SSHClient()
    c.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    c.connect(info.endpoint.host, info.endpoint.port, info.endpoint.user, key_filename=str(fc.client_key_path),
              timeout=10, allow_agent=False, look_for_keys=False)
    try:
        _, out, _ = c.exec_command(command, timeout=30)
        return out.read().decode()
    finally:
        c.close()


def refuses(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.parametrize("kind", ["vastai", "runpod"])
def test_lifecycle_new_port_on_every_start(fake_cloud, kind):
    p = provider(fake_cloud, kind)
    iid = p.create(InstanceSpec(label="orch-r1-j1", gpu=p.__class__ is LambdaProvider and "A10" or "RTX 4090"))
    first = wait_state(p, iid, InstanceState.RUNNING)
    assert ssh_run(fake_cloud, first, "echo hello") == "hello\n"
    p.stop(iid)
    assert wait_state(p, iid, InstanceState.STOPPED).endpoint is None
    assert refuses(first.endpoint.port)
    p.start(iid)
    second = wait_state(p, iid, InstanceState.RUNNING)
    assert second.endpoint.port != first.endpoint.port
    assert ssh_run(fake_cloud, second, "echo again") == "again\n"
    p.destroy(iid)
    assert p.list("orch-") == []
    assert refuses(second.endpoint.port)
    assert fake_cloud.running_count() == 0 and fake_cloud.live_count() == 0


def test_lambda_launch_terminate(fake_cloud):
    p = provider(fake_cloud, "lambda")
    iid = p.create(InstanceSpec(label="orch-r1-j2", gpu="A10"))
    info = wait_state(p, iid, InstanceState.RUNNING)
    assert ssh_run(fake_cloud, info, "echo up") == "up\n"
    assert [i.instance_id for i in p.list("orch-r1-")] == [iid]
    p.stop(iid)   # == terminate on Lambda
    assert p.list("orch-") == [] and fake_cloud.live_count() == 0


def test_bill_by_its_own_clock(fake_cloud):
    vast = provider(fake_cloud, "vastai", disk_gb=73)
    lam = provider(fake_cloud, "lambda")
    v = vast.create(InstanceSpec(label="orch-b-1", gpu="RTX 4090", disk_gb=73))
    lid = lam.create(InstanceSpec(label="orch-b-2", gpu="A10"))
    httpx.post(f"{fake_cloud.url}/_fake/clock", json={"advance_s": 3600}).raise_for_status()
    vast.stop(v)
    lam.destroy(lid)
    httpx.post(f"{fake_cloud.url}/_fake/clock", json={"advance_s": 7200}).raise_for_status()
    vast.destroy(v)
    bill = httpx.get(f"{fake_cloud.url}/_fake/bill").json()
    bv, bl = bill["instances"][v], bill["instances"][lid]
    assert bv["gpu_cost"] == pytest.approx(0.44, rel=1e-3)                      # one hour of RTX 4090
    assert bv["storage_cost"] == pytest.approx(2 * 73 * 0.15 / 730, rel=1e-3)   # two hours of 73 GB stopped
    assert bv["storage_cost"] == pytest.approx(2 * vast.billing.storage_price_per_hour, rel=1e-3)
    # an hour and a fraction of a second, billed in whole minutes: 61 of them
    assert bl["gpu_cost"] == pytest.approx(0.75 * 3660 / 3600, rel=1e-9)
    assert bill["running"] == 0 and bill["live"] == 0


def test_lambda_bills_whole_minutes(fake_cloud):
    lam = provider(fake_cloud, "lambda")
    lid = lam.create(InstanceSpec(label="orch-m-1", gpu="A10"))
    time.sleep(0.2)
    lam.destroy(lid)
    b = fake_cloud.bill()["instances"][lid]
    assert b["gpu_seconds"] < 5 and b["gpu_cost"] == pytest.approx(60 * 0.75 / 3600)


@pytest.mark.parametrize("kind", ["vastai", "runpod"])
def test_instance_stops_itself_with_its_scoped_key(fake_cloud, kind):
    p = provider(fake_cloud, kind)
    other = p.create(InstanceSpec(label="orch-s-2", gpu="RTX 4090"))
    iid = p.create(InstanceSpec(label="orch-s-1", gpu="RTX 4090"))
    info = wait_state(p, iid, InstanceState.RUNNING)
    env = ssh_run(fake_cloud, info, "echo $CONTAINER_ID $RUNPOD_POD_ID")
    assert env.split() == [iid, iid]
    # the scoped key cannot touch another instance nor destroy
    key_var = "$CONTAINER_API_KEY" if kind == "vastai" else "$RUNPOD_API_KEY"
    denied = ssh_run(fake_cloud, info, f"curl -s -o /dev/null -w '%{{http_code}}' -X DELETE "
                                       f"-H \"Authorization: Bearer {key_var}\" {fake_cloud.url}/api/v0/instances/{other}/")
    assert denied == "401"
    # Stopping kills the instance's processes, the session running the command included.
    ssh_run(fake_cloud, info, p.self_stop_command(iid))
    assert p.describe(iid).state == InstanceState.STOPPED
    assert p.describe(other).state != InstanceState.STOPPED


def test_never_ssh_fault(fake_cloud):
    fake_cloud.set_faults(never_ssh=1)
    p = provider(fake_cloud, "runpod")
    iid = p.create(InstanceSpec(label="orch-n-1", gpu="RTX 4090"))
    time.sleep(0.6)
    info = p.describe(iid)
    assert info.state == InstanceState.RUNNING and info.endpoint is None
    p.destroy(iid)


def test_slow_boot_fault(fake_cloud):
    fake_cloud.set_faults(boot_s=1.5)
    p = provider(fake_cloud, "vastai")
    iid = p.create(InstanceSpec(label="orch-sb-1", gpu="RTX 4090"))
    time.sleep(0.5)
    assert p.describe(iid).state == InstanceState.BOOTING
    t0 = time.monotonic()
    wait_state(p, iid, InstanceState.RUNNING)
    assert 0.5 < time.monotonic() - t0 + 0.5 < 3.0
    p.destroy(iid)


def test_5xx_fault_retried_on_reads_not_on_create(fake_cloud):
    p = provider(fake_cloud, "vastai")
    fake_cloud.set_faults(fail_next=2, fail_status=503)
    assert p.list("orch-") == []                      # two 503s, then the answer
    assert fake_cloud.world.faults.fail_next == 0
    fake_cloud.set_faults(fail_next=1, fail_status=502, fail_methods=["PUT"])
    with pytest.raises(ProviderError, match="502"):
        p.create(InstanceSpec(label="orch-f-1", gpu="RTX 4090", offer_id="7001"))
    assert fake_cloud.bill()["created"] == 0


@pytest.mark.parametrize("kind", ["vastai", "runpod", "lambda"])
def test_lost_create_reply_instance_found_by_label_and_destroyed(fake_cloud, kind):
    p = provider(fake_cloud, kind)
    fake_cloud.set_faults(lose_create_replies=1)
    label = f"orch-lost-{kind}"
    with pytest.raises(ProviderError, match="may have taken effect"):
        p.create(InstanceSpec(label=label, gpu="A10" if kind == "lambda" else "RTX 4090"))
    assert fake_cloud.bill()["created"] == 1 and fake_cloud.live_count() == 1
    found = [i for i in p.list(label) if i.label == label]
    assert len(found) == 1
    p.destroy(found[0].instance_id)
    assert fake_cloud.live_count() == 0 and fake_cloud.running_count() == 0


def test_state_survives_restart_and_port_changes(tmp_path, monkeypatch):
    fc = FakeCloud(tmp_path / "state").start()
    try:
        monkeypatch.setenv("FAKECLOUD_API_KEY", fc.api_key)
        p = provider(fc, "vastai")
        iid = p.create(InstanceSpec(label="orch-rs-1", gpu="RTX 4090"))
        before = wait_state(p, iid, InstanceState.RUNNING)
        key_before = fc.world.servers[iid].host_key_public
    finally:
        fc.stop()
    assert refuses(before.endpoint.port)       # sshd children killed on shutdown
    fc2 = FakeCloud(tmp_path / "state").start()
    try:
        assert fc2.api_key == os.environ["FAKECLOUD_API_KEY"]
        p2 = provider(fc2, "vastai")
        after = wait_state(p2, iid, InstanceState.RUNNING)
        assert after.endpoint.port != before.endpoint.port
        assert fc2.world.servers[iid].host_key_public == key_before   # same machine, same host key
        assert ssh_run(fc2, after, "echo back") == "back\n"
        assert fc2.bill()["instances"][iid]["gpu_seconds"] > 0
        p2.destroy(iid)
    finally:
        fc2.stop()


def test_wrong_api_key_refused_in_each_dialect(fake_cloud, monkeypatch):
    monkeypatch.setenv("WRONG_KEY", "not-the-key")
    for kind in CLASSES:
        p = CLASSES[kind](fake_host(fake_cloud, kind, api_key_env="WRONG_KEY"), policy=FAST)
        with pytest.raises(ProviderError) as exc:
            p.list("orch-")
        assert exc.value.status == 401


def test_cli_serves_and_kills_sshd_on_sigterm(tmp_path):
    state = tmp_path / "st"
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.testing.fakecloud", "--port", "0",
                             "--state", str(state), "--log-level", "WARNING"], stdout=subprocess.PIPE, text=True)
    try:
        line = json.loads(proc.stdout.readline())
        url = line["url"]
        assert (state / "url").read_text().strip() == url
        key = json.loads((state / "fakecloud.json").read_text())["api_key"]
        h = {"Authorization": f"Bearer {key}"}
        r = httpx.put(f"{url}/api/v0/asks/7001/", json={"label": "orch-cli-1"}, headers=h).json()
        iid = str(r["new_contract"])
        deadline = time.monotonic() + 10
        port = None
        while time.monotonic() < deadline and not port:
            inst = httpx.get(f"{url}/api/v0/instances/{iid}/", headers=h).json()["instances"]
            port = inst["ssh_port"] or (inst["ports"] or {}).get("22/tcp", [{}])[0].get("HostPort")
            time.sleep(0.05)
        assert port and not refuses(int(port))
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    assert refuses(int(port))
    saved = json.loads((state / "fakecloud.json").read_text())
    assert [i["id"] for i in saved["instances"]] == [iid]


def test_stop_kills_detached_processes_of_that_instance_only(fake_cloud, tmp_path):
    p = provider(fake_cloud, "vastai")
    a = p.create(InstanceSpec(label="orch-k-1", gpu="RTX 4090"))
    b = p.create(InstanceSpec(label="orch-k-2", gpu="RTX 4090"))
    ia, ib = wait_state(p, a, InstanceState.RUNNING), wait_state(p, b, InstanceState.RUNNING)
    pids = {}
    for iid, info in ((a, ia), (b, ib)):
        out = ssh_run(fake_cloud, info, "setsid -f sleep 300 >/dev/null 2>&1 </dev/null; sleep 0.2; "
                                        "pgrep -n -f 'sleep 300' ")
        pids[iid] = int(out.split()[-1])
    p.stop(a)
    time.sleep(0.2)
    assert not Path(f"/proc/{pids[a]}").exists() or "Z" in Path(f"/proc/{pids[a]}/stat").read_text().split()[2]
    assert Path(f"/proc/{pids[b]}").exists()
    p.destroy(b)
    p.destroy(a)
    time.sleep(0.2)
    assert not Path(f"/proc/{pids[b]}").exists() or "Z" in Path(f"/proc/{pids[b]}/stat").read_text().split()[2]


def test_each_instance_has_its_own_home_and_our_python(fake_cloud):
    p = provider(fake_cloud, "runpod")
    a, b = (p.create(InstanceSpec(label=f"orch-h-{i}", gpu="RTX 4090")) for i in (1, 2))
    homes = [ssh_run(fake_cloud, wait_state(p, i, InstanceState.RUNNING),
                     "echo $HOME; python3 -c 'import sys; print(sys.executable)'").split() for i in (a, b)]
    assert homes[0][0] != homes[1][0] and homes[0][0].endswith(a) and homes[1][0].endswith(b)
    assert os.path.realpath(homes[0][1]) == os.path.realpath(sys.executable)
    p.destroy(a)
    p.destroy(b)


@pytest.mark.parametrize("kind", ["vastai", "runpod"])
def test_boot_guard_stops_an_instance_nobody_set_up(fake_cloud, tmp_path, kind):
    """The create-time dead-man's switch (vast `onstart`, RunPod `dockerArgs`): no work root
    activity for idle_timeout_s -> self-stop with the instance's own scoped key."""
    p = provider(fake_cloud, kind)
    guard = p.boot_guard(root=str(tmp_path / "never-made"), idle_timeout_s=2)
    iid = p.create(InstanceSpec(label="orch-bg-1", gpu="RTX 4090", onstart=guard))
    wait_state(p, iid, InstanceState.RUNNING)
    assert wait_state(p, iid, InstanceState.STOPPED, timeout_s=15).endpoint is None


@pytest.mark.parametrize("kind", ["vastai", "runpod"])
def test_boot_guard_hands_over_to_the_job_watchdog(fake_cloud, tmp_path, kind):
    root = tmp_path / "root"
    (root / "jobs" / "j1").mkdir(parents=True)
    (root / "jobs" / "j1" / "heartbeat").touch()
    p = provider(fake_cloud, kind)
    iid = p.create(InstanceSpec(label="orch-bg-2", gpu="RTX 4090",
                                onstart=p.boot_guard(root=str(root), idle_timeout_s=1)))
    wait_state(p, iid, InstanceState.RUNNING)
    time.sleep(4)
    assert p.describe(iid).state == InstanceState.RUNNING
    p.destroy(iid)


def test_boot_guard_waits_while_a_process_works_in_the_root(fake_cloud, tmp_path):
    """A long bootstrap writes nothing for minutes (building tiny-cuda-nn) but is alive."""
    root = tmp_path / "busy-root"
    worker = subprocess.Popen(["bash", "-c", f'exec -a "worker {root}" sleep 6'])
    try:
        p = provider(fake_cloud, "vastai")
        iid = p.create(InstanceSpec(label="orch-bg-3", gpu="RTX 4090",
                                    onstart=p.boot_guard(root=str(root), idle_timeout_s=1)))
        wait_state(p, iid, InstanceState.RUNNING)
        time.sleep(3)
        assert p.describe(iid).state == InstanceState.RUNNING      # the worker is still at it
        worker.wait(timeout=10)
        assert wait_state(p, iid, InstanceState.STOPPED, timeout_s=15).state == InstanceState.STOPPED
    finally:
        worker.kill()
        worker.wait()
