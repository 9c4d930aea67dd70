"""The local transport: a work directory on this machine, reached with bash subprocesses.

It speaks the same `Transport` protocol as SSH, so the runner drives a local "host" exactly
as it drives a rented one: same remote layout under `root`, same detached start.
"""
from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from ..errors import CommandError, TransportError
from ..secrets import redact
from .base import CommandResult, ProgressFn, TransferStats

log = logging.getLogger(__name__)


class LocalTransport:
    """Commands run as `bash -c` with cwd = root; files are copied with shutil."""

    def __init__(self, root: str | Path) -> None:
        path = Path(root).expanduser().resolve()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TransportError(f"cannot create the local work root {path}: {exc.strerror or exc}",
                                 hint="set host.root (or ORCHESTRATE_HOME) to a writable directory") from None
        self.root = str(path)

    def abspath(self, remote: str) -> str:
        p = Path(remote).expanduser()
        return str(p if p.is_absolute() else Path(self.root) / p)

    # -- commands -------------------------------------------------------------------------
    def run(self, command: str, *, timeout_s: float | None = None, check: bool = True,
            env: dict[str, str] | None = None) -> CommandResult:
        full_env = {**os.environ, **(env or {})}
        t0 = time.monotonic()
        try:
            proc = subprocess.run(["bash", "-c", command], cwd=self.root, env=full_env,
                                  stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  errors="replace", timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            raise CommandError(redact(command), 124, redact(out + f"\n(timed out after {timeout_s:g} s)"),
                               hint="the command took too long on the host") from None
        except OSError as exc:
            raise TransportError(f"cannot run bash locally: {exc.strerror or exc}") from None
        res = CommandResult(command=command, exit_code=proc.returncode, stdout=proc.stdout,
                            stderr=proc.stderr, duration_s=time.monotonic() - t0)
        if check and not res.ok:
            raise CommandError(redact(command), res.exit_code, redact(res.stderr or res.stdout))
        return res

    def start_detached(self, command: str, *, log_path: str, env: dict[str, str] | None = None) -> int:
        """Start `command` in a new session (setsid) with all three streams redirected, so it
        outlives this controller; return the pid of the session leader."""
        logf = shlex.quote(self.abspath(log_path))
        inner = shlex.quote("".join(f"export {k}={shlex.quote(v)}; " for k, v in (env or {}).items())
                            + command)
        # Two statements, not `mkdir && nohup ... &`: that would background the whole list in a
        # subshell still holding our stdout pipe, and this call would wait for the command.
        script = (f"mkdir -p \"$(dirname {logf})\" || exit 1\n"
                  f"nohup setsid bash -c {inner} >>{logf} 2>&1 </dev/null &\necho $!")
        res = self.run(script, timeout_s=60)
        try:
            return int(res.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise TransportError(f"could not read the pid of a detached command: {res.stdout[-200:]!r}") from None

    # -- files ----------------------------------------------------------------------------
    def put(self, local: Path, remote: str, *, progress: ProgressFn | None = None) -> TransferStats:
        return _copy(Path(local), Path(self.abspath(remote)), progress)

    def get(self, remote: str, local: Path, *, progress: ProgressFn | None = None) -> TransferStats:
        return _copy(Path(self.abspath(remote)), Path(local), progress)

    def read_text(self, remote: str) -> str | None:
        try:
            return Path(self.abspath(remote)).read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return None
        except IsADirectoryError:
            return None
        except OSError as exc:
            raise TransportError(f"cannot read {remote}: {exc.strerror or exc}") from None

    def write_text(self, remote: str, text: str) -> None:
        path = Path(self.abspath(remote))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
            os.replace(tmp, path)
        except OSError as exc:
            raise TransportError(f"cannot write {remote}: {exc.strerror or exc}") from None

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"LocalTransport({self.root!r})"


def _copy(src: Path, dst: Path, progress: ProgressFn | None) -> TransferStats:
    t0 = time.monotonic()
    if not src.exists():
        raise TransportError(f"nothing to copy: {src} does not exist")
    files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    done = 0
    try:
        for f in files:
            target = dst if src.is_file() else dst / f.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, target)
            done += f.stat().st_size
            if progress:
                progress(done, total)
        if src.is_dir():
            dst.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TransportError(f"copying {src} to {dst} failed: {exc.strerror or exc}") from None
    return TransferStats(files=len(files), bytes=done, seconds=time.monotonic() - t0)
