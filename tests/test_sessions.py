"""Instance sessions (issue 15): a host entry's jobs on one warm instance, the next dataset staged
while the current job trains, the bill split into own + shared time, failover to the next offer
when the chosen one was rented away between search and create, Ctrl-C during a session.

The fake cloud speaks the vast.ai REST API as documented at https://docs.vast.ai/api (search
offers `GET /api/v0/bundles/`, create `PUT /api/v0/asks/{id}/` answering `no_such_ask` for an
offer that is gone); its instances are real sshd processes on loopback.
"""
from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path
from types import SimpleNamespace as NS

import pytest

from orchestrator.errors import ConfigError
from orchestrator.ledger import Ledger
from orchestrator.run.session import instances_for, plan_instances, share_costs
from orchestrator.testing.fakecloud import fake_cloud  # noqa: F401 (fixture)
from orchestrator.testing.faultmatrix import Harness, assert_resumed
from orchestrator.testing.hosts import make_host


# -- the bill split and the plan (no host needed) ---------------------------------------------
def test_share_costs_own_seconds_plus_an_even_share_of_the_rest() -> None:
    shares = share_costs(1.0, 100.0, {"a": 30.0, "b": 50.0})
    assert shares["a"].own_cost == pytest.approx(0.30) and shares["b"].own_cost == pytest.approx(0.50)
    # 20 s of boot, environment and gaps: 10 s and 0.10 each
    assert shares["a"].shared_seconds == pytest.approx(10.0) and shares["b"].shared_cost == pytest.approx(0.10)
    assert sum(s.own_cost + s.shared_cost for s in shares.values()) == pytest.approx(1.0)


def test_share_costs_overlapping_own_time_never_exceeds_the_bill() -> None:
    shares = share_costs(2.0, 100.0, {"a": 80.0, "b": 80.0})     # two GPUs at once
    assert shares["a"].own_seconds == pytest.approx(50.0) and shares["a"].shared_cost == pytest.approx(0.0)
    assert sum(s.own_cost + s.shared_cost for s in shares.values()) == pytest.approx(2.0)
    assert share_costs(1.0, 10.0, {}) == {}


def test_instances_per_host_entry() -> None:
    assert instances_for(make_host("vastai"), 8) == 1                       # clouds: one by default
    assert instances_for(make_host("vastai", max_instances=3), 8) == 3
    assert instances_for(make_host("vastai", max_instances=3), 2) == 2      # never more than jobs
    assert instances_for(make_host("ssh", max_instances=4), 8) == 1         # one machine
    assert instances_for(make_host("local"), 3) == 1
    assert instances_for(make_host("vastai"), 0) == 0


def _job(jid: str, host, seconds: float, cost: float):
    phases = {"boot": 120.0, "setup": 60.0, "staging": 60.0, "teardown": 10.0}
    return NS(job_id=jid, host_name=host.name, host=host, estimate_seconds=seconds, estimate_cost=cost,
              estimate={"phases": phases})


def test_plan_balances_queues_and_pays_the_shared_time_once() -> None:
    host = make_host("vastai", max_instances=2)
    jobs = [_job(f"j{i}", host, 450.0, 0.45) for i in range(4)]    # 250 s of it shared, 200 own
    plans = plan_instances(jobs)
    assert [p.job_ids for p in plans] == [("j0", "j2"), ("j1", "j3")]
    assert [p.seconds for p in plans] == [190.0 + 2 * 200.0] * 2
    one = plan_instances(jobs, one_per_job=True)
    assert len(one) == 4 and all(p.seconds == 190.0 + 200.0 for p in one)
    assert sum(p.cost for p in plans) < sum(p.cost for p in one)


def test_config_session_and_failover_keys(tmp_path: Path) -> None:
    from orchestrator.config import load_config

    def load(extra: str):
        p = tmp_path / "e.yaml"
        p.write_text("name: t\nhosts:\n  v: {provider: vastai, gpu: RTX 4090, api_key_env: K" + extra + "}\n"
                     "datasets:\n  d: {generate: {size: 16}}\n"
                     "experiments:\n  - {name: e, dataset: d, scenes: [default], hosts: [v], steps: 5}\n")
        return load_config(p).hosts["v"]

    h = load(", max_instances: 2, max_offer_tries: 5, retry_until_up: 20m")
    assert (h.max_instances, h.max_offer_tries, h.retry_until_up_s) == (2, 5, 1200.0)
    assert load("").max_instances == 1 and load("").retry_until_up_s is None
    with pytest.raises(ConfigError, match="retry_until_up"):
        load(", retry_until_up: soon")
    with pytest.raises(ConfigError, match="max_instances"):
        load(", max_instances: 0")


