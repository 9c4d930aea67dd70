"""Issue 16 end to end: the fake cloud produces the documented failure states, and `orchestrate`
(the real CLI, the real provider clients, real sshd instances, a real SQLite ledger) copes.

The states and their shapes follow the providers' documentation (sources are cited in
tests/test_provider_documented.py): vast.ai's `status_msg` for a container that failed to start,
404/410 `no_such_ask` for an offer rented meanwhile, 429 with Retry-After, the attach-ssh call;
RunPod's errors with HTTP 200 and `isIpPublic`; Lambda's older instance-type list.
"""
from __future__ import annotations

import json
import threading

import paramiko
import pytest

from orchestrator.config import HostConfig
from orchestrator.errors import CapacityError, ProviderError
from orchestrator.ledger import Ledger, parse_iso
from orchestrator.providers._http import RetryPolicy
from orchestrator.providers.base import InstanceSpec, InstanceState
from orchestrator.providers.lambdalabs import LambdaProvider
from orchestrator.providers.runpod import RunPodProvider
from orchestrator.providers.vastai import VastProvider
from orchestrator.run.provisioning import provision, release
from orchestrator.testing.fakecloud import FakeCloud, fake_cloud, fake_host, host_config  # noqa: F401 (fixture)
from orchestrator.testing.faultmatrix import Harness

pytestmark = [pytest.mark.sshd, pytest.mark.timeout(300)]
CLASSES = {"vastai": VastProvider, "runpod": RunPodProvider, "lambda": LambdaProvider}
FAST = RetryPolicy(deadline_s=5.0, attempt_timeout_s=2.0, backoff_s=0.02, max_backoff_s=0.1,
                   release_deadline_s=20.0, release_max_backoff_s=1.0)
POLL_S = 2.0   # provisioning.wait_running's poll interval


def provider(fc: FakeCloud, kind: str, **extra):
    return CLASSES[kind](fake_host(fc, kind, **extra), policy=FAST)


def host(fc: FakeCloud, kind: str, **extra) -> HostConfig:
    return HostConfig(name="cloud", **host_config(fc, kind, **extra))


def run(h: Harness, *extra: str):
    return h.cli("run", str(h.config), "--yes", "--runs-dir", str(h.dir / "runs"), *extra, timeout_s=240)


def only_instance(fc: FakeCloud):
    insts = list(fc.world.instances.values())
    assert len(insts) == 1, insts
    return insts[0]


# -- vast.ai: a container that fails at boot ---------------------------------------------------
def test_run_vast_boot_failure_is_destroyed_within_one_poll(fake_cloud, tmp_path):
    h = Harness(tmp_path, fake_cloud, "vastai")
    fake_cloud.set_faults(boot_fail_next=1)
    res = run(h)
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-2000:]
    # one clear line naming the provider's own message
    lines = [ln for ln in res.stderr.splitlines() if "failed at boot" in ln]
    assert lines and "OCI runtime create failed" in lines[0], res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    inst = only_instance(fake_cloud)
    failed_at = inst.created_at + fake_cloud.world.faults.boot_s
    bill = fake_cloud.bill()["instances"][inst.id]
    print(f"boot failure: destroyed {inst.ended_at - failed_at:.2f} s after the failure; "
          f"{bill['gpu_seconds']:.2f} s billed by the fake cloud")
    assert inst.status == "terminated" and fake_cloud.live_count() == 0
    assert inst.ended_at - failed_at <= POLL_S + 0.5
    assert bill["gpu_seconds"] < 30
    ledger = Ledger(h.home / "ledger.sqlite")
    try:
        (row,) = ledger.instances()
        assert row.state == "destroyed" and not ledger.open_billing()
        assert ledger.instance_cost(row.row_id) < 30 * row.price_per_hour / 3600 + 1e-9
    finally:
        ledger.close()


