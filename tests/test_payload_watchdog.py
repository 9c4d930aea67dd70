"""The on-host watchdog, run as the real CLI in a subprocess with short timeouts.

The stop command is harmless: it appends a line to a file, so each test can count how many
times the host would have been stopped. Nothing here powers anything off.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from remote_payload.watchdog import Observation, decide

PY = sys.executable

# A stand-in pipeline: its argv reads `... remote_payload run` (what the watchdog checks),
# it rewrites status.json every 0.1 s like the real one, and records a SIGTERM before exiting.
FAKE_PIPELINE = textwrap.dedent("""
    import json, os, signal, sys, time
    job = sys.argv[1]
    def write(extra):
        st = {"phase": "train", "step": 1, "total_steps": 10, "loss": 0.1, "psnr": None,
              "eta_s": 1.0, "updated_at": "x", "pid": os.getpid(), "exit_code": None, "error": None}
        st.update(extra)
        tmp = os.path.join(job, ".status.tmp")
        with open(tmp, "w") as f: json.dump(st, f)
        os.replace(tmp, os.path.join(job, "status.json"))
    def term(*_):
        open(os.path.join(job, "got_sigterm"), "w").close()
        write({"phase": "interrupted", "exit_code": 5})
        sys.exit(5)
    signal.signal(signal.SIGTERM, term)
    freeze = len(sys.argv) > 4 and sys.argv[4] == "freeze"
    write({})
    end = time.monotonic() + 60
    while time.monotonic() < end:
        if not freeze:
            write({})
        time.sleep(0.1)
