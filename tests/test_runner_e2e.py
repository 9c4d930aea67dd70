"""`orchestrate run` end to end on the local provider: real subprocesses (controller, detached
pipeline, watchdog, ffmpeg), a real SQLite ledger, a tiny generated scene.

- a run leaves every artifact and a closed, billed interval;
- SIGINT to the controller mid-training stops the pipeline with a snapshot, releases the
  instance, marks the job interrupted, and a rerun of the same file resumes from the snapshot.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.ledger import interval_cost
from orchestrator.providers.local import marked_pids

PRICE_PER_HOUR = 3.6   # simulated: 0.001 per second, so billed time shows up as cost


def config_text(steps: int, size: int = 24, scenes: str = "[default]") -> str:
    return f"""\
name: e2e
hosts:
  here: {{provider: local, price_per_hour: {PRICE_PER_HOUR}, idle_timeout_s: 120}}
datasets:
  demo: {{generate: {{size: {size}, seed: 0}}}}
experiments:
  - name: ngp
    dataset: demo
    scenes: {scenes}
    hosts: [here]
    steps: {steps}
"""


def env_for(home: Path) -> dict[str, str]:
    env = {**os.environ, "ORCHESTRATE_HOME": str(home)}
    env.pop("ORCHESTRATE_DEBUG", None)
    return env


def rows(home: Path, sql: str) -> list[dict]:
    con = sqlite3.connect(home / "ledger.sqlite")
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute(sql)]
    finally:
        con.close()


def assert_released(home: Path) -> None:
    """Every instance destroyed, every billing interval closed, no marked process left."""
    instances = rows(home, "SELECT * FROM instances")
    assert instances and all(i["state"] == "destroyed" for i in instances), instances
    assert all(b["ended_at"] for b in rows(home, "SELECT * FROM billing"))
    for i in instances:
        assert marked_pids(i["instance_id"]) == []
        state = json.loads((home / "local-instances" / f"{i['instance_id']}.json").read_text())["state"]
        assert state == "terminated"


@pytest.mark.timeout(900)
def test_run_end_to_end_pulls_every_artifact_and_bills(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (tmp_path / "experiments.yaml").write_text(config_text(steps=30))
    res = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", "experiments.yaml", "--yes", "--json"],
                         cwd=tmp_path, env=env_for(home), stdin=subprocess.DEVNULL, capture_output=True,
                         text=True, timeout=840)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    out = json.loads(res.stdout)
    [job] = out["jobs"]
    assert job["status"] == "succeeded" and job["job"] == "ngp-default-here"
    job_dir = tmp_path / "runs" / out["run_id"] / "ngp-default-here"
    assert Path(job["out_dir"]) == job_dir
    summary = json.loads((job_dir / "summary.json").read_text())
    assert summary["steps"] == 30 and math.isfinite(summary["psnr_mean"]) and summary["psnr_mean"] > 8
    with (job_dir / "metrics.csv").open() as fh:
        metrics = list(csv.DictReader(fh))
    assert len(metrics) == summary["n_test_images"] > 0
    assert abs(sum(float(m["psnr"]) for m in metrics) / len(metrics) - summary["psnr_mean"]) < 1e-3
    for name in ("render", "gt", "compare"):
        video = job_dir / "videos" / f"{name}.mp4"
        assert video.stat().st_size > 1000, video
        assert video.read_bytes()[4:8] == b"ftyp"
    assert (job_dir / "train_log.csv").read_text().splitlines()[0].startswith("step")
    assert job["psnr"] == pytest.approx(summary["psnr_mean"])

    # the ledger: one job, one result, the phases, a closed and billed interval
    [j] = rows(home, "SELECT * FROM jobs")
    assert j["status"] == "succeeded" and j["out_dir"] == str(job_dir)
    [r] = rows(home, "SELECT * FROM results")
    assert r["psnr_mean"] == pytest.approx(summary["psnr_mean"]) and r["steps"] == 30
    phases = {p["phase"] for p in rows(home, "SELECT * FROM phases")}
    assert {"boot", "setup", "staging", "train", "eval", "pull", "teardown"} <= phases
    assert_released(home)
    [b] = rows(home, "SELECT * FROM billing")
    cost = interval_cost(b["started_at"], b["ended_at"], b["price_per_hour"], b["granularity_s"])
    assert b["price_per_hour"] == PRICE_PER_HOUR and cost > 0
    assert job["cost"] == pytest.approx(cost) and out["total_cost"] == pytest.approx(cost)
    [run] = rows(home, "SELECT * FROM runs")
    assert run["status"] == "succeeded" and run["ended_at"]


def _host_job_dir(home: Path) -> Path | None:
    dirs = list((home / "hosts" / "here" / "jobs").glob("*/status.json"))
    return dirs[0].parent if dirs else None


def _host_status(home: Path) -> dict | None:
    d = _host_job_dir(home)
    try:
        return json.loads((d / "status.json").read_text()) if d else None
    except (OSError, ValueError):
        return None


def _training_starts(home: Path) -> list[int]:
    """The step each training session started from, from the pipeline's log."""
    d = _host_job_dir(home)
    text = (d / "log.txt").read_text() if d and (d / "log.txt").exists() else ""
    return [int(m) for m in dict.fromkeys(re.findall(r"training .* from step (\d+) to \d+", text))]


