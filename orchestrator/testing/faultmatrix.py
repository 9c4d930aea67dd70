"""The fault-injection matrix: SIGKILL `orchestrate run` at a lifecycle point, then check that
nothing keeps billing at the fake cloud.

For each point the controller (a real `orchestrate run` process) is killed with SIGKILL when
the point is observed from outside (the ledger, the host's work root, the fake cloud's state).
Then, in mode "down", `orchestrate down --orphans --yes` is run once and the fake cloud must
hold zero live instances (nothing running, nothing stopped-but-billing-storage). In mode
"watchdog" no second command runs: the on-host watchdog must stop the instance by itself.

Used by tests/test_faults_matrix.py and bench/bench_faults.py (which prints the table).
"""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .fakecloud import FakeCloud

log = logging.getLogger(__name__)

POINTS = ("after_intent", "after_create", "during_boot", "during_staging", "during_training",
          "during_pullback", "during_teardown")
GPU = {"vastai": "RTX 4090", "runpod": "RTX 4090", "lambda": "A10"}
# Faults that hold the controller at a point long enough to be killed there.
POINT_FAULTS: dict[str, dict[str, float]] = {
    "after_intent": {"create_delay_s": 3.0},
    "after_create": {"boot_s": 4.0},
    "during_boot": {"boot_s": 4.0},
    "during_teardown": {"destroy_delay_s": 3.0},
}


@dataclass(frozen=True, slots=True)
class PointResult:
    point: str
    provider: str
    mode: str                  # "down" | "watchdog" | "none" (a completed run, no kill)
    killed: bool               # the controller was SIGKILLed at the point
    created: int               # instances the fake cloud created
    leaked: int                # still live (running or stopped) at the end
    stop_s: float | None       # watchdog mode: seconds from the kill until nothing ran
    note: str = ""


def write_config(path: Path, fc: FakeCloud, provider: str, host_root: Path, *, idle_timeout_s: float,
                 steps: int = 30, size: int = 24) -> Path:
    host = {"provider": provider, "gpu": GPU[provider], "api_base": fc.url,
            "api_key_env": "FAKECLOUD_API_KEY", "identity_file": str(fc.client_key_path),
            "user": os.environ.get("USER") or "root", "python": sys.executable, "root": str(host_root),
            "idle_timeout_s": idle_timeout_s}
    doc = {"name": f"faults-{provider}", "budget": {"max_cost": 5, "currency": "USD"},
           "hosts": {"cloud": host},
           "datasets": {"demo": {"generate": {"size": size, "seed": 0}}},
           "experiments": [{"name": "f", "dataset": "demo", "scenes": ["default"], "hosts": ["cloud"],
                            "steps": steps, "device": "cpu", "backend": "torch"}]}
    path.write_text(json.dumps(doc, indent=1))   # JSON is YAML
    return path


class Harness:
    """One fake cloud + one ORCHESTRATE_HOME; run/kill/inspect the controller."""

    def __init__(self, workdir: Path, fc: FakeCloud, provider: str, *, idle_timeout_s: float = 5.0,
                 steps: int = 30) -> None:
        self.dir = workdir
        self.fc = fc
        self.provider = provider
        self.home = workdir / "home"
        self.host_root = workdir / "host"
        self.config = write_config(workdir / "exp.yaml", fc, provider, self.host_root,
                                   idle_timeout_s=idle_timeout_s, steps=steps)
        self.env = {**os.environ, "ORCHESTRATE_HOME": str(self.home), "FAKECLOUD_API_KEY": fc.api_key,
                    "PYTHONUNBUFFERED": "1"}
        self.proc: subprocess.Popen | None = None

    def cli(self, *args: str, timeout_s: float = 300.0) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], env=self.env, cwd=self.dir,
                              capture_output=True, text=True, timeout=timeout_s)

    def start_run(self) -> subprocess.Popen:
        log_path = self.dir / "run.log"
        self.proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", str(self.config), "--yes",
                                      "--runs-dir", str(self.dir / "runs")], env=self.env, cwd=self.dir,
                                     stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
        return self.proc

    def wait_for_pull(self, pattern: str, timeout_s: float = 600.0) -> Path | None:
        """The first file under the run's results matching `pattern` (e.g. a snapshot that came
        home), waiting while the run lives; None when none appeared."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.proc is not None and self.proc.poll() is None:
            found = sorted((self.dir / "runs").glob(pattern))
            if found:
                return found[0]
            time.sleep(0.2)
        return None

    def run_log(self) -> str:
        path = self.dir / "run.log"
        return path.read_text()[-3000:] if path.exists() else ""

    # -- observations ---------------------------------------------------------------------
    def ledger_rows(self) -> list[dict]:
        db = self.home / "ledger.sqlite"
        if not db.exists():
            return []
        try:
            con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
            try:
                con.row_factory = sqlite3.Row
                return [dict(r) for r in con.execute("SELECT * FROM instances")]
            finally:
                con.close()
        except sqlite3.Error:
            return []

    def job_status(self) -> dict | None:
        for p in self.host_root.glob("jobs/*/status.json"):
            try:
                return json.loads(p.read_text())
            except (OSError, ValueError):
                return None
        return None

    def trigger(self, point: str) -> Callable[[], bool]:
        fc = self.fc
        if point == "after_intent":
            return lambda: any(r["state"] == "intent" for r in self.ledger_rows())
        if point == "after_create":
            return lambda: any(r["instance_id"] for r in self.ledger_rows())
        if point == "during_boot":
            return lambda: any(i.status == "booting" and fc.world.now() - i.created_at > 1.0
                               for i in list(fc.world.instances.values()))
        if point == "during_staging":
            return lambda: (self.host_root / "cache").exists() and not list(self.host_root.glob("jobs/*/status.json"))
        if point == "during_training":
            return lambda: (self.job_status() or {}).get("phase") == "train"
        if point == "during_pullback":
            return lambda: (self.job_status() or {}).get("exit_code") is not None
        if point == "during_teardown":
            return lambda: fc.world.inflight["destroy"] > 0
        raise ValueError(f"unknown point {point!r}")

    def kill_at(self, point: str, timeout_s: float = 900.0) -> str:
        """Wait for the point, then SIGKILL the controller. Returns "killed", "ended" (the run
        ended first) or "timeout" (the point never came; the controller is SIGKILLed anyway)."""
        assert self.proc is not None
        cond = self.trigger(point)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if cond():
                self.proc.send_signal(signal.SIGKILL)
                self.proc.wait(timeout=30)
                return "killed"
            if self.proc.poll() is not None:
                return "ended"
            time.sleep(0.02)
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        return "timeout"

    def settle(self, timeout_s: float = 15.0) -> None:
        """Let requests the dead controller had in flight land at the fake cloud."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(self.fc.world.inflight.values()):
            time.sleep(0.05)
        time.sleep(0.2)

    def wait_nothing_running(self, timeout_s: float) -> float | None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if self.fc.running_count() == 0:
                return time.monotonic() - t0
            time.sleep(0.1)
        return None


