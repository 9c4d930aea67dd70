"""Transports: `local` (a work directory on this machine) and `ssh` (paramiko).

`connect()` picks the transport a provider's instances are reached with. The SSH transport
is imported lazily so the local path needs no paramiko at import time.
"""
from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .base import CommandResult, ProgressFn, TransferStats, Transport


def connect(provider: Any, instance_id: str, host_cfg: Any, *, ledger: Any = None,
            instance_row: Any = None, stop: Any = None) -> Transport:
    """A transport to `instance_id` of `provider` (its `transport_kind` decides which)."""
    kind = getattr(provider, "transport_kind", "")
    if kind == "local":
        from .local import LocalTransport
        return LocalTransport(provider.work_root(instance_id))
    if kind == "ssh":
        from .ssh import connect_ssh
        return connect_ssh(provider, instance_id, host_cfg, ledger=ledger, instance_row=instance_row, stop=stop)
    raise ConfigError(f"provider {getattr(provider, 'name', provider)!r} has unknown transport kind {kind!r}")


__all__ = ["CommandResult", "ProgressFn", "TransferStats", "Transport", "connect"]
