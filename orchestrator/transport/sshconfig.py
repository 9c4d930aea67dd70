"""The managed OpenSSH config: `ssh <name>` and editors keep working when a host changes port.

One file, <ORCHESTRATE_HOME>/ssh_config, holds a `Host` block per live instance that has an
SSH endpoint in the ledger: its current HostName/Port/User, a `HostKeyAlias` naming the
instance (so the key is checked per instance, not per host:port) and a known-hosts file of its
own holding the pinned key. ~/.ssh/config gets one `Include` line for it, once, at the top.
Every write is atomic (temp file + rename), so an editor never reads half a file.
"""
from __future__ import annotations

import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MANAGED_NAME = "ssh_config"
HEADER = ("# Managed by `orchestrate ssh-config`; rewritten whenever an endpoint changes.\n"
          "# Do not edit: changes are lost. Included from ~/.ssh/config.\n")
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True, slots=True)
class HostEntry:
    name: str               # what the user types: `ssh <name>`
    aliases: tuple[str, ...]
    host: str
    port: int
    user: str
    instance_id: str
    host_key: str | None
    known_hosts: Path


def atomic_write(path: Path, text: str, mode: int = 0o600) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def managed_path(home: Path | str) -> Path:
    return Path(home) / MANAGED_NAME


def _slug(text: str) -> str:
    return _SAFE.sub("-", text).strip("-") or "host"


def host_entries(ledger: Any, home: Path | str) -> list[HostEntry]:
    """One entry per open instance with an endpoint; the newest instance of a host gets the
    host's own name, every instance also answers to its instance id."""
    from .endpoint import parse_endpoint
    rows = [r for r in ledger.instances(open_only=True) if r.endpoint and r.instance_id]
    rows.sort(key=lambda r: r.row_id, reverse=True)
    taken: set[str] = set()
    out: list[HostEntry] = []
    for r in rows:
        try:
            ep = parse_endpoint(r.endpoint)
        except ValueError:
            log.warning("ledger row %s has an unreadable endpoint; skipped", r.row_id)
            continue
        iid = _slug(r.instance_id)
        name = _slug(r.host_name)
        names = ([name] if name not in taken else []) + ([iid] if iid != name else [])
        taken.update(names)
        out.append(HostEntry(name=names[0], aliases=tuple(names[1:]), host=ep.host, port=ep.port,
                             user=ep.user, instance_id=r.instance_id, host_key=r.host_key,
                             known_hosts=Path(home) / "known_hosts.d" / iid))
    return out


def render(entries: list[HostEntry]) -> str:
    blocks = [HEADER]
    for e in entries:
        pinned = bool(e.host_key)
        blocks.append(
            f"\nHost {' '.join((e.name, *e.aliases))}\n"
            f"    HostName {e.host}\n"
            f"    Port {e.port}\n"
            f"    User {e.user}\n"
            f"    HostKeyAlias orchestrate-{_slug(e.instance_id)}\n"
            f"    UserKnownHostsFile \"{e.known_hosts}\"\n"
            f"    StrictHostKeyChecking {'yes' if pinned else 'accept-new'}\n"
            f"    ServerAliveInterval 15\n")
    return "".join(blocks)


def ensure_include(managed: Path, user_home: Path | str | None = None) -> bool:
    """Add `Include <managed>` at the top of ~/.ssh/config once; True when it was added."""
    home = Path(user_home) if user_home else Path.home()
    cfg = home / ".ssh" / "config"
    line = f'Include "{managed}"'
    current = cfg.read_text() if cfg.exists() else ""
    for existing in current.splitlines():
        words = existing.strip().split(None, 1)
        if len(words) == 2 and words[0].lower() == "include" and \
                words[1].strip('"') == str(managed):
            return False
    cfg.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    mode = cfg.stat().st_mode & 0o777 if cfg.exists() else 0o600
    # at the top: an Include after a Host line would only apply inside that block
    atomic_write(cfg, f"# added by orchestrate (managed hosts)\n{line}\n\n" + current, mode)
    return True


def update_ssh_config(ledger: Any, home: Path | str | None = None, *, user_home: Path | str | None = None,
                      add_include: bool = True) -> list[HostEntry]:
    """Rewrite the managed file (and known-hosts files) from the ledger; add the Include once."""
    from ..home import default_home
    home = Path(home) if home else default_home()
    entries = host_entries(ledger, home)
    kh_dir = home / "known_hosts.d"
    keep = set()
    for e in entries:
        keep.add(e.known_hosts.name)
        if e.host_key:
            kind, b64 = e.host_key.split()[:2]
            atomic_write(e.known_hosts, f"orchestrate-{_slug(e.instance_id)} {kind} {b64}\n", 0o600)
    if kh_dir.is_dir():   # instances that ended: their pins go with them
        for stale in kh_dir.iterdir():
            if stale.name not in keep and not stale.name.startswith("."):
                stale.unlink(missing_ok=True)
    managed = managed_path(home)
    atomic_write(managed, render(entries), 0o600)
    if add_include:
        ensure_include(managed, user_home)
    log.debug("ssh config: %d host(s) in %s", len(entries), managed)
    return entries


def refresh_if_present(ledger: Any) -> None:
    """Called when the runner learns a new endpoint: rewrite the managed file only when the
    user opted in by running `orchestrate ssh-config` once (never touches ~/.ssh/config)."""
    home = Path(ledger.path).parent
    if managed_path(home).exists():
        update_ssh_config(ledger, home, add_include=False)
