"""A real OpenSSH server for tests, shipped with the package (like `fabric.testing`).

`SSHServer` starts `/usr/sbin/sshd -D` on 127.0.0.1 at a free port with everything in its own
temporary directory: config, an ed25519 host key, authorized_keys holding a client key pair it
generates (`client_key_path`), PidFile and log. It can be stopped (which also kills the live
sessions, so "the host went away" can be simulated), restarted on a new port and/or with a new
host key, and optionally accept a password.

    with SSHServer() as srv:
        client.connect(srv.host, srv.port, srv.user, key_filename=str(srv.client_key_path))

Password logins: sshd checks /etc/shadow (UsePAM no). Rather than change the real account's
password, the server runs in a private mount namespace where a copy of /etc/shadow with the
test password is bind-mounted (needs root, as sshd itself does here).

It installs nothing: sshd comes from the OS package (openssh-server). Every wait is bounded.
"""
from __future__ import annotations

import getpass
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

SSHD_PATH = "/usr/sbin/sshd"
START_TIMEOUT_S = 10.0


class SSHServerError(RuntimeError):
    """The test sshd could not be started (a test-environment problem, not a product error)."""


def find_sshd() -> str | None:
    path = shutil.which("sshd") or (SSHD_PATH if os.path.exists(SSHD_PATH) else None)
    return path


