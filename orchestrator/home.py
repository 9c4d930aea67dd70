"""Where orchestrate keeps its state on this machine, and how its records write time.

A leaf (stdlib only) so that every part can name `$ORCHESTRATE_HOME` and timestamps without
depending on the ledger: providers keep their instance records under it, the ledger its file.
"""
from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path


def default_home() -> Path:
    """`$ORCHESTRATE_HOME`, else `$XDG_STATE_HOME/orchestrate` (`~/.local/state/orchestrate`)."""
    env = os.environ.get("ORCHESTRATE_HOME")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "orchestrate"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def iso(t: datetime | float | None = None) -> str:
    """ISO 8601 in UTC with microseconds: the one timestamp format of every record."""
    if t is None:
        t = utcnow()
    elif isinstance(t, (int, float)):
        t = datetime.fromtimestamp(t, timezone.utc)
    return t.isoformat(timespec="microseconds")