def _interrupt_when(proc: subprocess.Popen, ready, timeout_s: float = 600) -> str:
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and proc.poll() is None and not ready():
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
        return err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.timeout(1200)
def test_sigint_interrupts_releases_and_rerun_resumes(tmp_path: Path) -> None:
    """SIGINT mid-training: exit 130, snapshot kept, instance released, job interrupted. The
    rerun of the same file starts training from the snapshot's step (then is interrupted too,
    so the test does not depend on how fast this machine trains)."""
    home = tmp_path / "home"
    (tmp_path / "experiments.yaml").write_text(config_text(steps=400))
    cmd = [sys.executable, "-m", "orchestrator.cli", "run", "experiments.yaml", "--yes", "--json"]

    def popen() -> subprocess.Popen:
        return subprocess.Popen(cmd, cwd=tmp_path, env=env_for(home), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    first = popen()
    err = _interrupt_when(first, lambda: ((_host_status(home) or {}).get("phase") == "train"
                                          and (_host_status(home) or {}).get("step", 0) >= 1))
    assert first.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    [j] = rows(home, "SELECT * FROM jobs")
    assert j["status"] == "interrupted"
    assert_released(home)
    st = _host_status(home)
    assert st["phase"] == "interrupted" and st["exit_code"] == 5
    stopped_at = st["step"]
    assert 0 < stopped_at < 400
    assert (_host_job_dir(home) / "out" / "snapshot.pt").is_file()
    [run] = rows(home, "SELECT * FROM runs")
    assert run["status"] == "interrupted"
    assert _training_starts(home) == [0]

    second = popen()
    err = _interrupt_when(second, lambda: len(_training_starts(home)) >= 2)
    assert second.returncode == 130, err[-3000:]
    assert _training_starts(home) == [0, stopped_at]     # resumed from the snapshot, not from 0
    assert {r["status"] for r in rows(home, "SELECT * FROM runs")} == {"interrupted"}
    assert [j["status"] for j in rows(home, "SELECT * FROM jobs")] == ["interrupted", "interrupted"]
    assert_released(home)


@pytest.mark.timeout(600)
def test_killed_controller_leaves_no_bill_running(tmp_path: Path) -> None:
    """SIGKILL to the controller mid-training (no teardown runs): the on-host watchdog stops the
    instance (hard deadline 20 s, idle timeout 5 s) with the provider's own stop command (pipeline ended, instance
    state `stopped`), and `orchestrate down --all --yes` then closes the ledger's interval."""
    home = tmp_path / "home"
    (tmp_path / "experiments.yaml").write_text(
        config_text(steps=400).replace("idle_timeout_s: 120}", "idle_timeout_s: 5, deadline_s: 20}"))
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", "experiments.yaml", "--yes"],
                            cwd=tmp_path, env=env_for(home), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and (_host_status(home) or {}).get("phase") != "train":
            assert proc.poll() is None
            time.sleep(0.2)
    finally:
        proc.kill()
        proc.wait()
    [inst] = rows(home, "SELECT * FROM instances")
    assert inst["state"] == "running"          # the controller died before its teardown
    state_file = home / "local-instances" / f"{inst['instance_id']}.json"
    watchdog_record = _host_job_dir(home) / "watchdog.json"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not watchdog_record.exists():
        time.sleep(0.5)
    record = json.loads(watchdog_record.read_text())
    # at the 20 s deadline, or earlier: heartbeat stale (> 5 s) and no status update for 5 s
    assert ("deadline" in record["reason"] or "stale" in record["reason"]) and record["stop_command_exit"] == 0
    assert json.loads(state_file.read_text())["state"] == "stopped"
    assert _wait_for(lambda: marked_pids(inst["instance_id"]) == [], 30)
    st = _host_status(home)
    assert st["exit_code"] is not None             # the pipeline ended (snapshot kept on SIGTERM)

    res = subprocess.run([sys.executable, "-m", "orchestrator.cli", "down", "--all", "--yes", "--json"],
                         cwd=tmp_path, env=env_for(home), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["released"][0]["result"] == "destroyed"
    assert_released(home)


def _wait_for(pred, timeout_s: float) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.2)
    return pred()