""")


def start_fake_pipeline(job: Path, *, freeze: bool = False) -> subprocess.Popen:
    args = [PY, "-c", FAKE_PIPELINE, str(job), "remote_payload", "run"] + (["freeze"] if freeze else [])
    proc = subprocess.Popen(args)
    deadline = time.monotonic() + 10
    while not (job / "status.json").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (job / "status.json").exists()
    return proc


def write_status(job: Path, **fields: object) -> None:
    st = {"phase": "done", "step": 10, "total_steps": 10, "loss": 0.1, "psnr": 20.0, "eta_s": 0.0,
          "updated_at": "x", "pid": 999999, "exit_code": 0, "error": None}
    st.update(fields)
    (job / "status.json").write_text(json.dumps(st))


def start_watchdog(job: Path, stops: Path, *, idle: float = 1.0, deadline: float = 60.0,
                   grace: float = 5.0) -> subprocess.Popen:
    return subprocess.Popen(
        [PY, "-m", "remote_payload", "watchdog", "--job-dir", str(job), "--idle-timeout", str(idle),
         "--deadline", str(deadline), "--stop-command", f"echo stopped >> {stops}",
         "--poll-s", "0.1", "--grace-s", str(grace)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stop_count(stops: Path) -> int:
    return len(stops.read_text().splitlines()) if stops.exists() else 0


def finish(proc: subprocess.Popen, timeout_s: float = 20) -> int:
    return proc.wait(timeout=timeout_s)


class Toucher:
    """Touches JOB_DIR/heartbeat every 0.1 s, like a live controller."""

    def __init__(self, job: Path) -> None:
        self.path = job / "heartbeat"
        self.alive = threading.Event()
        self.alive.set()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        end = time.monotonic() + 60
        while self.alive.is_set() and time.monotonic() < end:
            self.path.touch()
            time.sleep(0.1)

    def stop(self) -> None:
        self.alive.clear()
        self.thread.join(timeout=5)


def test_stale_heartbeat_and_finished_pipeline_stops_once(tmp_path: Path) -> None:
    job, stops = tmp_path / "job", tmp_path / "stops.txt"
    job.mkdir()
    write_status(job, exit_code=0, phase="done")
    (job / "heartbeat").touch()
    t0 = time.monotonic()
    wd = start_watchdog(job, stops, idle=1.0)
    assert finish(wd) == 0
    elapsed = time.monotonic() - t0
    assert stop_count(stops) == 1
    record = json.loads((job / "watchdog.json").read_text())
    assert "finished" in record["reason"] and "heartbeat stale" in record["reason"]
    assert record["stop_command_exit"] == 0
    assert record["at"].endswith("Z")
    assert 0.9 <= elapsed < 10   # waited for the idle timeout, not longer than needed


def test_fresh_heartbeat_keeps_host_then_stale_stops(tmp_path: Path) -> None:
    job, stops = tmp_path / "job", tmp_path / "stops.txt"
    job.mkdir()
    write_status(job, exit_code=0)
    toucher = Toucher(job)
    wd = start_watchdog(job, stops, idle=1.0)
    try:
        time.sleep(2.5)   # 2.5 idle timeouts with a live controller
        assert wd.poll() is None and stop_count(stops) == 0
    finally:
        toucher.stop()
    assert finish(wd) == 0
    assert stop_count(stops) == 1


def test_running_pipeline_is_never_stopped_before_deadline_then_death_stops(tmp_path: Path) -> None:
    job, stops = tmp_path / "job", tmp_path / "stops.txt"
    job.mkdir()
    pipe = start_fake_pipeline(job)   # no heartbeat file at all: the controller is gone
    wd = start_watchdog(job, stops, idle=1.0)
    try:
        time.sleep(2.5)
        assert wd.poll() is None and stop_count(stops) == 0
        assert pipe.poll() is None
    finally:
        pipe.kill()
        pipe.wait(timeout=5)
    assert finish(wd) == 0
    assert stop_count(stops) == 1
    assert "died" in json.loads((job / "watchdog.json").read_text())["reason"]


def test_hard_deadline_stops_even_with_live_controller_and_pipeline(tmp_path: Path) -> None:
    job, stops = tmp_path / "job", tmp_path / "stops.txt"
    job.mkdir()
    pipe = start_fake_pipeline(job)
    toucher = Toucher(job)
    t0 = time.monotonic()
    wd = start_watchdog(job, stops, idle=30.0, deadline=1.5)
    try:
        assert finish(wd) == 0
        elapsed = time.monotonic() - t0
        assert stop_count(stops) == 1
        assert "deadline" in json.loads((job / "watchdog.json").read_text())["reason"]
        # the pipeline got SIGTERM (to save its snapshot) before the host was stopped
        assert (job / "got_sigterm").exists()
        assert pipe.wait(timeout=5) == 5
        assert 1.4 <= elapsed < 10
    finally:
        toucher.stop()
        if pipe.poll() is None:
            pipe.kill()


def test_stalled_pipeline_with_stale_heartbeat_stops(tmp_path: Path) -> None:
    job, stops = tmp_path / "job", tmp_path / "stops.txt"
    job.mkdir()
    pipe = start_fake_pipeline(job, freeze=True)   # alive, but status.json never changes again
    wd = start_watchdog(job, stops, idle=1.0, grace=0.5)
    try:
        assert finish(wd) == 0
        assert stop_count(stops) == 1
        assert "stalled" in json.loads((job / "watchdog.json").read_text())["reason"]
    finally:
        if pipe.poll() is None:
            pipe.kill()
        pipe.wait(timeout=5)


def test_second_watchdog_on_same_job_exits_without_stopping(tmp_path: Path) -> None:
    job, stops = tmp_path / "job", tmp_path / "stops.txt"
    job.mkdir()
    write_status(job, exit_code=0)
    toucher = Toucher(job)
    first = start_watchdog(job, stops, idle=1.0)
    try:
        time.sleep(0.8)
        second = start_watchdog(job, stops, idle=1.0)
        assert finish(second, 10) == 0
        assert "already watches" in second.stderr.read()
        assert first.poll() is None
    finally:
        toucher.stop()
    assert finish(first) == 0
    assert stop_count(stops) == 1


def test_bad_arguments_are_one_line_and_launch_nothing(tmp_path: Path) -> None:
    res = subprocess.run([PY, "-m", "remote_payload", "watchdog", "--job-dir", str(tmp_path),
                          "--idle-timeout", "-3", "--deadline", "10", "--stop-command", "true"],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 64
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "--idle-timeout" in lines[0] and "must be > 0" in lines[0]
    assert not (tmp_path / "watchdog.json").exists()


@pytest.mark.parametrize("obs, stop, word", [
    (Observation(5, 100, "running", 0.5), False, "progress"),
    (Observation(5, 100, "running", 50), True, "stalled"),
    (Observation(5, 0.5, "died", None), False, "fresh"),
    (Observation(5, 100, "died", None), True, "died"),
    (Observation(5, 100, "absent", None), True, "no pipeline"),
    (Observation(5, 100, "finished", 1), True, "finished"),
    (Observation(200, 0.0, "running", 0.1), True, "deadline"),
])
def test_decide_table(obs: Observation, stop: bool, word: str) -> None:
    d = decide(obs, idle_timeout_s=10, deadline_s=100)
    assert d.stop is stop
    assert word in d.reason
