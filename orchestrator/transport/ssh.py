"""The `ssh` transport: commands and files over paramiko, to a host whose port may change.

- Lazy: nothing connects until the first call. Every (re)connect calls `resolve()` for the
  endpoint; a host:port is never cached across reconnects, because rented hosts change port.
- Host keys are pinned to the instance, not to host:port: `pinned_key` ("type base64") is
  compared before authentication, so a different key raises HostKeyMismatch and nothing runs.
  With no pin, the first key seen is handed to `on_first_key` (the runner stores it).
- Reconnects back off (0.5 s doubling to 10 s) until `reconnect_deadline_s`, then ConnectError.
- A command that fails raises CommandError (command, exit code, output tail), secrets redacted.
- Files go through `tarstream` (one tar stream per transfer, manifest-based skip/resume).
"""
from __future__ import annotations

import logging
import posixpath
import shlex
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import paramiko

from ..errors import CommandError, ConnectError, HostKeyMismatch, InstanceNotFound, OrchestratorError, TransportError
from ..secrets import redact
from . import tarstream
from .base import CommandResult, ProgressFn, TransferStats
from .endpoint import Endpoint

if TYPE_CHECKING:
    from ..config import HostConfig
    from ..ledger import Ledger
    from ..providers.base import Provider

log = logging.getLogger(__name__)

WINDOW_BYTES = 8 << 20


@dataclass(frozen=True, slots=True)
class SSHAuth:
    """How to log in. The password is read from env/file by the caller (orchestrator.secrets)."""
    identity_file: str | None = None
    password: str | None = field(default=None, repr=False)
    allow_agent: bool = True
    look_for_keys: bool = True       # ~/.ssh/id_* when no identity_file is given


def key_string(key: paramiko.PKey) -> str:
    return f"{key.get_name()} {key.get_base64()}"


_RSA_ALGS = ("ssh-rsa", "rsa-sha2-256", "rsa-sha2-512")


def _make_paramiko_transport(sock: Any, **kw: Any) -> paramiko.Transport:
    """A paramiko transport with a large receive window and AES-GCM first: an AEAD cipher is
    one pass over the data instead of AES-CTR plus a separate HMAC (bulk transfers are
    CPU-bound in paramiko)."""
    t = paramiko.Transport(sock, default_window_size=WINDOW_BYTES, **kw)
    opts = t.get_security_options()
    ciphers = list(opts.ciphers)
    opts.ciphers = [c for c in ciphers if "gcm" in c] + [c for c in ciphers if "gcm" not in c]
    return t


class _PinPolicy(paramiko.MissingHostKeyPolicy):
    """Checks the server's key against the instance's pin before any authentication."""

    def __init__(self, owner: SSHTransport, endpoint: Endpoint) -> None:
        self.owner, self.endpoint = owner, endpoint

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        self.owner._check_host_key(key_string(key), self.endpoint)


