"""`orchestrate ssh-config [--json] [--no-include]` and `orchestrate ssh NAME [COMMAND...]`."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from typing import Any

from ..errors import ConfigError, TransportError
from ..ledger import Ledger, default_home
from ..transport.sshconfig import managed_path, update_ssh_config


def register(sub: Any) -> None:
    p = sub.add_parser("ssh-config", help="write ~/.ssh config entries for live instances",
                       description="Write one managed OpenSSH include file with a Host block per "
                                   "live instance (current port, pinned host key) and include it "
                                   "from ~/.ssh/config once, so `ssh NAME` and editors keep working "
                                   "when a host changes port.")
    p.add_argument("--no-include", action="store_true",
                   help="only write the managed file; leave ~/.ssh/config alone")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run_ssh_config)

    s = sub.add_parser("ssh", help="open a shell on a live instance",
                       description="Open an SSH session to a live instance by host name or instance id "
                                   "(uses the managed config, so the current port and pinned key).")
    s.add_argument("name", help="host name from experiments.yaml, or an instance id")
    s.add_argument("remote_command", nargs=argparse.REMAINDER, help="command to run instead of a shell")
    s.set_defaults(func=run_ssh)


def run_ssh_config(args: argparse.Namespace) -> int:
    home = default_home()
    ledger = Ledger.open(home)
    try:
        entries = update_ssh_config(ledger, home, add_include=not args.no_include)
    finally:
        ledger.close()
    path = managed_path(home)
    if args.json:
        sys.stdout.write(json.dumps({
            "config": str(path),
            "hosts": [{"name": e.name, "aliases": list(e.aliases), "host": e.host, "port": e.port,
                       "user": e.user, "instance_id": e.instance_id, "pinned": bool(e.host_key)}
                      for e in entries]}, indent=2) + "\n")
        return 0
    from rich.console import Console
    from rich.table import Table
    console = Console()
    if not entries:
        console.print(f"No live SSH instances; wrote an empty {path}.")
        return 0
    table = Table(title=f"hosts in {path}", title_justify="left")
    for col in ("name", "endpoint", "instance", "host key"):
        table.add_column(col)
    for e in entries:
        table.add_row(" ".join((e.name, *e.aliases)), f"{e.user}@{e.host}:{e.port}", e.instance_id,
                      "pinned" if e.host_key else "not yet seen")
    console.print(table)
    console.print(f"Connect with: ssh {entries[0].name}")
    return 0


def run_ssh(args: argparse.Namespace) -> int:
    home = default_home()
    ledger = Ledger.open(home)
    try:
        entries = update_ssh_config(ledger, home, add_include=False)
    finally:
        ledger.close()
    known = {n for e in entries for n in (e.name, *e.aliases)}
    if args.name not in known:
        raise ConfigError(f"no live instance called {args.name!r}"
                          + (f"; live: {', '.join(sorted(known))}" if known else "; none is live"),
                          hint="see `orchestrate status`")
    ssh = shutil.which("ssh")
    if ssh is None:
        raise TransportError("the OpenSSH client (ssh) is not installed",
                             hint="install openssh-client")
    argv = [ssh, "-F", str(managed_path(home)), args.name, *[a for a in args.remote_command if a != "--"]]
    sys.stdout.flush()
    os.execv(ssh, argv)
    return 0   # not reached
