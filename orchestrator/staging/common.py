"""What both kinds of staging share: the cache key, the payload command line, the check."""
from __future__ import annotations

import hashlib
import json
import shlex
from collections.abc import Callable
from typing import TYPE_CHECKING

from remote_payload.contract import EXIT_BAD_DATA

from ..errors import DatasetInvalid, StagingError

if TYPE_CHECKING:
    from ..transport.base import Transport

StageProgress = Callable[[str, int, "int | None"], None]   # (message, done_bytes, total_bytes)


def content_key(obj: object) -> str:
    """First 16 hex of the sha256 of the canonical JSON of `obj`."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def payload_cmd(python: str, payload_dir: str, args: str) -> str:
    return f"PYTHONPATH={shlex.quote(payload_dir)} {shlex.quote(python)} -m {args}"


def check_remote(transport: Transport, scene_dir: str, *, python: str, payload_dir: str) -> None:
    """Run `remote_payload check-data` on the host; raise DatasetInvalid with its one line."""
    res = transport.run(payload_cmd(python, payload_dir, f"remote_payload check-data {shlex.quote(scene_dir)}"),
                        check=False, timeout_s=600)
    if res.exit_code == EXIT_BAD_DATA:
        line = (res.stderr.strip() or res.stdout.strip() or "invalid dataset").splitlines()[-1]
        raise DatasetInvalid(f"dataset at {scene_dir} is not usable: {line}",
                             hint="fix or replace the dataset; nothing was trained")
    if res.exit_code != 0:
        raise StagingError(f"check-data failed on the host (exit {res.exit_code}): "
                           f"{(res.stderr or res.stdout).strip()[-300:]}")
