"""Snapshots: everything needed to resume training or render, in one torch file (atomic write)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .errors import SnapshotError

FORMAT = "ngp_train.snapshot/1"


def save_snapshot(path: str | Path, state: dict[str, Any]) -> Path:
    """Write `state` (plus the format tag) to `path` via a temporary file and rename."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    torch.save({"format": FORMAT, **state}, tmp)
    os.replace(tmp, p)
    return p


def load_snapshot(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise SnapshotError(f"{p}: snapshot does not exist")
    try:
        state = torch.load(p, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a corrupt file
        raise SnapshotError(f"{p}: not a readable snapshot ({type(e).__name__}); delete it to start over") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise SnapshotError(f"{p}: not an ngp_train snapshot (expected format {FORMAT})")
    return state
