"""Failover: a create that finds no capacity (or an offer rented away since the search) tries
the next offer of the same host entry, then another host entry of the experiment with the
same GPU; `retry_until_up` keeps going round with backoff until its deadline.

Choosing an offer and marking it taken happen under one lock, so two instances of one run
never race for the same cheapest offer; offers that failed in this run are not tried again.
Every try is a ledger row (intent → failed), so failed launches show in `costs`.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from ..config import HostConfig
from ..errors import CapacityError, OrchestratorError, ProviderError
from ..providers.base import Provider
from ..secrets import redact
from .provisioning import PriceChoice, Provisioned, gpu_label, offer_fits, provision

if TYPE_CHECKING:
    from .runner import JobPlan, Runner

log = logging.getLogger(__name__)

DEFAULT_OFFER_TRIES = 3
MAX_BACKOFF_S = 60.0


@dataclass(slots=True)
class FailoverState:
    """Per run: which offers it took (kept out of the next choice) and which failed."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    taken: set[tuple[str, str]] = field(default_factory=set)     # (provider, offer id)
    failed: set[tuple[str, str]] = field(default_factory=set)
    tries: int = 0


def choose_offer(provider: Provider, host: HostConfig, state: FailoverState) -> PriceChoice:
    """The cheapest available offer this run neither took nor saw fail (an offer taken by this
    run is used again only when nothing else is left: some providers' offers are GPU types,
    not single machines). Call with `state.lock` held; marks the choice taken."""
    if host.price_per_hour is not None:
        return PriceChoice(float(host.price_per_hour), host.currency or "USD", None)
    gpu = host.gpu or ""
    cap = host.max_price_per_hour
    offers = [o for o in provider.offers(gpu)
              if offer_fits(o, host) and (provider.name, str(o.offer_id)) not in state.failed]
    fresh = [o for o in offers if (provider.name, str(o.offer_id)) not in state.taken]
    pool = fresh or offers
    if not pool:
        raise CapacityError(f"{provider.name}: no available offer for {gpu_label(host)}"
                            + (f" at or below {cap}/h" if cap is not None else "")
                            + (" (offers that failed in this run are skipped)" if state.failed else ""),
                            provider=provider.name, hint="try another GPU type, or raise max_price_per_hour")
    best = min(pool, key=lambda o: o.price_per_hour)
    if best.offer_id is not None:
        state.taken.add((provider.name, str(best.offer_id)))
    return PriceChoice(best.price_per_hour, best.currency, best.offer_id)


def candidate_hosts(job: JobPlan, jobs: list[JobPlan]) -> list[HostConfig]:
    """The job's own host entry, then the experiment's other entries with the same GPU."""
    out = [job.host]
    for j in jobs:
        if j.experiment == job.experiment and j.host.gpu == job.host.gpu \
                and all(h.name != j.host.name for h in out):
            out.append(j.host)
    return out


def provision_with_failover(runner: Runner, job: JobPlan, *, label: str,
                            state: FailoverState) -> tuple[Provisioned, Provider, HostConfig]:
    """Rent an instance for `job` (it may end up on another host entry with the same GPU)."""
    hosts = candidate_hosts(job, runner.jobs)
    retry_s = float(getattr(job.host, "retry_until_up_s", None) or 0.0)
    deadline = time.monotonic() + retry_s
    backoff = 2.0
    last: OrchestratorError | None = None
    for _round in range(10_000):     # bounded by the deadline; the count is a backstop
        for host in hosts:
            provider = runner.provider_for(replace(job, host_name=host.name, host=host))
            tries = int(getattr(host, "max_offer_tries", None) or DEFAULT_OFFER_TRIES)
            for k in range(tries):
                if runner.stop.is_set():
                    raise ProviderError(f"{provider.name}: interrupted before an instance was up",
                                        provider=provider.name)
                try:
                    with state.lock:
                        choice = choose_offer(provider, host, state)
                        state.tries += 1
                except CapacityError as exc:
                    last = exc
                    runner.ledger.add_event("launch_failed", f"{host.name}: {redact(str(exc))[:300]}",
                                            runner.run_id, job.job_id)
                    break      # nothing left on this entry: the next entry
                try:
                    prov = provision(provider, host, ledger=runner.ledger, run_id=runner.run_id,
                                     job_id=job.job_id, label=f"{label}-t{state.tries}",
                                     ready_timeout_s=runner.opts.ready_timeout_s, stop=runner.stop,
                                     choice=choice)
                    return prov, provider, host
                except CapacityError as exc:
                    last = exc
                except ProviderError as exc:   # booted into an error, or never became RUNNING
                    if runner.stop.is_set():
                        raise
                    last = exc
                if choice.offer_id is not None:
                    with state.lock:
                        state.failed.add((provider.name, str(choice.offer_id)))
                runner.ledger.add_event("launch_failed", f"{host.name} try {k + 1}/{tries}"
                                        f"{' offer ' + str(choice.offer_id) if choice.offer_id else ''}: "
                                        f"{redact(str(last))[:300]}", runner.run_id, job.job_id)
                log.warning("%s: launch on %s failed (%s); trying the next offer", job.job_id, host.name,
                            redact(str(last)))
        if time.monotonic() + backoff > deadline or runner.stop.is_set():
            break
        log.warning("%s: no capacity yet; retrying in %.0f s (retry_until_up)", job.job_id, backoff)
        runner.stop.wait(backoff)
        backoff = min(MAX_BACKOFF_S, backoff * 2)
        with state.lock:
            state.failed.clear()       # a new round: offers may have come back
    assert last is not None
    raise last