# -- on the fake cloud --------------------------------------------------------------------------
def _harness(tmp_path: Path, fc, scenes: list[str], *, steps: int = 5, idle_timeout_s: float = 120) -> Harness:
    h = Harness(tmp_path, fc, "vastai", idle_timeout_s=idle_timeout_s, steps=steps)
    doc = json.loads(h.config.read_text())
    doc["experiments"][0]["scenes"] = scenes
    doc["datasets"]["demo"]["generate"]["size"] = 16
    h.config.write_text(json.dumps(doc))
    return h


def _run(h: Harness, *extra: str) -> tuple[int, dict]:
    res = h.cli("run", str(h.config), "--yes", "--json", "--runs-dir", str(h.dir / "runs"), *extra,
                timeout_s=840)
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    return res.returncode, (json.loads(res.stdout) if res.stdout.strip() else {"stderr": res.stderr[-3000:]})


@pytest.mark.sshd
@pytest.mark.timeout(900)
def test_session_runs_a_queue_on_one_instance_and_splits_its_bill(fake_cloud, tmp_path):
    h = _harness(tmp_path, fake_cloud, ["default", "spheres"])
    rc, out = _run(h)
    assert rc == 0, out
    assert [j["status"] for j in out["jobs"]] == ["succeeded", "succeeded"]
    bill = fake_cloud.bill()
    assert bill["created"] == 1 and bill["live"] == 0          # one instance, released
    ledger = Ledger(h.home / "ledger.sqlite")
    try:
        [inst] = ledger.instances(run_id=out["run_id"])
        assert inst.state == "destroyed"
        assert {j.instance_row for j in ledger.jobs(out["run_id"])} == {inst.row_id}
        costs = ledger.job_costs(out["run_id"])
        assert sorted(c["job_id"] for c in costs) == sorted(j["job"] for j in out["jobs"])
        total = ledger.instance_cost(inst.row_id)
        assert sum(c["own_cost"] + c["shared_cost"] for c in costs) == pytest.approx(total, rel=1e-9)
        assert costs[0]["shared_seconds"] == pytest.approx(costs[1]["shared_seconds"])
        assert all(c["own_seconds"] > 0 for c in costs)
        # the outcomes carry each job's share, and they add up to the run's cost
        assert sum(j["cost"] for j in out["jobs"]) == pytest.approx(out["total_cost"], rel=1e-6)
        phases = {(p["job_id"], p["phase"]) for p in ledger.phases(out["run_id"])}
        second = out["jobs"][1]["job"]
        assert (second, "prestage") in phases           # staged while the first one trained
        assert (out["jobs"][0]["job"], "boot") in phases and (second, "boot") not in phases
        assert abs(inst_bill := bill["instances"][inst.instance_id]["total"]) > 0
        assert total == pytest.approx(inst_bill, rel=0.01)
    finally:
        ledger.close()


@pytest.mark.sshd
@pytest.mark.timeout(900)
def test_offer_lost_between_search_and_create_uses_the_next_offer(fake_cloud, tmp_path):
    fake_cloud.world.catalog = {**fake_cloud.world.catalog,
                                "vastai": [("7001", "RTX 4090", 0.44), ("7011", "RTX 4090", 0.52)]}
    fake_cloud.set_faults(vanish_offers=1)
    h = _harness(tmp_path, fake_cloud, ["default"])
    rc, out = _run(h)
    assert rc == 0, out
    assert [j["status"] for j in out["jobs"]] == ["succeeded"]
    assert fake_cloud.bill()["created"] == 1 and fake_cloud.live_count() == 0
    [inst] = fake_cloud.world.instances.values()
    assert inst.offer_id == "7011"                     # the cheaper one was rented away
    ledger = Ledger(h.home / "ledger.sqlite")
    try:
        rows = ledger.instances(run_id=out["run_id"])
        assert [r.state for r in rows] == ["failed", "destroyed"]
        assert rows[0].instance_id is None and rows[0].price_per_hour == 0.44
        assert any(e["kind"] == "launch_failed" and "7001" in e["message"] for e in ledger.events(out["run_id"]))
    finally:
        ledger.close()
    res = h.cli("costs", "--json")
    assert res.returncode == 0, res.stderr
    by_run = json.loads(res.stdout)["by"]["run"]
    assert sum(g["failed_launches"] for g in by_run) == 1


