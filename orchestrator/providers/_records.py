"""Instance records of the providers that have no API of their own (local, ssh).

One JSON file per instance id in a state directory, written atomically (temp + rename) so a
controller killed mid-write leaves the old record, never half of one.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import InstanceNotFound, ProviderError
from ..home import iso


class InstanceRecords:
    """`<state_dir>/<instance_id>.json` for the provider `provider` ("local instance", ...)."""

    def __init__(self, state_dir: Path, provider: str, noun: str) -> None:
        self.state_dir = state_dir
        self.provider = provider
        self.noun = noun                     # how errors name an instance: "local instance"

    def path(self, instance_id: str) -> Path:
        if not instance_id or "/" in instance_id or instance_id.startswith("."):
            raise InstanceNotFound(f"not a {self.noun} id: {instance_id!r}", provider=self.provider,
                                   instance_id=instance_id)
        return self.state_dir / f"{instance_id}.json"

    def read(self, instance_id: str) -> dict[str, Any]:
        try:
            return json.loads(self.path(instance_id).read_text())
        except FileNotFoundError:
            raise InstanceNotFound(f"{self.noun} {instance_id} does not exist", provider=self.provider,
                                   instance_id=instance_id) from None
        except (OSError, ValueError) as exc:
            raise ProviderError(f"cannot read {self.noun} {instance_id}: {exc}", provider=self.provider,
                                instance_id=instance_id) from None

    def write(self, instance_id: str, data: dict[str, Any]) -> None:
        path = self.path(instance_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**data, "updated_at": iso()}, indent=1))
        os.replace(tmp, path)

    def all(self) -> Iterator[dict[str, Any]]:
        """Every readable record, in id order (an unreadable file is skipped, not fatal)."""
        if not self.state_dir.is_dir():
            return
        for path in sorted(self.state_dir.glob("*.json")):
            try:
                yield json.loads(path.read_text())
            except (OSError, ValueError):
                continue
