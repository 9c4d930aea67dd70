"""A jump host (ProxyJump) for the ssh transport: a direct-tcpip channel through it.

paramiko opens a session to the jump host and asks it for a TCP channel to the target; the
target's SSH session then runs inside that channel (`connect(sock=channel)`), as OpenSSH's
`ssh -J` does. Chosen over fabric's gateway Connection: these few lines reuse the transport's
own auth and host-key pinning, and nothing else in the project imports fabric.

The target's host key is pinned as always (the channel is end-to-end to the target); the jump
host's key is logged, not pinned: it sees only encrypted traffic.
"""
from __future__ import annotations

import logging
from typing import Any

import paramiko

from ..errors import ConnectError
from .endpoint import Endpoint

log = logging.getLogger(__name__)


def parse_jump(spec: str, default_user: str) -> Endpoint:
    """`[user@]host[:port]` (one hop; OpenSSH's comma-separated chains are refused)."""
    spec = spec.strip()
    if spec.startswith("ssh://"):
        spec = spec[6:]
    if "," in spec:
        raise ConnectError(f"proxy_jump {spec!r}: only one jump host is supported",
                           hint="give the last hop, or put the chain in ~/.ssh/config behind an alias")
    user, _, hostport = spec.rpartition("@")
    host, port = hostport, 22
    if hostport.startswith("["):
        host, _, rest = hostport[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else 22
    elif hostport.count(":") == 1:
        host, _, p = hostport.partition(":")
        port = int(p)
    if not host:
        raise ConnectError(f"proxy_jump {spec!r} is not [user@]host[:port]")
    return Endpoint(host=host, port=port, user=user or default_user)


class _LogKey(paramiko.MissingHostKeyPolicy):
    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        log.info("jump host %s presents %s key …%s", hostname, key.get_name(), key.get_base64()[-12:])


def open_jump_channel(target: Endpoint, connect_kwargs: dict[str, Any],
                      timeout_s: float) -> tuple[paramiko.SSHClient, paramiko.Channel]:
    """Log in to the jump host with the target's credentials; a channel to the target."""
    assert target.jump
    jump = parse_jump(target.jump, target.user)
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(_LogKey())
    kw = {k: v for k, v in connect_kwargs.items() if k not in ("hostname", "port", "username",
                                                                 "disabled_algorithms", "sock")}
    try:
        client.connect(hostname=jump.host, port=jump.port, username=jump.user, **kw)
        t = client.get_transport()
        assert t is not None
        channel = t.open_channel("direct-tcpip", (target.host, target.port), ("127.0.0.1", 0),
                                 timeout=timeout_s)
    except BaseException:
        client.close()
        raise
    log.info("connected to %s through jump host %s", target, jump)
    return client, channel
