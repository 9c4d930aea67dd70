"""Ledger files in bad shape, through the CLI (issue 18, items 14, 15, 19): a read-only ledger
(a read-only bind mount in a private mount namespace: root ignores file modes), a damaged page
under the events table, a file that is not a database at all, and control characters stored in
names. Real SQLite files throughout; the damage is done to the bytes on disk."""
from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.ledger import Ledger

REPO = Path(__file__).resolve().parents[1]


def cli(tmp: Path, *args: str, wrap: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ORCHESTRATE_HOME": str(tmp / "home"), "PYTHONPATH": str(REPO)}
    env.pop("ORCHESTRATE_DEBUG", None)
    argv = [sys.executable, "-m", "orchestrator.cli", *args]
    return subprocess.run((wrap or []) + argv, env=env, cwd=tmp, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)


def a_ledger(tmp: Path, run_name: str = "t") -> Path:
    led = Ledger.open(tmp / "home")
    led.create_run("r1", run_name)
    led.add_job("r1", "j1", experiment="e", scene="lego", host_name="here", provider="local", gpu="cpu",
                steps=10, backend="torch", dataset="demo", status="running")
    row = led.record_intent(run_id="r1", job_id="j1", host_name="here", provider="local", label="orch-r1-j1",
                            gpu="cpu", price_per_hour=3.6, currency="USD")
    led.instance_created(row, "here-1", at=1_700_000_000.0)
    led.set_instance_state(row, "destroyed", at=1_700_000_100.0)
    led.add_result("r1", "j1", {"scene": "lego", "psnr_mean": 25.5, "ssim_mean": 0.9, "train_seconds": 50,
                                "steps": 10, "backend": "torch"}, gpu="cpu", out_dir="")
    led.update_job("r1", "j1", status="succeeded")
    for i in range(200):
        led.add_event("note", f"event {i} " + "x" * 100, "r1", "j1")
    led.finish_run("r1", "succeeded")
    led.close()
    return tmp / "home" / "ledger.sqlite"


def damage_table(db: Path, table: str) -> None:
    con = sqlite3.connect(db)
    try:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page_size = con.execute("PRAGMA page_size").fetchone()[0]
        root = con.execute("SELECT rootpage FROM sqlite_master WHERE name=?", (table,)).fetchone()[0]
        con.execute("PRAGMA journal_mode=DELETE")
    finally:
        con.close()
    with open(db, "r+b") as f:
        f.seek((root - 1) * page_size)
        f.write(b"\xa5" * page_size)


BUDGET_FILE = """\
name: t
budget: {max_cost: 0.001}
hosts:
  here: {provider: local, price_per_hour: 100}
datasets:
  demo: {generate: {size: 16}}
experiments:
  - {name: e, dataset: demo, steps: 500}
"""


def test_read_only_ledger_does_not_hide_a_budget_refusal(tmp_path: Path) -> None:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare for a read-only bind mount")
    a_ledger(tmp_path)
    (tmp_path / "e.yaml").write_text(BUDGET_FILE)
    home = tmp_path / "home"
    ro = ["unshare", "--mount", "sh", "-c", f'mount --bind -o ro "{home}" "{home}" && exec "$@"', "sh"]
    probe = subprocess.run(ro + ["sh", "-c", f'touch "{home}/x"'], capture_output=True, text=True)
    assert probe.returncode != 0 and "Read-only file system" in probe.stderr
    res = cli(tmp_path, "run", "e.yaml", "--yes", wrap=ro)
    assert res.returncode == 3, res.stderr
    assert res.stderr.splitlines()[0].startswith("error: estimated cost ") and "exceeds the budget" in res.stderr
    assert "internal error" not in res.stderr and "Traceback" not in res.stderr


def test_a_damaged_events_page_does_not_cost_the_report(tmp_path: Path) -> None:
    db = a_ledger(tmp_path)
    damage_table(db, "events")
    con = sqlite3.connect(db)
    with pytest.raises(sqlite3.DatabaseError):
        con.execute("SELECT * FROM events").fetchall()
    con.close()
    res = cli(tmp_path, "report", "--format", "csv")
    assert res.returncode == 0, res.stderr
    assert "r1,j1,lego,cpu,torch,10,,succeeded,25.5" in res.stdout
    assert res.stderr.strip().splitlines() == [res.stderr.strip()]           # one line
    assert "events of run r1 cannot be read (database disk image is malformed)" in res.stderr
    md = cli(tmp_path, "report")
    assert md.returncode == 0 and "r1: events left out: the ledger's events table is damaged" in md.stdout
    assert "Traceback" not in res.stderr + md.stderr
    for command in ("status", "costs"):
        assert cli(tmp_path, command).returncode == 0


def test_a_corrupt_ledger_is_called_damaged_not_unwritable(tmp_path: Path) -> None:
    db = a_ledger(tmp_path)
    for extra in ("-wal", "-shm"):
        Path(f"{db}{extra}").unlink(missing_ok=True)
    with open(db, "r+b") as f:
        f.write(b"this is not an sqlite file" * 8)
    res = cli(tmp_path, "status")
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: cannot open the ledger at ")
    assert lines[1].startswith("hint: the ledger file is damaged;") and "writable" not in lines[1]


def test_control_characters_stored_in_names_are_printed_escaped(tmp_path: Path) -> None:
    a_ledger(tmp_path, run_name="evil\x1b[2J\x07[bold]name[/]")
    res = cli(tmp_path, "status")
    assert res.returncode == 0, res.stderr
    assert "\x1b" not in res.stdout and "\x07" not in res.stdout
    assert "evil\\x1b[2J\\x07[bold]name[/]" in res.stdout


RUN_FILE = """\
name: t
hosts:
  here: {provider: local, price_per_hour: 3.6}
datasets:
  demo: {generate: {size: 16}}
experiments:
  - {name: e, dataset: demo, steps: 5}
"""


@pytest.mark.parametrize("how", ["a file in the way", "read-only mount"])
def test_unwritable_runs_dir_is_refused_before_renting(tmp_path: Path, how: str) -> None:
    """Issue 18 item 9: found only after training, the results (paid for) were lost."""
    (tmp_path / "e.yaml").write_text(RUN_FILE)
    wrap = None
    if how == "a file in the way":
        (tmp_path / "blocker").write_text("")
        runs = tmp_path / "blocker" / "runs"
    else:
        if os.geteuid() != 0 or shutil.which("unshare") is None:
            pytest.skip("needs root and unshare for a read-only bind mount")
        runs = tmp_path / "ro-runs"
        runs.mkdir()
        wrap = ["unshare", "--mount", "sh", "-c", f'mount --bind -o ro "{runs}" "{runs}" && exec "$@"', "sh"]
    res = cli(tmp_path, "run", "e.yaml", "--yes", "--runs-dir", str(runs), wrap=wrap)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert lines[0].startswith(f"error: --runs-dir {runs}: results cannot be written there (")
    assert lines[0].endswith("); nothing was started") and len(lines) == 2
    db = tmp_path / "home" / "ledger.sqlite"
    if db.exists():
        con = sqlite3.connect(db)
        try:
            assert con.execute("SELECT COUNT(*) FROM instances").fetchone()[0] == 0
        finally:
            con.close()
