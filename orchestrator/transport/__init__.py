"""Transports: `local` (a work directory on this machine) and `ssh` (paramiko).

`connect()` picks the transport a provider's instances are reached with. The SSH transport
is imported lazily so the local path needs no paramiko at import time.
"""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from ..errors import ConfigError
from .base import CommandResult, ProgressFn, TransferStats, Transport

if TYPE_CHECKING:   # types only: providers depend on transport.endpoint, not the other way
    from ..config import HostConfig
    from ..ledger import Ledger
    from ..providers.base import Provider


def connect(provider: Provider, instance_id: str, host_cfg: HostConfig, *, ledger: Ledger | None = None,
            instance_row: int | None = None, stop: threading.Event | None = None) -> Transport:
    """A transport to `instance_id` of `provider` (its `transport_kind` decides which)."""
    kind = provider.transport_kind
    if kind == "local":
        from .local import LocalTransport
        root = provider.work_root(instance_id)
        if root is None:
            raise ConfigError(f"provider {provider.name!r} reaches its instances locally but names no work root")
        return LocalTransport(root)
    if kind == "ssh":
        from .ssh import connect_ssh
        if ledger is None:   # the endpoint and the host key pin live in the ledger
            raise ConfigError("an SSH transport needs the ledger (endpoint history, host key pin)")
        return connect_ssh(provider, instance_id, host_cfg, ledger=ledger, instance_row=instance_row, stop=stop)
    raise ConfigError(f"provider {provider.name!r} has unknown transport kind {kind!r}")


__all__ = ["CommandResult", "ProgressFn", "TransferStats", "Transport", "connect"]
