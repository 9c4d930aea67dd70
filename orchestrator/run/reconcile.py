"""Reconciliation: compare the providers' own instance lists with the ledger; destroy orphans.

An orphan is an instance carrying our label prefix that no live job will ever release:
- the ledger has no row for it (a create whose reply was lost and whose controller died), or
- its ledger row is closed (destroyed/failed) yet the provider still lists it, or
- its run's controller is gone (the run lock is free: the process exited or was SIGKILLed), or
  its job has ended.

Whether a controller is alive is decided by an advisory lock: the runner holds
`<home>/locks/<run_id>.lock` (`hold_run_lock`) for as long as the run goes on. The kernel drops
the lock when the process dies, however it dies, so a free lock means "nobody will tear this
down". A run with no lock file at all is treated as live while the ledger says it is running
(conservative: never destroy what another live controller may still be using).

`down_orphans` shows, destroys, and closes the ledger rows (and so the billing intervals) of
what it destroyed; open ledger rows whose instance the provider no longer lists are closed too.
"""
from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ExperimentsConfig, HostConfig
from ..errors import OrchestratorError
from ..ledger import DESTROYED, FAILED, INTENT, JOB_DONE_STATES, OPEN_STATES, Ledger, parse_iso
from ..providers.base import LABEL_PREFIX, InstanceInfo, InstanceState, Provider
from ..secrets import redact

log = logging.getLogger(__name__)

CLOUD_KINDS = ("vastai", "runpod", "lambda")
ORPHAN_KINDS = CLOUD_KINDS + ("slurm",)     # providers that can list what carries our label


@dataclass(frozen=True, slots=True)
class Orphan:
    provider: str
    info: InstanceInfo
    row_id: int | None        # the ledger row it belongs to, when there is one
    reason: str


@dataclass(frozen=True, slots=True)
class Teardown:
    orphan: Orphan
    destroyed: bool
    error: str | None = None


# -- the run lock ---------------------------------------------------------------------------
def lock_path(ledger: Ledger, run_id: str) -> Path:
    return ledger.path.parent / "locks" / f"{run_id}.lock"


