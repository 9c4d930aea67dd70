"""Interruptible (bid) instances (issue 15 item 4): `interruptible: true` with `max_bid` on a vast.ai
(or RunPod) host, the bid placed at create, and an outbid instance's job resumed on a new instance.

vast.ai's documented API, as the fake cloud speaks it:
- https://docs.vast.ai/cli/reference/create-instance: `vastai create instance ID --price PRICE`,
  "per machine bid price in $/hour" (the REST body of `PUT /api/v0/asks/{id}/` carries `"price"`);
- a search (`POST /api/v0/bundles/`) with `"type": "bid"` returns interruptible offers, each with
  its current `min_bid`; a bid below it is refused with `success: false` and a `msg`;
- https://docs.vast.ai/cli/reference/change-bid: the bid of a running instance can change; when
  another renter bids more, vast stops the instance (intended `running`, actual `exited`), its
  disk still billing, until the bid wins again.
RunPod (GraphQL, runpod-python's `create_pod` for a spot pod): `gpuTypes.lowestPrice.minimumBidPrice`
is the lowest bid per GPU, `podRentInterruptable(input: {bidPerGpu, gpuCount, gpuTypeId, ...})` rents a
spot pod at the bid; an outbid spot pod reads `desiredStatus: EXITED`.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.config import load_config
from orchestrator.config.model import INTERRUPTIBLE_PROVIDERS, PROVIDERS
from orchestrator.errors import CapacityError, ConfigError
from orchestrator.ledger import Ledger
from orchestrator.providers import REGISTRY
from orchestrator.providers._bid import choose_bid
from orchestrator.providers._http import RetryPolicy
from orchestrator.providers.base import InstanceSpec, InstanceState
from orchestrator.providers.vastai import VastProvider
from orchestrator.testing.fakecloud import fake_cloud, fake_host  # noqa: F401 (fixture)

FAST = RetryPolicy(deadline_s=5.0, attempt_timeout_s=2.0, backoff_s=0.02, max_backoff_s=0.1)


# -- config ----------------------------------------------------------------------------------------
HOSTS = {
    "vastai": "{provider: vastai, gpu: RTX 4090, api_key_env: K",
    "runpod": "{provider: runpod, gpu: RTX 4090, api_key_env: K",
    "lambda": "{provider: lambda, gpu: A10, api_key_env: K",
    "ssh": "{provider: ssh, gpu: RTX 4090, host: box.example, price_per_hour: 1",
    "local": "{provider: local",
    "slurm": "{provider: slurm, host: login.example",
}


def _write(tmp_path: Path, provider: str, extra: str) -> Path:
    p = tmp_path / "e.yaml"
    p.write_text("name: t\nhosts:\n  h: " + HOSTS[provider] + extra + "}\n"
                 "datasets:\n  d: {generate: {size: 16}}\n"
                 "experiments:\n  - {name: e, dataset: d, scenes: [default], hosts: [h], steps: 5}\n")
    return p


def test_only_lambda_and_the_hand_rented_have_no_bids() -> None:
    assert sorted(p for p in PROVIDERS if p not in INTERRUPTIBLE_PROVIDERS) == ["lambda", "local", "slurm", "ssh"]


def test_config_reads_interruptible_and_max_bid(tmp_path: Path) -> None:
    h = load_config(_write(tmp_path, "vastai", ", interruptible: true, max_bid: 0.3")).hosts["h"]
    assert (h.interruptible, h.max_bid) == (True, 0.3)
    h = load_config(_write(tmp_path, "vastai", ", interruptible: true")).hosts["h"]
    assert (h.interruptible, h.max_bid) == (True, None)          # bid: the offer's minimum + a margin
    h = load_config(_write(tmp_path, "vastai", "")).hosts["h"]
    assert (h.interruptible, h.max_bid) == (False, None)


@pytest.mark.parametrize("provider", [p for p in PROVIDERS if p not in INTERRUPTIBLE_PROVIDERS])
def test_config_refuses_interruptible_where_the_provider_has_none(tmp_path: Path, provider: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, provider, ", interruptible: true"))
    msg = str(info.value)
    assert "\n" not in msg
    assert re.search(rf"e\.yaml:3: hosts\.h\.interruptible: provider {provider} has no interruptible offers; "
                     r"interruptible instances are rented from vastai, runpod hosts only", msg), msg


@pytest.mark.parametrize("extra, wanted", [
    (", max_bid: 0.3", r"hosts\.h\.max_bid: a bid is only for interruptible instances; add interruptible: true, "
                       r"or remove max_bid"),
    (", interruptible: false, max_bid: 0.3", r"hosts\.h\.max_bid: a bid is only for interruptible instances"),
    (", interruptible: true, max_bid: 0", r"hosts\.h\.max_bid: must be > 0, got 0"),
    (", interruptible: true, max_bid: -0.2", r"hosts\.h\.max_bid: must be > 0, got -0\.2"),
    (", interruptible: yes please", r"hosts\.h\.interruptible: expected true or false"),
    (", interuptible: true", r"hosts\.h\.interuptible: unknown key; did you mean 'interruptible'"),
])
def test_config_bid_errors_are_one_line(tmp_path: Path, extra: str, wanted: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, "vastai", extra))
    assert "\n" not in str(info.value) and re.search(wanted, str(info.value)), str(info.value)


def test_config_refusal_through_the_cli_is_one_line_and_rents_nothing(tmp_path: Path) -> None:
    path = _write(tmp_path, "lambda", ", interruptible: true, max_bid: 0.5")
    env = {**os.environ, "ORCHESTRATE_HOME": str(tmp_path / "home"), "K": "not-a-real-key"}
    res = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", str(path), "--yes"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "provider lambda has no interruptible offers" in res.stderr
    assert len([ln for ln in res.stderr.splitlines() if "interruptible" in ln]) == 1


def test_the_config_list_is_the_providers_capability() -> None:
    """config may not import providers, so it keeps its own list; it must say what they say."""
    import importlib
    for name, target in REGISTRY.items():
        module, _, attr = target.partition(":")
        cls = getattr(importlib.import_module(module), attr)
        assert cls.interruptible_offers == (name in INTERRUPTIBLE_PROVIDERS), name


def test_estimate_plans_an_interruptible_entry_at_its_bid(tmp_path: Path) -> None:
    path = _write(tmp_path, "vastai", ", interruptible: true, max_bid: 0.25")
    env = {k: v for k, v in os.environ.items() if k != "K"}
    env["ORCHESTRATE_HOME"] = str(tmp_path / "home")
    res = subprocess.run([sys.executable, "-m", "orchestrator.cli", "estimate", str(path), "--json"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    [job] = out["jobs"]
    assert job["price_per_hour"] == 0.25 and "max_bid" in job["price_detail"]
    assert out["plan"]["instances"][0]["interruptible"] is True
    text = subprocess.run([sys.executable, "-m", "orchestrator.cli", "estimate", str(path)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert text.returncode == 0, text.stderr
    assert "(interruptible, bid ≤ 0.25 USD/h)" in text.stdout


# -- the bid ---------------------------------------------------------------------------------------
def test_the_bid_is_the_minimum_plus_a_margin_capped_at_max_bid() -> None:
    assert choose_bid(0.22, 0.30) == 0.231            # 5 % above the minimum
    assert choose_bid(0.22, None) == 0.231
    assert choose_bid(0.22, 0.225) == 0.225           # the margin is capped at max_bid
    assert choose_bid(0.30, 0.30) == 0.30
    assert choose_bid(0.31, 0.30) is None             # the minimum is already above what we pay
    assert choose_bid(None, 0.30) is None and choose_bid(0.0, 0.30) is None
    assert choose_bid(0.1234, None) == 0.1296         # rounded up to 0.0001 $/h, never below the minimum


CATALOG = [("7401", "RTX 4090", 0.60), ("7402", "RTX 4090", 0.50), ("7403", "RTX 4090", 0.44)]
MIN_BIDS = {"7401": 0.35, "7402": 0.22, "7403": 0.28}


def _bid_world(fc) -> None:
    fc.world.catalog = {**fc.world.catalog, "vastai": CATALOG}
    fc.world.min_bids = dict(MIN_BIDS)


@pytest.mark.sshd
def test_vast_client_bids_min_bid_plus_margin_and_skips_offers_above_max_bid(fake_cloud):
    _bid_world(fake_cloud)
    p = VastProvider(fake_host(fake_cloud, "vastai", interruptible=True, max_bid=0.30), policy=FAST)
    offers = p.offers("RTX 4090")
    # 7401's minimum (0.35) is above max_bid: skipped; the others priced at their bid, cheapest first
    assert [(o.offer_id, o.price_per_hour, o.min_bid, o.interruptible) for o in offers] == [
        ("7402", 0.231, 0.22, True), ("7403", 0.294, 0.28, True)]
    iid = p.create(InstanceSpec(label="orch-b-1", gpu="RTX 4090"))          # no offer named: the cheapest
    inst = fake_cloud.world.instances[iid]
    assert (inst.offer_id, inst.bid, inst.price_per_hour) == ("7402", 0.231, 0.231)
    other = p.create(InstanceSpec(label="orch-b-2", gpu="RTX 4090", offer_id="7403", bid_per_hour=0.29))
    assert fake_cloud.world.instances[other].bid == 0.29                    # the spec's bid, as given
    # the minimum rose past our bid since the search: vast's success: false, tried like a lost offer
    fake_cloud.world.min_bids["7402"] = 0.25
    with pytest.raises(CapacityError, match=r"bid 0\.231/h on offer 7402 refused: .*below the minimum bid 0\.25"):
        p.create(InstanceSpec(label="orch-b-3", gpu="RTX 4090", offer_id="7402", bid_per_hour=0.231))
    assert len(fake_cloud.world.instances) == 2
    for i in (iid, other):
        p.destroy(i)


@pytest.mark.sshd
def test_a_host_that_is_not_interruptible_never_sends_a_price(fake_cloud):
    _bid_world(fake_cloud)
    p = VastProvider(fake_host(fake_cloud, "vastai"), policy=FAST)
    assert [(o.offer_id, o.price_per_hour, o.interruptible) for o in p.offers("RTX 4090")] == [
        ("7403", 0.44, False), ("7402", 0.50, False), ("7401", 0.60, False)]
    a = p.create(InstanceSpec(label="orch-n-1", gpu="RTX 4090"))
    b = p.create(InstanceSpec(label="orch-n-2", gpu="RTX 4090", offer_id="7402", bid_per_hour=0.2))
    assert [(fake_cloud.world.instances[i].bid, fake_cloud.world.instances[i].price_per_hour) for i in (a, b)] \
        == [(None, 0.44), (None, 0.50)]
    for i in (a, b):
        p.destroy(i)


@pytest.mark.sshd
def test_provisioning_records_the_bid_and_an_outbid_reads_stopped(fake_cloud, tmp_path):
    from orchestrator.run.provisioning import Provisioned, note_stopped_by_provider, provision, release
    from orchestrator.run.session import instance_gone
    _bid_world(fake_cloud)
    host = fake_host(fake_cloud, "vastai", interruptible=True, max_bid=0.30)
    p = VastProvider(host, policy=FAST)
    ledger = Ledger(tmp_path / "l.sqlite")
    try:
        ledger.create_run("r1", "t")
        prov = provision(p, host, ledger=ledger, run_id="r1", job_id="j", label="orch-r1-j", ready_timeout_s=30)
        assert isinstance(prov, Provisioned) and prov.price_per_hour == 0.231
        assert fake_cloud.world.instances[prov.instance_id].bid == 0.231
        assert ledger.instance(prov.row_id).price_per_hour == 0.231
        assert not instance_gone(p, prov.instance_id, interruptible=True)
        fake_cloud.world.outbid(prov.instance_id)
        info = p.describe(prov.instance_id)
        assert info.state == InstanceState.STOPPED and info.raw_state.startswith("outbid: stopped by the provider")
        assert info.price_per_hour == pytest.approx(20 * 0.15 / 730)       # the disk alone bills
        assert instance_gone(p, prov.instance_id, interruptible=True)
        assert not instance_gone(p, prov.instance_id)     # an on-demand instance stopped is not gone
        assert note_stopped_by_provider(p, prov, ledger, run_id="r1", job_id="j")
        assert ledger.instance(prov.row_id).state == "stopped"
        assert release(p, prov.instance_id, prov.row_id, ledger=ledger, destroy=True)
        assert [b.kind for b in ledger.billing(prov.row_id)] == ["gpu", "storage"]
        assert all(b.ended_at for b in ledger.billing(prov.row_id))
        assert fake_cloud.live_count() == 0
    finally:
        ledger.close()


@pytest.mark.sshd
def test_runpod_rents_a_spot_pod_at_its_bid_and_an_outbid_pod_is_gone(fake_cloud):
    from orchestrator.providers.runpod import RunPodProvider
    from orchestrator.run.session import instance_gone
    fake_cloud.world.catalog = {**fake_cloud.world.catalog, "runpod": [
        ("NVIDIA GeForce RTX 4090", "RTX 4090", 0.34), ("NVIDIA RTX 4090 Ti", "RTX 4090", 0.50)]}
    fake_cloud.world.min_bids = {"NVIDIA GeForce RTX 4090": 0.16, "NVIDIA RTX 4090 Ti": 0.26}
    p = RunPodProvider(fake_host(fake_cloud, "runpod", interruptible=True, max_bid=0.2), policy=FAST)
    offers = p.offers("RTX 4090")
    assert [(o.offer_id, o.price_per_hour, o.available) for o in offers if o.available] == [
        ("NVIDIA GeForce RTX 4090", 0.168, True)]                # the Ti's minimum (0.26) is above max_bid
    pod = p.create(InstanceSpec(label="orch-s-1", gpu="RTX 4090"))
    assert fake_cloud.world.instances[pod].bid == 0.168          # podRentInterruptable with bidPerGpu
    deadline = time.monotonic() + 10
    while p.describe(pod).state != InstanceState.RUNNING and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not instance_gone(p, pod, interruptible=True)
    fake_cloud.world.outbid(pod)
    assert p.describe(pod).state == InstanceState.STOPPED and instance_gone(p, pod, interruptible=True)
    on_demand = RunPodProvider(fake_host(fake_cloud, "runpod"), policy=FAST)
    other = on_demand.create(InstanceSpec(label="orch-s-2", gpu="RTX 4090", bid_per_hour=0.2))
    assert (fake_cloud.world.instances[other].bid, fake_cloud.world.instances[other].price_per_hour) == (None, 0.34)
    for i in (pod, other):
        p.destroy(i)
    assert fake_cloud.live_count() == 0


def test_a_two_gpu_runpod_spot_pod_is_bid_per_gpu_within_the_machine_s_max_bid() -> None:
    """`max_bid`, like every price of an entry, is the whole instance's; RunPod bids per GPU."""
    from orchestrator.providers.runpod import parse_gpu_offer
    g = {"id": "NVIDIA GeForce RTX 4090", "displayName": "RTX 4090",
         "lowestPrice": {"minimumBidPrice": 0.16, "uninterruptablePrice": 0.34, "stockStatus": "High"}}
    two = parse_gpu_offer(g, 2, bid=True, max_bid=0.4)          # 0.2 per GPU at most
    assert (two.gpu_count, two.interruptible, two.available) == (2, True, True)
    assert two.price_per_hour == pytest.approx(2 * 0.168)       # (min bid + 5 %) per GPU, × 2
    assert not parse_gpu_offer(g, 2, bid=True, max_bid=0.3).available   # 0.15 per GPU < the 0.16 minimum
    assert parse_gpu_offer(g, 2).price_per_hour == pytest.approx(0.68)   # on demand: the per-GPU price × 2


