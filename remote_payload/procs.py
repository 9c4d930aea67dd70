"""Finding and ending this job's own processes on the host, never by a bare PID.

Every process the controller starts for a job (the pipeline, the watchdog, and whatever they
fork: the shell wrapper, ffmpeg, the stop command) inherits `ORCHESTRATE_JOB_DIR=<job dir>` and
`ORCHESTRATE_ROLE=<pipeline|watchdog>` in its environment. `/proc/<pid>/environ` is the
process's own, so a PID that was reused by an unrelated program never matches: the markers are
the identity, the PID only the address. A wrapper PID returned by `setsid` is not enough: the
real process behind it is re-parented to PID 1 when the wrapper dies and lives on.
"""
from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

log = logging.getLogger(__name__)

JOB_DIR_ENV = "ORCHESTRATE_JOB_DIR"
ROLE_ENV = "ORCHESTRATE_ROLE"
ROLES = ("pipeline", "watchdog")


def _environ(pid: int) -> dict[str, str] | None:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None   # gone, or another user's process (which is not ours either)
    out = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            out[key.decode(errors="replace")] = value.decode(errors="replace")
    return out


def marked_pids(job_dir: str, role: str | None = None) -> list[int]:
    """Live processes whose environment names `job_dir` (and `role`, when given); never this one."""
    me = os.getpid()
    found = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []   # no /proc (not Linux): nothing can be identified, so nothing is signalled
    for name in entries:
        if not name.isdigit() or int(name) == me:
            continue
        env = _environ(int(name))
        if env is None or env.get(JOB_DIR_ENV) != job_dir:
            continue
        if role is not None and env.get(ROLE_ENV) != role:
            continue
        found.append(int(name))
    return sorted(found)


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def stop_marked(job_dir: str, roles: tuple[str, ...] = ROLES, *, grace_s: float = 20.0) -> int:
    """End this job's processes, watchdog first (so it cannot fire a stop while the pipeline
    goes): SIGTERM (the pipeline saves its snapshot), SIGKILL what is left after `grace_s`.
    Each signal goes to a PID just re-identified by its markers. Returns how many were ended."""
    order = [r for r in ("watchdog", "pipeline") if r in roles]
    total = 0
    for role in order:
        pids = marked_pids(job_dir, role)
        if not pids:
            continue
        total += len(pids)
        _signal_all(pids, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and marked_pids(job_dir, role):
            time.sleep(0.1)
        left = marked_pids(job_dir, role)
        if left:
            log.warning("%d %s process(es) survived SIGTERM for %g s: SIGKILL", len(left), role, grace_s)
            _signal_all(left, signal.SIGKILL)
        log.info("ended %d %s process(es) of %s", len(pids), role, job_dir)
    return total
