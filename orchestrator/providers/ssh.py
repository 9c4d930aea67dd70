"""The `ssh` provider: a host the user rented by hand and reaches over SSH.

There is no API: "create" registers the host under a label (a small state file in
<ORCHESTRATE_HOME>/ssh-instances/), and the endpoint comes from the configuration, re-read at
every `describe()` because rented hosts change port on restart:

- `host`/`port`/`user` as written;
- `ssh_alias`: resolved by the real OpenSSH client (`ssh -G alias`), so ~/.ssh/config decides;
- `endpoint_command`: run locally, prints `user@host:port` (or `ssh -p PORT user@host`).

Stopping the meter: `stop_command` runs locally (a rental platform's CLI), or with
`shutdown_on_host` the host runs `shutdown -h now`. A shutdown is refused when the endpoint
resolves to this machine (loopback or one of its own addresses), whatever the config says.
"""
from __future__ import annotations

import builtins
import logging
import os
import secrets
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, ProviderError
from ..home import default_home, iso
from ..secrets import redact
from ..transport.endpoint import Endpoint, is_this_machine, parse_endpoint, ssh_g
from ._records import InstanceRecords
from .base import BillingRules, InstanceInfo, InstanceSpec, InstanceState, Offer, Provider

if TYPE_CHECKING:
    from ..config import HostConfig

log = logging.getLogger(__name__)

SHUTDOWN_COMMAND = "sudo -n shutdown -h now 2>/dev/null || shutdown -h now"
COMMAND_TIMEOUT_S = 60.0