def free_port(host: str = "127.0.0.1", avoid: set[int] | None = None) -> int:
    """A TCP port nobody listens on right now (the caller should still retry on a race)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if not avoid or port not in avoid:
            return port
    raise SSHServerError("no free TCP port found")


def _ppid_map() -> dict[int, int]:
    out: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        # the command name may contain spaces and parentheses: parse after the last ')'
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) >= 2:
            out[int(entry)] = int(fields[1])
    return out


def descendants(pid: int) -> list[int]:
    """Pids of every live descendant of `pid` (children first, then theirs)."""
    ppids = _ppid_map()
    children: dict[int, list[int]] = {}
    for child, parent in ppids.items():
        children.setdefault(parent, []).append(child)
    found: list[int] = []
    todo = list(children.get(pid, []))
    while todo:
        p = todo.pop(0)
        found.append(p)
        todo.extend(children.get(p, []))
    return found


def _kill_quietly(pids: list[int], sig: int = signal.SIGKILL) -> None:
    for p in pids:
        try:
            os.kill(p, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _keygen(path: Path, comment: str) -> None:
    for suffix in ("", ".pub"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE, timeout=30)


def _stop_process(proc: subprocess.Popen, sessions: list[int]) -> None:
    """Finalizer-safe stop: kill the listener and the sessions recorded just before."""
    _kill_quietly(sessions)
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


class SSHServer:
    """A real sshd on 127.0.0.1 for tests. Use as a context manager or call start()/stop()."""

    def __init__(self, *, password: str | None = None, base_dir: Path | str | None = None,
                 host: str = "127.0.0.1", extra_config: dict[str, str] | None = None,
                 sshd_path: str | None = None, netns: str | None = None,
                 port: int | None = None, plain_shell_rc: bool = True) -> None:
        self.host = host
        self.port = 0
        self.netns = netns                  # run inside this network namespace (benchmarks)
        self.fixed_port = port
        self.plain_shell_rc = plain_shell_rc   # see _plain_rc
        self.user = getpass.getuser()
        self.password = password
        self.extra_config = dict(extra_config or {})
        self.sshd_path = sshd_path or find_sshd() or SSHD_PATH
        self._own_dir = base_dir is None
        self.dir = Path(tempfile.mkdtemp(prefix="orch-sshd-")) if base_dir is None else Path(base_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host_key_path = self.dir / "ssh_host_ed25519_key"
        self.client_key_path = self.dir / "client_ed25519"
        self.authorized_keys_path = self.dir / "authorized_keys"
        self.config_path = self.dir / "sshd_config"
        self.log_path = self.dir / "sshd.log"
        self.pid_path = self.dir / "sshd.pid"
        self._proc: subprocess.Popen | None = None
        self._finalizer: weakref.finalize | None = None
        self._used_ports: set[int] = set()
        self._keys_made = False

    # -- keys ---------------------------------------------------------------------------------
    def _ensure_keys(self) -> None:
        if self._keys_made:
            return
        _keygen(self.host_key_path, "orchestrate-test-host")
        _keygen(self.client_key_path, "orchestrate-test-client")
        self.authorized_keys_path.write_text(self.client_public_key + "\n")
        self.authorized_keys_path.chmod(0o600)
        self._keys_made = True

    @property
    def host_key_public(self) -> str:
        """The server's host key as "ssh-ed25519 AAAA..." (type and base64, no comment)."""
        kind, b64 = Path(str(self.host_key_path) + ".pub").read_text().split()[:2]
        return f"{kind} {b64}"

    @property
    def client_public_key(self) -> str:
        return Path(str(self.client_key_path) + ".pub").read_text().strip()

    def authorize_key(self, public_key: str) -> None:
        """Also accept this public key ("type base64 [comment]")."""
        self._ensure_keys()
        with open(self.authorized_keys_path, "a") as f:
            f.write(public_key.strip() + "\n")

    def regenerate_host_key(self) -> None:
        _keygen(self.host_key_path, "orchestrate-test-host")

    # -- lifecycle ----------------------------------------------------------------------------
    def _write_config(self) -> None:
        lines = {
            "Port": str(self.port),
            "ListenAddress": self.host,
            "HostKey": str(self.host_key_path),
            "PidFile": str(self.pid_path),
            "AuthorizedKeysFile": str(self.authorized_keys_path),
            "UsePAM": "no",
            "StrictModes": "no",
            "PermitRootLogin": "yes" if self.password else "prohibit-password",
            "PubkeyAuthentication": "yes",
            "PasswordAuthentication": "yes" if self.password else "no",
            "KbdInteractiveAuthentication": "no",
            "PrintMotd": "no",
            "MaxStartups": "50:30:100",
            "MaxSessions": "50",
            "Subsystem": "sftp internal-sftp",
        }
        lines.update(self.extra_config)
        self.config_path.write_text("".join(f"{k} {v}\n" for k, v in lines.items()))

    def _command(self) -> list[str]:
        sshd = [self.sshd_path, "-D", "-f", str(self.config_path), "-E", str(self.log_path)]
        if self.netns:
            sshd = ["ip", "netns", "exec", self.netns, *sshd]
        binds = self._binds()
        if not binds:
            return sshd
        # sshd runs in a private mount namespace; the binds are seen by its sessions only
        script = "".join(f'mount --bind "${2 * i + 1}" "${2 * i + 2}" && ' for i in range(len(binds)))
        script += f'shift {2 * len(binds)} && exec "$@"'
        flat = [x for pair in binds for x in pair]
        return ["unshare", "-m", "--propagation", "private", "--", "sh", "-c", script, "sh",
                *flat, *sshd]

    def _binds(self) -> list[tuple[str, str]]:
        """(source, target) bind mounts: the test password, and a plain shell rc."""
        can = os.geteuid() == 0 and shutil.which("unshare") is not None
        binds: list[tuple[str, str]] = []
        if self.password:
            if not can:
                raise SSHServerError("password logins in the test sshd need root and unshare(1)")
            binds.append((str(self._shadow_copy()), "/etc/shadow"))
        bashrc = Path(os.path.expanduser(f"~{self.user}")) / ".bashrc"
        if self.plain_shell_rc and can and bashrc.is_file():
            binds.append((str(self._plain_rc()), str(bashrc)))
        return binds

    def _shadow_copy(self) -> Path:
        shadow = self.dir / "shadow"
        hashed = subprocess.run(["openssl", "passwd", "-6", "-stdin"], input=self.password,
                                capture_output=True, text=True, check=True, timeout=30).stdout.strip()
        rows = []
        for line in Path("/etc/shadow").read_text().splitlines():
            parts = line.split(":")
            if parts and parts[0] == self.user:
                parts[1] = hashed
            rows.append(":".join(parts))
        shadow.write_text("\n".join(rows) + "\n")
        shadow.chmod(0o600)
        return shadow

    def _plain_rc(self) -> Path:
        """The sessions' ~/.bashrc: this interpreter's bin dir first on PATH, nothing else.
        (A user rc that runs e.g. `pyenv init` costs ~0.5 s per session and takes a lock that a
        session killed mid-start leaves behind, stalling every later login for 60 s.)"""
        rc = self.dir / "session_bashrc"
        bindir = os.path.dirname(sys.executable)
        rc.write_text(f'export PATH={shlex.quote(bindir)}:"$PATH"\n')
        return rc

    def start(self) -> SSHServer:
        """Start on a free port never used by this server before (retries on a port race)."""
        if self.running:
            return self
        last_error = ""
        if self.fixed_port:
            return self._start_on(self.fixed_port)
        for _attempt in range(5):
            ok, last_error = self._spawn(free_port(self.host, avoid=self._used_ports))
            if ok:
                return self
        raise SSHServerError(f"sshd did not start: {last_error.strip()[-500:]}")

    def _spawn(self, port: int) -> tuple[bool, str]:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        self._ensure_keys()
        self.port = port
        self._write_config()
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        proc = subprocess.Popen(self._command(), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)
        ok, error = self._wait_listening(proc, offset)
        if not ok:
            _stop_process(proc, [])
            return False, error
        self._proc = proc
        self._used_ports.add(port)
        self._finalizer = weakref.finalize(self, _stop_process, proc, [])
        log.debug("test sshd pid %d on %s:%d", proc.pid, self.host, port)
        return True, ""

    def _wait_listening(self, proc: subprocess.Popen, log_offset: int) -> tuple[bool, str]:
        deadline = time.monotonic() + START_TIMEOUT_S
        needle = f"Server listening on {self.host} port {self.port}"
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                return False, err + self._log_tail(log_offset)
            if needle in self._log_tail(log_offset):
                return True, ""
            time.sleep(0.01)
        return False, "timed out waiting for sshd to listen; " + self._log_tail(log_offset)

    def _log_tail(self, offset: int = 0) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    def session_pids(self) -> list[int]:
        """Pids of the live per-connection sshd processes and whatever they run (not processes
        that detached into their own session and were re-parented)."""
        return descendants(self._proc.pid) if self._proc is not None else []

    def kill_sessions(self) -> int:
        """Kill every live session (connections drop at once, as when a host vanishes); the
        listener keeps running. Returns how many processes were killed."""
        pids = self.session_pids()
        _kill_quietly(pids)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() and not _zombie(p)
                                                  for p in pids):
            time.sleep(0.01)
        return len(pids)

    def stop(self) -> None:
        """Stop the listener and kill its live sessions."""
        if self._proc is None:
            return
        sessions = self.session_pids()
        _stop_process(self._proc, sessions)
        if self._finalizer is not None:
            self._finalizer.detach()
        if self._proc.stderr:
            self._proc.stderr.close()
        self._proc = None

    def restart(self, *, new_port: bool = True, new_host_key: bool = False) -> SSHServer:
        """Stop (dropping live sessions) and start again, by default on a different port."""
        old_port = self.port
        self.stop()
        if new_host_key:
            self.regenerate_host_key()
        if not new_port:
            self._used_ports.discard(old_port)
            return self._start_on(old_port)
        return self.start()

    def _start_on(self, port: int) -> SSHServer:
        deadline = time.monotonic() + START_TIMEOUT_S
        last = ""
        while time.monotonic() < deadline:   # the old port may linger briefly
            ok, last = self._spawn(port)
            if ok:
                return self
            time.sleep(0.1)
        raise SSHServerError(f"sshd did not restart on port {port}: {last.strip()[-500:]}")

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> SSHServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        return f"SSHServer({self.user}@{self.host}:{self.port}, running={self.running})"


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
        return stat[stat.rfind(")") + 2:].split()[0] == "Z"
    except OSError:
        return True


try:  # the fixture is only defined where pytest is importable (it is a test dependency)
    import pytest
except ImportError:  # pragma: no cover
    pytest = None  # type: ignore[assignment]

if pytest is not None:
    @pytest.fixture
    def sshd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SSHServer]:
        """A started `SSHServer` (key auth) in its own temp dir; stopped after the test."""
        if find_sshd() is None:
            pytest.skip("sshd not installed (apt-get install openssh-server)")
        srv = SSHServer(base_dir=tmp_path_factory.mktemp("sshd"))
        srv.start()
        try:
            yield srv
        finally:
            srv.stop()
