"""The CLI surface: bad input gives one clear line and a non-zero exit, starts nothing, and no
traceback reaches the user; the budget refuses before anything is rented; --dry-run starts
nothing. Each case runs the real `orchestrate` entry point in a subprocess with its own state
directory (ORCHESTRATE_HOME) and inspects the real SQLite ledger afterwards."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator import cli

GOOD = """\
name: t
hosts:
  here: {provider: local, price_per_hour: 36}
datasets:
  demo: {generate: {size: 24}}
experiments:
  - name: ngp
    dataset: demo
    scenes: [default]
    hosts: [here]
    steps: 30
"""


def run_cli(args: list[str], home: Path, cwd: Path, timeout_s: float = 120,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "ORCHESTRATE_HOME": str(home), **(env or {})}
    full_env.pop("ORCHESTRATE_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, env=full_env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout_s)


def ledger_rows(home: Path, table: str) -> list[dict]:
    path = home / "ledger.sqlite"
    if not path.exists():
        return []
    con = sqlite3.connect(path)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute(f"SELECT * FROM {table}")]
    finally:
        con.close()


def assert_nothing_started(home: Path) -> None:
    assert ledger_rows(home, "instances") == []
    assert ledger_rows(home, "jobs") == []
    assert not (home / "hosts").exists()
    assert not (home / "local-instances").exists()


BAD_INPUTS = [
    # (case, file text or None for "no file", extra args, words the error line must contain)
    ("malformed yaml", "name: t\nhosts: [unclosed\n", [], ["experiments.yaml"]),
    ("unknown key", GOOD.replace("steps: 30", "stpes: 30"), [], ["stpes", "steps"]),
    ("unknown provider", GOOD.replace("provider: local", "provider: lokal"), [], ["lokal"]),
    ("unknown gpu", GOOD.replace("provider: local, price_per_hour: 36",
                                 "provider: vastai, gpu: ZX9000, api_key_env: ORCH_TEST_KEY"),
     [], ["ZX9000"]),
    ("unset api key variable", GOOD.replace("provider: local, price_per_hour: 36",
                                            "provider: vastai, gpu: RTX 4090, api_key_env: ORCH_UNSET_KEY"),
     [], ["ORCH_UNSET_KEY"]),
    ("negative steps", GOOD.replace("steps: 30", "steps: -5"), [], ["steps"]),
    ("missing scene", GOOD.replace("scenes: [default]", "scenes: [nosuchscene]"), [], ["nosuchscene"]),
    ("unreadable secret file",
     GOOD.replace("here: {provider: local, price_per_hour: 36}",
                  "here: {provider: local, price_per_hour: 36}\n  box: {provider: ssh, host: 127.0.0.1, "
                  "gpu: H100, price_per_hour: 1, password_file: /nonexistent/secret.txt}")
         .replace("hosts: [here]", "hosts: [box]"),
     [], ["/nonexistent/secret.txt"]),
    ("literal secret", GOOD.replace("price_per_hour: 36}", "price_per_hour: 36, password: hunter22}"),
     [], ["password"]),
    ("no such file", None, [], ["experiments.yaml"]),
    ("negative max-cost", GOOD, ["--max-cost", "-1"], ["max-cost"]),
    ("zero concurrency", GOOD, ["--concurrency", "0"], ["concurrency"]),
]


@pytest.mark.parametrize("case,text,extra,words", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_one_clear_line(tmp_path: Path, case: str, text: str | None, extra: list[str],
                                     words: list[str]) -> None:
    home = tmp_path / "home"
    if text is not None:
        (tmp_path / "experiments.yaml").write_text(text)
    res = run_cli(["run", "experiments.yaml", "--yes", *extra], home, tmp_path, timeout_s=60)
    assert res.returncode not in (0, 70), (case, res.returncode, res.stderr)
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, res.stderr
    for w in words:
        assert w in errors[0], (case, errors[0])
    assert "hunter22" not in res.stderr + res.stdout
    assert_nothing_started(home)


def test_max_cost_below_estimate_refuses_and_records_only_the_refusal(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (tmp_path / "experiments.yaml").write_text(GOOD)
    est = run_cli(["estimate", "experiments.yaml", "--json"], home, tmp_path)
    assert est.returncode == 0, est.stderr
    total = json.loads(est.stdout)["total_cost"]
    assert total > 0   # 36/h simulated: the estimate costs something
    res = run_cli(["run", "experiments.yaml", "--yes", "--max-cost", f"{total / 2:.6f}"], home, tmp_path)
    assert res.returncode == 3, res.stderr
    assert "exceeds the budget" in res.stderr and "Traceback" not in res.stderr
    assert_nothing_started(home)
    runs = ledger_rows(home, "runs")
    assert [r["status"] for r in runs] == ["refused"]
    events = ledger_rows(home, "events")
    assert [e["kind"] for e in events] == ["refused"]
    assert ledger_rows(home, "billing") == []
    # the budget in the file works the same way
    (tmp_path / "experiments.yaml").write_text(GOOD.replace("hosts:\n", f"budget: {{max_cost: {total / 2}}}\nhosts:\n", 1))
    res = run_cli(["run", "experiments.yaml", "--yes"], home, tmp_path)
    assert res.returncode == 3 and "budget.max_cost" in res.stderr
    assert_nothing_started(home)


def test_dry_run_starts_nothing(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (tmp_path / "experiments.yaml").write_text(GOOD)
    res = run_cli(["run", "experiments.yaml", "--dry-run", "--json"], home, tmp_path)
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["dry_run"] is True and len(data["estimate"]["jobs"]) == 1
    assert_nothing_started(home)
    assert ledger_rows(home, "runs") == []
    assert not (tmp_path / "runs").exists()


def test_paid_run_without_tty_needs_yes(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (tmp_path / "experiments.yaml").write_text(GOOD)
    res = run_cli(["run", "experiments.yaml"], home, tmp_path)
    assert res.returncode != 0
    assert "--yes" in res.stderr and "Traceback" not in res.stderr
    assert_nothing_started(home)


def test_status_and_down_on_an_empty_ledger(tmp_path: Path) -> None:
    home = tmp_path / "home"
    res = run_cli(["status", "--json"], home, tmp_path)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"runs": [], "jobs": [], "open_instances": [], "orphans": []}
    res = run_cli(["down", "--all", "--yes", "--json"], home, tmp_path)
    assert res.returncode == 0 and json.loads(res.stdout) == {"released": []}
    res = run_cli(["down"], home, tmp_path)
    assert res.returncode != 0 and res.stderr.startswith("error: say what to stop")
    res = run_cli(["down", "nosuch", "--yes"], home, tmp_path)
    assert res.returncode != 0 and "no open instance 'nosuch'" in res.stderr


def test_usage_error_is_one_line(tmp_path: Path) -> None:
    res = run_cli(["frobnicate"], tmp_path / "home", tmp_path)
    assert res.returncode == cli.EXIT_USAGE
    assert res.stderr.startswith("error: ") and "Traceback" not in res.stderr


def test_internal_error_is_one_line_and_traceback_only_with_debug(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from orchestrator.commands import status

    def boom(args: object) -> int:
        raise RuntimeError("kaput\nsecond line")

    monkeypatch.setenv("ORCHESTRATE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ORCHESTRATE_DEBUG", raising=False)
    monkeypatch.setattr(status, "main", boom)
    assert cli.main(["status"]) == cli.EXIT_INTERNAL
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("internal error: RuntimeError: kaput second line")
    assert "Traceback" not in err
    assert cli.main(["--debug", "status"]) == cli.EXIT_INTERNAL
    assert "Traceback" in capsys.readouterr().err


def test_status_shows_open_instances_and_down_releases_them(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """An instance left open (as after a controller crash) is listed with its accrued cost and
    released by `down --all --yes`: state destroyed, billing interval closed, processes ended."""
    from orchestrator.ledger import Ledger
    from orchestrator.providers.local import LocalProvider, marked_pids
    from orchestrator.run.provisioning import provision
    from orchestrator.testing.hosts import make_host
    from orchestrator.transport import connect

    home = tmp_path / "home"
    monkeypatch.setenv("ORCHESTRATE_HOME", str(home))

    host = make_host("local", name="here", price_per_hour=36.0)
    ledger = Ledger.open(home)
    provider = LocalProvider(host)
    ledger.create_run("r1", "t")
    p = provision(provider, host, ledger=ledger, run_id="r1", job_id="j1", label="orch-r1-j1")
    ledger.close()
    t = connect(provider, p.instance_id, host)
    t.start_detached("sleep 120", log_path="jobs/j1/log.txt", env={"ORCHESTRATE_INSTANCE": p.instance_id})

    res = run_cli(["status", "--json"], home, tmp_path)
    assert res.returncode == 0, res.stderr
    [inst] = json.loads(res.stdout)["open_instances"]
    assert inst["instance_id"] == p.instance_id and inst["state"] == "running" and inst["cost"] > 0
    res = run_cli(["down", "--all"], home, tmp_path)           # not a TTY and no --yes: refuses
    assert res.returncode != 0 and "--yes" in res.stderr
    assert marked_pids(p.instance_id) != []
    res = run_cli(["down", "--all", "--yes", "--json"], home, tmp_path)
    assert res.returncode == 0, res.stderr
    [released] = json.loads(res.stdout)["released"]
    assert released["instance_id"] == p.instance_id and released["result"] == "destroyed"
    assert marked_pids(p.instance_id) == []
    [row] = ledger_rows(home, "instances")
    assert row["state"] == "destroyed"
    assert all(b["ended_at"] for b in ledger_rows(home, "billing"))
    assert json.loads(run_cli(["status", "--json"], home, tmp_path).stdout)["open_instances"] == []


@pytest.mark.skipif(shutil.which("script") is None, reason="needs util-linux `script` for a pseudo-terminal")
def test_on_a_terminal_the_run_asks_and_no_starts_nothing(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (tmp_path / "experiments.yaml").write_text(GOOD)
    cmd = f"{shlex.quote(sys.executable)} -m orchestrator.cli run experiments.yaml"
    proc = subprocess.Popen(["script", "-qec", cmd, "/dev/null"], cwd=tmp_path, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "ORCHESTRATE_HOME": str(home)})
    try:
        time.sleep(3)   # let the prompt appear; the answer is read from the pseudo-terminal
        out, _ = proc.communicate("n\n", timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "estimated" in out
    assert "[y/N]" in out and "not started" in out
    assert proc.returncode == 1
    assert_nothing_started(home)
    assert ledger_rows(home, "runs") == []
