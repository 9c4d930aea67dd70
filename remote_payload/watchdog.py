"""The on-host dead-man's switch.

Runs beside the pipeline. It stops the host (runs the stop command, once) when
- the controller's heartbeat (`JOB_DIR/heartbeat` mtime) is older than the idle timeout AND the
  pipeline is not doing useful work (finished, died, never started, or stalled: alive but its
  status.json untouched for longer than the idle timeout); or
- the hard deadline (seconds since the watchdog started) has passed, whatever else is true. A
  pipeline still running then gets SIGTERM and a short grace to save its snapshot first.
A pipeline making progress before the deadline is never stopped, heartbeat or not: a dead
controller must not throw away paid-for training. The decision is a pure function
(`decide`) so it can be tested without clocks; `watch` is the bounded loop around it.
"""
from __future__ import annotations

import fcntl
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .status import STATUS_NAME, is_pipeline_process, read_status, utc_now_iso, write_json_atomic

log = logging.getLogger(__name__)

HEARTBEAT_NAME = "heartbeat"
RECORD_NAME = "watchdog.json"


@dataclass(frozen=True, slots=True)
class Observation:
    """What the watchdog sees at one poll. Ages are in seconds (wall clock, same host)."""

    elapsed_s: float              # since the watchdog started
    heartbeat_age_s: float        # since the last heartbeat (watchdog start if none yet)
    pipeline: str                 # "running" | "finished" | "died" | "absent"
    status_age_s: float | None    # since status.json was last written (None: no file)


@dataclass(frozen=True, slots=True)
class Decision:
    stop: bool
    reason: str


def decide(obs: Observation, *, idle_timeout_s: float, deadline_s: float) -> Decision:
    if obs.elapsed_s >= deadline_s:
        return Decision(True, f"hard deadline of {deadline_s:g} s passed (pipeline {obs.pipeline})")
    if obs.heartbeat_age_s < idle_timeout_s:
        return Decision(False, "controller heartbeat is fresh")
    stale = f"heartbeat stale for {obs.heartbeat_age_s:.0f} s (> {idle_timeout_s:g} s)"
    if obs.pipeline == "running":
        if obs.status_age_s is not None and obs.status_age_s >= idle_timeout_s:
            return Decision(True, f"{stale} and the pipeline stalled "
                                  f"(no status update for {obs.status_age_s:.0f} s)")
        return Decision(False, "pipeline is making progress")
    what = {"finished": "the pipeline finished", "died": "the pipeline died",
            "absent": "no pipeline ever started"}[obs.pipeline]
    return Decision(True, f"{stale} and {what}")


def pipeline_state(job_dir: Path) -> tuple[str, float | None, int | None]:
    """(state, status age in s, live pipeline pid) from JOB_DIR/status.json."""
    status = read_status(job_dir)
    if status is None:
        return "absent", None, None
    try:
        age_s: float | None = max(0.0, time.time() - (job_dir / STATUS_NAME).stat().st_mtime)
    except OSError:
        age_s = None
    if status.exit_code is not None:
        return "finished", age_s, None
    if is_pipeline_process(status.pid):
        return "running", age_s, status.pid
    return "died", age_s, None


def observe(job_dir: Path, *, started_wall: float, started_mono: float) -> tuple[Observation, int | None]:
    try:
        beat = max((job_dir / HEARTBEAT_NAME).stat().st_mtime, started_wall)
    except OSError:
        beat = started_wall   # no heartbeat yet: the watchdog's start counts as the first one
    state, status_age_s, pid = pipeline_state(job_dir)
    obs = Observation(elapsed_s=time.monotonic() - started_mono,
                      heartbeat_age_s=max(0.0, time.time() - beat),
                      pipeline=state, status_age_s=status_age_s)
    return obs, pid


def _terminate_pipeline(pid: int, grace_s: float) -> None:
    """SIGTERM so the trainer saves its snapshot; wait at most `grace_s` for it to exit."""
    try:
        os.kill(pid, signal.SIGTERM)
    except OSError:
        return
    end = time.monotonic() + grace_s
    while time.monotonic() < end and is_pipeline_process(pid):
        time.sleep(0.2)


def run_stop_command(command: str, timeout_s: float) -> int:
    log.warning("running the stop command")   # its text may hold a token: not logged
    try:
        proc = subprocess.run(command, shell=True, timeout=timeout_s, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        log.error("stop command timed out after %g s", timeout_s)
        return -1
    except OSError as exc:
        log.error("stop command could not start: %s", exc)
        return -1
    if proc.returncode != 0:
        log.error("stop command exited %d: %s", proc.returncode, (proc.stderr or "").strip()[-300:])
    return proc.returncode


def watch(job_dir: Path, *, idle_timeout_s: float, deadline_s: float, stop_command: str,
          poll_s: float = 5.0, grace_s: float = 30.0, stop_timeout_s: float = 120.0) -> Decision | None:
    """Watch until a stop is due, run the stop command once and record it.

    Returns the decision that stopped, or None when another watchdog already watches this job.
    Bounded: the loop always ends at the deadline.
    """
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    lock_fd = os.open(job_dir / ".watchdog.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock_fd)
        log.info("another watchdog already watches %s", job_dir)
        return None
    try:
        started_wall, started_mono = time.time(), time.monotonic()
        log.info("watchdog on %s: idle timeout %g s, deadline %g s", job_dir, idle_timeout_s,
                 deadline_s)
        while True:
            obs, pid = observe(job_dir, started_wall=started_wall, started_mono=started_mono)
            decision = decide(obs, idle_timeout_s=idle_timeout_s, deadline_s=deadline_s)
            if decision.stop:
                break
            remaining_s = deadline_s - obs.elapsed_s
            time.sleep(max(0.01, min(poll_s, remaining_s)))
        log.warning("stopping the host: %s", decision.reason)
        if pid is not None:
            _terminate_pipeline(pid, grace_s)
        code = run_stop_command(stop_command, stop_timeout_s)
        write_json_atomic(job_dir / RECORD_NAME,
                          {"reason": decision.reason, "at": utc_now_iso(), "stop_command_exit": code})
        return decision
    finally:
        os.close(lock_fd)