def test_run_429_burst_on_destroy_ends_destroyed(fake_cloud, tmp_path):
    h = Harness(tmp_path, fake_cloud, "vastai")
    fake_cloud.set_faults(boot_fail_next=1, fail_next=6, fail_status=429, fail_methods=["DELETE"],
                          fail_retry_after_s=0.5)
    res = run(h)
    assert res.returncode == 1, res.stderr[-2000:]
    assert fake_cloud.world.faults.fail_next == 0          # the whole burst was met, and outlasted
    inst = only_instance(fake_cloud)
    assert inst.status == "terminated" and fake_cloud.live_count() == 0
    ledger = Ledger(h.home / "ledger.sqlite")
    try:
        (row,) = ledger.instances()
        assert row.state == "destroyed" and not ledger.open_billing()
        assert not [e for e in ledger.events() if e["kind"] == "release_failed"]
        # the ledger closed the interval when the provider agreed, after the burst (6 x 0.5 s)
        failed_at = inst.created_at + fake_cloud.world.faults.boot_s
        print(f"429 burst: destroyed {inst.ended_at - failed_at:.1f} s after the boot failure, "
              f"after 6 refusals with Retry-After 0.5 s; ledger billed {ledger.instance_cost(row.row_id):.6f} USD")
        assert parse_iso(row.ended_at).timestamp() - inst.created_at >= 6 * 0.5
    finally:
        ledger.close()


def test_429_burst_longer_than_the_window_hands_over_to_reconcile(fake_cloud, tmp_path):
    p = provider(fake_cloud, "vastai")
    iid = p.create(InstanceSpec(label="orch-r1-j1", gpu="RTX 4090", offer_id="7001"))
    ledger = Ledger(tmp_path / "ledger.sqlite")
    try:
        row = ledger.record_intent(run_id="r1", job_id="j1", host_name="cloud", provider="vastai",
                                   label="orch-r1-j1", gpu="RTX 4090", price_per_hour=0.44, currency="USD")
        ledger.instance_created(row, iid)
        fake_cloud.set_faults(fail_next=1000, fail_status=429, fail_methods=["DELETE"], fail_retry_after_s=0.2)
        short = VastProvider(fake_host(fake_cloud, "vastai"),
                             policy=RetryPolicy(backoff_s=0.05, release_deadline_s=1.5, release_max_backoff_s=0.3))
        assert release(short, iid, row, ledger=ledger, run_id="r1", job_id="j1") is False
        (event,) = [e for e in ledger.events("r1") if e["kind"] == "release_failed"]
        assert "429" in event["message"] and "orchestrate down --orphans" in event["message"]
        assert ledger.instance(row).state == "creating" and fake_cloud.live_count() == 1
        fake_cloud.set_faults(fail_next=0)
        assert release(p, iid, row, ledger=ledger) is True   # what reconciliation then does
        assert fake_cloud.live_count() == 0 and not ledger.open_billing()
    finally:
        ledger.close()


# -- vast.ai: the offer is rented between search and create ------------------------------------
def test_run_offer_lost_between_search_and_create_is_capacity(fake_cloud, tmp_path):
    h = Harness(tmp_path, fake_cloud, "vastai")
    fake_cloud.set_faults(offer_lost_next=1)
    res = run(h)
    assert res.returncode == 1
    assert "is gone (rented since the search)" in res.stderr, res.stderr[-2000:]
    assert fake_cloud.bill()["created"] == 0
    ledger = Ledger(h.home / "ledger.sqlite")
    try:
        (row,) = ledger.instances()
        assert row.state == "failed" and row.instance_id is None
    finally:
        ledger.close()


def test_vast_offer_lost_raises_capacity_error(fake_cloud):
    fake_cloud.set_faults(offer_lost_next=1)
    with pytest.raises(CapacityError, match="no_such_ask|not available"):
        provider(fake_cloud, "vastai").create(InstanceSpec(label="orch-r1-j1", gpu="RTX 4090", offer_id="7001"))
    assert fake_cloud.bill()["created"] == 0


