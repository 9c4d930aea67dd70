"""The ledger's schema version and migrations: an unversioned ledger written by the old code
(`fixtures/ledger_v0.sqlite`, made by `fixtures/make_ledger_v0.py` at commit ca9350d) opens
with its runs, jobs, billing and costs unchanged; a new file gets the latest version; a file
from a newer orchestrate is refused and left byte for byte as it was; migrations run in
order and all-or-nothing. Real SQLite files throughout."""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

from orchestrator import ledger as L
from orchestrator.errors import LedgerError, LedgerTooNew
from orchestrator.ledger import schema
from orchestrator.report import costs

FIXTURE = Path(__file__).parent / "fixtures" / "ledger_v0.sqlite"
# r-b's GPU interval opened at 23:59:00 on 1 March and is still open in the fixture
NOW = datetime(2026, 3, 2, 0, 1, 0, tzinfo=timezone.utc)


def _t(hh: int, mm: int, ss: int = 0, day: int = 1) -> str:
    return f"2026-03-{day:02d}T{hh:02d}:{mm:02d}:{ss:02d}.000000+00:00"


@pytest.fixture()
def v0(tmp_path: Path) -> Path:
    path = tmp_path / "home" / "ledger.sqlite"
    path.parent.mkdir()
    shutil.copyfile(FIXTURE, path)
    return path


def raw_version(path: Path) -> int:
    con = sqlite3.connect(path)
    try:
        return con.execute("PRAGMA user_version").fetchone()[0]
    finally:
        con.close()


def dump(path: Path) -> dict[str, list[tuple]]:
    """Every table's rows and the schema text, read without the ledger's code."""
    con = sqlite3.connect(path)
    try:
        names = [r[0] for r in con.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]
        out = {n: sorted(con.execute(f"SELECT * FROM {n}").fetchall(), key=repr) for n in names}
        out["__schema__"] = sorted(con.execute("SELECT type, name, sql FROM sqlite_master").fetchall(),
                                   key=repr)
        return out
    finally:
        con.close()


