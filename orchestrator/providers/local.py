"""The `local` provider: "instances" are work directories on this machine.

It is the embedded default (no account, no network) and behaves like a rented host where it
matters to the runner: create/stop/destroy/describe/list with a label, a price per hour
(simulated, `host.price_per_hour`, default 0) billed per second, and a `stop` that really
ends the instance's processes. Every process the runner starts on an instance carries
`ORCHESTRATE_INSTANCE=<id>` in its environment; `stop` finds them by that marker in
/proc/<pid>/environ (never by name), sends SIGTERM (the pipeline snapshots), then SIGKILL.

The work root (`host.root`, default `<ORCHESTRATE_HOME>/hosts/<name>`) is the host's disk:
it outlives `destroy`, so the dataset cache and a job's snapshot are found again by a rerun.
"""
from __future__ import annotations

import logging
import os
import secrets
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ProviderError
from ..home import default_home, iso
from ._records import InstanceRecords
from .base import BillingRules, InstanceInfo, InstanceSpec, InstanceState, Offer, Provider

if TYPE_CHECKING:
    from ..config import HostConfig

log = logging.getLogger(__name__)

MARKER = "ORCHESTRATE_INSTANCE"


class LocalProvider(Provider):
    name = "local"
    shares_machine = True          # every instance is this machine: concurrent jobs split its CPUs
    transport_kind = "local"
    billing = BillingRules(granularity_s=1.0)

    def __init__(self, host: HostConfig | None, *, home: Path | str | None = None) -> None:
        """`host` None: a provider that only acts on existing instances by id (the watchdog's
        `python -m orchestrator.providers.local stop ID`)."""
        self.home = Path(home) if home else default_home()
        self.host_name = (host.name if host else "") or "local"
        root = host.root if host else None
        self.root = Path(root).expanduser() if root else self.home / "hosts" / self.host_name
        self.gpu = (host.gpu if host else "") or "cpu"
        self.price_per_hour = float((host.price_per_hour if host else None) or 0.0)
        self.currency = (host.currency if host else "") or "USD"
        self.state_dir = self.home / "local-instances"
        self.records = InstanceRecords(self.state_dir, self.name, "local instance")

    # -- state files ----------------------------------------------------------------------
    def _info(self, data: dict[str, Any]) -> InstanceInfo:
        return InstanceInfo(instance_id=data["id"], state=InstanceState(data["state"]),
                            label=data.get("label", ""), endpoint=None, gpu=data.get("gpu", ""),
                            price_per_hour=data.get("price_per_hour"),
                            currency=data.get("currency", "USD"), raw_state=data["state"])

    # -- the Provider protocol -------------------------------------------------------------
    def offers(self, gpu: str) -> list[Offer]:
        return [Offer(provider=self.name, gpu=self.gpu, price_per_hour=self.price_per_hour,
                      currency=self.currency, region="localhost")]

    def create(self, spec: InstanceSpec) -> str:
        instance_id = f"{self.host_name}-{secrets.token_hex(4)}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ProviderError(f"cannot create the local work root {self.root}: {exc.strerror or exc}",
                                provider=self.name, hint="set host.root to a writable directory") from None
        self.records.write(instance_id, {"id": instance_id, "label": spec.label, "state": "running",
                                         "root": str(self.root), "gpu": self.gpu,
                                         "price_per_hour": self.price_per_hour, "currency": self.currency,
                                         "created_at": iso()})
        return instance_id

    def start(self, instance_id: str) -> None:
        data = self.records.read(instance_id)
        if data["state"] == "terminated":
            raise ProviderError(f"local instance {instance_id} was destroyed", provider=self.name,
                                instance_id=instance_id)
        self.records.write(instance_id, {**data, "state": "running"})

    def stop(self, instance_id: str) -> None:
        data = self.records.read(instance_id)
        kill_marked(instance_id)
        if data["state"] != "terminated":
            self.records.write(instance_id, {**data, "state": "stopped"})

    def destroy(self, instance_id: str) -> None:
        data = self.records.read(instance_id)
        kill_marked(instance_id)
        self.records.write(instance_id, {**data, "state": "terminated"})

    def describe(self, instance_id: str) -> InstanceInfo:
        return self._info(self.records.read(instance_id))

    def list(self, label_prefix: str) -> list[InstanceInfo]:
        out = []
        for data in self.records.all():
            if str(data.get("label", "")).startswith(label_prefix):
                out.append(self._info(data))
        return out

    def self_stop_command(self, instance_id: str) -> str | None:
        """Run on this machine by the watchdog: the same stop the controller would make."""
        root = Path(__file__).resolve().parents[2]
        return (f"PYTHONPATH={shlex.quote(str(root))} ORCHESTRATE_HOME={shlex.quote(str(self.home))} "
                f"{shlex.quote(sys.executable)} -m orchestrator.providers.local stop "
                f"{shlex.quote(instance_id)}")

    def work_root(self, instance_id: str) -> str:
        return str(self.records.read(instance_id).get("root") or self.root)


# -- processes ------------------------------------------------------------------------------
def _ancestors() -> set[int]:
    pids, pid = {os.getpid()}, os.getpid()
    for _ in range(64):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            pid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
        if pid <= 1:
            break
        pids.add(pid)
    return pids


def marked_pids(instance_id: str) -> list[int]:
    """Pids of processes whose environment carries ORCHESTRATE_INSTANCE=<instance_id>."""
    needle = f"{MARKER}={instance_id}".encode()
    skip = _ancestors()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in skip:
            continue
        try:
            env = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in env.split(b"\0"):
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def kill_marked(instance_id: str, grace_s: float = 20.0) -> int:
    """SIGTERM every marked process, SIGKILL what is left after `grace_s`; return the count."""
    pids = marked_pids(instance_id)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    for pid in pids:
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    if pids:
        log.info("local instance %s: ended %d process(es)", instance_id, len(pids))
    return len(pids)


def _main(argv: list[str]) -> int:
    """`python -m orchestrator.providers.local stop ID`: the watchdog's stop command."""
    if len(argv) != 2 or argv[0] != "stop":
        sys.stderr.write("usage: python -m orchestrator.providers.local stop INSTANCE_ID\n")
        return 2
    provider = LocalProvider(None)
    try:
        provider.stop(argv[1])
    except ProviderError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