@contextmanager
def hold_run_lock(ledger: Ledger, run_id: str) -> Iterator[None]:
    """Held by the controller for the whole run; proves to `orchestrate down` that it lives."""
    path = lock_path(ledger, run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        os.close(fd)   # closing drops the lock


def run_is_live(ledger: Ledger, run_id: str) -> bool:
    path = lock_path(ledger, run_id)
    if not path.exists():
        run = ledger.run(run_id)
        return bool(run and run.get("status") == "running" and not run.get("ended_at"))
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


# -- finding ----------------------------------------------------------------------------------
def _job_live(ledger: Ledger, run_id: str, job_id: str, live_runs: dict[str, bool]) -> bool:
    if run_id not in live_runs:
        live_runs[run_id] = run_is_live(ledger, run_id)
    if not live_runs[run_id]:
        return False
    job = next((j for j in ledger.jobs(run_id) if j.job_id == job_id), None)
    return job is None or job.status not in JOB_DONE_STATES


def _providers(providers: Iterable[Provider] | Mapping[str, Provider]) -> list[Provider]:
    return list(providers.values()) if isinstance(providers, Mapping) else list(providers)


def _label_of_our_run(ledger: Ledger, label: str, run_ids: list[str]) -> bool:
    return any(label.startswith(f"{LABEL_PREFIX}-{rid}-") for rid in run_ids)


def find_orphans(ledger: Ledger, providers: Iterable[Provider] | Mapping[str, Provider], *,
                 any_controller: bool = False) -> list[Orphan]:
    """Instances with our label prefix that no live job will release (see module doc). An
    instance whose label names a run this ledger never had belongs to another controller (on
    another machine, with its own ledger) and is left alone unless `any_controller`."""
    orphans: list[Orphan] = []
    live_runs: dict[str, bool] = {}
    run_ids = [r["run_id"] for r in ledger.runs()]
    for provider in _providers(providers):
        listed = provider.list(LABEL_PREFIX + "-")
        for info in listed:
            if info.state == InstanceState.TERMINATED:
                continue
            row = ledger.find_instance(provider.name, info.instance_id)
            if row is None:
                # A create in flight has an open intent row with this label but no id yet; a
                # create that failed has a closed one (its cost is attributed to it when destroyed).
                by_label = [r for r in ledger.instances(provider=provider.name)
                            if r.label == info.label and r.instance_id is None]
                pending = [r for r in by_label if r.state in OPEN_STATES]
                if pending and _job_live(ledger, pending[0].run_id, pending[0].job_id, live_runs):
                    continue
                if not by_label and not any_controller and not _label_of_our_run(ledger, info.label, run_ids):
                    log.debug("%s %s (%s) belongs to no run of this ledger: another controller's; left alone",
                             provider.name, info.instance_id, info.label)
                    continue
                orphans.append(Orphan(provider.name, info, by_label[-1].row_id if by_label else None,
                                      "not in the ledger (a create whose reply was lost?)" if by_label
                                      or _label_of_our_run(ledger, info.label, run_ids)
                                      else "labelled by a controller this ledger does not know "
                                           "(--any-controller)"))
            elif row.state not in OPEN_STATES:
                orphans.append(Orphan(provider.name, info, row.row_id,
                                      f"the ledger says {row.state}, the provider still lists it"))
            elif not _job_live(ledger, row.run_id, row.job_id, live_runs):
                orphans.append(Orphan(provider.name, info, row.row_id,
                                      f"job {row.job_id} of run {row.run_id} has no live controller"))
    return orphans


def close_vanished(ledger: Ledger, providers: Iterable[Provider] | Mapping[str, Provider]) -> list[int]:
    """Close open ledger rows of dead runs whose instance the provider no longer lists."""
    closed: list[int] = []
    live_runs: dict[str, bool] = {}
    for provider in _providers(providers):
        listed = provider.list(LABEL_PREFIX + "-")
        ids = {i.instance_id for i in listed if i.state != InstanceState.TERMINATED}
        labels = {i.label for i in listed if i.state != InstanceState.TERMINATED}
        for row in ledger.instances(open_only=True, provider=provider.name):
            if _job_live(ledger, row.run_id, row.job_id, live_runs):
                continue
            if row.instance_id is None and row.state == INTENT and row.label not in labels:
                ledger.set_instance_state(row.row_id, FAILED, note="create never completed (reconcile)")
                closed.append(row.row_id)
            elif row.instance_id is not None and row.instance_id not in ids:
                ledger.set_instance_state(row.row_id, DESTROYED, note="gone at the provider (reconcile)")
                closed.append(row.row_id)
    return closed


# -- acting -----------------------------------------------------------------------------------
def providers_for(config: ExperimentsConfig | None, ledger: Ledger, **provider_kwargs: Any) -> dict[str, Provider]:
    """One provider client per cloud host of the config (or, with no config, per cloud kind in
    the ledger's open rows, using the default API key variables). Unreachable ones are skipped."""
    from ..providers import make_provider

    hosts: list[HostConfig] = []
    if config is not None:
        hosts = [h for h in config.hosts.values() if h.provider in ORPHAN_KINDS]
    else:
        hosts = _hosts_from_runs(ledger)
        kinds = {h.provider for h in hosts}
        open_kinds = {r.provider for r in ledger.instances(open_only=True)} & set(CLOUD_KINDS)
        # a kind with open rows but no file at hand: its client with the default key variable
        hosts += [HostConfig(name="", provider=k) for k in sorted(open_kinds - kinds)]
    out: dict[str, Provider] = {}
    for host in hosts:
        key = f"{host.provider}|{host.api_base}|{host.api_key_env}"
        if host.provider == "slurm":
            key += f"|{host.name}"
        if key in out:
            continue
        try:
            out[key] = make_provider(host, **provider_kwargs)
            if host.provider == "slurm":
                from .slurm_login import bind_login
                bind_login(out[key], host)
        except OrchestratorError as exc:
            log.warning("cannot check %s for orphans: %s", host.provider, exc)
    return out


def _hosts_from_runs(ledger: Ledger) -> list[HostConfig]:
    """Cloud hosts of the experiments files the ledger's runs came from (newest first), so
    `orchestrate down --orphans` after a crash needs no --config."""
    from ..config import load_config

    hosts: list[HostConfig] = []
    seen: set[str] = set()
    for run in reversed(ledger.runs()):
        path = run.get("config_path") or ""
        if not path or path in seen or not Path(path).is_file():
            continue
        seen.add(path)
        try:
            config = load_config(Path(path))
        except OrchestratorError as exc:
            log.warning("orphan check: cannot read %s: %s", path, exc)
            continue
        hosts += [h for h in config.hosts.values() if h.provider in ORPHAN_KINDS]
    return hosts


def destroy_orphan(ledger: Ledger, provider: Provider, orphan: Orphan) -> Teardown:
    iid = orphan.info.instance_id
    try:
        provider.destroy(iid)
    except OrchestratorError as exc:
        msg = redact(str(exc))
        ledger.add_event("orphan_destroy_failed", f"{provider.name} {iid}: {msg}")
        return Teardown(orphan, False, msg)
    row_id = orphan.row_id
    if row_id is not None:
        row = ledger.instance(row_id)
        queued = provider.name == "slurm" and orphan.info.state == InstanceState.PENDING
        if row is not None and row.instance_id is None and not queued:
            # A lost-reply create: it billed from the moment we asked for it. (A Slurm task still
            # queued never ran: nothing billed, its row closes without an interval.)
            ledger.instance_created(row_id, iid, at=parse_iso(row.created_at).timestamp())
            row = ledger.instance(row_id)
        if row is not None and row.state in OPEN_STATES:
            ledger.set_instance_state(row_id, DESTROYED, note=f"orphan destroyed: {orphan.reason}")
    ledger.add_event("orphan_destroyed", f"{provider.name} {iid} ({orphan.info.label}): {orphan.reason}")
    log.warning("destroyed orphan %s %s (%s): %s", provider.name, iid, orphan.info.label, orphan.reason)
    return Teardown(orphan, True)


# Providers whose instances cannot stop themselves (no scoped key on the host: Lambda): an
# orphan of theirs bills at the full price until someone terminates it, so `run` does.
TERMINATE_ON_SIGHT = ("lambda",)


def check_orphans(ledger: Ledger, providers: Iterable[Provider] | Mapping[str, Provider], *,
                  terminate: Iterable[str] = ()) -> list[str]:
    """What `run` and `status` say about orphans (labelled instances no live job will release):
    one line each naming the command that destroys them; those of the providers in `terminate`
    are destroyed here. A provider that cannot be asked is one line too, never an error."""
    kill = set(terminate)
    lines: list[str] = []
    for p in _providers(providers):
        try:
            found = find_orphans(ledger, [p])
        except OrchestratorError as exc:
            lines.append(f"could not check {p.name} for orphans: {redact(str(exc))}")
            continue
        for orphan in found:
            what = f"{p.name} {orphan.info.instance_id} ({orphan.info.label}, {orphan.info.state.value})"
            if p.name in kill:
                td = destroy_orphan(ledger, p, orphan)
                lines.append(f"orphan {what}: {orphan.reason}; terminated" if td.destroyed else
                             f"orphan {what}: {orphan.reason}; terminating it failed ({td.error}): "
                             "run `orchestrate down --orphans`")
            else:
                lines.append(f"orphan {what}: {orphan.reason}; it may still bill: "
                             "run `orchestrate down --orphans` to destroy it")
    return lines


def down_orphans(ledger: Ledger, config_or_none: ExperimentsConfig | None, yes: bool, *,
                 providers: Iterable[Provider] | Mapping[str, Provider] | None = None,
                 any_controller: bool = False) -> list[Teardown]:
    """Find orphans and, when `yes`, destroy them and close their ledger rows. Without `yes`
    nothing is touched: the list (destroyed=False, error="not confirmed") is for showing."""
    provs = _providers(providers) if providers is not None else list(providers_for(config_or_none, ledger).values())
    results: list[Teardown] = []
    for p in provs:
        for orphan in find_orphans(ledger, [p], any_controller=any_controller):
            if not yes:
                results.append(Teardown(orphan, False, "not confirmed"))
                continue
            results.append(destroy_orphan(ledger, p, orphan))
    if yes:
        close_vanished(ledger, provs)
    return results
