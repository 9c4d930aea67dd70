"""Estimate against actual for jobs that shared one instance (a session): each job is charged its
own seconds plus an even share of the instance's shared time (ledger `job_costs`), and is set
beside the same split of the plan (its own estimated time plus an even share of what the plan
expected the instance to pay once), not beside the instance's whole bill."""
from __future__ import annotations

from datetime import datetime, timezone

import pytest

from orchestrator import ledger as L
from orchestrator.report.collect import collect

T0 = datetime(2026, 3, 1, tzinfo=timezone.utc).timestamp()


def _estimate(job: str) -> dict:
    # standalone: boot 100 + setup 50 (+ staging 20, inside set-up) + train 300 + eval 20 + pull 10 + teardown 10
    phases = {"boot": 100, "setup": 50, "staging": 20, "train": 300, "eval": 20, "pull": 10, "teardown": 10}
    billed = {**phases, "staging": 0}
    return {"job_id": job, "total_seconds": 490.0, "total_cost": 0.49, "source": "test",
            "phases": {k: {"seconds": v, "billed_seconds": billed[k]} for k, v in phases.items()}}


def test_a_session_job_is_compared_share_for_share(tmp_path) -> None:
    led = L.Ledger.open(tmp_path)
    led.create_run("r", "r")
    for i, job in enumerate(("a", "b")):
        led.add_job("r", job, experiment="e", scene="default", host_name="h", provider="vastai", gpu="GPU X",
                    steps=1000, backend="torch", dataset="d", estimate=_estimate(job))
        led.update_job("r", job, status="succeeded",
                       started_at=datetime.fromtimestamp(T0 + 200 * i, timezone.utc).isoformat())
    row = led.record_intent(run_id="r", job_id="a", host_name="h", provider="vastai", label="orch-r-h",
                            gpu="GPU X", price_per_hour=3.6, currency="USD")
    led.instance_created(row, "i-1", at=T0)
    led.set_instance_state(row, L.DESTROYED, at=T0 + 825)
    for job in ("a", "b"):
        led.update_job("r", job, instance_row=row)
    # billed 825 s at 0.001 USD/s: a's own 330 s, b's own 335 s, 160 s shared (80 each)
    led.record_job_cost("r", "a", row, own_seconds=330, shared_seconds=80, own_cost=0.33, shared_cost=0.08)
    led.record_job_cost("r", "b", row, own_seconds=335, shared_seconds=80, own_cost=0.335, shared_cost=0.08)
    got = {j.job_id: j for j in collect(led, ["r"]).jobs}
    for job, own in (("a", 330), ("b", 335)):
        e = got[job].estimate
        assert e.actual_seconds == pytest.approx(own + 80)             # not the instance's 825 s
        assert e.actual_cost == pytest.approx(own / 1000 + 0.08)
        # own: 490 - (100 + 50 + 10) - 0 = 330; shared: the first job's 160 s / 2 jobs
        assert e.estimate_seconds == pytest.approx(330 + 80)
        assert e.estimate_cost == pytest.approx(0.49 * 410 / 490)
    assert sum(j.cost for j in got.values()) == pytest.approx(led.instance_cost(row))
    led.close()
