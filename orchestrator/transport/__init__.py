"""Transports: `local` (a work directory on this machine) and `ssh` (paramiko)."""
from __future__ import annotations

from .base import CommandResult, ProgressFn, TransferStats, Transport

__all__ = ["CommandResult", "ProgressFn", "TransferStats", "Transport"]