@pytest.mark.sshd
@pytest.mark.timeout(900)
def test_ctrl_c_during_a_session_releases_cancels_and_the_rerun_resumes(fake_cloud, tmp_path):
    h = _harness(tmp_path, fake_cloud, ["default", "spheres", "rods"], steps=40)
    h.start_run()
    cond = h.trigger("during_training")
    deadline = time.monotonic() + 600
    while not cond() and time.monotonic() < deadline and h.proc.poll() is None:
        time.sleep(0.05)
    assert cond(), "training never started"
    # a few steps, so there is a snapshot worth resuming: the phase turns "train" before the
    # first step (the model and the data load first), so a fixed sleep raced a loaded machine
    while (h.job_status() or {}).get("step", 0) < 2 and time.monotonic() < deadline and h.proc.poll() is None:
        time.sleep(0.05)
    assert (h.job_status() or {}).get("step", 0) >= 2, h.job_status()
    h.proc.send_signal(signal.SIGINT)
    assert h.proc.wait(timeout=300) == 130
    assert fake_cloud.live_count() == 0 and fake_cloud.bill()["created"] == 1
    ledger = Ledger(h.home / "ledger.sqlite")
    try:
        [run] = ledger.runs()
        statuses = {j.scene: j.status for j in ledger.jobs(run["run_id"])}
        assert statuses == {"default": "interrupted", "spheres": "cancelled", "rods": "cancelled"}
        assert all(i.state == "destroyed" for i in ledger.instances(run_id=run["run_id"]))
    finally:
        ledger.close()
    snaps = list((tmp_path / "runs").glob("*/f-default-cloud/snapshot.pt"))
    assert len(snaps) == 1
    # the rerun resumes the interrupted job from its snapshot and runs the cancelled ones
    rc, out = _run(h)
    assert rc == 0, out
    assert [j["status"] for j in out["jobs"]] == ["succeeded"] * 3
    log_text = (tmp_path / "runs" / out["run_id"] / "f-default-cloud" / "log.txt").read_text()
    starts = re.findall(r"from step (\d+) to 40", log_text)   # the host's log grows across runs
    assert int(starts[-1]) > 0                         # nothing before the snapshot retrained
    assert fake_cloud.live_count() == 0 and fake_cloud.bill()["created"] == 2


