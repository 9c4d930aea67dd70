"""Renting and releasing one instance, with the ledger kept ahead of every paid call.

Order matters for money: the ledger row (state `intent`) is written before `create`, so a
controller that dies inside the call still left a trace for reconciliation. A `create` that
raises may still have made an instance (timeouts, 5xx after commit): we look for our label in
`provider.list` and destroy exactly what carries it, nothing else.
"""
from __future__ import annotations

import logging
import shlex
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import HostConfig
from ..errors import CapacityError, ConfigError, OrchestratorError, ProviderError
from ..ledger import DESTROYED, FAILED, RUNNING, STOPPED, Ledger
from ..providers.base import InstanceInfo, InstanceSpec, InstanceState, Offer, Provider
from ..secrets import redact

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Provisioned:
    instance_id: str
    row_id: int
    price_per_hour: float
    currency: str


@dataclass(frozen=True, slots=True)
class PriceChoice:
    price_per_hour: float
    currency: str
    offer_id: str | None
    offer: Offer | None = None   # the chosen offer (its storage and traffic prices), if any


def choose_price(provider: Provider, host: HostConfig) -> PriceChoice:
    """The price recorded at provisioning: the host's own figure, else the cheapest offer."""
    if host.price_per_hour is not None:
        return PriceChoice(float(host.price_per_hour), host.currency or "USD", None)
    gpu = host.gpu or ""
    cap = host.max_price_per_hour
    offers = [o for o in provider.offers(gpu) if offer_fits(o, host)]
    if not offers:
        raise CapacityError(f"{provider.name}: no available offer for {gpu_label(host)}"
                            + (f" at or below {cap}/h" if cap is not None else ""),
                            provider=provider.name, hint="try another GPU type, or raise max_price_per_hour")
    best = min(offers, key=lambda o: o.price_per_hour)
    return PriceChoice(best.price_per_hour, best.currency, best.offer_id, best)


def gpu_label(host: HostConfig) -> str:
    """`RTX 4090`, or `2x RTX 4090` for a host entry with gpus_per_instance: 2."""
    n, gpu = int(host.gpus_per_instance or 1), host.gpu or "the requested GPU"
    return f"{n}x {gpu}" if n > 1 else gpu


def offer_fits(offer: Offer, host: HostConfig) -> bool:
    """Available, under the host's price cap, and with exactly its `gpus_per_instance` GPUs: an
    offer with more (or fewer) never stands in for it, whatever its name says (the price is the
    whole instance's, and the runner runs one job per GPU)."""
    cap = host.max_price_per_hour
    return offer.available and offer.gpu_count == int(host.gpus_per_instance or 1) \
        and (cap is None or offer.price_per_hour <= cap)


DEFAULT_PUBLIC_KEYS = ("~/.ssh/id_ed25519.pub", "~/.ssh/id_ecdsa.pub", "~/.ssh/id_rsa.pub")


def run_public_key(host: HostConfig) -> tuple[str | None, str]:
    """The public half of the key this run connects with, and where it was looked for: the
    host's identity_file (its .pub, else derived with ssh-keygen -y), else the default keys."""
    ident = host.identity_file
    if ident:
        path = Path(str(ident)).expanduser()
        pub = Path(str(path) + ".pub")
        if pub.is_file():
            text = pub.read_text(errors="replace").strip()
            if text:
                return text, str(pub)
        try:
            out = subprocess.run(["ssh-keygen", "-y", "-P", "", "-f", str(path)], capture_output=True,
                                 text=True, timeout=10, stdin=subprocess.DEVNULL, check=False)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip(), str(path)
        except (OSError, subprocess.SubprocessError):
            pass
        return None, f"{pub} (or a key ssh-keygen -y can read from {path})"
    for cand in DEFAULT_PUBLIC_KEYS:
        pub = Path(cand).expanduser()
        if pub.is_file() and pub.read_text(errors="replace").strip():
            return pub.read_text(errors="replace").strip(), str(pub)
    return None, ", ".join(DEFAULT_PUBLIC_KEYS)


