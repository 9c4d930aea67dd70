"""`orchestrate report` and `orchestrate costs` through the real CLI entry point."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.ledger import Ledger
from orchestrator.report.synthetic import FakeJob, add_finished_job

T0 = datetime(2026, 3, 1, 10, tzinfo=timezone.utc).timestamp()


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("ORCHESTRATE_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    led = Ledger.open(tmp_path / "home")
    led.create_run("20260301-100000-abcd", "demo", budget=1.0)
    add_finished_job(led, "20260301-100000-abcd",
                     FakeJob("ngp-lego-here", "lego", psnrs=(24.0, 26.0, 28.0), ssims=(0.8, 0.85, 0.9), billed_s=90,
                             price_per_hour=0.72, video=False),
                     runs_root=tmp_path / "runs", start_epoch=T0)
    led.close()
    return tmp_path


def test_report_formats_on_stdout_and_in_files(home, capsys):
    assert main(["report", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    (job,) = data["jobs"]
    assert job["psnr"] == pytest.approx(26.0) and job["cost"] == pytest.approx(90 * 0.72 / 3600)
    assert main(["report", "latest", "--format", "csv"]) == 0
    rows = list(csv.DictReader(capsys.readouterr().out.splitlines()))
    assert rows[0]["job"] == "ngp-lego-here" and float(rows[0]["psnr"]) == pytest.approx(26.0)
    assert main(["report", "demo"]) == 0
    assert "| ngp-lego-here |" in capsys.readouterr().out
    assert main(["report", "--format", "html"]) == 0                  # default ./report.html
    assert (home / "report.html").read_text().startswith("<!doctype html>")
    assert "report written to report.html" in capsys.readouterr().err
    assert main(["report", "--format", "md", "--out", "out/r.md"]) == 0
    assert "ngp-lego-here" in (home / "out" / "r.md").read_text()


def test_costs_tables_and_json(home, capsys):
    assert main(["costs", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data["by"]) == {"provider", "gpu", "run", "day"}
    (prov,) = data["by"]["provider"]
    assert prov["key"] == "local" and prov["total"] == pytest.approx(90 * 0.72 / 3600)
    assert data["total"] == {"USD": pytest.approx(0.018)}
    assert main(["costs", "--by", "day"]) == 0
    out = capsys.readouterr().out
    assert "spend by day" in out and "2026-03-01" in out and "spend by gpu" not in out


@pytest.mark.parametrize("argv, code, message", [
    (["report", "nope"], 1, "error: unknown run 'nope'"),
    (["report", "--format", "pdf"], 64, "error: argument --format: invalid choice"),
    (["report", "--format", "html", "--out", "/proc/no/report.html"], 1,
     "error: cannot write the report to /proc/no/report.html"),
    (["costs", "--by", "week"], 64, "error: argument --by: invalid choice"),
])
def test_bad_input_is_one_clear_line_and_a_nonzero_exit(home, argv, code, message):
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", *argv], capture_output=True,
                          text=True, env={**os.environ, "ORCHESTRATE_HOME": str(home / "home")},
                          cwd=home, timeout=60)
    assert proc.returncode == code
    assert proc.stderr.startswith(message), proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert len([ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]) == 1


def test_empty_ledger_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ORCHESTRATE_HOME", str(tmp_path / "empty"))
    assert main(["costs"]) == 0
    assert "No billed instances" in capsys.readouterr().out
    assert main(["report"]) == 0
    assert "No jobs in the ledger" in capsys.readouterr().out


def test_report_without_pandas_says_what_to_install(tmp_path: Path) -> None:
    """pandas is the report extra: a controller installed without it gets one line, exit 1."""
    import subprocess
    import sys
    code = ("import sys; sys.modules['pandas'] = None\n"
            "from orchestrator.cli import main; sys.exit(main(['report']))")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "ORCHESTRATE_HOME": str(tmp_path / "home")}, timeout=60)
    assert res.returncode == 1
    assert res.stderr.splitlines() == ["error: `orchestrate report` needs pandas, which this install lacks",
                                       "hint: pip install 'orchestrate[report]'"]
