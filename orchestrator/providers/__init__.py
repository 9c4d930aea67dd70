"""Provider registry. Modules are imported lazily so the controller starts fast and a
provider's optional dependencies are only needed when it is used."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from .base import (
    LABEL_PREFIX,
    BillingRules,
    Endpoint,
    InstanceInfo,
    InstanceSpec,
    InstanceState,
    Offer,
    Provider,
    make_label,
)

if TYPE_CHECKING:
    from ..config import HostConfig

# provider name in experiments.yaml -> "module:factory"; factory(host: HostConfig) -> Provider
REGISTRY: dict[str, str] = {
    "local": "orchestrator.providers.local:LocalProvider",
    "ssh": "orchestrator.providers.ssh:SSHProvider",
    "vastai": "orchestrator.providers.vastai:VastProvider",
    "runpod": "orchestrator.providers.runpod:RunPodProvider",
    "lambda": "orchestrator.providers.lambdalabs:LambdaProvider",
    "slurm": "orchestrator.providers.slurm:SlurmProvider",
}


def make_provider(host: HostConfig, **kwargs: Any) -> Provider:
    target = REGISTRY.get(host.provider)
    if target is None:
        raise ConfigError(f"unknown provider {host.provider!r}; known: {', '.join(sorted(REGISTRY))}")
    module_name, _, attr = target.partition(":")
    factory = getattr(importlib.import_module(module_name), attr)
    return factory(host, **kwargs)


__all__ = ["BillingRules", "Endpoint", "InstanceInfo", "InstanceSpec", "InstanceState", "Offer",
           "Provider", "REGISTRY", "make_provider", "make_label", "LABEL_PREFIX"]