def run_point(workdir: Path, fc: FakeCloud, provider: str, point: str, mode: str, *,
              idle_timeout_s: float = 10.0) -> PointResult:
    """One cell of the matrix on a fresh ORCHESTRATE_HOME (the fake cloud is shared)."""
    workdir.mkdir(parents=True, exist_ok=True)
    before = set(fc.world.instances)
    fc.world.set_faults({"boot_s": 0.3, "create_delay_s": 0.0, "destroy_delay_s": 0.0,
                         **POINT_FAULTS.get(point, {})})
    h = Harness(workdir, fc, provider, idle_timeout_s=idle_timeout_s)
    h.start_run()
    outcome = h.kill_at(point)
    killed = outcome == "killed"
    h.settle()
    fc.world.set_faults({"boot_s": 0.3, "create_delay_s": 0.0, "destroy_delay_s": 0.0})
    stop_s = None
    code = h.proc.returncode if h.proc is not None else None
    note = {"killed": "", "ended": f"the run ended (exit {code}) before the point was seen",
            "timeout": "the point was not reached in time; killed anyway"}[outcome]
    if mode == "down":
        res = h.cli("down", "--orphans", "--yes")
        if res.returncode != 0:
            note = (note + "; " if note else "") + f"down exit {res.returncode}: {res.stdout[-200:]}{res.stderr[-200:]}"
    else:
        # The watchdog waits for a stale heartbeat (idle timeout) and polls every 5 s; a pipeline
        # still making progress first runs to its end (it is never stopped while useful), so the
        # wait is long on a slow machine; `stop_s` counts from the kill.
        stop_s = h.wait_nothing_running(900.0)
        st = h.job_status()
        if stop_s is not None and st is not None and st.get("exit_code") is not None:
            note = (note + "; " if note else "") + f"pipeline had finished (phase {st.get('phase')})"
    mine = [i for iid, i in list(fc.world.instances.items()) if iid not in before]
    leaked = sum(1 for i in mine if i.status != "terminated") if mode == "down" else \
        sum(1 for i in mine if i.status in ("booting", "running"))
    return PointResult(point, provider, mode, killed, len(mine), leaked, stop_s, note)


def cleanup(fc: FakeCloud) -> None:
    """Destroy whatever a cell left (so the next cell starts from zero)."""
    for iid, inst in list(fc.world.instances.items()):
        if inst.status != "terminated":
            fc.world.destroy(inst.provider, iid)


def table(results: list[PointResult]) -> str:
    head = f"{'point':<17} {'provider':<8} {'mode':<9} {'killed':<6} {'created':>7} {'leaked':>6} {'stop_s':>7}  note"
    lines = [head, "-" * len(head)]
    for r in results:
        stop = "-" if r.stop_s is None else f"{r.stop_s:.1f}"
        lines.append(f"{r.point:<17} {r.provider:<8} {r.mode:<9} {str(r.killed):<6} {r.created:>7} "
                     f"{r.leaked:>6} {stop:>7}  {r.note}")
    return "\n".join(lines)


def assert_resumed(out: Path, steps: int) -> None:
    """The job's pulled results: all `steps` trained, the last start resumed from a snapshot
    (not retrained from step 0)."""
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == steps
    starts = re.findall(rf"from step (\d+) to {steps}", (out / "log.txt").read_text())
    assert starts and int(starts[-1]) > 0, starts
