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


def _host_status(home: Path) -> dict | None:
    for p in (home / "hosts" / "here" / "jobs").glob("*/status.json"):
        try:
            return json.loads(p.read_text())
        except ValueError:
            return None
    return None


@pytest.mark.timeout(900)
def test_sigint_interrupts_releases_and_rerun_resumes(tmp_path: Path) -> None:
    home = tmp_path / "home"
    steps = 60
    (tmp_path / "experiments.yaml").write_text(config_text(steps=steps))
    cmd = [sys.executable, "-m", "orchestrator.cli", "run", "experiments.yaml", "--yes", "--json"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env_for(home), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            st = _host_status(home)
            if st and st.get("phase") == "train" and st.get("step", 0) >= 5:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    [j] = rows(home, "SELECT * FROM jobs")
    assert j["status"] == "interrupted"
    assert_released(home)
    st = _host_status(home)
    assert st["phase"] == "interrupted" and st["exit_code"] == 5
    stopped_at = st["step"]
    assert 0 < stopped_at < steps
    [run] = rows(home, "SELECT * FROM runs")
    assert run["status"] == "interrupted"

    # the rerun of the same file resumes from the snapshot and finishes
    res = subprocess.run(cmd, cwd=tmp_path, env=env_for(home), stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, timeout=840)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout)
    job_dir = tmp_path / "runs" / out["run_id"] / "ngp-default-here"
    summary = json.loads((job_dir / "summary.json").read_text())
    assert summary["steps"] == steps
    result = json.loads((job_dir / "train_result.json").read_text())
    assert result["resumed_from_step"] and result["resumed_from_step"] > 0
    first_logged = int((job_dir / "train_log.csv").read_text().splitlines()[1].split(",")[0])
    assert first_logged > 0
    assert_released(home)
