"""How commands and files reach a host. Knows no provider.

A transport is bound to one host's work root (`root`, an absolute path on that host), under
which the remote layout of DESIGN.md lives (payload/, cache/datasets/, jobs/<job_id>/).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

# progress(done_bytes, total_bytes_or_None)
ProgressFn = Callable[[int, "int | None"], None]


@dataclass(frozen=True, slots=True)
class CommandResult:
    command: str
    exit_code: int
    stdout: str
    stderr: str
    duration_s: float

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


@dataclass(frozen=True, slots=True)
class TransferStats:
    files: int
    bytes: int
    seconds: float
    skipped_files: int = 0   # already present and identical (resume / manifest)

    @property
    def rate_bytes_per_s(self) -> float:
        return self.bytes / self.seconds if self.seconds > 0 else 0.0


@runtime_checkable
class Transport(Protocol):
    @property
    def root(self) -> str:
        ...

    def run(self, command: str, *, timeout_s: float | None = None, check: bool = True,
            env: dict[str, str] | None = None) -> CommandResult:
        """Run a shell command (bash) on the host, cwd = root. `check` raises CommandError."""
        ...

    def start_detached(self, command: str, *, log_path: str, env: dict[str, str] | None = None) -> int:
        """Start `command` in its own session so it outlives this connection; return its pid.
        stdin/stdout/stderr are redirected (stdout+stderr appended to log_path)."""
        ...

    def put(self, local: Path, remote: str, *, progress: ProgressFn | None = None) -> TransferStats:
        """Copy a file or a directory tree to `remote` (absolute, or relative to root)."""
        ...

    def get(self, remote: str, local: Path, *, progress: ProgressFn | None = None) -> TransferStats:
        """Copy a remote file or directory tree to `local`."""
        ...

    def read_text(self, remote: str) -> str | None:
        """The file's text, or None when it does not exist."""
        ...

    def write_text(self, remote: str, text: str) -> None:
        """Write atomically (temp file + rename)."""
        ...

    def close(self) -> None: ...
