"""Host entries for tests and tools: the same `HostConfig` the config reader builds.

Providers and transports receive typed host configs only; building one here (rather than a
dict or an ad-hoc class) keeps tests on the production path and fails loudly on a typo'd field.
"""
from __future__ import annotations

from typing import Any

from ..config import HostConfig

_DEFAULTS: dict[str, dict[str, Any]] = {
    "local": {"gpu": "cpu", "price_per_hour": 0.0},
    "ssh": {"gpu": "RTX 4090", "price_per_hour": 1.0},
    "vastai": {"gpu": "RTX 4090"},
    "runpod": {"gpu": "H100 PCIe"},
    "lambda": {"gpu": "A100 PCIe"},
}


def make_host(provider: str = "local", name: str | None = None, **fields: Any) -> HostConfig:
    """A host entry of `provider` with the given fields (the provider's usual defaults otherwise)."""
    return HostConfig(name=name or provider, provider=provider, **{**_DEFAULTS.get(provider, {}), **fields})
