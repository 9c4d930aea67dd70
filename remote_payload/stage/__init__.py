"""Host-side dataset staging (issue #7): probe mirrors, resumable download with fail-over,
safe extraction, validation, content-addressed cache. Standard library only (+ ngp_train's check).

Run as `python -m remote_payload stage ...`; see `cli`.
"""
from __future__ import annotations

from .errors import BadData, NoMirror, StageError

__all__ = ["BadData", "NoMirror", "StageError", "main"]


def main(argv: list[str] | None = None) -> int:
    from .cli import main as _main
    return _main(argv)
