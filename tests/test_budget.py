"""The budget guard over a real ledger: projected spend, start refusals, an early enough stop."""
from __future__ import annotations

import time

import pytest

from orchestrator import ledger as L
from orchestrator.run.budget import Budget, BudgetGuard


@pytest.fixture()
def led(tmp_path):
    led = L.Ledger.open(tmp_path)
    led.create_run("r", "r", budget=100.0)
    yield led
    led.close()


def running_instance(led, job, *, price=3600.0, age_s=0.0, granularity_s=1.0):
    """An instance of `job` billed since `age_s` seconds ago (price 3600/h = 1 per second)."""
    led.add_job("r", job, experiment="e", scene="s", host_name="h", provider="local", gpu="cpu",
                steps=10, backend="torch", dataset="d")
    led.update_job("r", job, status="running")
    row = led.record_intent(run_id="r", job_id=job, host_name="h", provider="local",
                            label=f"orch-r-{job}", gpu="cpu", price_per_hour=price, currency="USD",
                            granularity_s=granularity_s)
    led.instance_created(row, f"i-{job}", at=time.time() - age_s)
    return row


def test_a_job_starts_only_when_spent_plus_running_estimates_plus_its_own_fit(led):
    guard = BudgetGuard(Budget(100.0), led, "r")
    assert guard.may_start("a", 30.0)
    running_instance(led, "a", age_s=10.0)              # ~10 spent, 20 still expected
    spent, remaining = guard.projected()
    assert 10.0 <= spent < 12.0 and 18.0 < remaining <= 20.0
    assert guard.may_start("b", 60.0)                     # 10 + 20 + 60 = 90 <= 100
    assert not guard.may_start("c", 15.0)                 # 10 + 20 + 60 + 15 > 100
    (ev,) = [e for e in led.events("r") if e["kind"] == "budget_refused"]
    assert ev["job_id"] == "c" and "> cap 100.0000 USD" in ev["message"]
    # A finished job no longer holds its remaining estimate: only what it really cost counts.
    led.update_job("r", "a", status="succeeded")
    spent, remaining = guard.projected()
    assert remaining == pytest.approx(60.0) and guard.may_start("c", 15.0)


def test_a_job_running_past_its_estimate_counts_at_its_real_cost(led):
    guard = BudgetGuard(Budget(100.0), led, "r")
    assert guard.may_start("a", 5.0)
    running_instance(led, "a", age_s=40.0)               # 40 spent, estimate was 5
    spent, remaining = guard.projected()
    assert spent >= 40.0 and remaining == 0.0
    assert not guard.may_start("b", 61.0) and guard.may_start("b", 55.0)


def test_over_cap_trips_before_the_cap_by_the_cost_of_stopping(led):
    guard = BudgetGuard(Budget(60.0), led, "r", stop_reserve_s=10.0)
    running_instance(led, "a", age_s=45.0)               # 45 spent; reserve (10 s + 1 granule) = 11
    assert not guard.over_cap()
    assert BudgetGuard(Budget(55.0), led, "r", stop_reserve_s=10.0).over_cap()
    cheap = BudgetGuard(Budget(60.0), led, "r", stop_reserve_s=20.0)
    assert cheap.over_cap() and cheap.over_cap()
    events = [e for e in led.events("r") if e["kind"] == "budget_cap"]
    assert len(events) == 2 and "stop reserve" in events[-1]["message"]   # once per guard
    assert guard.stop_reserve() == pytest.approx(11.0)


def test_no_cap_never_refuses_or_stops(led):
    guard = BudgetGuard(Budget(None), led, "r")
    running_instance(led, "a", age_s=1e6)
    assert guard.may_start("b", 1e9) and not guard.over_cap()


def test_spend_in_another_currency_is_converted_to_the_budget_currency(led):
    from orchestrator.catalog import convert

    guard = BudgetGuard(Budget(100.0, "USD"), led, "r")
    row = led.record_intent(run_id="r", job_id="cny", host_name="h", provider="ssh",
                            label="orch-r-cny", gpu="H100", price_per_hour=3600.0, currency="CNY")
    led.instance_created(row, "i-cny", at=time.time() - 50)
    cny = led.instance_cost(row)
    assert cny >= 50.0
    assert guard.spent() == pytest.approx(convert(cny, "CNY", "USD")[0], rel=1e-3)
    assert guard.spent() < cny / 5                      # a yuan is not a dollar
    assert guard.stop_reserve() == pytest.approx(convert(11.0, "CNY", "USD")[0])
