"""The ledger: intent before the paid call, billing intervals, costs recomputed from them."""
from __future__ import annotations

import sqlite3
import threading
from datetime import datetime, timedelta, timezone

import pytest

from orchestrator import ledger as L
from orchestrator.errors import ConfigError, LedgerError
from orchestrator.secrets import read_secret, redact

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc).timestamp()


@pytest.fixture()
def led(tmp_path):
    led = L.Ledger.open(tmp_path)
    led.create_run("r1", "demo", budget=10.0, currency="USD")
    yield led
    led.close()


def intent(led, price=3.6, granularity_s=1.0, storage=0.0, job="j1"):
    return led.record_intent(run_id="r1", job_id=job, host_name="h", provider="vastai",
                             label=f"orch-r1-{job}", gpu="RTX 4090", price_per_hour=price,
                             currency="USD", granularity_s=granularity_s,
                             storage_price_per_hour=storage)


def test_intent_is_recorded_before_create_and_bills_nothing(led):
    row = intent(led)
    inst = led.instance(row)
    assert inst.state == L.INTENT and inst.instance_id is None
    assert [i.row_id for i in led.instances(open_only=True)] == [row]
    assert led.billing(row) == [] and led.instance_cost(row) == 0.0
    # a create that never happened closes the intent without cost
    led.set_instance_state(row, L.FAILED, note="create refused: no capacity")
    assert led.instances(open_only=True) == []
    assert led.instance(row).note == "create refused: no capacity"


def test_gpu_time_billed_at_recorded_price_rounded_to_granularity(led):
    row = intent(led, price=3.6, granularity_s=60.0)        # 0.001 USD per second
    led.instance_created(row, "i-7", at=T0)
    led.set_instance_state(row, L.RUNNING, at=T0 + 5)
    led.set_instance_state(row, L.DESTROYED, at=T0 + 61)   # 61 s → two 60 s granules
    (b,) = led.billing(row)
    assert b.kind == "gpu" and b.price_per_hour == 3.6
    assert led.instance_cost(row) == pytest.approx(120 * 0.001)
    assert led.instance(row).ended_at is not None
    assert led.find_instance("vastai", "i-7").row_id == row


def test_stopped_instance_bills_storage_then_gpu_again_on_restart(led):
    row = intent(led, price=3.6, storage=0.36)
    led.instance_created(row, "i-8", at=T0)
    led.set_instance_state(row, L.STOPPED, at=T0 + 100)    # 100 s of GPU
    led.set_instance_state(row, L.RUNNING, at=T0 + 1100)   # 1000 s of storage
    led.set_instance_state(row, L.DESTROYED, at=T0 + 1150)  # 50 s more GPU
    kinds = [(b.kind, b.cost()) for b in led.billing(row)]
    assert [k for k, _ in kinds] == ["gpu", "storage", "gpu"]
    assert led.instance_cost(row) == pytest.approx(150 * 0.001 + 1000 * 0.0001)
    assert led.open_billing() == []


def test_open_interval_accrues_until_now(led):
    row = intent(led, price=3.6)
    led.instance_created(row, "i-9", at=T0)
    now = datetime.fromtimestamp(T0 + 30, timezone.utc)
    assert led.instance_cost(row, now=now) == pytest.approx(0.03)
    assert led.run_cost("r1", now=now) == pytest.approx(0.03)


def test_host_key_is_pinned_once(led):
    row = intent(led)
    led.pin_host_key(row, "ssh-ed25519 AAAAfirst")
    led.pin_host_key(row, "ssh-ed25519 AAAAsecond")
    assert led.host_key(row) == "ssh-ed25519 AAAAfirst"


def test_concurrent_jobs_write_safely(led):
    def work(k: int) -> None:
        job = f"j{k}"
        led.add_job("r1", job, experiment="e", scene="s", host_name="h", provider="local",
                    gpu="cpu", steps=10, backend="torch", dataset="d")
        row = intent(led, job=job)
        led.instance_created(row, f"i-{k}")
        with led.phase("r1", job, "train"):
            pass
        led.set_instance_state(row, L.DESTROYED)
        led.update_job("r1", job, status="succeeded")

    threads = [threading.Thread(target=work, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(led.jobs("r1")) == 16
    assert all(j.status == "succeeded" and j.ended_at for j in led.jobs("r1"))
    assert len(led.phases("r1")) == 16
    assert led.instances(open_only=True) == []
    # a second process (another `orchestrate` command) reads the same file
    con = sqlite3.connect(led.path)
    assert con.execute("SELECT COUNT(*) FROM billing WHERE ended_at IS NULL").fetchone()[0] == 0
    con.close()


def test_update_job_rejects_unknown_fields(led):
    with pytest.raises(LedgerError, match="unknown fields"):
        led.update_job("r1", "j", colour="red")


def test_secrets_are_redacted_from_everything_stored(led, monkeypatch):
    monkeypatch.setenv("TEST_LEDGER_TOKEN", "s3cr3t-token-value")
    assert read_secret(env="TEST_LEDGER_TOKEN") == "s3cr3t-token-value"
    led.add_event("error", "auth failed with s3cr3t-token-value", run_id="r1")
    led.add_job("r1", "j", experiment="e", scene="s", host_name="h", provider="local",
                gpu="cpu", steps=1, backend="torch", dataset="d")
    led.update_job("r1", "j", status="failed", error="bad key s3cr3t-token-value")
    assert "s3cr3t" not in led.events("r1")[0]["message"]
    assert "s3cr3t" not in led.jobs("r1")[0].error
    assert redact("x s3cr3t-token-value y") == "x *** y"
    led.close()
    assert b"s3cr3t-token-value" not in led.path.read_bytes()


def test_secret_references_fail_with_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.delenv("NOPE_NOT_SET", raising=False)
    with pytest.raises(ConfigError, match="NOPE_NOT_SET is not set"):
        read_secret(env="NOPE_NOT_SET", what="hosts.x.password_env")
    with pytest.raises(ConfigError, match="cannot read secret file"):
        read_secret(file=str(tmp_path / "missing"), what="hosts.x.password_file")
    (tmp_path / "key").write_text("  abcdef123\n")
    assert read_secret(file=str(tmp_path / "key")) == "abcdef123"


def test_interval_cost_rounds_up_but_not_from_zero():
    start = L.iso(T0)
    assert L.interval_cost(start, start, 100.0, 60) == 0.0
    assert L.interval_cost(start, L.iso(T0 + 1), 3600.0, 60) == pytest.approx(60.0)
    assert L.interval_cost(start, L.iso(T0 + 60), 3600.0, 60) == pytest.approx(60.0)
    later = datetime.fromtimestamp(T0, timezone.utc) + timedelta(seconds=90)
    assert L.interval_cost(start, None, 3600.0, 1, now=later) == pytest.approx(90.0)
