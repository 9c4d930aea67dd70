"""GuardedLedger on real SQLite files: a replaced ledger is never overwritten, deferred writes
keep their instants and order, a journal is replayed once (issue 18, items 8 and 10)."""
from __future__ import annotations

import json
import sqlite3
from datetime import datetime
from pathlib import Path

from orchestrator.ledger import Ledger
from orchestrator.ledger.guard import GuardedLedger, replay_journals


def opened(tmp: Path) -> tuple[Ledger, GuardedLedger, int]:
    inner = Ledger.open(tmp)
    g = GuardedLedger(inner, "r1")
    g.create_run("r1", "t")
    row = g.record_intent(run_id="r1", job_id="j1", host_name="h", provider="local", label="orch-r1-j1",
                          gpu="cpu", price_per_hour=3600.0, currency="USD")
    g.instance_created(row, "i-1", at=1_700_000_000.0)
    return inner, g, row


def test_a_replaced_ledger_file_is_left_alone_and_the_run_goes_beside_it(tmp_path: Path) -> None:
    inner, g, row = opened(tmp_path)
    db = tmp_path / "ledger.sqlite"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    other = sqlite3.connect(db)
    other.execute("CREATE TABLE mine (x)")
    other.execute("INSERT INTO mine VALUES (42)")
    other.commit()
    other.close()
    g.set_instance_state(row, "destroyed", at=1_700_000_010.0)
    assert g.relocated_to == tmp_path / "ledger-recovered-r1.sqlite"
    con = sqlite3.connect(db)
    assert con.execute("SELECT x FROM mine").fetchall() == [(42,)]          # untouched
    con.close()
    assert g.instance_cost(row) == 10.0                                       # 10 s at 3600/h
    inner.close()
    rec = Ledger(g.relocated_to)
    assert rec.instance(row).state == "destroyed" and rec.instance_cost(row) == 10.0
    rec.close()


def test_deferred_writes_keep_their_instants_and_replay_once(tmp_path: Path) -> None:
    inner, g, row = opened(tmp_path)
    db = tmp_path / "ledger.sqlite"
    con = sqlite3.connect(db)
    con.execute("CREATE TRIGGER f BEFORE UPDATE ON instances BEGIN SELECT RAISE(ABORT, 'disk full'); END")
    con.commit()
    con.close()
    g.set_instance_state(row, "destroyed", at=1_700_000_020.0)
    g.add_event("note", "after the fault", "r1")            # queued behind it: order kept
    assert g.pending == 2 and not g.flush(tries=2, pause_s=0.01)
    journal = g.save_journal()
    assert [r["call"] for r in json.loads(journal.read_text())] == ["set_instance_state", "add_event"]
    inner.close()
    con = sqlite3.connect(db)
    con.execute("DROP TRIGGER f")
    con.commit()
    con.close()
    led = Ledger.open(tmp_path)
    assert replay_journals(led) == 2 and not journal.exists()
    assert replay_journals(led) == 0
    [bill] = led.billing(row)
    assert datetime.fromisoformat(bill.ended_at).timestamp() == 1_700_000_020.0
    assert [e["message"] for e in led.events("r1")] == ["after the fault"]
    led.close()