# -- vast.ai: the run's key is attached; an account without it still gets in -------------------
def test_vast_run_key_attached_to_an_instance_without_account_keys(fake_cloud, tmp_path):
    fake_cloud.set_faults(vast_no_account_keys=True)
    p = provider(fake_cloud, "vastai")
    ledger = Ledger(tmp_path / "ledger.sqlite")
    try:
        prov = provision(p, host(fake_cloud, "vastai"), ledger=ledger, run_id="r1", job_id="j1",
                         label="orch-r1-j1", ready_timeout_s=30, stop=threading.Event())
        info = p.describe(prov.instance_id)
        c = paramiko.SSHClient()
        c.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        c.connect(info.endpoint.host, info.endpoint.port, info.endpoint.user,
                  key_filename=str(fake_cloud.client_key_path), timeout=10, allow_agent=False, look_for_keys=False)
        try:
            _, out, _ = c.exec_command("echo in", timeout=30)
            assert out.read().decode() == "in\n"
        finally:
            c.close()
        inst = fake_cloud.world.instances[prov.instance_id]
        assert inst.no_account_keys and inst.extra_keys == [fake_cloud.world.account_public_key]
        # the offer's own storage and traffic prices went into the ledger
        assert ledger.instance(prov.row_id).storage_price_per_hour == pytest.approx(20 * 0.15 / 730)
        (traffic,) = [e for e in ledger.events("r1") if e["kind"] == "offer_traffic_price"]
        assert "into the instance 0.01 USD/GB, out of it 0.02 USD/GB" in traffic["message"]
        assert release(p, prov.instance_id, prov.row_id, ledger=ledger)
    finally:
        ledger.close()


# -- RunPod: errors with HTTP 200, a private-only SSH port, the placed price ---------------------
def test_runpod_graphql_errors_with_200_are_retried_on_idempotent_calls(fake_cloud):
    p = provider(fake_cloud, "runpod")
    fake_cloud.set_faults(gql_errors_next=1)
    with pytest.raises(ProviderError, match="Something went wrong"):
        p.create(InstanceSpec(label="orch-r1-j1", gpu="RTX 4090", offer_id="NVIDIA GeForce RTX 4090"))
    assert fake_cloud.bill()["created"] == 0          # the create was not resent
    iid = p.create(InstanceSpec(label="orch-r1-j1", gpu="RTX 4090", offer_id="NVIDIA GeForce RTX 4090"))
    fake_cloud.set_faults(gql_errors_next=2)
    assert p.describe(iid).state in (InstanceState.BOOTING, InstanceState.RUNNING)
    fake_cloud.set_faults(gql_errors_next=2)
    p.destroy(iid)                                     # one transient error no longer leaves it billing
    assert fake_cloud.live_count() == 0 and fake_cloud.world.faults.gql_errors_next == 0


def test_runpod_private_ssh_port_fails_the_boot_and_is_destroyed(fake_cloud, tmp_path):
    fake_cloud.set_faults(private_ssh_next=1)
    p = provider(fake_cloud, "runpod")
    ledger = Ledger(tmp_path / "ledger.sqlite")
    try:
        with pytest.raises(ProviderError, match="isIpPublic"):
            provision(p, host(fake_cloud, "runpod"), ledger=ledger, run_id="r1", job_id="j1",
                      label="orch-r1-j1", ready_timeout_s=60, stop=threading.Event())
        assert fake_cloud.live_count() == 0
        (row,) = ledger.instances()
        assert row.state == "destroyed"
    finally:
        ledger.close()


def test_runpod_placed_price_is_recorded_in_the_ledger(fake_cloud, tmp_path):
    # The offer list shows 0.34; the pod lands at 0.41 (the fake places it at its catalog price).
    fake_cloud.world.catalog = {**fake_cloud.world.catalog,
                                "runpod": [("NVIDIA GeForce RTX 4090", "RTX 4090", 0.41)]}
    p = provider(fake_cloud, "runpod")
    ledger = Ledger(tmp_path / "ledger.sqlite")
    try:
        cfg = host(fake_cloud, "runpod", price_per_hour=0.34)   # what the intent recorded
        prov = provision(p, cfg, ledger=ledger, run_id="r1", job_id="j1", label="orch-r1-j1",
                         ready_timeout_s=30, stop=threading.Event())
        row = ledger.instance(prov.row_id)
        assert prov.price_per_hour == 0.41 and row.price_per_hour == 0.41
        assert [b.price_per_hour for b in ledger.billing(prov.row_id)] == [0.41]
        assert any(e["kind"] == "instance_price" and "0.41" in e["message"] for e in ledger.events("r1"))
        assert release(p, prov.instance_id, prov.row_id, ledger=ledger)
    finally:
        ledger.close()