def provision(provider: Provider, host: HostConfig, *, ledger: Ledger, run_id: str, job_id: str,
              label: str, ready_timeout_s: float = 900.0,
              stop: threading.Event | None = None, choice: PriceChoice | None = None) -> Provisioned:
    """Create an instance and wait until it is RUNNING; the ledger follows every step.
    `choice` is an offer already chosen (failover picks it under its lock)."""
    public_key, looked_at = run_public_key(host)
    if public_key is None and provider.needs_ssh_public_key:
        # Fail before paying: an instance without our key cannot be reached.
        raise ConfigError(f"{provider.name}: no SSH public key to put on the instance: none at {looked_at}",
                          hint="set identity_file to a private key whose .pub lies next to it")
    price = choice if choice is not None else choose_price(provider, host)
    # an interruptible entry bids what its chosen offer was priced at (min_bid + margin ≤ max_bid)
    bid = (price.price_per_hour if host.interruptible and provider.interruptible_offers
           and price.offer_id is not None else None)
    spec = InstanceSpec(label=label, gpu=host.gpu or "", offer_id=price.offer_id,
                        max_price_per_hour=host.max_price_per_hour, bid_per_hour=bid, image=host.image,
                        disk_gb=float(host.disk_gb or 20.0), region=host.region,
                        onstart=provider.boot_guard(root=host.root or "~/orchestrate",
                                                    idle_timeout_s=float(host.idle_timeout_s or 600.0)),
                        ssh_public_key=public_key)
    billing = provider.billing
    offer = price.offer
    storage = billing.storage_price_per_hour
    if offer is not None and offer.storage_price_per_hour is not None:
        storage = offer.storage_price_per_hour   # the offer's own $/GB-month, for our disk
    row_id = ledger.record_intent(run_id=run_id, job_id=job_id, host_name=host.name,
                                  provider=provider.name, label=label, gpu=spec.gpu,
                                  price_per_hour=price.price_per_hour, currency=price.currency,
                                  granularity_s=billing.granularity_s,
                                  storage_price_per_hour=storage)
    t_create = time.time()
    try:
        instance_id = provider.create(spec)
    except Exception as exc:
        _cleanup_failed_create(provider, label, ledger, row_id, t_create, exc)
        if isinstance(exc, OrchestratorError):
            raise
        raise ProviderError(f"{provider.name}: create failed: {redact(str(exc))}", provider=provider.name) from None
    ledger.instance_created(row_id, instance_id, at=t_create)
    ledger.add_event("instance_created", f"{provider.name} {instance_id} ({label})", run_id, job_id)
    if offer is not None and (offer.upload_price_per_gb or offer.download_price_per_gb):
        # Nothing may stand between the intent and the create: this is noted after it.
        ledger.add_event("offer_traffic_price",
                         f"{provider.name} offer {offer.offer_id}: traffic into the instance "
                         f"{offer.upload_price_per_gb or 0:g} {offer.currency}/GB, out of it "
                         f"{offer.download_price_per_gb or 0:g} {offer.currency}/GB", run_id, job_id)
    result = Provisioned(instance_id, row_id, price.price_per_hour, price.currency)
    try:
        info = wait_running(provider, instance_id, timeout_s=ready_timeout_s, stop=stop)
    except BaseException:
        # The caller never sees a Provisioned, so its teardown cannot release this one: do it here
        # (a boot that failed, timed out or was interrupted costs what it cost, not a leak).
        release(provider, instance_id, row_id, ledger=ledger, destroy=True, run_id=run_id, job_id=job_id,
                host=host)
        raise
    ledger.set_instance_state(row_id, RUNNING, note=info.raw_state or None)
    placed = info.price_per_hour
    if placed is not None and placed > 0 and abs(placed - price.price_per_hour) > 1e-9:
        # What the provider placed it at is what bills (RunPod's adjusted price, vast's dph_total).
        ledger.set_instance_price(row_id, placed)
        ledger.add_event("instance_price", f"{provider.name} {instance_id} placed at {placed:g} "
                         f"{price.currency}/h (offer {price.price_per_hour:g})", run_id, job_id)
        result = Provisioned(instance_id, row_id, placed, price.currency)
    if info.endpoint is not None:
        ledger.set_endpoint(row_id, str(info.endpoint))
    return result


def _cleanup_failed_create(provider: Provider, label: str, ledger: Ledger, row_id: int,
                           t_create: float, exc: BaseException) -> None:
    """After a create that raised: destroy any instance carrying exactly our label."""
    note = f"create failed: {redact(str(exc))}"[:500]
    try:
        found = [i for i in provider.list(label) if i.label == label]
    except Exception as list_exc:  # noqa: BLE001 - the provider is unreachable: leave the intent for reconcile
        log.warning("%s: create failed and listing to check for a stray instance failed too: %s",
                    provider.name, redact(str(list_exc)))
        ledger.set_instance_state(row_id, FAILED, note=note + "; could not list to verify (run `orchestrate down --orphans`)")
        return
    for info in found:
        if info.state == InstanceState.TERMINATED:
            continue
        log.warning("%s: create raised but instance %s exists; destroying it", provider.name, info.instance_id)
        ledger.instance_created(row_id, info.instance_id, at=t_create)
        try:
            provider.destroy(info.instance_id)
            ledger.set_instance_state(row_id, DESTROYED, note=note + "; stray instance destroyed")
        except Exception as d_exc:  # noqa: BLE001 - the row stays open: reconcile retries the destroy
            ledger.set_instance_state(row_id, RUNNING, note=note + f"; destroying the stray failed: {redact(str(d_exc))}")
        return
    ledger.set_instance_state(row_id, FAILED, note=note)


