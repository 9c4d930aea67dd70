"""A budget that holds while running, on the local provider with a simulated price.

Price 3600 USD/h = 1 USD per billed second, per-second billing: one granule costs 1 USD.
Two long jobs (minutes of training each) are submitted together under a cap of CAP USD, each
estimated at ESTIMATE: the first fits and starts; the second would push the projection
(spent + the running job's remaining estimate + its own) over the cap, so it never starts.
The running job is stopped cleanly when the spend (plus what stopping costs) reaches the cap:
its pipeline saves a snapshot, which is pulled back with its log before the instance is
released. The ledger says why at each step, and the run's total never exceeds the cap by more
than one granule.
"""
from __future__ import annotations

import csv
import json
import threading
import time

from orchestrator.config import parse_config
from orchestrator.ledger import Ledger
from orchestrator.run.budget import Budget, BudgetGuard
from orchestrator.run.live import LiveView
from orchestrator.run.runner import JobPlan, Runner, RunOptions

PRICE_PER_HOUR = 3600.0
GRANULE_COST = 1.0                 # 1 s at 1 USD/s
CAP = 75.0
ESTIMATE = 45.0                    # each job's estimate (USD = seconds here): one fits, two do not
STOP_RESERVE_S = 12.0              # a training step takes seconds on this shared CPU

CONFIG = f"""
name: budget
budget: {{max_cost: {CAP}, currency: USD}}
hosts:
  here: {{provider: local, gpu: cpu, price_per_hour: {PRICE_PER_HOUR}}}
datasets:
  tiny: {{generate: {{size: 16, seed: 0}}}}
experiments:
  - {{name: b, dataset: tiny, scenes: [default], hosts: [here], steps: 10, backend: torch}}
"""


def plan(cfg, job_id: str, steps: int) -> JobPlan:
    return JobPlan(job_id=job_id, experiment="b", scene="default", host_name="here",
                   host=cfg.hosts["here"], dataset_name="tiny", dataset=cfg.datasets["tiny"],
                   steps=steps, backend="torch", device="cpu", estimate_cost=ESTIMATE,
                   estimate_seconds=ESTIMATE, currency="USD",
                   estimate={"total_seconds": ESTIMATE, "total_cost": ESTIMATE})


def test_a_run_that_would_cross_its_cap_starts_what_fits_and_stops_at_the_cap(tmp_path, monkeypatch):
    monkeypatch.setenv("ORCHESTRATE_HOME", str(tmp_path / "home"))
    cfg = parse_config(CONFIG)
    jobs = [plan(cfg, "long-1", 200_000), plan(cfg, "long-2", 200_000)]
    ledger = Ledger.open(tmp_path / "home")
    ledger.create_run("r", "budget", budget=CAP, currency="USD")
    guard = BudgetGuard(Budget(CAP, "USD"), ledger, "r", stop_reserve_s=STOP_RESERVE_S)
    t0 = time.monotonic()
    with LiveView([(j.job_id, j.host_name) for j in jobs], tty=False) as view:
        outcomes = Runner(jobs, ledger=ledger, run_id="r",
                          options=RunOptions(runs_dir=tmp_path / "runs", concurrency=2, poll_s=0.5),
                          guard=guard, view=view, stop=threading.Event()).run_all()
    wall_s = time.monotonic() - t0
    total = ledger.run_cost("r")
    print(f"\nbudget run: {[(o.job_id, o.status, round(o.cost, 2)) for o in outcomes]}; "
          f"total {total:.2f} USD of cap {CAP:.2f} (wall {wall_s:.0f} s)")

    started = [i.job_id for i in ledger.instances(run_id="r")]
    assert len(started) == 1, started                      # only what fits was started
    (ran,) = started
    (skipped,) = [j.job_id for j in jobs if j.job_id != ran]
    assert {o.job_id: o.status for o in outcomes} == {ran: "budget_stopped", skipped: "budget_stopped"}
    # The ledger total never exceeds the cap by more than one billing granule ...
    assert total <= CAP + GRANULE_COST
    # ... and the job really ran up to it (stopped within the reserve, not long before).
    assert total >= CAP - STOP_RESERVE_S - 2 * GRANULE_COST
    # The ledger says why: the refusal with its figures, then the cap.
    events = ledger.events("r")
    refused = [e for e in events if e["kind"] == "budget_refused"]
    assert [e["job_id"] for e in refused] == [skipped]
    assert f"its estimate {ESTIMATE:.4f} > cap {CAP:.4f} USD" in refused[0]["message"]
    (cap_event,) = [e for e in events if e["kind"] == "budget_cap"]
    assert "stopping running jobs" in cap_event["message"]
    rows = {j.job_id: j for j in ledger.jobs("r")}
    assert "budget" in (rows[skipped].error or "") and rows[skipped].instance_row is None
    # Every instance released, every billing interval closed.
    assert ledger.instances(run_id="r", open_only=True) == [] and ledger.open_billing() == []
    # Results kept: the stopped job's snapshot, its log and its last status were pulled back.
    out = tmp_path / "runs" / "r" / ran
    assert rows[ran].out_dir == str(out)
    assert (out / "snapshot.pt").stat().st_size > 0
    status = json.loads((out / "status.json").read_text())
    assert status["phase"] == "interrupted" and status["exit_code"] == 5 and status["step"] > 0
    if (out / "train_log.csv").exists():
        with (out / "train_log.csv").open() as fh:
            steps = [int(r["step"]) for r in csv.DictReader(fh)]
        assert all(0 < s <= status["step"] for s in steps)
