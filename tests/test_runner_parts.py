"""The runner's parts on real processes and a real SQLite ledger: the local transport and
provider, provisioning's money rules (intent first, stray instances destroyed), the budget
guard, the payload push."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from orchestrator.config import HostConfig
from orchestrator.errors import BudgetError, CommandError, ProviderError
from orchestrator.ledger import DESTROYED, FAILED, Ledger
from orchestrator.providers.base import InstanceSpec, InstanceState
from orchestrator.providers.local import LocalProvider, marked_pids
from orchestrator.run.budget import Budget, BudgetGuard, check_estimate, effective_budget
from orchestrator.run.payload import RemoteStatus, job_key, push_payload
from orchestrator.run.provisioning import provision, release
from orchestrator.testing.hosts import make_host
from orchestrator.transport import connect
from orchestrator.transport.local import LocalTransport


def Host(**fields: Any) -> HostConfig:
    return make_host("local", **{"name": "here", "price_per_hour": 7.2, **fields})


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ORCHESTRATE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture()
def ledger(home: Path) -> Ledger:
    led = Ledger.open(home)
    yield led
    led.close()


def _wait(pred, timeout_s: float = 10.0) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


# -- local transport ------------------------------------------------------------------------------
def test_local_transport_runs_in_root_and_reports_failures(tmp_path: Path) -> None:
    t = LocalTransport(tmp_path / "root")
    res = t.run("pwd; echo out; echo err >&2")
    assert res.ok and res.stdout.split() == [str(tmp_path / "root"), "out"] and res.stderr.strip() == "err"
    with pytest.raises(CommandError) as exc:
        t.run("echo boom >&2; exit 3")
    assert exc.value.exit_code_remote == 3 and "boom" in str(exc.value)
    assert t.run("exit 4", check=False).exit_code == 4
    with pytest.raises(CommandError) as exc:
        t.run("sleep 5", timeout_s=0.3)
    assert exc.value.exit_code_remote == 124


def test_local_transport_files(tmp_path: Path) -> None:
    t = LocalTransport(tmp_path / "root")
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "b" / "x.txt").write_text("x" * 10)
    (src / "y.bin").write_bytes(b"\0" * 5)
    stats = t.put(src, "dst")
    assert (stats.files, stats.bytes) == (2, 15)
    assert (tmp_path / "root" / "dst" / "a" / "b" / "x.txt").read_text() == "x" * 10
    back = t.get("dst", tmp_path / "back")
    assert back.files == 2 and (tmp_path / "back" / "y.bin").read_bytes() == b"\0" * 5
    assert t.read_text("nope.txt") is None
    t.write_text("deep/s.json", '{"a": 1}')
    assert t.read_text("deep/s.json") == '{"a": 1}'
    assert [p.name for p in (tmp_path / "root" / "deep").iterdir()] == ["s.json"]   # no temp left


def test_detached_start_returns_at_once_and_stop_ends_only_marked_processes(home: Path) -> None:
    provider = LocalProvider(Host())
    iid = provider.create(InstanceSpec(label="orch-r-j", gpu="cpu"))
    other = provider.create(InstanceSpec(label="orch-r-k", gpu="cpu"))
    t = connect(provider, iid, Host())
    t0 = time.monotonic()
    pid = t.start_detached("sleep 60", log_path="jobs/j/log.txt", env={"ORCHESTRATE_INSTANCE": iid})
    pid_other = t.start_detached("sleep 60", log_path="jobs/k/log.txt", env={"ORCHESTRATE_INSTANCE": other})
    assert time.monotonic() - t0 < 5.0
    assert _wait(lambda: pid in marked_pids(iid))
    try:
        provider.stop(iid)
        assert marked_pids(iid) == []
        assert provider.describe(iid).state == InstanceState.STOPPED
        assert pid_other in marked_pids(other)       # the other instance is untouched
    finally:
        provider.destroy(other)
    assert marked_pids(other) == []
    assert provider.describe(other).state == InstanceState.TERMINATED
    assert {i.instance_id for i in provider.list("orch-r-")} == {iid, other}
    assert provider.list("orch-zzz") == []


# -- provisioning ---------------------------------------------------------------------------------
class CreateThenFail(LocalProvider):
    """A real local provider whose create makes the instance, then raises (a lost reply)."""

    def create(self, spec: InstanceSpec) -> str:
        super().create(spec)
        raise ProviderError("timeout reading the reply", provider=self.name)


class CreateFails(LocalProvider):
    def create(self, spec: InstanceSpec) -> str:
        raise ProviderError("sold out", provider=self.name)


def test_provision_records_intent_and_billing(home: Path, ledger: Ledger) -> None:
    provider = LocalProvider(Host())
    p = provision(provider, Host(), ledger=ledger, run_id="r1", job_id="j1", label="orch-r1-j1")
    row = ledger.instance(p.row_id)
    assert row.state == "running" and row.instance_id == p.instance_id and row.price_per_hour == 7.2
    [b] = ledger.billing(p.row_id)
    assert b.ended_at is None and b.kind == "gpu"
    time.sleep(1.1)
    assert release(provider, p.instance_id, p.row_id, ledger=ledger)
    [b] = ledger.billing(p.row_id)
    assert b.ended_at is not None
    assert ledger.instance(p.row_id).state == DESTROYED
    # 1 s granularity: at least 2 billed seconds at 7.2/h = 0.004
    assert ledger.instance_cost(p.row_id) >= 2 * 7.2 / 3600 - 1e-12


def test_create_that_raised_but_made_an_instance_is_destroyed(home: Path, ledger: Ledger) -> None:
    provider = CreateThenFail(Host())
    with pytest.raises(ProviderError, match="timeout reading the reply"):
        provision(provider, Host(), ledger=ledger, run_id="r1", job_id="j1", label="orch-r1-j1")
    [row] = ledger.instances()
    assert row.state == DESTROYED and row.instance_id is not None
    assert all(b.ended_at for b in ledger.billing(row.row_id))
    [info] = provider.list("orch-r1-j1")
    assert info.state == InstanceState.TERMINATED
    assert ledger.instances(open_only=True) == []


def test_create_that_failed_leaves_a_closed_intent(home: Path, ledger: Ledger) -> None:
    with pytest.raises(ProviderError, match="sold out"):
        provision(CreateFails(Host()), Host(), ledger=ledger, run_id="r1", job_id="j1", label="orch-r1-j1")
    [row] = ledger.instances()
    assert row.state == FAILED and row.instance_id is None and "sold out" in row.note
    assert ledger.billing() == []


# -- budget ---------------------------------------------------------------------------------------
def test_budget_refuses_above_cap_and_flag_wins() -> None:
    @dataclass
    class B:
        max_cost: float = 2.0
        currency: str = "CNY"

    assert effective_budget(B(), None) == Budget(2.0, "CNY", "budget.max_cost")
    assert effective_budget(B(), 1.0) == Budget(1.0, "CNY", "--max-cost")
    assert effective_budget(None, None).max_cost is None
    check_estimate(2.0, Budget(2.0))
    with pytest.raises(BudgetError, match="exceeds the budget"):
        check_estimate(2.01, Budget(2.0))


def test_guard_reserves_estimates_and_sees_real_spend(home: Path, ledger: Ledger) -> None:
    guard = BudgetGuard(Budget(1.0), ledger, "r1")
    assert guard.may_start("a", 0.6)
    assert not guard.may_start("b", 0.6)       # 0.6 reserved + 0.6 > 1.0
    assert guard.may_start("c", 0.4)
    assert not guard.over_cap()
    row = ledger.record_intent(run_id="r1", job_id="a", host_name="h", provider="local", label="l",
                               gpu="cpu", price_per_hour=3600.0 * 2, currency="USD")
    ledger.instance_created(row, "x", at=time.time() - 1.0)     # 1 s at 2/s = 2.0 > cap
    assert guard.over_cap()
    assert BudgetGuard(Budget(None), ledger, "r1").may_start("z", 1e9)


# -- payload --------------------------------------------------------------------------------------
def test_payload_is_pushed_once_per_content(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for pkg in ("remote_payload", "ngp_train"):
        (src / pkg).mkdir(parents=True)
        (src / pkg / "__init__.py").write_text(f"# {pkg}\n")
    t = LocalTransport(tmp_path / "root")
    first = push_payload(t, src)
    assert first.pushed and (Path(first.remote_dir) / "ngp_train" / "__init__.py").is_file()
    again = push_payload(t, src)
    assert not again.pushed and again.remote_dir == first.remote_dir
    (src / "ngp_train" / "__init__.py").write_text("# changed\n")
    changed = push_payload(t, src)
    assert changed.pushed and changed.digest != first.digest


def test_remote_status_parsing_and_job_key() -> None:
    st = RemoteStatus.parse('{"phase": "train", "step": 5, "total_steps": 30, "loss": 0.1, '
                            '"psnr": null, "pid": 42, "exit_code": null}')
    assert st == RemoteStatus(phase="train", step=5, total_steps=30, loss=0.1, pid=42)
    done = RemoteStatus.parse('{"phase": "done", "exit_code": 0, "updated_at": "2026-01-01T00:00:00Z"}')
    assert done.updated_at.startswith("2026")
    assert RemoteStatus.parse("") is None and RemoteStatus.parse("{not json") is None
    assert RemoteStatus.parse('{"step": 1}') is None
    a = job_key("ngp-default-here", {"steps": 30})
    assert a == job_key("ngp-default-here", {"steps": 30}) and a.startswith("ngp-default-here-")
    assert a != job_key("ngp-default-here", {"steps": 31})


# -- live view ------------------------------------------------------------------------------------
def test_live_view_logs_phase_changes_when_not_a_tty(caplog: pytest.LogCaptureFixture) -> None:
    from orchestrator.run.live import LiveView
    caplog.set_level("INFO", logger="orchestrator.run.live")
    with LiveView([("j1", "here")], tty=False, log_every_s=3600) as view:
        view.update("j1", phase="train", step=1, total_steps=30, loss=0.5)
        view.update("j1", step=2, loss=0.4)              # same phase, within log_every_s: quiet
        view.update("j1", phase="render", step=30, psnr=21.5, cost=0.25)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert "j1 [here] train step 1/30 loss 0.5000" in lines[0]
    assert "render step 30/30" in lines[1] and "psnr 21.50" in lines[1] and "cost 0.2500 USD" in lines[1]


def test_live_view_table_on_a_tty_shows_every_job() -> None:
    from rich.console import Console

    from orchestrator.run.live import LiveView
    view = LiveView([("j1", "here"), ("j2", "box")], tty=False)
    view.update("j2", phase="train", step=7, total_steps=30, loss=0.125, psnr=18.0, cost=1.5, currency="CNY")
    console = Console(width=160, record=True, file=open(os.devnull, "w"))
    console.print(view._table())
    text = console.export_text()
    assert "j1" in text and "pending" in text
    assert "7/30" in text and "0.1250" in text and "18.00" in text and "1.5000 CNY" in text


def test_failed_setup_releases_the_instance_and_exits_1(tmp_path: Path) -> None:
    """A host whose interpreter is missing: set-up fails, the job is `failed`, the instance is
    destroyed and its billing closed, the run exits 1 with the reason on one line per job."""
    import json
    import sqlite3
    import subprocess
    import sys
    home = tmp_path / "home"
    (tmp_path / "experiments.yaml").write_text(
        "name: t\nhosts:\n  here: {provider: local, price_per_hour: 3.6, python: /nonexistent/python3}\n"
        "datasets:\n  demo: {generate: {size: 24}}\n"
        "experiments:\n  - {name: ngp, dataset: demo, scenes: [default], hosts: [here], steps: 10}\n")
    res = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", "experiments.yaml", "--yes", "--json"],
                         cwd=tmp_path, env={**os.environ, "ORCHESTRATE_HOME": str(home)},
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr
    [job] = json.loads(res.stdout)["jobs"]
    assert job["status"] == "failed" and "/nonexistent/python3" in job["error"]
    con = sqlite3.connect(home / "ledger.sqlite")
    try:
        [(state,)] = con.execute("SELECT state FROM instances").fetchall()
        assert state == "destroyed"
        assert con.execute("SELECT COUNT(*) FROM billing WHERE ended_at IS NULL").fetchone() == (0,)
        assert con.execute("SELECT status FROM jobs").fetchall() == [("failed",)]
    finally:
        con.close()


def test_jobs_on_one_machine_split_its_cpus() -> None:
    from types import SimpleNamespace as NS

    from orchestrator.run.runner import Runner

    jobs = [NS(host_name="here"), NS(host_name="here"), NS(host_name="here"), NS(host_name="vast")]
    runner = Runner(jobs, ledger=None, run_id="r", options=NS(concurrency=2), guard=None, view=None,  # type: ignore[arg-type]
                    stop=None)  # type: ignore[arg-type]
    local, cloud = NS(shares_machine=True), NS(shares_machine=False)   # Provider declares it (default False)
    assert runner._cpu_share(jobs[0], local) == 2        # 3 jobs on "here", at most 2 at once
    assert runner._cpu_share(jobs[3], local) == 1        # alone on its host
    assert runner._cpu_share(jobs[0], cloud) == 1        # every cloud instance is its own machine
    runner.opts = NS(concurrency=8)
    assert runner._cpu_share(jobs[0], local) == 3
    from orchestrator.run.payload import run_args

    kw = dict(data_dir="d", job_dir="j", steps=5, backend="auto", device="auto", scene="s", max_seconds=None,
              downscale=1, seed=0)
    assert run_args(**kw, cpu_share=3).endswith(" --cpu-share 3") and "--cpu-share" not in run_args(**kw)