# -- Lambda: the older instance-type list ------------------------------------------------------
def test_lambda_older_type_list_never_rents_eight_gpus(fake_cloud, tmp_path):
    fake_cloud.set_faults(lambda_old_types=True, lambda_no_capacity=["gpu_1x_a10"])
    p = provider(fake_cloud, "lambda")
    ledger = Ledger(tmp_path / "ledger.sqlite")
    try:
        with pytest.raises(CapacityError):
            provision(p, host(fake_cloud, "lambda"), ledger=ledger, run_id="r1", job_id="j1",
                      label="orch-r1-j1", ready_timeout_s=30, stop=threading.Event())
        assert fake_cloud.bill()["created"] == 0          # gpu_8x_a10 had capacity: not taken
        fake_cloud.set_faults(lambda_no_capacity=[])
        prov = provision(p, host(fake_cloud, "lambda"), ledger=ledger, run_id="r1", job_id="j2",
                         label="orch-r1-j2", ready_timeout_s=30, stop=threading.Event())
        assert fake_cloud.world.instances[prov.instance_id].offer_id == "gpu_1x_a10"
        assert prov.price_per_hour == 0.75
        assert release(p, prov.instance_id, prov.row_id, ledger=ledger)
    finally:
        ledger.close()


# -- run and status name orphans of dead runs; run terminates Lambda's -------------------------
def test_status_lists_and_run_terminates_lambda_orphans(fake_cloud, tmp_path):
    h = Harness(tmp_path, fake_cloud, "vastai")
    doc = json.loads(h.config.read_text())
    doc["hosts"]["lam"] = {**doc["hosts"]["cloud"], "provider": "lambda", "gpu": "A10"}
    h.config.write_text(json.dumps(doc))
    h.home.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(h.home / "ledger.sqlite")
    ids = {}
    try:   # a run that died with two instances up (no lock held: its controller is gone)
        ledger.create_run("dead1", "faults-vastai", str(h.config), 5.0, "USD")
        for job, kind, offer in (("j1", "vastai", "7001"), ("j2", "lambda", "gpu_1x_a10@us-fake-1")):
            label = f"orch-dead1-{job}"
            row = ledger.record_intent(run_id="dead1", job_id=job, host_name="cloud", provider=kind,
                                       label=label, gpu="x", price_per_hour=0.5, currency="USD")
            ids[kind] = provider(fake_cloud, kind).create(InstanceSpec(label=label, gpu="x", offer_id=offer))
            ledger.instance_created(row, ids[kind])
        ledger.finish_run("dead1", "failed")
    finally:
        ledger.close()
    res = h.cli("status")
    assert res.returncode == 0, res.stderr[-2000:]
    for kind in ("vastai", "lambda"):
        line = next(ln for ln in res.stderr.splitlines() if ln.startswith("orphan ") and ids[kind] in ln)
        assert "orphan" in line and "orchestrate down --orphans" in line
    assert fake_cloud.live_count() == 2                   # status only lists
    fake_cloud.set_faults(boot_fail_next=1)               # keep the run itself short
    res = run(h)
    said = [ln for ln in res.stderr.splitlines() if ln.startswith("orphan ")]
    lam_line = next(ln for ln in said if ids["lambda"] in ln)
    vast_line = next(ln for ln in said if ids["vastai"] in ln)
    assert lam_line.endswith("terminated"), lam_line
    assert "orchestrate down --orphans" in vast_line
    assert fake_cloud.world.instances[ids["lambda"]].status == "terminated"
    assert fake_cloud.world.instances[ids["vastai"]].status != "terminated"
    res = h.cli("down", "--orphans", "--yes")
    assert res.returncode == 0 and fake_cloud.live_count() == 0
