"""Multi-GPU instances (issue 15 item 1): `gpus_per_instance: N` rents instances with exactly N
GPUs and a session runs N jobs of its queue at once, one GPU each via CUDA_VISIBLE_DEVICES; the
environment is built once per instance; while k jobs run, each owns 1/k of that time, so the
per-job costs add up to the instance's bill.

The fake cloud speaks the vast.ai REST API as documented at https://docs.vast.ai/api (search
offers `POST /api/v0/bundles/` with the query filter `num_gpus: {"eq": N}`; an offer's
`dph_total` is the price of the whole machine); its instances are real sshd processes on loopback.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from itertools import combinations
from pathlib import Path
from types import SimpleNamespace as NS

import pytest

from orchestrator.ledger import Ledger
from orchestrator.run.session import instances_for, plan_instances, share_costs, split_overlaps
from orchestrator.testing.fakecloud import fake_cloud  # noqa: F401 (fixture)
from orchestrator.testing.faultmatrix import Harness
from orchestrator.testing.hosts import make_host


# -- the cost rule and the plan (no host needed) ----------------------------------------------
def test_overlapping_time_is_split_between_the_jobs_that_ran_in_it() -> None:
    # a: 0-10, b: 5-15, c: 20-25 → 0-5 a alone, 5-10 a and b, 10-15 b alone, 15-20 nobody
    own = split_overlaps({"a": [(0.0, 10.0)], "b": [(5.0, 15.0)], "c": [(20.0, 25.0)]})
    assert own == {"a": pytest.approx(7.5), "b": pytest.approx(7.5), "c": pytest.approx(5.0)}
    # billed 30 s at 3.0: 20 s owned, 10 s (gaps, boot) shared three ways
    shares = share_costs(3.0, 30.0, own)
    assert shares["a"].own_cost == pytest.approx(0.75) and shares["c"].own_cost == pytest.approx(0.5)
    assert all(s.shared_seconds == pytest.approx(10.0 / 3) for s in shares.values())
    assert sum(s.own_cost + s.shared_cost for s in shares.values()) == pytest.approx(3.0)
    # one job at a time: its own time is its interval, as before
    assert split_overlaps({"a": [(0.0, 4.0)], "b": [(4.0, 6.0)]}) == {"a": 4.0, "b": 2.0}


def _job(jid: str, host, seconds: float = 450.0, cost: float = 0.45):
    phases = {"boot": 120.0, "setup": 60.0, "staging": 60.0, "teardown": 10.0}
    return NS(job_id=jid, host_name=host.name, host=host, estimate_seconds=seconds, estimate_cost=cost,
              estimate={"phases": phases})


def test_plan_puts_n_lanes_on_an_n_gpu_instance() -> None:
    host = make_host("vastai", gpus_per_instance=2)
    jobs = [_job(f"j{i}", host) for i in range(4)]                 # 190 s shared, 200 s own each
    [plan] = plan_instances(jobs)
    assert plan.gpus == 2 and plan.lanes == (("j0", "j2"), ("j1", "j3"))
    assert plan.job_ids == ("j0", "j1", "j2", "j3")
    assert plan.seconds == 190.0 + 2 * 200.0                       # the longest lane, not the sum
    assert plan.cost == pytest.approx(plan.seconds * 0.45 / 450.0)
    # enough instances to give each job a GPU, never more
    assert instances_for(make_host("vastai", gpus_per_instance=2, max_instances=4), 4) == 2
    assert instances_for(make_host("vastai", gpus_per_instance=2, max_instances=4), 5) == 3
    two = plan_instances([_job(f"j{i}", make_host("vastai", gpus_per_instance=2, max_instances=4))
                          for i in range(4)])
    assert [p.lanes for p in two] == [(("j0",), ("j1",)), (("j2",), ("j3",))]
    assert all(p.seconds == 190.0 + 200.0 for p in two)
    # one instance per job: each rents the whole N-GPU instance and runs on one lane
    one = plan_instances(jobs, one_per_job=True)
    assert len(one) == 4 and all(p.gpus == 2 and len(p.lanes) == 1 for p in one)


def test_a_lane_gets_its_gpu_and_on_this_machine_one_of_the_controllers_own(monkeypatch) -> None:
    from orchestrator.run.session import SessionRunner, _Session
    runner = SessionRunner.__new__(SessionRunner)        # only the hook's own state
    sess = _Session("h", NS(), NS(), NS(), NS(), lanes=2)  # type: ignore[arg-type]
    runner._sessions = {"a": sess, "b": sess}
    sess.lane_of.update({"a": 0, "b": 1})
    cloud, here = NS(transport_kind="ssh"), NS(transport_kind="local")
    job = {j: NS(job_id=j) for j in "ab"}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert [runner._visible_devices(job[j], cloud) for j in "ab"] == ["0", "1"]   # the instance's own GPUs
    assert [runner._visible_devices(job[j], here) for j in "ab"] == ["3", "5"]    # what this shell allows
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert [runner._visible_devices(job[j], here) for j in "ab"] == ["0", "1"]
    assert runner._cpu_share(job["a"], here) == 2            # the machine's cores split two ways
    sess.lanes = 1                                           # one GPU: the host's own setting stands
    assert runner._visible_devices(job["a"], cloud) is None


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ORCHESTRATE_HOME": str(tmp_path / "home")}
    env.pop("ORCHESTRATE_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], capture_output=True, text=True,
                          env=env, timeout=120, stdin=subprocess.DEVNULL, cwd=tmp_path)


def _file(tmp_path: Path, host: str) -> Path:
    p = tmp_path / "e.yaml"
    p.write_text(f"name: t\nhosts:\n  h: {host}\ndatasets:\n  d: {{generate: {{size: 16}}}}\n"
                 "experiments:\n  - {name: e, dataset: d, scenes: [default, spheres, rods], hosts: [h], steps: 30000}\n")
    return p


def test_config_reads_gpus_per_instance_and_refuses_bad_values_in_one_line(tmp_path: Path) -> None:
    from orchestrator.config import load_config
    assert load_config(_file(tmp_path, "{provider: local, gpus_per_instance: 2}")).hosts["h"].gpus_per_instance == 2
    assert load_config(_file(tmp_path, "{provider: vastai, gpu: RTX 4090}")).hosts["h"].gpus_per_instance == 1
    cases = [("0", "hosts.h.gpus_per_instance: must be >= 1, got 0"),
             ("two", "hosts.h.gpus_per_instance: expected a whole number, got text"),
             ("1.5", "hosts.h.gpus_per_instance: expected a whole number")]
    for value, want in cases:
        _file(tmp_path, f"{{provider: local, gpus_per_instance: {value}}}")
        res = _cli(tmp_path, "run", "e.yaml", "--yes")
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        assert len(lines) == 1 and lines[0].startswith("error: e.yaml:3: ") and want in lines[0], res.stderr
        assert not (tmp_path / "home" / "ledger.sqlite").exists() or "instances" not in res.stdout
    _file(tmp_path, "{provider: local, gpu_per_instance: 2}")
    res = _cli(tmp_path, "estimate", "e.yaml")
    assert res.returncode == 2 and "did you mean 'gpus_per_instance'" in res.stderr, res.stderr


def test_estimate_prices_the_whole_instance_and_shows_the_lanes(tmp_path: Path) -> None:
    """The catalog prices one GPU; a 2-GPU instance bills two, and runs two jobs at once."""
    _file(tmp_path, "{provider: vastai, gpu: RTX 4090, api_key_env: NOT_SET_IN_THIS_TEST}")
    one = json.loads(_cli(tmp_path, "estimate", "e.yaml", "--json").stdout)
    _file(tmp_path, "{provider: vastai, gpu: RTX 4090, api_key_env: NOT_SET_IN_THIS_TEST, gpus_per_instance: 2}")
    res = _cli(tmp_path, "estimate", "e.yaml", "--json")
    assert res.returncode == 0, res.stderr
    two = json.loads(res.stdout)
    assert two["jobs"][0]["price_per_hour"] == pytest.approx(2 * one["jobs"][0]["price_per_hour"])
    [inst] = two["plan"]["instances"]
    assert inst["gpus"] == 2 and [len(lane) for lane in inst["lanes"]] == [2, 1]
    text = _cli(tmp_path, "estimate", "e.yaml").stdout
    assert "h#1 (2 GPUs):" in text and "GPU 0: e-default-h" in text and "GPU 1: e-spheres-h" in text


# -- on the fake cloud --------------------------------------------------------------------------
@pytest.mark.sshd
def test_vast_search_asks_for_the_gpu_count(fake_cloud):
    from orchestrator.providers.vastai import VastProvider
    from orchestrator.run.provisioning import choose_price
    from orchestrator.testing.fakecloud import host_config
    fake_cloud.world.catalog = {**fake_cloud.world.catalog, "vastai": [
        ("7401", "RTX 4090", 0.40), ("7402", "RTX 4090", 0.85), ("7403", "RTX 4090", 1.70)]}
    fake_cloud.world.offer_extra = {"7402": {"num_gpus": 2}, "7403": {"num_gpus": 4}}
    fields = {k: v for k, v in host_config(fake_cloud, "vastai").items() if k != "provider"}
    host = make_host("vastai", gpus_per_instance=2, **fields)
    offers = VastProvider(host).offers("RTX 4090")
    assert fake_cloud.world.searches[-1]["num_gpus"] == {"eq": 2}
    assert [(o.offer_id, o.gpu_count, o.price_per_hour) for o in offers] == [("7402", 2, 0.85)]
    assert choose_price(VastProvider(host), host).offer_id == "7402"    # the whole machine's price
    single = make_host("vastai", **fields)
    assert [o.offer_id for o in VastProvider(single).offers("RTX 4090")] == ["7401"]
    assert fake_cloud.world.searches[-1]["num_gpus"] == {"eq": 1}


@pytest.mark.sshd
@pytest.mark.timeout(900)
def test_two_gpu_instance_runs_two_jobs_at_once_one_gpu_each(fake_cloud, tmp_path):
    fake_cloud.world.catalog = {**fake_cloud.world.catalog, "vastai": [
        ("7501", "RTX 4090", 0.40), ("7502", "RTX 4090", 0.80)]}
    fake_cloud.world.offer_extra = {"7502": {"num_gpus": 2}}
    # long enough that a job still trains while the next one gets ready beside it
    h = Harness(tmp_path, fake_cloud, "vastai", idle_timeout_s=120, steps=300)
    doc = json.loads(h.config.read_text())
    doc["hosts"]["cloud"]["gpus_per_instance"] = 2
    doc["experiments"][0]["scenes"] = ["default", "spheres", "rods", "blocks"]
    doc["datasets"]["demo"]["generate"]["size"] = 16
    h.config.write_text(json.dumps(doc))
    res = h.cli("run", str(h.config), "--yes", "--json", "--runs-dir", str(h.dir / "runs"), timeout_s=840)
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout)
    assert [j["status"] for j in out["jobs"]] == ["succeeded"] * 4
    bill = fake_cloud.bill()
    assert bill["created"] == 1 and bill["live"] == 0                     # ONE instance, released
    assert fake_cloud.world.searches[-1]["num_gpus"] == {"eq": 2}
    [inst] = fake_cloud.world.instances.values()
    assert inst.offer_id == "7502"
    # each job was given one GPU, and both GPUs were used
    devices = {json.loads((h.dir / "runs" / out["run_id"] / j["job"] / "summary.json").read_text())
               ["cuda_visible_devices"] for j in out["jobs"]}
    assert devices == {"0", "1"}
    ledger = Ledger(h.home / "ledger.sqlite")
    try:
        [row] = ledger.instances(run_id=out["run_id"])
        assert row.state == "destroyed"
        train = {p["job_id"]: (p["started_at"], p["ended_at"]) for p in ledger.phases(out["run_id"])
                 if p["phase"] == "train"}
        assert len(train) == 4
        overlapping = [(a, b) for a, b in combinations(sorted(train), 2)
                       if max(train[a][0], train[b][0]) < min(train[a][1], train[b][1])]
        assert overlapping, train                                         # two trained at once
        costs = ledger.job_costs(out["run_id"])
        assert sorted(c["job_id"] for c in costs) == sorted(j["job"] for j in out["jobs"])
        total = ledger.instance_cost(row.row_id)
        assert total > 0
        assert sum(c["own_cost"] + c["shared_cost"] for c in costs) == pytest.approx(total, rel=1e-9)
        assert sum(c["own_seconds"] + c["shared_seconds"] for c in costs) <= \
            bill["instances"][inst.id]["gpu_seconds"] + 2.0               # never more time than billed
        assert total == pytest.approx(bill["instances"][inst.id]["total"], rel=0.01)
        assert sum(j["cost"] for j in out["jobs"]) == pytest.approx(out["total_cost"], rel=1e-6)
        # the second job waited for the first to build the environment, then found it built
        envs = [e["message"] for e in ledger.events(out["run_id"]) if e["kind"] == "environment"]
        assert [": built with" in m for m in envs] == [True, False, False, False], envs
    finally:
        ledger.close()


def test_lambda_and_runpod_offers_are_for_exactly_n_gpus_priced_per_instance() -> None:
    """Lambda prices an instance type (gpu_2x_a100 is two GPUs, one price); RunPod prices a GPU
    type per GPU and rents `gpuCount` of them (its API docs, reference provider-apis.md)."""
    from orchestrator.providers.lambdalabs import type_matches
    from orchestrator.providers.runpod import Q_GPUS, parse_gpu_offer
    two = {"name": "gpu_2x_a100", "description": "2x A100 (40 GB PCIe)", "specs": {"gpus": 2}}
    one = {"name": "gpu_1x_a100", "description": "1x A100 (40 GB PCIe)", "specs": {"gpus": 1}}
    assert [type_matches(t, "A100 PCIe", 2) for t in (one, two)] == [False, True]
    assert [type_matches(t, "A100 PCIe") for t in (one, two)] == [True, False]
    g = {"id": "NVIDIA A40", "displayName": "A40", "communityPrice": 0.39,
         "lowestPrice": {"uninterruptablePrice": 0.40, "stockStatus": "High"}}
    offer = parse_gpu_offer(g, 2)
    assert (offer.price_per_hour, offer.gpu_count, offer.available) == (pytest.approx(0.80), 2, True)
    assert "lowestPrice(input: {gpuCount: 2})" in Q_GPUS % 2