def wait_running(provider: Provider, instance_id: str, *, timeout_s: float,
                 stop: threading.Event | None = None, poll_s: float = 2.0) -> InstanceInfo:
    """Poll `describe` until RUNNING; ERROR/TERMINATED or the deadline raise ProviderError."""
    deadline = time.monotonic() + timeout_s
    delay = 0.05
    while True:
        info = provider.describe(instance_id)
        if info.state == InstanceState.RUNNING:
            return info
        if info.state == InstanceState.ERROR:   # the provider's own words, and no more waiting
            raise ProviderError(f"{provider.name}: instance {instance_id} failed at boot: "
                                f"{info.raw_state or info.state.value}", provider=provider.name,
                                instance_id=instance_id)
        if info.state in (InstanceState.TERMINATED, InstanceState.STOPPED):
            # nobody here asked for a stop: an interruptible instance outbid at boot (or a guard
            # that gave up on us) does not come back by waiting
            raise ProviderError(f"{provider.name}: instance {instance_id} is {info.raw_state or info.state.value}",
                                provider=provider.name, instance_id=instance_id)
        if stop is not None and stop.is_set():
            raise ProviderError(f"{provider.name}: interrupted while instance {instance_id} was booting",
                                provider=provider.name, instance_id=instance_id)
        if time.monotonic() >= deadline:
            raise ProviderError(f"{provider.name}: instance {instance_id} not running after {timeout_s:g} s "
                                f"(state {info.raw_state or info.state.value})", provider=provider.name,
                                instance_id=instance_id, hint="the provider may be short of capacity; try again or another offer")
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(poll_s, delay * 2)


def release(provider: Provider, instance_id: str, row_id: int, *, ledger: Ledger, destroy: bool = True,
            run_id: str | None = None, job_id: str | None = None, host: HostConfig | None = None) -> bool:
    """Stop or destroy; the ledger's billing interval is closed only when the provider agreed.
    Returns False (and logs an event) when it failed, so `orchestrate down` can retry.
    A provider whose meter stops only when the machine powers off (an SSH host with
    `shutdown_on_host`) gets its shutdown run over SSH here, before `stop`/`destroy`."""
    what = "destroy" if destroy else "stop"
    try:
        _shutdown_on_host(provider, instance_id, row_id, ledger, host)
        (provider.destroy if destroy else provider.stop)(instance_id)
    except Exception as exc:  # noqa: BLE001 - any failure of a billing stop is handed to reconciliation below
        # Retried for minutes already (see providers/_http.py): from here on reconciliation
        # owns it; the ledger row stays open, so `down --orphans` and the next run/status see it.
        msg = (f"{provider.name}: {what} {instance_id} failed: {redact(str(exc))}; the instance may "
               f"still bill and is handed over to reconciliation: run `orchestrate down --orphans`")
        log.error("%s", msg)
        ledger.add_event("release_failed", msg, run_id, job_id)
        return False
    ledger.set_instance_state(row_id, DESTROYED if destroy else STOPPED)
    ledger.add_event(f"instance_{'destroyed' if destroy else 'stopped'}", f"{provider.name} {instance_id}",
                     run_id, job_id)
    return True


def note_stopped_by_provider(provider: Provider, prov: Provisioned, ledger: Ledger, *,
                             run_id: str | None = None, job_id: str | None = None) -> bool:
    """A lost instance that the provider lists as stopped (an interruptible one outbid): its GPU
    stopped billing, its disk did not; the ledger says so until the release destroys it."""
    try:
        info = provider.describe(prov.instance_id)
    except Exception:  # noqa: BLE001 - gone or unreachable: the release settles the row
        return False
    if info.state != InstanceState.STOPPED:
        return False
    ledger.set_instance_state(prov.row_id, STOPPED, note=info.raw_state or None)
    ledger.add_event("instance_stopped_by_provider", f"{provider.name} {prov.instance_id}: "
                     f"{info.raw_state or 'stopped'}", run_id, job_id)
    return True


def _shutdown_on_host(provider: Provider, instance_id: str, row_id: int, ledger: Ledger,
                      host: HostConfig | None) -> None:
    command = provider.host_shutdown_command(instance_id)
    if command is None:
        return
    if host is None:
        raise ProviderError(f"{provider.name}: {instance_id} stops by a shutdown over SSH, and its host "
                            "entry is not at hand", provider=provider.name, instance_id=instance_id,
                            hint="pass --config experiments.yaml")
    from ..transport.ssh import SSHTransport, auth_from_host
    info = provider.describe(instance_id)
    if info.endpoint is None:
        raise ProviderError(f"{provider.name}: {instance_id} has no SSH endpoint to run the shutdown on",
                            provider=provider.name, instance_id=instance_id)
    endpoint = info.endpoint
    tr = SSHTransport(lambda: endpoint, root="/tmp", auth=auth_from_host(host),
                      pinned_key=ledger.host_key(row_id), reconnect_deadline_s=60, name=host.name)
    try:
        # detached and delayed by a second, so the command returns before the machine goes down
        tr.run(f"nohup sh -c {shlex.quote('sleep 1; ' + command)} >/dev/null 2>&1 &", timeout_s=30)
    finally:
        tr.close()
