"""The provider interface: a small set of calls, plain dataclasses across the boundary.

Providers talk to their API only: they never open SSH and never write the ledger (a boundary
test enforces both). The SSH endpoint is never cached by callers: read it from `describe()`
before every connect. Optional capabilities (sharing one machine, a boot guard, a self-stop
command, a shutdown the controller runs over SSH, where the work root is, which keys to offer,
whether create needs our public key, interruptible offers)
are declared on `Provider` with defaults, so callers never probe with getattr.
"""
from __future__ import annotations

import builtins
import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

from ..transport.endpoint import Endpoint


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
class Offer:
    provider: str
    gpu: str
    price_per_hour: float
    currency: str = "USD"
    region: str = ""
    available: bool = True
    offer_id: str | None = None
    gpu_count: int = 1
    # What else the offer bills, where the provider prices it per offer (vast.ai): storage
    # while the instance exists (and alone while stopped), and traffic per GB each way.
    storage_price_per_hour: float | None = None
    upload_price_per_gb: float | None = None      # into the instance (our dataset upload)
    download_price_per_gb: float | None = None    # out of the instance (results we pull)
    inet_down_mbps: float | None = None   # where the API reports it (vast `inet_down`)
    reliability: float | None = None      # 0..1 where the API reports it (vast `reliability2`)
    # An interruptible (bid) offer: price_per_hour is the bid we would place, min_bid the
    # provider's current minimum (vast `min_bid`); what bills is the bid.
    interruptible: bool = False
    min_bid: float | None = None


@dataclass(frozen=True, slots=True)
class InstanceSpec:
    """What to create. `label` carries the run and job id (see `make_label`)."""
    label: str
    gpu: str
    offer_id: str | None = None
    max_price_per_hour: float | None = None
    bid_per_hour: float | None = None    # set: rent it as an interruptible instance at this bid
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


class Provider(ABC):
    """What every provider implements (the calls) and may declare (the capabilities)."""

    name: ClassVar[str]
    transport_kind: ClassVar[str]            # "local" or "ssh": which transport reaches its instances
    billing: BillingRules = BillingRules()     # per instance where the price list says so
    shares_machine: ClassVar[bool] = False   # every instance is one machine: concurrent jobs split it
    needs_ssh_public_key: bool = False       # create must carry the run's key, or nothing can connect
    # rents interruptible (bid) instances: `offers` of an `interruptible: true` host are bid offers
    # priced at the bid, and `create` places the spec's `bid_per_hour`; an instance the provider
    # takes back (outbid) reads STOPPED though nobody stopped it
    interruptible_offers: ClassVar[bool] = False

    @abstractmethod
    def offers(self, gpu: str) -> list[Offer]: ...
    @abstractmethod
    def create(self, spec: InstanceSpec) -> str: ...
    @abstractmethod
    def start(self, instance_id: str) -> None: ...
    @abstractmethod
    def stop(self, instance_id: str) -> None: ...
    @abstractmethod
    def destroy(self, instance_id: str) -> None: ...
    @abstractmethod
    def describe(self, instance_id: str) -> InstanceInfo: ...
    @abstractmethod
    def list(self, label_prefix: str) -> builtins.list[InstanceInfo]: ...

    # -- capabilities, with the default of a provider that has none ------------------------------
    def self_stop_command(self, instance_id: str) -> str | None:
        """A shell command that stops this instance when run ON the instance, without the
        controller (used by the on-host watchdog); None when the provider has none."""
        return None

    def boot_guard(self, *, root: str, idle_timeout_s: float) -> str | None:
        """A start-up command that stops the instance when no controller shows up (vast.ai
        `onstart`, RunPod start command); None when the provider cannot run one."""
        return None

    def host_shutdown_command(self, instance_id: str) -> str | None:
        """A command the controller runs on the host over SSH to stop the meter before `stop`
        (a machine rented by hand that stops billing when it powers off); None: `stop` suffices."""
        return None

    def work_root(self, instance_id: str) -> str | None:
        """The instance's work root when the provider fixes it (the local provider's directory);
        None: the transport's default (`host.root` or `~/orchestrate`)."""
        return None

    def identity_files(self) -> builtins.list[str]:
        """Private keys to offer when the host config names none (an ssh alias's IdentityFile)."""
        return []
