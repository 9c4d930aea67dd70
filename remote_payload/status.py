"""`JOB_DIR/status.json`: written atomically (temp file + rename) and read back.

The controller polls this file and the watchdog reads it to decide whether the pipeline still
does useful work, so every write is complete or absent, never half a JSON document.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .contract import PHASES, STATUS_KEYS, STATUS_NAME, VISIBLE_DEVICES_ENV

log = logging.getLogger(__name__)

__all__ = ["PHASES", "STATUS_KEYS", "STATUS_NAME", "Status", "read_status", "write_json_atomic"]


def utc_now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class Status:
    phase: str
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    psnr: float | None = None
    eta_s: float | None = None
    updated_at: str = ""
    pid: int = 0
    exit_code: int | None = None
    error: str | None = None
    cuda_visible_devices: str | None = None   # as the pipeline found it in its environment

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Status:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to `path` via a temp file in the same directory and an atomic rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1, sort_keys=False)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_status(job_dir: Path) -> Status | None:
    """The current status, or None when there is none yet (or it cannot be parsed)."""
    try:
        data = json.loads((Path(job_dir) / STATUS_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or "phase" not in data:
        return None
    try:
        return Status.from_json(data)
    except TypeError:
        return None


def pid_alive(pid: int) -> bool:
    """True when a process with this pid exists (zombies count as dead)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def is_pipeline_process(pid: int) -> bool:
    """True when `pid` is alive and is a `remote_payload run` process (guards against pid reuse)."""
    if not pid_alive(pid):
        return False
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True   # no /proc (not Linux): trust the pid
    words = [a.decode(errors="replace") for a in argv if a]
    return any("remote_payload" in w for w in words) and "run" in words


class StatusWriter:
    """Keeps the latest status and writes it; `update` is throttled, `set_phase`/`finish` are not."""

    def __init__(self, job_dir: Path, *, min_interval_s: float = 1.0) -> None:
        self.path = Path(job_dir) / STATUS_NAME
        self.min_interval_s = min_interval_s
        self._status = Status(phase="check", pid=os.getpid(),
                              cuda_visible_devices=os.environ.get(VISIBLE_DEVICES_ENV))
        self._last_write = 0.0

    @property
    def current(self) -> Status:
        return self._status

    def _write(self) -> None:
        self._status = replace(self._status, updated_at=utc_now_iso())
        try:
            write_json_atomic(self.path, self._status.to_json())
        except OSError as exc:   # a full disk must not kill training; the log says why
            log.warning("could not write %s: %s", self.path, exc)
        self._last_write = time.monotonic()

    def set_phase(self, phase: str, **fields: Any) -> None:
        assert phase in PHASES, phase
        self._status = replace(self._status, phase=phase, **fields)
        self._write()

    def update(self, *, force: bool = False, **fields: Any) -> None:
        self._status = replace(self._status, **fields)
        if force or time.monotonic() - self._last_write >= self.min_interval_s:
            self._write()

    def finish(self, phase: str, exit_code: int, error: str | None = None) -> None:
        self._status = replace(self._status, phase=phase, exit_code=exit_code, error=error,
                               eta_s=None if exit_code else 0.0)
        self._write()
