"""Hostile/unlucky inputs on a real ssh host (issue 18, items 1 and 3), through the CLI.

A host shared by several runs (an ssh host that is this machine, no shutdown) keeps running
other work after a job, so teardown must end exactly the processes the job started. The
pipeline and watchdog run detached behind a `setsid bash -c` wrapper: signalling the wrapper's
PID (what teardown did) left the real watchdog alive, re-parented to PID 1, and it later ran
`kill -TERM <wrapper pid>`, a PID the kernel may have handed to an unrelated process.
"""
from __future__ import annotations

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

loopback_index = pypi.loopback_index     # the fixture: pip and uv on the host ask loopback only

pytestmark = pytest.mark.sshd


def config(tmp: Path, srv: SSHServer, *, user: str | None = None) -> str:
    return f"""\
name: hostile-ssh
hosts:
  shared:
    provider: ssh
    host: 127.0.0.1
    port: {srv.port}
    user: {user or srv.user}
    identity_file: {srv.client_key_path}
    gpu: cpu
    price_per_hour: 1.0
    python: {sys.executable}
    root: {tmp / 'hostroot'}
    idle_timeout_s: 2
datasets:
  demo: {{generate: {{size: 16, seed: 0}}}}
experiments:
  - name: ngp
    dataset: demo
    scenes: [default]
    hosts: [shared]
    steps: 5
"""


def ours(marker: str) -> list[tuple[int, str]]:
    """Every live process whose environment carries `marker` (what the job's processes inherit)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            env = Path(f"/proc/{name}/environ").read_bytes()
            cmd = Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker.encode() in env:
            found.append((int(name), cmd.strip()))
    return found


@pytest.mark.timeout(600)
def test_successful_run_leaves_no_process_and_no_watchdog_fires_later(tmp_path: Path,
                                                                       loopback_index: LocalIndex) -> None:
    home, runs = tmp_path / "home", tmp_path / "runs"
    offline = index_env(loopback_index.url)
    with SSHServer(base_dir=tmp_path / "sshd", extra_config=set_env(**offline)) as srv:
        (tmp_path / "experiments.yaml").write_text(config(tmp_path, srv))
        env = {**os.environ, **offline, "ORCHESTRATE_HOME": str(home)}
        env.pop("ORCHESTRATE_DEBUG", None)
        res = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", "experiments.yaml", "--yes",
                              "--runs-dir", str(runs)], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                             capture_output=True, text=True, timeout=500)
        assert res.returncode == 0, res.stderr[-3000:]
        assert "Traceback" not in res.stderr
        jobs_root = tmp_path / "hostroot" / "jobs"
        [job_dir] = [p for p in jobs_root.iterdir() if p.is_dir()]
        # right after the run: nothing of this job is alive on the host
        assert ours(f"ORCHESTRATE_JOB_DIR={job_dir}") == []
        con = sqlite3.connect(home / "ledger.sqlite")
        try:
            [(instance_id,)] = con.execute("SELECT instance_id FROM instances").fetchall()
        finally:
            con.close()
        assert ours(f"ORCHESTRATE_INSTANCE={instance_id}") == []
        # a watchdog that survived would fire after the idle timeout (2 s) plus a poll (5 s)
        time.sleep(9)
        assert ours(f"ORCHESTRATE_INSTANCE={instance_id}") == []
        assert not (job_dir / "watchdog.json").exists()
        wlog = (job_dir / "watchdog.log").read_text()
        assert "running the stop command" not in wlog and "stopping the host" not in wlog


@pytest.mark.timeout(300)
def test_ctrl_c_while_ssh_connection_attempts_retry_stops_at_once(tmp_path: Path) -> None:
    """Issue 18 item 11: the host's port refuses every connection; the controller backs off
    between attempts (up to 300 s). A Ctrl-C must end the run within seconds, not after the
    retries, with the instance released and billing closed."""
    from orchestrator.testing.sshd import free_port

    key = tmp_path / "id_test"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True, timeout=30)
    text = f"""\
name: unreachable
hosts:
  gone:
    provider: ssh
    host: 127.0.0.1
    port: {free_port()}
    user: root
    identity_file: {key}
    gpu: cpu
    price_per_hour: 36
    python: {sys.executable}
    root: {tmp_path / 'hostroot'}
datasets:
  demo: {{generate: {{size: 16, seed: 0}}}}
experiments:
  - {{name: ngp, dataset: demo, scenes: [default], hosts: [gone], steps: 5}}
"""
    (tmp_path / "experiments.yaml").write_text(text)
    env = {**os.environ, "ORCHESTRATE_HOME": str(tmp_path / "home")}
    env.pop("ORCHESTRATE_DEBUG", None)
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", "experiments.yaml", "--yes"],
                            cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    import select
    seen = ""
    deadline = time.monotonic() + 120
    while "(attempt 3)" not in seen and "attempt 3)" not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stderr], [], [], 1.0)
        if ready:
            line = proc.stderr.readline()
            if not line:
                break
            seen += line
    assert "connect to root@127.0.0.1" in seen and "failed (attempt" in seen, seen[-2000:]
    t0 = time.monotonic()
    proc.send_signal(2)
    out, err = proc.communicate(timeout=120)
    stopped_s = time.monotonic() - t0
    assert stopped_s < 15, f"took {stopped_s:.1f} s after Ctrl-C"
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in seen + err
    con = sqlite3.connect(tmp_path / "home" / "ledger.sqlite")
    try:
        states = con.execute("SELECT state FROM instances").fetchall()
        open_bills = con.execute("SELECT COUNT(*) FROM billing WHERE ended_at IS NULL").fetchone()[0]
        jobs = con.execute("SELECT status FROM jobs").fetchall()
    finally:
        con.close()
    assert states == [("destroyed",)] and open_bills == 0 and jobs == [("interrupted",)]
