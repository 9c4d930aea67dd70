"""Where an SSH host is: the `Endpoint` value and the parsers that produce one.

Stdlib only, no connection is opened here: providers report endpoints (`describe()`), the
transports connect to them, and both import this module. `ssh_g` asks the real OpenSSH client
how it would resolve an alias, so the user's ~/.ssh/config decides.
"""
from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
from dataclasses import dataclass

from ..errors import ProviderError


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int
    user: str = "root"
    jump: str | None = None      # ssh: "[user@]host[:port]" of a jump host (ProxyJump)

    def __str__(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"


_SSH_ARG_OPTS = set("BbcDEeFIiJLlmOopQRSWw")


def _parse_ssh_command(tokens: list[str], default_user: str) -> Endpoint:
    """The destination of an `ssh [options] [user@]host` command line."""
    port, user, dest = 22, None, None
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok.startswith("-") and len(tok) >= 2 and tok[1] in _SSH_ARG_OPTS:
            value = tok[2:] or (tokens[i + 1] if i + 1 < len(tokens) else "")
            i += 1 if tok[2:] else 2
            if tok[1] == "p":
                port = int(value)
            elif tok[1] == "l":
                user = value
            continue
        if tok.startswith("-"):
            i += 1
            continue
        if dest is None:
            dest = tok
        i += 1
    if not dest:
        raise ValueError("no host in the ssh command")
    if dest.startswith("ssh://"):
        return parse_endpoint(dest[6:], user or default_user)
    u, _, h = dest.rpartition("@")
    if not (0 < port < 65536):
        raise ValueError(f"bad port {port}")
    return Endpoint(host=h, port=port, user=u or user or default_user)


def parse_endpoint(text: str, default_user: str = "root") -> Endpoint:
    """`user@host:port`, `host:port`, `user@host`, `[v6]:port` or `ssh -p PORT user@host`."""
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    if not line:
        raise ValueError("empty output")
    if line.startswith("ssh "):
        return _parse_ssh_command(line.split()[1:], default_user)
    user, _, hostport = line.rpartition("@")
    if hostport.startswith("["):
        host, _, rest = hostport[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else 22
    elif hostport.count(":") == 1:
        host, _, p = hostport.partition(":")
        port = int(p)
    else:
        host, port = hostport, 22
    if not host or " " in host or not (0 < port < 65536):
        raise ValueError(f"not user@host:port: {line!r}")
    return Endpoint(host=host, port=port, user=user or default_user)


def ssh_g(alias: str, timeout_s: float = 10.0) -> dict[str, list[str]]:
    """The OpenSSH client's view of `alias` (`ssh -G`): option -> values. OpenSSH reads the
    passwd home's ~/.ssh/config (not $HOME); ORCHESTRATE_SSH_CONFIG names another file."""
    cfg = os.environ.get("ORCHESTRATE_SSH_CONFIG")
    argv = ["ssh", *(["-F", cfg] if cfg else []), "-G", alias]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True,
                              timeout=timeout_s, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ProviderError(f"cannot run `ssh -G {alias}`: {exc}", provider="ssh",
                            hint="install the OpenSSH client") from None
    if proc.returncode != 0:
        raise ProviderError(f"`ssh -G {alias}` failed: {proc.stderr.strip()[-200:]}", provider="ssh")
    opts: dict[str, list[str]] = {}
    for line in proc.stdout.splitlines():
        key, _, value = line.partition(" ")
        opts.setdefault(key.lower(), []).append(value.strip())
    return opts


def is_this_machine(host: str) -> bool:
    """True when `host` resolves to loopback or to an address of this machine."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror:
        return False
    for family, _type, _proto, _canon, sockaddr in infos:
        addr = str(sockaddr[0])
        ip = ipaddress.ip_address(addr.split("%")[0])
        if ip.is_loopback or ip.is_unspecified:
            return True
        try:   # binding succeeds only on an address this machine owns
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((addr, 0) if family == socket.AF_INET else (addr, 0, 0, 0))
            return True
        except OSError:
            continue
    return False