# -- outbid mid-training ---------------------------------------------------------------------------
@pytest.mark.sshd
@pytest.mark.timeout(1200)
def test_outbid_instance_mid_training_resumes_on_a_new_one_from_the_snapshot(fake_cloud, tmp_path):
    """vast stops an interruptible instance when it is outbid: the job goes back in the queue and
    resumes on a new instance from the snapshot that came home; the stopped one is destroyed
    (its disk would bill on), both are billed to the job at the bid, nothing is left running."""
    from orchestrator.testing.faultmatrix import Harness, assert_resumed
    fake_cloud.world.catalog = {**fake_cloud.world.catalog, "vastai": [("7001", "RTX 4090", 0.44)]}
    fake_cloud.world.min_bids = {"7001": 0.20}
    h = Harness(tmp_path, fake_cloud, "vastai", idle_timeout_s=120, steps=800)
    doc = json.loads(h.config.read_text())
    doc["datasets"]["demo"]["generate"]["size"] = 16
    doc["hosts"]["cloud"].pop("root")       # each instance its own disk: the snapshot must come home
    doc["hosts"]["cloud"].update(interruptible=True, max_bid=0.30)
    doc["experiments"][0]["train"] = {"snapshot_every_s": 1.0}
    h.config.write_text(json.dumps(doc))
    h.start_run()
    snap = h.wait_for_pull("*/f-default-cloud/snapshot.pt")
    assert snap is not None, h.run_log()
    [first] = [i for i in fake_cloud.world.instances.values() if i.status == "running"]
    fake_cloud.world.outbid(first.id)
    assert h.proc.wait(timeout=900) == 0, h.run_log()
    bill = fake_cloud.bill()
    assert bill["created"] == 2 and bill["live"] == 0                      # nothing leaked
    assert [i.bid for i in fake_cloud.world.instances.values()] == [0.21, 0.21]   # 0.20 + 5 %, ≤ 0.30
    assert first.status == "terminated"                                    # destroyed, not left stopped
    first_bill = bill["instances"][first.id]
    assert first_bill["gpu_seconds"] > 0 and first_bill["storage_seconds"] > 0
    ledger = Ledger(h.home / "ledger.sqlite")
    try:
        [run] = ledger.runs()
        [job] = ledger.jobs(run["run_id"])
        assert job.status == "succeeded"
        rows = ledger.instances(run_id=run["run_id"])
        assert len(rows) == 2 and all(r.state == "destroyed" for r in rows)
        assert [r.price_per_hour for r in rows] == [0.21, 0.21]
        assert [r.instance_id for r in rows][0] == first.id
        assert [b.kind for b in ledger.billing(rows[0].row_id)] == ["gpu", "storage"]   # outbid: the disk alone
        shares = ledger.job_costs(run["run_id"])
        assert sorted(c["instance_row"] for c in shares) == sorted(r.row_id for r in rows)   # both billed to it
        assert sum(c["own_cost"] + c["shared_cost"] for c in shares) == pytest.approx(ledger.run_cost(run["run_id"]))
        assert ledger.instance_cost(rows[0].row_id) > 0 and ledger.instance_cost(rows[1].row_id) > 0
        kinds = [e["kind"] for e in ledger.events(run["run_id"])]
        assert "instance_lost" in kinds and "instance_stopped_by_provider" in kinds
    finally:
        ledger.close()
    assert_resumed(snap.parent, 800)