def _run_local(command: str, what: str, timeout_s: float = COMMAND_TIMEOUT_S) -> str:
    """Run a user-configured shell command on this machine; return its stdout."""
    try:
        proc = subprocess.run(command, shell=True, capture_output=True, text=True,
                              timeout=timeout_s, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise ProviderError(f"{what} timed out after {timeout_s:.0f} s: {redact(command)}",
                            provider="ssh") from None
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise ProviderError(f"{what} failed (exit {proc.returncode}): {redact(command)}"
                            + (f": {redact(tail)}" if tail else ""), provider="ssh")
    return proc.stdout


class SSHProvider(Provider):
    """Provider for hand-rented SSH hosts (see the module docstring)."""

    name = "ssh"
    shares_machine = True          # one rented machine: concurrent jobs on it split its CPUs
    transport_kind = "ssh"
    billing = BillingRules(granularity_s=1.0)

    def __init__(self, host: HostConfig, *, home: Path | str | None = None) -> None:
        self.home = Path(home) if home else default_home()
        self.host_name = host.name or "ssh"
        self.host_cfg = host
        self.address = host.host
        self.port = int(host.port or 22)
        self.user = host.user or "root"
        self.ssh_alias = host.ssh_alias
        self.endpoint_command = host.endpoint_command
        self.stop_command = host.stop_command
        self.proxy_jump = host.proxy_jump
        self.shutdown_on_host = bool(host.shutdown_on_host)
        self.gpu = host.gpu or ""
        self.price_per_hour = float(host.price_per_hour) if host.price_per_hour is not None else None
        self.currency = host.currency or "USD"
        self.state_dir = self.home / "ssh-instances"
        self.records = InstanceRecords(self.state_dir, self.name, "ssh instance")
        sources = [k for k, v in (("host", self.address), ("ssh_alias", self.ssh_alias),
                                  ("endpoint_command", self.endpoint_command)) if v]
        if len(sources) != 1:
            raise ConfigError(
                f"host {self.host_name}: give exactly one of host, ssh_alias, endpoint_command"
                + (f" (got {', '.join(sources)})" if sources else ""),
                hint="e.g. endpoint_command: \"platform-cli ssh-url my-h100\" (prints user@host:port)")
        if self.price_per_hour is None:
            raise ConfigError(f"host {self.host_name}: price_per_hour is required for an ssh host",
                              hint="write what the rental costs per hour, e.g. price_per_hour: 15")

    # -- endpoint ---------------------------------------------------------------------------------
    def resolve_endpoint(self) -> Endpoint:
        """The endpoint right now (never cached), with its jump host: `proxy_jump`, else the
        ProxyJump that `ssh -G` reports for an alias."""
        import dataclasses
        ep = self._resolve_direct()
        jump = self.proxy_jump
        if not jump and self.ssh_alias:
            value = ssh_g(self.ssh_alias).get("proxyjump", ["none"])[0]
            jump = None if value.lower() == "none" else value
        return dataclasses.replace(ep, jump=jump) if jump else ep

    def _resolve_direct(self) -> Endpoint:
        if self.endpoint_command:
            out = _run_local(self.endpoint_command, f"endpoint_command of {self.host_name}")
            try:
                return parse_endpoint(out, self.user)
            except ValueError as exc:
                raise ProviderError(f"endpoint_command of {self.host_name} printed something that is "
                                    f"not user@host:port ({redact(str(exc))})", provider=self.name,
                                    hint="it must print one line like root@1.2.3.4:22022") from None
        if self.ssh_alias:
            opts = ssh_g(self.ssh_alias)
            return Endpoint(host=opts.get("hostname", [self.ssh_alias])[0],
                            port=int(opts.get("port", ["22"])[0]),
                            user=opts.get("user", [self.user])[0])
        return Endpoint(host=str(self.address), port=self.port, user=self.user)

    def identity_files(self) -> builtins.list[str]:
        """Keys the user's ssh config names for the alias (used when identity_file is unset)."""
        if not self.ssh_alias:
            return []
        files = [os.path.expanduser(f) for f in ssh_g(self.ssh_alias).get("identityfile", [])]
        return [f for f in files if os.path.isfile(f)]

    # -- state files ------------------------------------------------------------------------------
    def _info(self, data: dict[str, Any], endpoint: Endpoint | None) -> InstanceInfo:
        return InstanceInfo(instance_id=data["id"], state=InstanceState(data["state"]),
                            label=data.get("label", ""), endpoint=endpoint, gpu=self.gpu,
                            price_per_hour=self.price_per_hour, currency=self.currency,
                            raw_state=data["state"])

    # -- the Provider protocol --------------------------------------------------------------------
    def offers(self, gpu: str) -> list[Offer]:
        return [Offer(provider=self.name, gpu=self.gpu or gpu, price_per_hour=self.price_per_hour or 0.0,
                      currency=self.currency, region=self.host_name)]

    def create(self, spec: InstanceSpec) -> str:
        """Register the host (there is nothing to rent: the user already did)."""
        instance_id = f"{self.host_name}-{secrets.token_hex(4)}"
        self.records.write(instance_id, {"id": instance_id, "label": spec.label, "state": "running",
                                         "host_name": self.host_name, "created_at": iso()})
        return instance_id

    def start(self, instance_id: str) -> None:
        data = self.records.read(instance_id)
        if data["state"] == "terminated":
            raise ProviderError(f"ssh instance {instance_id} was released", provider=self.name,
                                instance_id=instance_id)
        self.records.write(instance_id, {**data, "state": "running"})

    def stop(self, instance_id: str) -> None:
        """Stop paying: `stop_command` locally. With `shutdown_on_host` the controller has already
        run `host_shutdown_command` on the host over SSH (run.release); this records the stop."""
        data = self.records.read(instance_id)
        if data["state"] in ("stopped", "terminated"):
            return
        if self.stop_command:
            _run_local(self.stop_command, f"stop_command of {self.host_name}", timeout_s=300)
        elif not self.shutdown_on_host:
            log.warning("%s: no stop_command and no shutdown_on_host: the host keeps running "
                        "(and billing) until you stop it yourself", self.host_name)
        self.records.write(instance_id, {**data, "state": "stopped"})

    def host_shutdown_command(self, instance_id: str) -> str | None:
        """`shutdown -h now` for the controller to run on the host, refused on this machine."""
        if not self.shutdown_on_host or self.stop_command:
            return None
        if self.records.read(instance_id)["state"] in ("stopped", "terminated"):
            return None
        ep = self.resolve_endpoint()
        if is_this_machine(ep.host):
            raise ProviderError(
                f"refusing `shutdown -h now` on {self.host_name}: {ep.host} is this machine",
                provider=self.name, instance_id=instance_id,
                hint="use stop_command for this host, or point it at the real rented machine")
        return SHUTDOWN_COMMAND

    def destroy(self, instance_id: str) -> None:
        """Stop the host (as `stop`) and forget the registration."""
        self.stop(instance_id)
        self.records.write(instance_id, {**self.records.read(instance_id), "state": "terminated"})

    def describe(self, instance_id: str) -> InstanceInfo:
        data = self.records.read(instance_id)
        endpoint = self.resolve_endpoint() if data["state"] == "running" else None
        return self._info(data, endpoint)

    def list(self, label_prefix: str) -> list[InstanceInfo]:
        out = []
        for data in self.records.all():
            if data.get("host_name") == self.host_name and str(data.get("label", "")).startswith(label_prefix):
                out.append(self._info(data, None))
        return out

    def self_stop_command(self, instance_id: str) -> str | None:
        """The on-host watchdog's stop: a shutdown, unless the host is this machine."""
        if not self.shutdown_on_host:
            return None
        try:
            if is_this_machine(self.resolve_endpoint().host):
                return None
        except ProviderError:
            return None
        return SHUTDOWN_COMMAND
