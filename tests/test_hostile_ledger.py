"""Ledger faults during a real run, through the CLI, on the local provider (issue 18, items 8, 10).

The faults are real SQLite behaviour injected from a second connection while the pipeline
trains: triggers that make every later write of the run fail (what a full disk, a lock held
too long or an I/O error do to a write), and the file deleted under the open connection. In
both the run pulls its results, releases the instance and prints its cost; no billing
interval is lost: it reaches the ledger file with the instants it happened.
"""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

PRICE_PER_HOUR = 36.0     # 0.01 per second: a cost visibly above zero within seconds


def config(tmp: Path, steps: int = 60) -> str:
    return f"""\
name: ledger-faults
hosts:
  here: {{provider: local, price_per_hour: {PRICE_PER_HOUR}, root: {tmp / 'hostroot'}}}
datasets:
  demo: {{generate: {{size: 16, seed: 0}}}}
experiments:
  - {{name: ngp, dataset: demo, scenes: [default], hosts: [here], steps: {steps}}}
"""


def start(tmp: Path) -> tuple[subprocess.Popen, dict[str, str]]:
    (tmp / "experiments.yaml").write_text(config(tmp))
    env = {**os.environ, "ORCHESTRATE_HOME": str(tmp / "home")}
    env.pop("ORCHESTRATE_DEBUG", None)
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", "experiments.yaml", "--yes",
                             "--runs-dir", str(tmp / "runs")], cwd=tmp, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, env


def wait_training(tmp: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        for f in (tmp / "hostroot" / "jobs").glob("*/status.json") if (tmp / "hostroot" / "jobs").is_dir() else []:
            try:
                st = json.loads(f.read_text())
            except (OSError, ValueError):
                continue
            if st.get("phase") == "train" and (st.get("step") or 0) >= 1:
                return
        time.sleep(0.1)
    raise AssertionError("never reached training: " + (proc.communicate(timeout=60)[1][-2000:]
                                                       if proc.poll() is not None else "timeout"))


def rows(db: Path, sql: str) -> list[dict]:
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute(sql)]
    finally:
        con.close()


def local_instance_states(home: Path) -> list[str]:
    return [json.loads(p.read_text())["state"] for p in (home / "local-instances").glob("*.json")]


FAULT = "injected write fault"
TABLES = {"phases": "INSERT", "events": "INSERT", "results": "INSERT", "jobs": "UPDATE",
          "instances": "UPDATE", "runs": "UPDATE", "billing": "UPDATE"}


@pytest.mark.timeout(600)
def test_ledger_writes_failing_mid_run_keep_billing_and_results(tmp_path: Path) -> None:
    proc, env = start(tmp_path)
    wait_training(tmp_path, proc)
    db = tmp_path / "home" / "ledger.sqlite"
    con = sqlite3.connect(db, timeout=30)
    for table, op in TABLES.items():
        con.execute(f"CREATE TRIGGER fault_{table} BEFORE {op} ON {table} BEGIN "
                    f"SELECT RAISE(ABORT, '{FAULT}'); END")
    con.close()
    out, err = proc.communicate(timeout=400)
    faults_end = time.time()
    assert "Traceback" not in err and "internal error" not in err
    assert proc.returncode == 1, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: the ledger refused ") and f"(IntegrityError: {FAULT})" in last, err[-2000:]
    assert "written by the next `orchestrate run` or `status`; cost so far " in last
    assert float(last.rsplit("cost so far ", 1)[1]) > 0
    # the results were pulled and the instance released although the ledger refused it all
    [summary] = list((tmp_path / "runs").glob("*/*/summary.json"))
    assert json.loads(summary.read_text())["steps"] == 60
    assert local_instance_states(tmp_path / "home") == ["terminated"]
    [journal] = list((tmp_path / "home").glob("pending-*.json"))
    assert {"set_instance_state", "record_phase", "add_result"} <= {r["call"] for r in json.loads(journal.read_text())}
    assert rows(db, "SELECT state FROM instances") == [{"state": "running"}]      # not yet known there

    # the fault clears: the next command writes what was kept, with the instants it happened
    con = sqlite3.connect(db, timeout=30)
    for table in TABLES:
        con.execute(f"DROP TRIGGER fault_{table}")
    con.close()
    res = subprocess.run([sys.executable, "-m", "orchestrator.cli", "status", "--json"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert not list((tmp_path / "home").glob("pending-*.json"))
    [inst] = rows(db, "SELECT * FROM instances")
    assert inst["state"] == "destroyed"
    [bill] = rows(db, "SELECT * FROM billing")
    ended = datetime.fromisoformat(bill["ended_at"]).timestamp()
    assert ended < faults_end                     # the teardown's instant, not the replay's
    assert [j["status"] for j in rows(db, "SELECT status FROM jobs")] == ["succeeded"]
    assert len(rows(db, "SELECT * FROM results")) == 1
    assert json.loads(res.stdout)["open_instances"] == []


@pytest.mark.timeout(600)
def test_ledger_deleted_mid_run_is_recreated_with_every_row(tmp_path: Path) -> None:
    proc, env = start(tmp_path)
    wait_training(tmp_path, proc)
    db = tmp_path / "home" / "ledger.sqlite"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err
    assert "was removed during the run; recreated it from the open copy" in err
    assert db.exists()
    [job] = rows(db, "SELECT * FROM jobs")
    assert job["status"] == "succeeded"
    [inst] = rows(db, "SELECT * FROM instances")
    assert inst["state"] == "destroyed"
    [bill] = rows(db, "SELECT * FROM billing")
    assert bill["ended_at"] is not None
    assert len(rows(db, "SELECT * FROM results")) == 1
    res = subprocess.run([sys.executable, "-m", "orchestrator.cli", "status"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "no runs yet" not in res.stdout + res.stderr
    assert "succeeded" in res.stdout
