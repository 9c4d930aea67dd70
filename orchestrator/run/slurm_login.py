"""The login node of a Slurm host: an SSH transport bound to its `SlurmProvider`.

Kept apart from `run.slurm` (the array flow, which needs the runner) so that `reconcile` and
`commands.down` can reach a cluster's scheduler without importing the runner.
"""
from __future__ import annotations

from typing import Any, cast

from ..providers.slurm import SlurmProvider, with_setup
from ..transport.base import Transport
from ..transport.ssh import SSHTransport, auth_from_host

COMMAND_TIMEOUT_S = 120.0


def login_transport(provider: SlurmProvider, host: Any, *, reconnect_deadline_s: float = 300.0) -> Transport:
    """An SSH transport to the login node, bound to `provider` (its commands run through it).
    The host key is pinned at first contact for the life of the connection."""
    holder: dict[str, SSHTransport] = {}

    def pin(key: str) -> None:
        holder["t"].pinned_key = key

    t = SSHTransport(provider.resolve_endpoint, root=host.root or "~/orchestrate", auth=auth_from_host(host),
                     on_first_key=pin, name=host.name, reconnect_deadline_s=reconnect_deadline_s)
    holder["t"] = t

    def execute(command: str) -> tuple[int, str, str]:
        res = t.run(command, check=False, timeout_s=COMMAND_TIMEOUT_S)
        return res.exit_code, res.stdout, res.stderr

    provider.bind(execute)
    return cast(Transport, _WithSetup(t, host))


class _WithSetup:
    """The login-node transport with the host's `setup` run before every command, so staging
    and the data check find the same `python` (modules, a conda env) as the tasks do."""

    def __init__(self, inner: SSHTransport, host: Any) -> None:
        self.inner = inner
        self.host = host

    @property
    def root(self) -> str:
        return self.inner.root

    def run(self, command: str, **kwargs: Any) -> Any:
        return self.inner.run(with_setup(self.host, command), **kwargs)

    def start_detached(self, command: str, **kwargs: Any) -> int:
        return self.inner.start_detached(with_setup(self.host, command), **kwargs)

    def __getattr__(self, name: str) -> Any:   # put, get, read_text, write_text, close
        return getattr(self.inner, name)


def bind_login(provider: Any, host: Any) -> Transport | None:
    """For `down` and the orphan checks of `run` and `status`: a Slurm provider gets its
    login-node connection (returned, for the caller to close; a login node that does not answer
    is given up after 30 s); any other provider is left as it is (None)."""
    if not isinstance(provider, SlurmProvider):
        return None
    return login_transport(provider, host, reconnect_deadline_s=30.0)