def files_in(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


# -- the old ledger, read by the new code -------------------------------------------------------

def test_fixture_is_unversioned_as_the_old_code_left_it() -> None:
    header = FIXTURE.read_bytes()[:100]                 # read, never opened: it must not change
    assert header[:16] == b"SQLite format 3\x00"
    assert int.from_bytes(header[60:64], "big") == 0    # PRAGMA user_version lives at offset 60


def test_v0_ledger_opens_with_runs_jobs_billing_and_costs_unchanged(v0: Path) -> None:
    assert raw_version(v0) == 0
    with L.Ledger(v0) as led:
        assert led.schema_version == schema.LATEST_VERSION
        assert led.runs() == [
            {"run_id": "r-a", "name": "demo", "config_path": "experiments.yaml",
             "created_at": _t(9, 0), "ended_at": _t(9, 45), "status": "succeeded",
             "budget": 20.0, "currency": "USD", "note": "1 of 3 jobs succeeded"},
            {"run_id": "r-b", "name": "overnight", "config_path": "night.yaml",
             "created_at": _t(23, 58), "ended_at": None, "status": "running", "budget": None,
             "currency": "EUR", "note": None}]
        assert led.run("r-b")["currency"] == "EUR"

        jobs = {(j.run_id, j.job_id): j for j in led.jobs()}
        assert sorted(jobs) == [("r-a", "j1"), ("r-a", "j2"), ("r-a", "j3"), ("r-b", "j1"), ("r-b", "j2")]
        assert jobs["r-a", "j1"] == L.JobRow(
            run_id="r-a", job_id="j1", experiment="ngp", scene="lego", host_name="vast-4090",
            provider="vastai", gpu="RTX 4090", steps=3000, backend="tcnn",
            settings={"lr": 0.01, "batch_rays": 4096}, dataset="nerf-synthetic",
            status="succeeded", error=None, created_at=_t(9, 0, 1), started_at=_t(9, 1, 6),
            ended_at=_t(9, 20, 11), estimate={"seconds": 412.5, "cost": 0.41, "currency": "USD"},
            instance_row=1, out_dir="runs/r-a/j1")
        assert (jobs["r-a", "j2"].status, jobs["r-a", "j2"].error, jobs["r-a", "j2"].settings) == (
            "failed", "train exited 3: loss became NaN at step 120", {})
        assert (jobs["r-a", "j3"].status, jobs["r-a", "j3"].instance_row) == ("failed", None)
        assert [(j.job_id, j.status) for j in led.jobs("r-b")] == [("j1", "running"), ("j2", "pending")]

        assert [(i.row_id, i.provider, i.instance_id, i.state, i.price_per_hour, i.currency,
                 i.storage_price_per_hour, i.granularity_s) for i in led.instances()] == [
            (1, "vastai", "vast-777", "destroyed", 3.6, "USD", 0.36, 60.0),
            (2, "local", "local-1", "destroyed", 0.0, "USD", 0.0, 1.0),
            (3, "runpod", None, "failed", 1.89, "USD", 0.0, 1.0),
            (4, "lambda", "lam-42", "running", 1.8, "EUR", 0.0, 1.0),
            (5, "lambda", None, "intent", 1.8, "EUR", 0.0, 1.0)]
        inst = led.instance(1)
        assert (inst.endpoint, inst.note, inst.ended_at) == ("root@203.0.113.7:40022", "exited", _t(9, 20, 10))
        assert led.host_key(1) == "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFixtureHostKey"
        assert led.find_instance("lambda", "lam-42").row_id == 4
        assert [i.row_id for i in led.instances(open_only=True)] == [4, 5]

        assert led.billing() == [
            L.BillingRow(1, 1, "gpu", _t(9, 1), _t(9, 2, 40), 3.6, "USD", 60.0),
            L.BillingRow(2, 1, "storage", _t(9, 2, 40), _t(9, 19, 20), 0.36, "USD", 60.0),
            L.BillingRow(3, 1, "gpu", _t(9, 19, 20), _t(9, 20, 10), 3.6, "USD", 60.0),
            L.BillingRow(4, 2, "gpu", _t(9, 30), _t(9, 30, 30), 0.0, "USD", 1.0),
            L.BillingRow(5, 4, "gpu", _t(23, 59), None, 1.8, "EUR", 1.0)]
        assert [b.id for b in led.open_billing()] == [5]
        # 100 s GPU → 120 s billed at 0.001/s; 1000 s storage → 1020 s at 0.0001/s; 50 s → 60 s
        assert [b.cost() for b in led.billing(1)] == pytest.approx([0.12, 0.102, 0.06])
        assert led.instance_cost(1) == pytest.approx(0.282)
        assert led.run_cost("r-a") == pytest.approx(0.282)
        assert led.run_cost("r-b", now=NOW) == pytest.approx(120 * 1.8 / 3600)

        assert [(p["job_id"], p["phase"], p["seconds"]) for p in led.phases("r-a")] == [
            ("j1", "boot", 20.0), ("j1", "train", 70.0), ("j1", "eval", 30.0)]
        (res,) = led.results(["r-a"])
        assert (res["psnr_mean"], res["ssim_mean"], res["n_test_images"], res["out_dir"]) == (
            31.25, 0.953, 200, "runs/r-a/j1")
        assert json.loads(res["summary"])["device"] == "cuda"
        assert led.results(["r-b"]) == []
        assert [(e["at"], e["kind"], e["message"]) for e in led.events("r-b")] == [
            (_t(23, 59, 31), "warning", "controller lost while creating r-b/j2")]
        assert len(led.events()) == 3

        by_provider = {(r.key, r.currency): r for r in costs.spend(led, "provider", now=NOW)}
        assert sorted(by_provider) == [("lambda", "EUR"), ("local", "USD"), ("runpod", "USD"),
                                       ("vastai", "USD")]
        vast = by_provider["vastai", "USD"]
        assert (vast.gpu_cost, vast.storage_cost, vast.gpu_hours, vast.storage_hours) == pytest.approx(
            (0.18, 0.102, 150 / 3600, 1000 / 3600))
        lam = by_provider["lambda", "EUR"]
        assert (lam.total, lam.instances, lam.failed_launches, lam.accruing) == (
            pytest.approx(0.06), 2, 1, True)
        runpod = by_provider["runpod", "USD"]
        assert (runpod.total, runpod.instances, runpod.failed_launches) == (0.0, 1, 1)
        assert costs.totals(costs.spend(led, "run", now=NOW)) == pytest.approx({"USD": 0.282, "EUR": 0.06})
        by_day = {(r.key, r.currency): r.total for r in costs.spend(led, "day", now=NOW)}
        assert by_day == pytest.approx({("2026-03-01", "EUR"): 0.03, ("2026-03-01", "USD"): 0.282,
                                        ("2026-03-02", "EUR"): 0.03})
    assert raw_version(v0) == schema.LATEST_VERSION


def test_v0_ledger_keeps_working_for_writes_after_adoption(v0: Path) -> None:
    with L.Ledger(v0) as led:
        row = led.record_intent(run_id="r-b", job_id="j3", host_name="lambda-h100",
                                provider="lambda", label="orch-r-b-j3", gpu="H100",
                                price_per_hour=1.8, currency="EUR")
        assert row == 6                                 # AUTOINCREMENT carried on
        led.set_instance_state(4, L.DESTROYED, at=datetime(2026, 3, 2, 0, 0, 30, tzinfo=timezone.utc).timestamp())
        assert led.run_cost("r-b") == pytest.approx(90 * 1.8 / 3600)
        led.finish_run("r-b", "interrupted")
        assert led.run("r-b")["status"] == "interrupted"


def test_opening_twice_is_idempotent(v0: Path) -> None:
    L.Ledger(v0).close()
    first = dump(v0)
    first_bytes = v0.read_bytes()
    with L.Ledger(v0) as led:
        assert led.schema_version == schema.LATEST_VERSION
    assert dump(v0) == first
    assert v0.read_bytes() == first_bytes
    con = sqlite3.connect(v0, isolation_level=None)
    try:
        assert schema.migrate(con, v0) == ()            # nothing left to apply
    finally:
        con.close()


def test_adoption_only_added_the_version_and_later_tables(v0: Path) -> None:
    """Migration 1 adopts the old tables as they are; later migrations only add (job_costs)."""
    before = dump(v0)
    L.Ledger(v0).close()
    after = dump(v0)
    added = [entry for entry in after["__schema__"] if entry not in before["__schema__"]]
    assert sorted(name for _kind, name, _sql in added) == ["job_costs", "sqlite_autoindex_job_costs_1"]
    assert after.pop("job_costs") == []
    after["__schema__"] = [entry for entry in after["__schema__"] if entry not in added]
    assert after == before                              # same tables, same rows, same DDL
    assert raw_version(v0) == schema.LATEST_VERSION == 2


# -- new, future and foreign files --------------------------------------------------------------

def test_fresh_ledger_gets_the_latest_version(tmp_path: Path) -> None:
    with L.Ledger.open(tmp_path) as led:
        assert led.schema_version == schema.LATEST_VERSION
        led.create_run("r1", "demo")
    assert raw_version(tmp_path / "ledger.sqlite") == schema.LATEST_VERSION
    assert schema.LATEST_VERSION == len(schema.MIGRATIONS)


def test_with_block_closes_the_ledger(tmp_path: Path) -> None:
    with L.Ledger(tmp_path / "l.sqlite") as led:
        led.create_run("r1", "demo")
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        led.runs()
    led.close()                                         # closing again is harmless
    with L.Ledger(tmp_path / "l.sqlite") as again:
        assert [r["run_id"] for r in again.runs()] == ["r1"]


@pytest.mark.parametrize("wal", [True, False], ids=["wal", "rollback-journal"])
def test_a_newer_ledger_is_refused_and_left_unchanged(tmp_path: Path, wal: bool) -> None:
    home = tmp_path / "home"
    home.mkdir()
    path = home / "ledger.sqlite"
    con = sqlite3.connect(path, isolation_level=None)
    if wal:
        con.execute("PRAGMA journal_mode=WAL")
    con.execute("CREATE TABLE runs (run_id TEXT PRIMARY KEY, colour TEXT)")
    con.execute("INSERT INTO runs (run_id, colour) VALUES ('r9', 'blue')")
    con.execute(f"PRAGMA user_version = {schema.LATEST_VERSION + 1}")
    con.close()
    before, listing = path.read_bytes(), files_in(home)

    with pytest.raises(LedgerTooNew) as err:
        L.Ledger(path)
    assert isinstance(err.value, LedgerError)
    assert str(err.value) == (
        f"the ledger at {path} has schema version {schema.LATEST_VERSION + 1}, newer than this "
        f"orchestrate knows (up to {schema.LATEST_VERSION}); it was left unchanged")
    assert "upgrade orchestrate" in err.value.hint
    assert path.read_bytes() == before
    assert files_in(home) == listing                    # no -wal/-shm left behind either

    # the command line: one line, non-zero exit, no traceback
    env = {**os.environ, "ORCHESTRATE_HOME": str(home)}
    env.pop("ORCHESTRATE_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "costs"], check=False, cwd=tmp_path,
                          env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    assert f"error: the ledger at {path} has schema version {schema.LATEST_VERSION + 1}" in proc.stderr
    assert "upgrade orchestrate" in proc.stderr
    assert path.read_bytes() == before


def test_an_unversioned_file_that_is_not_a_ledger_is_refused_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE runs (run_id TEXT PRIMARY KEY, colour TEXT)")
    con.commit()
    con.close()
    before = path.read_bytes()
    with pytest.raises(LedgerError, match=r"lacks columns this orchestrate needs \(runs\.budget, "
                                          r"runs\.config_path"):
        L.Ledger(path)
    assert path.read_bytes() == before
    assert raw_version(path) == 0


# -- migrations: in order, all or nothing --------------------------------------------------------

LOGGED = schema.MIGRATIONS + (
    schema.Migration(schema.LATEST_VERSION + 1, "a log of migrations and a tag column",
                     ("CREATE TABLE migration_log (version INTEGER)",
                      f"INSERT INTO migration_log (version) VALUES ({schema.LATEST_VERSION + 1})",
                      "ALTER TABLE runs ADD COLUMN tag TEXT")),
    schema.Migration(schema.LATEST_VERSION + 2, "fill the tags (needs the column)",
                     (f"INSERT INTO migration_log (version) VALUES ({schema.LATEST_VERSION + 2})",
                      "UPDATE runs SET tag = 'tag-' || run_id")),
)


def connect(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


def test_migrations_run_in_order_from_the_files_version(v0: Path) -> None:
    n = schema.LATEST_VERSION
    con = connect(v0)
    try:
        assert schema.migrate(con, v0, LOGGED) == tuple(range(1, n + 3))
        assert [r[0] for r in con.execute("SELECT version FROM migration_log ORDER BY rowid")] == [n + 1, n + 2]
        assert con.execute("SELECT run_id, tag FROM runs ORDER BY run_id").fetchall() == [
            ("r-a", "tag-r-a"), ("r-b", "tag-r-b")]
        assert schema.user_version(con) == n + 2
        assert schema.migrate(con, v0, LOGGED) == ()
    finally:
        con.close()
    # this code only knows up to n: the file migrated past it is now refused
    with pytest.raises(LedgerTooNew):
        L.Ledger(v0)


def test_only_the_missing_migrations_run(tmp_path: Path) -> None:
    n = schema.LATEST_VERSION
    path = tmp_path / "l.sqlite"
    con = connect(path)
    try:
        assert schema.migrate(con, path, LOGGED[:n + 1]) == tuple(range(1, n + 2))
        assert schema.migrate(con, path, LOGGED) == (n + 2,)
        assert [r[0] for r in con.execute("SELECT version FROM migration_log ORDER BY rowid")] == [n + 1, n + 2]
    finally:
        con.close()


def test_a_failing_migration_leaves_the_file_at_its_version(v0: Path) -> None:
    n = schema.LATEST_VERSION
    broken = LOGGED[:n + 1] + (schema.Migration(n + 2, "broken", ("UPDATE no_such_table SET x = 1",)),)
    L.Ledger(v0).close()                                # at version n
    before = dump(v0)
    con = connect(v0)
    try:
        with pytest.raises(sqlite3.OperationalError, match="no_such_table"):
            schema.migrate(con, v0, broken)
        assert schema.user_version(con) == n            # n + 1 was rolled back with n + 2
        assert not con.in_transaction
    finally:
        con.close()
    assert dump(v0) == before


def test_migration_numbering_must_be_1_to_n() -> None:
    con = sqlite3.connect(":memory:", isolation_level=None)
    gap = schema.MIGRATIONS + (schema.Migration(schema.LATEST_VERSION + 2, "gap", ()),)
    with pytest.raises(ValueError, match="numbered 1, 2, 3"):
        schema.migrate(con, "", gap)
    assert schema.user_version(con) == 0


def test_a_column_added_later_breaks_no_write_or_read(tmp_path: Path) -> None:
    """Named columns everywhere: a column appended to every table (as a later migration
    would) leaves the whole API working. Positional INSERTs or rows built from SELECT * fail."""
    path = tmp_path / "l.sqlite"
    L.Ledger(path).close()
    con = sqlite3.connect(path)
    for table in ("runs", "instances", "billing", "jobs", "phases", "results", "events"):
        con.execute(f"ALTER TABLE {table} ADD COLUMN added_later TEXT DEFAULT 'x'")
    con.commit()
    con.close()
    with L.Ledger(path) as led:
        led.create_run("r1", "demo", budget=5.0)
        led.add_event("run", "started", run_id="r1")
        led.add_job("r1", "j1", experiment="e", scene="s", host_name="h", provider="vastai",
                    gpu="RTX 4090", steps=10, backend="torch", dataset="d")
        row = led.record_intent(run_id="r1", job_id="j1", host_name="h", provider="vastai",
                                label="orch-r1-j1", gpu="RTX 4090", price_per_hour=3.6,
                                currency="USD", granularity_s=60.0)
        t0 = datetime(2026, 1, 1, tzinfo=timezone.utc).timestamp()
        led.instance_created(row, "i-1", at=t0)
        led.set_instance_state(row, L.DESTROYED, at=t0 + 61)
        led.record_phase("r1", "j1", "train", t0, t0 + 30)
        led.add_result("r1", "j1", {"scene": "s", "psnr_mean": 25.0}, gpu="RTX 4090", out_dir="o")
        led.update_job("r1", "j1", status="succeeded", instance_row=row)
        assert led.run_cost("r1") == pytest.approx(0.12)
        assert led.instance(row).state == L.DESTROYED
        assert [j.status for j in led.jobs("r1")] == ["succeeded"]
        assert set(led.runs()[0]) == set(L.store.RUN_COLUMNS)
        assert led.results()[0]["psnr_mean"] == 25.0
        assert [p["seconds"] for p in led.phases("r1")] == [30.0]
        assert [e["message"] for e in led.events("r1")] == ["started"]


def test_migration_1_builds_exactly_the_tables_of_the_unversioned_ledger(tmp_path: Path, v0: Path) -> None:
    """Shipped migrations are never edited: migration 1 on an empty file gives the same DDL,
    statement for statement, as the old code left in the fixture."""
    fresh = tmp_path / "fresh.sqlite"
    con = connect(fresh)
    try:
        schema.migrate(con, fresh, schema.MIGRATIONS[:1])
    finally:
        con.close()
    assert dump(fresh)["__schema__"] == dump(v0)["__schema__"]
