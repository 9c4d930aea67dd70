"""`orchestrate run` on an `ssh` host backed by a real sshd whose port changes mid-training.

The host's endpoint comes from `endpoint_command` (reads a file this test rewrites). While the
pipeline trains, the test restarts sshd on another port and kills every live session: the
controller must reconnect on the new port (same host key), re-attach to the detached pipeline
without starting a second one, and bring every result home. Then every file the run wrote
(runs dir, ORCHESTRATE_HOME with the SQLite ledger) is searched for the password. The host's
pip and uv see only a loopback index (orchestrator/testing/pypi.py; its python, the controller's,
already has every requirement, so nothing is fetched).
"""
from __future__ import annotations

import csv
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.testing import pypi
from orchestrator.testing.pypi import LocalIndex
from orchestrator.testing.sshd import SSHServer
from orchestrator.testing.stockhost import index_env, set_env

loopback_index = pypi.loopback_index     # the fixture

pytestmark = pytest.mark.sshd

PASSWORD = "e2e-Pa55word-never-logged"
STEPS = 40


def config(tmp: Path, steps: int) -> str:
    return f"""\
name: ssh-e2e
hosts:
  rented:
    provider: ssh
    endpoint_command: "cat {tmp / 'endpoint'}"
    password_env: ORCH_E2E_SSH_PASSWORD
    gpu: cpu
    price_per_hour: 3.6
    currency: USD
    python: {sys.executable}
    root: {tmp / 'hostroot'}
    stop_command: "echo stopped >> {tmp / 'stops'}"
    idle_timeout_s: 300
datasets:
  demo: {{generate: {{size: 24, seed: 0}}}}
experiments:
  - name: ngp
    dataset: demo
    scenes: [default]
    hosts: [rented]
    steps: {steps}
"""


def rows(db: Path, sql: str) -> list[dict]:
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute(sql)]
    finally:
        con.close()


def status_files(root: Path) -> list[Path]:
    return list((root / "jobs").glob("*/status.json")) if (root / "jobs").is_dir() else []


@pytest.mark.timeout(900)
def test_run_survives_port_change_and_dropped_sessions(tmp_path: Path, loopback_index: LocalIndex) -> None:
    home, runs = tmp_path / "home", tmp_path / "runs"
    offline = index_env(loopback_index.url)
    with SSHServer(password=PASSWORD, base_dir=tmp_path / "sshd", extra_config=set_env(**offline)) as srv:
        (tmp_path / "endpoint").write_text(f"{srv.user}@127.0.0.1:{srv.port}\n")
        (tmp_path / "experiments.yaml").write_text(config(tmp_path, steps=STEPS))
        env = {**os.environ, **offline, "ORCHESTRATE_HOME": str(home), "ORCH_E2E_SSH_PASSWORD": PASSWORD}
        env.pop("ORCHESTRATE_DEBUG", None)
        ctl = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "-v", "run", "experiments.yaml",
                                "--yes", "--json", "--runs-dir", str(runs)],
                               cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first_port = srv.port
        # wait until the detached pipeline is training on the host
        deadline = time.monotonic() + 400
        training = None
        while time.monotonic() < deadline and ctl.poll() is None:
            for f in status_files(tmp_path / "hostroot"):
                try:
                    st = json.loads(f.read_text())
                except (OSError, ValueError):
                    continue
                if st.get("phase") == "train" and (st.get("step") or 0) >= 1:
                    training = st
            if training:
                break
            time.sleep(0.2)
        assert training is not None, "the pipeline never reached training: " + (
            ctl.communicate(timeout=60)[1][-3000:] if ctl.poll() is not None else "timeout")
        pipeline_pid = training["pid"]
        # the host "restarts" on another port: sessions die, the endpoint source changes
        srv.restart(new_port=True)
        (tmp_path / "endpoint").write_text(f"{srv.user}@127.0.0.1:{srv.port}\n")
        srv.kill_sessions()
        assert srv.port != first_port
        assert Path(f"/proc/{pipeline_pid}").exists()     # the detached pipeline kept running
        out, err = ctl.communicate(timeout=700)
    assert ctl.returncode == 0, err[-4000:]
    assert "Traceback" not in err

    db = home / "ledger.sqlite"
    jobs = rows(db, "SELECT * FROM jobs")
    assert [j["status"] for j in jobs] == ["succeeded"]
    inst = rows(db, "SELECT * FROM instances")
    assert len(inst) == 1 and inst[0]["state"] == "destroyed"
    assert inst[0]["endpoint"] == f"{srv.user}@127.0.0.1:{srv.port}"     # followed the move
    assert inst[0]["host_key"] == srv.host_key_public                      # pinned, same key
    assert (tmp_path / "stops").read_text() == "stopped\n"                 # paid host stopped once
    starts = [e for e in rows(db, "SELECT * FROM events") if e["kind"] == "pipeline_started"]
    assert len(starts) == 1                                                # no second copy

    out_dir = Path(jobs[0]["out_dir"])
    for name in ("summary.json", "metrics.csv", "train_log.csv", "videos/compare.mp4"):
        assert (out_dir / name).is_file() and (out_dir / name).stat().st_size > 0, name
    with open(out_dir / "train_log.csv") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f)]
    assert steps[-1] == STEPS and steps == sorted(set(steps))               # one training, never restarted
    summary = json.loads((out_dir / "summary.json").read_text())
    [remote_status] = status_files(tmp_path / "hostroot")
    final = json.loads(remote_status.read_text())
    assert (final["exit_code"], final["phase"], final["pid"]) == (0, "done", pipeline_pid)
    assert summary["steps"] == STEPS and summary["psnr_mean"] > 5
    assert not summary.get("resumed_from_step")                           # trained in one go
    host_env = json.loads((tmp_path / "hostroot" / "env.json").read_text())["environment"]
    assert (host_env["index"], host_env["index_url"]) == (True, loopback_index.url)   # asked only loopback

    # the password appears in no file the run wrote, nor in its output
    leaks = []
    for base in (home, runs, tmp_path / "hostroot" / "jobs"):
        for p in base.rglob("*"):
            if p.is_file() and PASSWORD.encode() in p.read_bytes():
                leaks.append(str(p))
    assert leaks == []
    assert PASSWORD not in out and PASSWORD not in err