def test_estimate_without_the_api_key_uses_the_catalog_and_shows_the_plan(tmp_path: Path) -> None:
    """A new user without an account: `estimate` on a vast.ai file estimates from the catalog,
    says live prices need the key, and shows instances × queues and the saving."""
    import subprocess
    import sys
    (tmp_path / "e.yaml").write_text(
        "name: t\nhosts:\n  v: {provider: vastai, gpu: RTX 4090, api_key_env: VAST_KEY_NOT_SET_IN_TEST}\n"
        "datasets:\n  d: {generate: {size: 16}}\n"
        "experiments:\n  - {name: e, dataset: d, scenes: [default, spheres, rods], hosts: [v], steps: 30000}\n")
    env = {k: v for k, v in os.environ.items() if k != "VAST_KEY_NOT_SET_IN_TEST"}
    env["ORCHESTRATE_HOME"] = str(tmp_path / "home")
    res = subprocess.run([sys.executable, "-m", "orchestrator.cli", "estimate", "e.yaml", "--json"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["notes"] == ["hosts.v.api_key_env: environment variable VAST_KEY_NOT_SET_IN_TEST is not set: "
                            "estimated from the catalog; live prices need the key"]
    plan = out["plan"]
    assert [len(i["jobs"]) for i in plan["instances"]] == [3]
    assert 0 < plan["cost"] < plan["one_per_job_cost"] == pytest.approx(out["total_cost"], rel=0.02)
    text = subprocess.run([sys.executable, "-m", "orchestrator.cli", "estimate", "e.yaml"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert text.returncode == 0 and "v#1:" in text.stdout and "against one instance per job" in text.stdout
    # `run` still needs the key before anything is rented
    run = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", "e.yaml", "--yes"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "VAST_KEY_NOT_SET_IN_TEST is not set" in run.stderr


@pytest.mark.sshd
@pytest.mark.timeout(900)
def test_preempted_instance_resumes_the_job_on_a_new_one_from_the_snapshot_home(fake_cloud, tmp_path):
    """The provider takes the machine back mid-training: the job goes back in the queue and
    resumes on a new instance from the snapshot that came home; both instances are billed to it."""
    h = _harness(tmp_path, fake_cloud, ["default"], steps=800)
    doc = json.loads(h.config.read_text())
    doc["hosts"]["cloud"].pop("root")       # each instance its own disk: the snapshot must come home
    # snapshots every second, so one comes home while training is still far from its end
    # (on a quiet machine the job trains ~100 steps/s; the snapshot home is rate-limited to ~15 s)
    doc["experiments"][0]["train"] = {"snapshot_every_s": 1.0}
    h.config.write_text(json.dumps(doc))
    h.start_run()
    snap = h.wait_for_pull("*/f-default-cloud/snapshot.pt")
    assert snap is not None, h.run_log()
    [iid] = [i.id for i in fake_cloud.world.instances.values() if i.status == "running"]
    fake_cloud.world.preempt(iid)
    assert h.proc.wait(timeout=600) == 0, h.run_log()
    bill = fake_cloud.bill()
    assert bill["created"] == 2 and bill["live"] == 0
    ledger = Ledger(h.home / "ledger.sqlite")
    try:
        [run] = ledger.runs()
        [job] = ledger.jobs(run["run_id"])
        assert job.status == "succeeded"
        rows = ledger.instances(run_id=run["run_id"])
        assert len(rows) == 2 and all(r.state == "destroyed" for r in rows)
        shares = ledger.job_costs(run["run_id"])
        assert sorted(c["instance_row"] for c in shares) == sorted(r.row_id for r in rows)   # both billed to it
        assert sum(c["own_cost"] + c["shared_cost"] for c in shares) == pytest.approx(ledger.run_cost(run["run_id"]))
        assert any(e["kind"] == "instance_lost" for e in ledger.events(run["run_id"]))
    finally:
        ledger.close()
    assert_resumed(snap.parent, 800)


def test_useful_time_per_run_is_train_plus_eval_over_billed(tmp_path: Path) -> None:
    from orchestrator.report.costs import useful_time
    ledger = Ledger(tmp_path / "l.sqlite")
    try:
        ledger.create_run("r1", "t")
        row = ledger.record_intent(run_id="r1", job_id="j", host_name="h", provider="vastai", label="orch-r1-j",
                                   gpu="RTX 4090", price_per_hour=0.44, currency="USD")
        ledger.instance_created(row, "i1", at=1000.0)
        ledger.set_instance_state(row, "destroyed", at=1200.0)
        ledger.record_phase("r1", "j", "boot", 1000.0, 1060.0)
        ledger.record_phase("r1", "j", "train", 1070.0, 1150.0)
        ledger.record_phase("r1", "j", "eval", 1150.0, 1170.0)
        [u] = useful_time(ledger)
        assert (u.run_id, u.billed_s, u.useful_s) == ("r1", pytest.approx(200.0), pytest.approx(100.0))
        assert u.ratio == pytest.approx(0.5)
    finally:
        ledger.close()


def test_logs_prints_the_pulled_copy_and_refuses_an_unknown_job(tmp_path: Path) -> None:
    import subprocess
    import sys
    home = tmp_path / "home"
    ledger = Ledger.open(home)
    try:
        ledger.create_run("r1", "t")
        ledger.add_job("r1", "e-default-h", experiment="e", scene="default", host_name="h", provider="local",
                       gpu="cpu", steps=5, backend="torch", dataset="d")
        out = tmp_path / "runs" / "r1" / "e-default-h"
        out.mkdir(parents=True)
        (out / "log.txt").write_text("line one\nline two\n")
        (out / "status.json").write_text(json.dumps({"phase": "done", "step": 5, "total_steps": 5, "exit_code": 0}))
        ledger.update_job("r1", "e-default-h", status="succeeded", out_dir=str(out))
    finally:
        ledger.close()
    env = {**os.environ, "ORCHESTRATE_HOME": str(home)}
    res = subprocess.run([sys.executable, "-m", "orchestrator.cli", "logs", "e-default-h"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "line one\nline two\n"
    assert "r1 e-default-h: succeeded (pulled copy" in res.stderr and "step 5/5, exit 0" in res.stderr
    bad = subprocess.run([sys.executable, "-m", "orchestrator.cli", "logs", "r1", "nope"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "no job 'nope' in run r1; jobs there: e-default-h" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.sshd
@pytest.mark.parametrize("steps, winner", [(3000, "7202"), (3_000_000, "7201")])
def test_offers_rank_by_the_jobs_cost_not_by_the_hourly_price(fake_cloud, tmp_path, steps, winner):
    """A cheaper-per-hour offer on a slow line (slow image pull: slow boot) loses to a dearer,
    fast one for a short job, and wins for a long one."""
    import subprocess
    import sys
    fake_cloud.world.catalog = {**fake_cloud.world.catalog,
                                "vastai": [("7201", "RTX 4090", 0.40), ("7202", "RTX 4090", 0.60)]}
    fake_cloud.world.offer_extra = {"7201": {"inet_down": 50.0, "reliability2": 0.95},
                                    "7202": {"inet_down": 2000.0}}
    h = _harness(tmp_path, fake_cloud, ["default"], steps=steps)
    res = subprocess.run([sys.executable, "-m", "orchestrator.cli", "offers", str(h.config), "--json"], env=h.env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    offers = json.loads(res.stdout)["offers"]
    assert [o["offer_id"] for o in offers][0] == winner and len(offers) == 2
    slow = next(o for o in offers if o["offer_id"] == "7201")
    assert slow["boot_s"] == pytest.approx(30 + 8000 * 8 / 50) and slow["reliability"] == 0.95
    assert all(o["cost"] == pytest.approx(o["price_per_hour"] * o["total_s"] / 3600) for o in offers)
    table = subprocess.run([sys.executable, "-m", "orchestrator.cli", "offers", str(h.config)], env=h.env,
                           capture_output=True, text=True, timeout=120)
    assert table.returncode == 0 and "95.0 %" in table.stdout


@pytest.mark.sshd
def test_fake_cloud_preempts_at_the_given_time_and_stops_billing(fake_cloud):
    from orchestrator.errors import InstanceNotFound
    from orchestrator.providers._http import RetryPolicy
    from orchestrator.providers.base import InstanceSpec, InstanceState
    from orchestrator.providers.vastai import VastProvider
    from orchestrator.testing.fakecloud import fake_host
    p = VastProvider(fake_host(fake_cloud, "vastai"),
                     policy=RetryPolicy(deadline_s=5.0, attempt_timeout_s=2.0, backoff_s=0.02, max_backoff_s=0.1))
    fake_cloud.set_faults(preempt_after_s=0.8)
    iid = p.create(InstanceSpec(label="orch-p-1", gpu="RTX 4090"))
    other = p.create(InstanceSpec(label="orch-p-2", gpu="RTX 4090"))     # the fault takes one instance
    deadline = time.monotonic() + 10
    while p.describe(iid).state != InstanceState.RUNNING and time.monotonic() < deadline:
        time.sleep(0.05)
    gone_at = None
    while time.monotonic() < deadline:
        try:
            p.describe(iid)
        except InstanceNotFound:
            gone_at = time.monotonic()
            break
        time.sleep(0.05)
    assert gone_at is not None
    b = fake_cloud.bill()["instances"][iid]
    assert b["status"] == "terminated" and 0.8 <= b["gpu_seconds"] < 3.0
    assert p.describe(other).state == InstanceState.RUNNING
    p.destroy(other)


@pytest.mark.sshd
def test_choose_offer_skips_what_this_run_took_and_what_failed(fake_cloud):
    from orchestrator.providers.vastai import VastProvider
    from orchestrator.run.failover import FailoverState, choose_offer
    from orchestrator.testing.fakecloud import host_config
    fake_cloud.world.catalog = {**fake_cloud.world.catalog, "vastai": [
        ("7301", "RTX 4090", 0.40), ("7302", "RTX 4090", 0.45), ("7303", "RTX 4090", 0.50)]}
    host = make_host("vastai", **{k: v for k, v in host_config(fake_cloud, "vastai").items() if k != "provider"})
    p = VastProvider(host)
    st = FailoverState()
    assert [choose_offer(p, host, st).offer_id for _ in range(3)] == ["7301", "7302", "7303"]
    st.failed.add(("vastai", "7301"))
    assert choose_offer(p, host, st).offer_id == "7302"   # all taken: reuse one, never a failed one
    st.failed.update({("vastai", "7302"), ("vastai", "7303")})
    with pytest.raises(Exception, match="offers that failed in this run are skipped"):
        choose_offer(p, host, st)


@pytest.mark.sshd
@pytest.mark.timeout(900)
def test_no_offer_on_one_entry_fails_over_to_another_entry_with_the_same_gpu(fake_cloud, tmp_path):
    h = _harness(tmp_path, fake_cloud, ["default"])
    doc = json.loads(h.config.read_text())
    base = doc["hosts"].pop("cloud")
    doc["hosts"]["vast"] = {**base, "max_price_per_hour": 0.1}           # nothing that cheap
    doc["hosts"]["pod"] = {**base, "provider": "runpod", "root": str(tmp_path / "host-pod")}
    doc["experiments"][0]["hosts"] = ["vast", "pod"]
    h.config.write_text(json.dumps(doc))
    rc, out = _run(h)
    assert rc == 0, out
    assert sorted(j["status"] for j in out["jobs"]) == ["succeeded", "succeeded"]
    assert {i.provider for i in fake_cloud.world.instances.values()} == {"runpod"}
    assert fake_cloud.live_count() == 0
    ledger = Ledger(h.home / "ledger.sqlite")
    try:
        events = [e for e in ledger.events(out["run_id"]) if e["kind"] == "launch_failed"]
        assert events and all(e["job_id"] == "f-default-vast" and "vast:" in e["message"] for e in events)
        assert {r.host_name for r in ledger.instances(run_id=out["run_id"])} == {"pod"}
    finally:
        ledger.close()


def test_the_next_job_starts_while_the_last_one_is_pulled(tmp_path: Path, monkeypatch) -> None:
    """Between two jobs of a session the GPU waits only for the start: the finished job's pull
    runs beside the next job (here a pull made slow on purpose), and both results come home."""
    from orchestrator import cli
    from orchestrator.run import payload as pl
    real_pull = pl.pull_results
    PULL_S = 4.0

    def slow_pull(*args, **kwargs):  # noqa: ANN002, ANN003
        time.sleep(PULL_S)
        return real_pull(*args, **kwargs)

    monkeypatch.setattr(pl, "pull_results", slow_pull)
    monkeypatch.setenv("ORCHESTRATE_HOME", str(tmp_path / "home"))
    cfg = tmp_path / "e.yaml"
    cfg.write_text(json.dumps({
        "name": "overlap", "hosts": {"here": {"provider": "local", "root": str(tmp_path / "host")}},
        "datasets": {"d": {"generate": {"size": 16, "seed": 0}}},
        "experiments": [{"name": "e", "dataset": "d", "scenes": ["default", "spheres"], "hosts": ["here"],
                         "steps": 5, "device": "cpu", "backend": "torch"}]}))
    assert cli.main(["run", str(cfg), "--yes", "--runs-dir", str(tmp_path / "runs")]) == 0
    ledger = Ledger(tmp_path / "home" / "ledger.sqlite")
    try:
        [run_id] = [r["run_id"] for r in ledger.runs()]
        jobs = sorted(ledger.jobs(run_id), key=lambda j: j.started_at or "")
        assert [j.status for j in jobs] == ["succeeded"] * 2
        ph = {(p["job_id"], p["phase"]): p for p in ledger.phases(run_id)}
        for before, after in zip(jobs, jobs[1:]):
            pull = ph[(before.job_id, "pull")]
            assert pull["seconds"] >= PULL_S
            # the next job trained while this one was still being pulled
            assert ph[(after.job_id, "train")]["started_at"] < pull["ended_at"], (before.job_id, after.job_id)
        for j in jobs:
            assert (Path(j.out_dir) / "summary.json").is_file()
    finally:
        ledger.close()
