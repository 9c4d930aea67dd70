"""The provider interface: a small set of calls, plain dataclasses across the boundary.

Providers talk to their API only: they never open SSH and never write the ledger. The SSH
endpoint is never cached by callers: read it from `describe()` before every connect.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


class InstanceState(str, enum.Enum):
    PENDING = "pending"        # accepted by the provider, not yet booting
    BOOTING = "booting"        # starting; no usable SSH yet
    RUNNING = "running"        # up; the endpoint (if any) is usable
    STOPPING = "stopping"
    STOPPED = "stopped"        # not billed for GPU; storage may still be billed
    TERMINATED = "terminated"  # gone; nothing billed
    ERROR = "error"            # the provider says it failed (may still need destroy)
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int
    user: str = "root"
    jump: str | None = None      # ssh: "[user@]host[:port]" of a jump host (ProxyJump)

    def __str__(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Offer:
    provider: str
    gpu: str
    price_per_hour: float
    currency: str = "USD"
    region: str = ""
    available: bool = True
    offer_id: str | None = None
    gpu_count: int = 1


@dataclass(frozen=True, slots=True)
class InstanceSpec:
    """What to create. `label` carries the run and job id (see `make_label`)."""
    label: str
    gpu: str
    offer_id: str | None = None
    max_price_per_hour: float | None = None
    image: str | None = None
    disk_gb: float = 20.0
    region: str | None = None
    onstart: str | None = None
    ssh_public_key: str | None = None
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class InstanceInfo:
    instance_id: str
    state: InstanceState
    label: str = ""
    endpoint: Endpoint | None = None
    gpu: str = ""
    price_per_hour: float | None = None
    currency: str = "USD"
    raw_state: str = ""        # the provider's own word, for messages


@dataclass(frozen=True, slots=True)
class BillingRules:
    granularity_s: float = 1.0            # GPU time is rounded up to this
    storage_price_per_hour: float = 0.0   # billed while stopped
    minimum_s: float = 0.0                # smallest billable interval


LABEL_PREFIX = "orch"


def make_label(run_id: str, job_id: str) -> str:
    """The label every instance is created with: `orch-<run_id>-<job_id>`."""
    return f"{LABEL_PREFIX}-{run_id}-{job_id}"


@runtime_checkable
class Provider(Protocol):
    name: str
    transport_kind: str      # "local" or "ssh": which transport reaches its instances
    billing: BillingRules

    def offers(self, gpu: str) -> list[Offer]: ...
    def create(self, spec: InstanceSpec) -> str: ...
    def start(self, instance_id: str) -> None: ...
    def stop(self, instance_id: str) -> None: ...
    def destroy(self, instance_id: str) -> None: ...
    def describe(self, instance_id: str) -> InstanceInfo: ...
    def list(self, label_prefix: str) -> list[InstanceInfo]: ...

    def self_stop_command(self, instance_id: str) -> str | None:
        """A shell command that stops this instance when run ON the instance, without the
        controller (used by the on-host watchdog); None when the provider has none."""
        ...