class SSHTransport:
    """Transport over SSH (see orchestrator.transport.base.Transport)."""

    def __init__(self, resolve: Callable[[], Endpoint], *, root: str = "~/orchestrate",
                 auth: SSHAuth | None = None, pinned_key: str | None = None,
                 on_first_key: Callable[[str], None] | None = None,
                 connect_timeout_s: float = 15.0, keepalive_s: float = 15.0,
                 reconnect_deadline_s: float = 300.0, backoff_initial_s: float = 0.5,
                 backoff_max_s: float = 10.0, name: str = "", stop: threading.Event | None = None) -> None:
        self._resolve = resolve
        self._stop = stop            # Ctrl-C: one more attempt at most, never a backoff wait
        self._root_spec = root
        self._root: str | None = root if root.startswith("/") else None
        self.auth = auth or SSHAuth()
        self.pinned_key = pinned_key.strip() if pinned_key else None
        self.on_first_key = on_first_key
        self.connect_timeout_s = connect_timeout_s
        self.keepalive_s = keepalive_s
        self.reconnect_deadline_s = reconnect_deadline_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.name = name
        self.endpoint: Endpoint | None = None       # of the live connection, for messages only
        self.connects = 0
        self._client: paramiko.SSHClient | None = None
        self._jump_client: paramiko.SSHClient | None = None
        self._lock = threading.RLock()

    # -- connection -------------------------------------------------------------------------------
    @property
    def root(self) -> str:
        """Absolute work root on the host ("~" is expanded there on first use)."""
        if self._root is None:
            self._paramiko()
        assert self._root is not None
        return self._root

    def _check_host_key(self, seen: str, endpoint: Endpoint) -> None:
        if self.pinned_key is None:
            log.info("%s: first contact with %s, pinning host key %s", self.name or "ssh", endpoint,
                     seen.split()[0])
            self.pinned_key = seen
            if self.on_first_key is not None:
                self.on_first_key(seen)
            return
        if seen.split()[:2] != self.pinned_key.split()[:2]:
            raise HostKeyMismatch(
                f"host key of {self.name or 'the instance'} at {endpoint} changed: expected "
                f"{_short(self.pinned_key)}, got {_short(seen)}; refusing to connect",
                hint="if the instance was really re-created, destroy it with `orchestrate down` "
                     "and start again; otherwise someone may be intercepting the connection")

    def _host_key_algs_disabled(self) -> dict[str, list[str]] | None:
        if not self.pinned_key:
            return None
        kind = self.pinned_key.split()[0]
        allowed = set(_RSA_ALGS) if kind in _RSA_ALGS else {kind}
        # every host key type paramiko implements, from its public key classes
        known = {name for cls in (paramiko.RSAKey, paramiko.ECDSAKey, paramiko.Ed25519Key)
                 for name in cls.identifiers() if "-cert-" not in name}
        others = sorted(known - allowed)
        return {"keys": others}

    def _connect_once(self, ep: Endpoint) -> paramiko.SSHClient:
        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(_PinPolicy(self, ep))
        kwargs: dict[str, Any] = dict(
            hostname=ep.host, port=ep.port, username=ep.user, timeout=self.connect_timeout_s,
            banner_timeout=self.connect_timeout_s, auth_timeout=self.connect_timeout_s,
            channel_timeout=self.connect_timeout_s,
            allow_agent=self.auth.allow_agent,
            look_for_keys=self.auth.look_for_keys and not self.auth.identity_file,
            disabled_algorithms=self._host_key_algs_disabled(),
            transport_factory=_make_paramiko_transport)
        if self.auth.identity_file:
            kwargs["key_filename"] = str(Path(self.auth.identity_file).expanduser())
        if self.auth.password:
            kwargs["password"] = self.auth.password
        if ep.jump:
            from .jump import open_jump_channel
            self._jump_client, kwargs["sock"] = open_jump_channel(ep, kwargs, self.connect_timeout_s)
        try:
            client.connect(**kwargs)
        except BaseException:
            client.close()
            self._close_jump()
            raise
        t = client.get_transport()
        assert t is not None
        if self.keepalive_s:
            t.set_keepalive(max(1, int(self.keepalive_s)))
        return client

    def _paramiko(self) -> paramiko.Transport:
        """The live paramiko transport, (re)connecting with backoff when needed."""
        with self._lock:
            if self._client is not None:
                t = self._client.get_transport()
                if t is not None and t.is_active():
                    return t
                self._drop()
            deadline = time.monotonic() + self.reconnect_deadline_s
            delay = self.backoff_initial_s
            attempt, last = 0, "no attempt"
            while True:
                attempt += 1
                ep: Endpoint | None = None
                try:
                    ep = self._resolve()           # every time: the port may have changed
                    if ep is None:
                        raise ConnectError("the provider reports no SSH endpoint yet")
                    self._client = self._connect_once(ep)
                    break
                except HostKeyMismatch:
                    raise
                except InstanceNotFound as exc:     # gone (destroyed, preempted): no reconnecting to it
                    raise ConnectError(f"{self.name or 'host'}: {redact(str(exc))}",
                                       hint="the provider no longer lists the instance") from None
                except paramiko.AuthenticationException as exc:
                    raise ConnectError(f"authentication to {ep} failed: {redact(str(exc))}",
                                       hint="check identity_file / password_env / password_file "
                                            "for this host") from None
                except (OSError, EOFError, paramiko.SSHException, OrchestratorError) as exc:
                    last = redact(str(exc)) or type(exc).__name__
                    log.info("%s: connect to %s failed (attempt %d): %s", self.name or "ssh",
                             ep or "?", attempt, last)
                if time.monotonic() + delay > deadline:
                    raise ConnectError(
                        f"cannot connect to {self.name or 'host'} at {ep or '?'} after {attempt} "
                        f"attempt(s) in {self.reconnect_deadline_s:.0f} s: {last}",
                        hint="check that the host is running and the endpoint is right")
                if self._stop is not None and self._stop.wait(delay):
                    raise ConnectError(f"interrupted while connecting to {self.name or 'host'} at "
                                       f"{ep or '?'} (attempt {attempt}: {last})")
                if self._stop is None:
                    time.sleep(delay)
                delay = min(delay * 2, self.backoff_max_s)
            self.endpoint = ep
            self.connects += 1
            log.info("%s: connected to %s", self.name or "ssh", ep)
            t = self._client.get_transport()
            assert t is not None
            if self._root is None:
                self._root = self._expand_root(t)
            return t

    def _expand_root(self, t: paramiko.Transport) -> str:
        spec = self._root_spec
        rest = spec[1:].lstrip("/") if spec.startswith("~") else spec
        code, out, err = tarstream.exec_capture(t, "cd ~ && pwd", timeout_s=60)
        if code != 0:
            raise CommandError("cd ~ && pwd", code, redact(err.decode(errors="replace")))
        home = out.decode().strip()
        return posixpath.normpath(posixpath.join(home, rest)) if rest else home

    def _drop(self) -> None:
        if self._client is not None:
            try:
                self._client.close()
            except Exception:  # noqa: BLE001 - closing a dead connection must not mask the real error
                pass
        self._client = None
        self._close_jump()

    def _close_jump(self) -> None:
        if self._jump_client is not None:
            try:
                self._jump_client.close()
            except Exception:  # noqa: BLE001 - as above
                pass
        self._jump_client = None

    def connect(self) -> SSHTransport:
        self._paramiko()
        return self

    def close(self) -> None:
        with self._lock:
            self._drop()

    def __enter__(self) -> SSHTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- commands ---------------------------------------------------------------------------------
    def abspath(self, remote: str) -> str:
        return remote if remote.startswith("/") else posixpath.join(self.root, remote)

    def _wrap(self, command: str, env: dict[str, str] | None) -> str:
        exports = "".join(f"export {k}={shlex.quote(v)}; " for k, v in (env or {}).items())
        root = shlex.quote(self.root)
        return f"mkdir -p {root} && cd {root} && exec bash -c {shlex.quote(exports + command)}"

    def _with_retry(self, fn: Callable[[paramiko.Transport], Any], *, idempotent: bool) -> Any:
        """Run fn on a live connection. A connection that dies is dropped; the next call
        re-resolves. Idempotent operations are retried once on a fresh connection."""
        for attempt in (1, 2):
            t = self._paramiko()
            try:
                return fn(t)
            except (OSError, EOFError, paramiko.SSHException, tarstream.LinkLost) as exc:
                with self._lock:     # whatever paramiko thinks yet, this connection is done
                    if self._client is not None and self._client.get_transport() is t:
                        self._drop()
                if not idempotent or attempt == 2:
                    raise tarstream.LinkLost(
                        f"connection to {self.name or 'the host'} at {self.endpoint} lost: "
                        f"{redact(str(exc)) or type(exc).__name__}",
                        hint="the transport reconnects on the next call") from None
                log.info("%s: connection lost (%s), retrying on a new connection",
                         self.name or "ssh", redact(str(exc)) or type(exc).__name__)
        raise AssertionError("unreachable")

    def run(self, command: str, *, timeout_s: float | None = None, check: bool = True,
            env: dict[str, str] | None = None, idempotent: bool = False) -> CommandResult:
        """Run a bash command on the host with cwd = root. A lost connection raises
        TransportError (and is retried once when `idempotent`)."""
        limit = timeout_s if timeout_s is not None else 24 * 3600.0
        start = time.monotonic()
        wrapped = self._wrap(command, env)

        def go(t: paramiko.Transport) -> tuple[int, bytes, bytes]:
            try:
                return tarstream.exec_capture(t, wrapped, timeout_s=limit)
            except TransportError as exc:
                if "timed out" in str(exc):
                    raise CommandError(redact(command), 124, "", hint=f"timed out after {limit:.0f} s") from None
                raise

        code, out, err = self._with_retry(go, idempotent=idempotent)
        result = CommandResult(command=redact(command), exit_code=code,
                               stdout=out.decode(errors="replace"), stderr=err.decode(errors="replace"),
                               duration_s=time.monotonic() - start)
        log.debug("%s: ran %r -> %d in %.2f s", self.name or "ssh", result.command, code, result.duration_s)
        if check and code != 0:
            lines = [ln for ln in (result.stdout + "\n" + result.stderr).splitlines() if ln.strip()]
            tail = "\n".join(lines[-20:])
            raise CommandError(redact(command), code, redact(tail))
        return result

    def start_detached(self, command: str, *, log_path: str, env: dict[str, str] | None = None) -> int:
        """Start `command` in its own session (setsid, all streams redirected) so it survives
        this connection; return its pid. Not retried: a retry could start a second copy."""
        logf = shlex.quote(self.abspath(log_path))
        inner = shlex.quote("".join(f"export {k}={shlex.quote(v)}; " for k, v in (env or {}).items())
                            + command)
        # In a non-interactive shell the background job is not a group leader, so setsid does
        # not fork again and $! is the pid of the new session's leader. Two statements (as in
        # transport/local.py): `mkdir && nohup … &` backgrounds the whole list in a subshell,
        # $! is then that subshell, and a kill of it leaves the real process running.
        script = (f"mkdir -p \"$(dirname {logf})\" || exit 1\n"
                  f"nohup setsid bash -c {inner} >>{logf} 2>&1 </dev/null &\necho $!")
        res = self.run(script, timeout_s=60)
        try:
            return int(res.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise TransportError(f"could not read the pid of a detached command: {res.stdout[-200:]!r}") from None

    def read_text(self, remote: str) -> str | None:
        path = shlex.quote(self.abspath(remote))
        res = self.run(f"if [ -f {path} ]; then cat -- {path}; else exit 44; fi", check=False,
                       timeout_s=120, idempotent=True)
        if res.exit_code == 44:
            return None
        if res.exit_code != 0:
            raise CommandError(f"cat {remote}", res.exit_code, redact(res.stderr))
        return res.stdout

    def write_text(self, remote: str, text: str) -> None:
        path = self.abspath(remote)
        q, tmp = shlex.quote(path), shlex.quote(f"{path}.tmp{time.monotonic_ns()}")
        cmd = f"mkdir -p \"$(dirname {q})\" && cat > {tmp} && mv -f {tmp} {q}"

        def go(t: paramiko.Transport) -> None:
            code, _o, err = tarstream.exec_capture(t, cmd, stdin=text.encode(), timeout_s=120)
            if code != 0:
                raise CommandError(f"write {remote}", code, redact(err.decode(errors="replace")))

        self._with_retry(go, idempotent=True)

    # -- files ------------------------------------------------------------------------------------
    def put(self, local: Path, remote: str, *, progress: ProgressFn | None = None) -> TransferStats:
        """Upload; a transfer cut by a dropped connection is resumed once on a new one."""
        dest = self.abspath(remote)
        return self._with_retry(lambda t: tarstream.put_tree(t, Path(local), dest, progress=progress),
                                idempotent=True)

    def get(self, remote: str, local: Path, *, progress: ProgressFn | None = None) -> TransferStats:
        src = self.abspath(remote)
        return self._with_retry(lambda t: tarstream.get_tree(t, src, Path(local), progress=progress),
                                idempotent=True)

    def __repr__(self) -> str:
        return f"SSHTransport({self.name or '?'} at {self.endpoint or 'not connected'})"


def _short(key: str) -> str:
    parts = key.split()
    return f"{parts[0]} …{parts[1][-12:]}" if len(parts) >= 2 else key


def auth_from_host(host_cfg: HostConfig) -> SSHAuth:
    """SSHAuth from a host's config: identity_file, or a password by reference (env/file)."""
    from ..secrets import read_secret
    identity = host_cfg.identity_file
    password_env = host_cfg.password_env
    password_file = host_cfg.password_file
    password = None
    if password_env or password_file:
        name = host_cfg.name or "host"
        password = read_secret(env=password_env, file=password_file, what=f"password for {name}")
    if identity and not Path(identity).expanduser().is_file():
        from ..errors import ConfigError
        raise ConfigError(f"identity_file {identity} does not exist",
                          hint="point identity_file at your private key (e.g. ~/.ssh/id_ed25519)")
    return SSHAuth(identity_file=identity, password=password)


def connect_ssh(provider: Provider, instance_id: str, host_cfg: HostConfig, *, ledger: Ledger,
                instance_row: Any, stop: threading.Event | None = None) -> SSHTransport:
    """The transport the runner uses for a provider whose transport_kind is 'ssh'.

    The endpoint comes from `provider.describe(instance_id)` at every (re)connect; a changed
    endpoint is written to the ledger (and to the managed ssh config when the user has one).
    The host key is pinned to the ledger's instance row at first contact."""
    row_id = instance_row if isinstance(instance_row, int) else instance_row.row_id
    name = host_cfg.name or instance_id
    last: list[str] = []

    def resolve() -> Endpoint:
        info = provider.describe(instance_id)
        if getattr(host_cfg, "interruptible", False) and info.state in ("stopped", "stopping"):
            # nobody here stopped it: the provider took an interruptible instance back (outbid);
            # it would return only when its bid wins again, so no reconnecting to it
            raise InstanceNotFound(f"{name}: instance {instance_id} was taken back by the provider "
                                   f"({info.raw_state or info.state.value})", provider=provider.name,
                                   instance_id=instance_id)
        if info.endpoint is None:
            raise ConnectError(f"{name}: the provider reports no SSH endpoint yet "
                               f"(state {info.raw_state or info.state.value})")
        ep = info.endpoint
        text = f"{ep.user}@[{ep.host}]:{ep.port}" if ":" in ep.host else str(ep)
        if not last or last[-1] != text:
            last.append(text)
            ledger.set_endpoint(row_id, text)
            _refresh_ssh_config(ledger)
        return info.endpoint

    auth = auth_from_host(host_cfg)
    if not auth.identity_file and not auth.password:
        keys = provider.identity_files()          # an ssh_alias's IdentityFile from ~/.ssh/config
        if keys:
            auth = SSHAuth(identity_file=keys[0])
    return SSHTransport(resolve, root=host_cfg.root or "~/orchestrate",
                        auth=auth, pinned_key=ledger.host_key(row_id),
                        on_first_key=lambda key: ledger.pin_host_key(row_id, key), name=name, stop=stop)


def _refresh_ssh_config(ledger: Any) -> None:
    """Rewrite the managed include file when the user has one (never adds the Include line)."""
    try:
        from .sshconfig import refresh_if_present
        refresh_if_present(ledger)
    except Exception as exc:  # noqa: BLE001 - a stale editor config must never stop a paid job
        log.warning("could not refresh the managed ssh config: %s", redact(str(exc)))
