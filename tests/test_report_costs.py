"""`orchestrate costs`: spend by provider, GPU, run and day from the ledger's billing rows."""
from __future__ import annotations

import math
from datetime import datetime, timezone

import pytest

from orchestrator import ledger as L
from orchestrator.report.costs import CostsError, spend, split_by_day, totals

DAY1 = datetime(2026, 3, 1, tzinfo=timezone.utc).timestamp()
H = 3600.0


def billed(seconds: float, granularity_s: float, price_per_hour: float) -> float:
    return math.ceil(seconds / granularity_s) * granularity_s * price_per_hour / H


def launch(led, run, job, provider, gpu, price, *, currency="USD", granularity_s=1.0,
           storage=0.0):
    return led.record_intent(run_id=run, job_id=job, host_name=job, provider=provider,
                             label=f"orch-{run}-{job}", gpu=gpu, price_per_hour=price,
                             currency=currency, granularity_s=granularity_s,
                             storage_price_per_hour=storage)


@pytest.fixture()
def led(tmp_path):
    led = L.Ledger.open(tmp_path)
    for r in ("r1", "r2"):
        led.create_run(r, r)
    # r1: an H100 on vast, billed per minute, 23:30 → 00:45 next day (75 min), then destroyed
    a = launch(led, "r1", "a", "vastai", "H100", 2.4, granularity_s=60)
    led.instance_created(a, "v-1", at=DAY1 + 23.5 * H)
    led.set_instance_state(a, L.DESTROYED, at=DAY1 + 24.75 * H)
    # r1: a RunPod 4090 that ran 1000 s, was stopped for 2 h (storage billed), then destroyed
    b = launch(led, "r1", "b", "runpod", "RTX 4090", 0.36, storage=0.018)
    led.instance_created(b, "p-1", at=DAY1 + 10 * H)
    led.set_instance_state(b, L.STOPPED, at=DAY1 + 10 * H + 1000)
    led.set_instance_state(b, L.DESTROYED, at=DAY1 + 12 * H + 1000)
    # r2: a vast launch refused before any instance existed (intent → failed, nothing billed)
    c = launch(led, "r2", "c", "vastai", "H100", 2.4)
    led.set_instance_state(c, L.FAILED, at=DAY1 + 5 * H, note="no capacity")
    # r2: a vast launch that was created, billed 90 s, then reported failed by the provider
    d = launch(led, "r2", "d", "vastai", "RTX 4090", 0.5)
    led.instance_created(d, "v-2", at=DAY1 + 6 * H)
    led.set_instance_state(d, L.FAILED, at=DAY1 + 6 * H + 90)
    # r2: a hand-rented SSH host priced in CNY
    e = launch(led, "r2", "e", "ssh", "H100", 15.0, currency="CNY")
    led.instance_created(e, "ssh-1", at=DAY1 + 7 * H)
    led.set_instance_state(e, L.DESTROYED, at=DAY1 + 7.5 * H)
    yield led
    led.close()


A = billed(75 * 60, 60, 2.4)
B_GPU, B_STORAGE = billed(1000, 1, 0.36), billed(2 * H, 1, 0.018)
D = billed(90, 1, 0.5)
E = billed(0.5 * H, 1, 15.0)


def rows(led, by):
    return {(r.key, r.currency): r for r in spend(led, by)}


def test_by_provider_splits_gpu_and_storage_and_counts_failed_launches(led):
    r = rows(led, "provider")
    assert set(r) == {("vastai", "USD"), ("runpod", "USD"), ("ssh", "CNY")}
    vast = r[("vastai", "USD")]
    assert vast.gpu_cost == pytest.approx(A + D) and vast.storage_cost == 0
    assert vast.instances == 3 and vast.failed_launches == 2
    assert vast.failed_cost == pytest.approx(D)            # a failed launch can still cost money
    assert vast.gpu_hours == pytest.approx(1.25 + 90 / H)
    runpod = r[("runpod", "USD")]
    assert runpod.gpu_cost == pytest.approx(B_GPU) and runpod.storage_cost == pytest.approx(B_STORAGE)
    assert runpod.storage_hours == pytest.approx(2.0) and runpod.failed_launches == 0
    assert r[("ssh", "CNY")].total == pytest.approx(E)
    assert totals(list(r.values())) == pytest.approx({"USD": A + D + B_GPU + B_STORAGE, "CNY": E})


def test_by_gpu_and_by_run_add_up_to_the_ledger_run_costs(led):
    g = rows(led, "gpu")
    assert g[("H100", "USD")].total == pytest.approx(A)
    assert g[("H100", "USD")].failed_launches == 1          # the refused intent, billed nothing
    assert g[("RTX 4090", "USD")].total == pytest.approx(B_GPU + B_STORAGE + D)
    assert g[("H100", "CNY")].total == pytest.approx(E)
    r = rows(led, "run")
    assert r[("r1", "USD")].total == pytest.approx(led.run_cost("r1"))
    assert r[("r2", "USD")].total + r[("r2", "CNY")].total == pytest.approx(led.run_cost("r2"))


def test_by_day_splits_an_interval_across_midnight_and_keeps_its_total(led):
    d = rows(led, "day")
    day1, day2 = "2026-03-01", "2026-03-02"
    # 30 of the H100's 75 billed minutes fall on day 1, 45 on day 2
    assert d[(day2, "USD")].total == pytest.approx(A * 45 / 75)
    assert d[(day1, "USD")].total == pytest.approx(A * 30 / 75 + B_GPU + B_STORAGE + D)
    assert d[(day1, "USD")].failed_launches == 2
    assert d[(day1, "USD")].total + d[(day2, "USD")].total == pytest.approx(A + B_GPU + B_STORAGE + D)
    (b,) = led.billing(led.instances(run_id="r1")[0].row_id)
    shares = list(split_by_day(b, L.utcnow()))
    assert [s[0] for s in shares] == [day1, day2] and [s[2] for s in shares] == [1800.0, 2700.0]


def test_open_intervals_accrue_until_now(tmp_path):
    led = L.Ledger.open(tmp_path)
    led.create_run("r", "r")
    row = launch(led, "r", "j", "local", "cpu", 3.6)
    led.instance_created(row, "local-1", at=DAY1)
    now = datetime.fromtimestamp(DAY1 + 100, timezone.utc)
    (r,) = spend(led, "run", now=now)
    assert r.accruing and r.total == pytest.approx(0.1)


def test_unknown_grouping_is_a_clear_error(led):
    with pytest.raises(CostsError) as exc:
        spend(led, "week")
    assert "week" in str(exc.value) and "provider|gpu|run|day" in exc.value.hint
