"""What a job will take and cost, phase by phase, and where each figure came from.

Phases: boot, setup, staging, train, eval, pull, teardown. Each `PhaseEstimate` names its
source: "config" (the user's own figure), "catalog" (prices.csv), "runtime table"
(runtimes.csv), "assumption" (phases.csv defaults) or "history (median of N)" (this user's
finished jobs in the ledger, which replace the tables as soon as they exist).

Billed time = boot + max(setup, staging) + train + eval + pull + teardown: staging runs while
the environment is set up (DESIGN.md), so only the part of staging longer than set-up adds
time. The total is rounded up to the provider's billing granularity. Costs in different
currencies are never added silently: `PlanEstimate.totals` holds one total per currency and
`total_in()` converts only when asked, with the rate and its source from catalog/fx.csv.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from .. import catalog
from ..config.plan import Job
from ..errors import ConfigError
from .history import History

if TYPE_CHECKING:
    from ..ledger import Ledger

log = logging.getLogger(__name__)

PHASES: tuple[str, ...] = ("boot", "setup", "staging", "train", "eval", "pull", "teardown")
GENERATED_TEST_VIEWS = 20          # ngp_train.synth DEFAULT_COUNTS["test"]
GENERATED_VIEWS = 128              # ngp_train.synth DEFAULT_COUNTS: 100 train + 8 val + 20 test
MIN_GENERATE_S = 2.0               # process start and PNG writing, whatever the size
BLENDER_TEST_VIEWS = 200           # NeRF-synthetic test split
BLENDER_SIZE_PX = 800
MARKETPLACES = ("vastai",)         # offers vary; max_price_per_hour is the price to plan with


@dataclass(frozen=True, slots=True)
class PhaseEstimate:
    phase: str
    seconds: float
    billed_seconds: float          # what this phase adds to the billed time
    cost: float
    source: str                    # config | catalog | runtime table | assumption | history (median of N)
    detail: str = ""


@dataclass(frozen=True, slots=True)
class JobEstimate:
    job_id: str
    host: str
    provider: str
    gpu: str
    currency: str
    price_per_hour: float
    price_source: str
    price_detail: str
    granularity_s: float
    phases: tuple[PhaseEstimate, ...]
    total_seconds: float           # billed wall time, before rounding to the granularity
    billed_seconds: float          # rounded up to the granularity
    total_cost: float

    def phase(self, name: str) -> PhaseEstimate:
        for p in self.phases:
            if p.phase == name:
                return p
        raise KeyError(name)

    @property
    def source(self) -> str:
        return f"train: {self.phase('train').source}; price: {self.price_source}"

    def to_dict(self) -> dict[str, Any]:
        """JSON for the ledger's jobs.estimate and `--json`."""
        return {"job_id": self.job_id, "host": self.host, "provider": self.provider, "gpu": self.gpu,
                "currency": self.currency, "price_per_hour": self.price_per_hour,
                "price_source": self.price_source, "price_detail": self.price_detail,
                "granularity_s": self.granularity_s, "total_seconds": self.total_seconds,
                "billed_seconds": self.billed_seconds, "total_cost": self.total_cost,
                "source": self.source,
                "phases": {p.phase: {"seconds": p.seconds, "billed_seconds": p.billed_seconds,
                                     "cost": p.cost, "source": p.source, "detail": p.detail}
                           for p in self.phases}}


@dataclass(frozen=True, slots=True)
class PlanEstimate:
    jobs: tuple[JobEstimate, ...]
    totals: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))  # currency -> cost
    total_seconds: float = 0.0     # sum over jobs (as if run one after another)

    def total_in(self, currency: str) -> tuple[float, list[str]]:
        """The plan's cost in `currency` and the conversion rules used (empty when none)."""
        amount, notes = 0.0, []
        for cur, value in self.totals.items():
            converted, rule = catalog.convert(value, cur, currency)
            amount += converted
            if cur.upper() != currency.upper():
                notes.append(f"{value:.4g} {cur} -> {converted:.4g} {currency.upper()} ({rule})")
        return amount, notes

    def job(self, job_id: str) -> JobEstimate:
        for j in self.jobs:
            if j.job_id == job_id:
                return j
        raise KeyError(job_id)

    def to_dict(self) -> dict[str, Any]:
        return {"jobs": [j.to_dict() for j in self.jobs], "totals": dict(self.totals),
                "total_seconds": self.total_seconds}


def _price(job: Job) -> tuple[float, str, str, str, float, str]:
    """(price_per_hour, currency, source, detail, granularity_s, granularity detail)."""
    h = job.host
    rows = catalog.price_rows(h.provider, h.gpu)
    any_row = next((p for p in catalog.prices() if p.provider == h.provider), None)
    gran_row = rows[0] if rows else any_row
    granularity = gran_row.billing_granularity_s if gran_row else 1.0
    gran_detail = (gran_row.billing_source if gran_row
                   else "assumption: per-second billing for a host rented by hand")
    if h.price_per_hour is not None:
        what = ("local host: not billed unless price_per_hour is set" if h.provider == "local"
                and h.price_per_hour == 0 else f"hosts.{h.name}.price_per_hour")
        return h.price_per_hour, h.currency, "config", what, granularity, gran_detail
    if h.interruptible and h.max_bid is not None:
        return (h.max_bid, h.currency, "config",
                f"hosts.{h.name}.max_bid (interruptible: the bid is at most this)", granularity, gran_detail)
    if h.max_price_per_hour is not None and (h.provider in MARKETPLACES or not rows):
        return (h.max_price_per_hour, h.currency, "config",
                f"hosts.{h.name}.max_price_per_hour (an upper bound: offers at or below it)",
                granularity, gran_detail)
    if rows:
        # the catalog prices one GPU; an instance with gpus_per_instance of them bills that many
        # (a price the user gives, or an offer's, is already the whole instance's)
        p, n = rows[0], int(getattr(h, "gpus_per_instance", 1) or 1)
        return (p.price_per_hour * n, p.currency, "catalog",
                f"cheapest {p.provider} {p.gpu} in prices.csv: {p.offer}, {p.source}, {p.date}"
                + (f"; x {n} GPUs per instance" if n > 1 else ""),
                granularity, gran_detail)
    raise ConfigError(f"hosts.{h.name}: no price for {h.gpu} at {h.provider} in the catalog",
                      hint="set price_per_hour (or max_price_per_hour) on the host")


def _default(provider: str, phase: str) -> tuple[float, str]:
    row = catalog.phase_default(provider, phase)
    if row is None:
        return 0.0, "no default in phases.csv"
    return row.seconds, row.source.removeprefix("assumption: ")


def _runtime(job: Job) -> tuple[catalog.RuntimeRow, str, str]:
    """The runtime row for the job's GPU (or cpu when the job is pinned to the CPU)."""
    table = catalog.runtimes()
    gpu = "cpu" if job.device == "cpu" else job.host.gpu
    if gpu in table:
        return table[gpu], "runtime table", f"{gpu}: {table[gpu].source}"
    gpus = sorted((r for g, r in table.items() if g != "cpu"), key=lambda r: r.steps_per_second)
    mid = gpus[len(gpus) // 2]
    return (mid, "assumption",
            f"{gpu} is not in runtimes.csv; using the median GPU ({mid.gpu}, {mid.steps_per_second:g} steps/s)")


def _eval_megapixels(job: Job) -> tuple[float, str]:
    ds = job.dataset
    if ds.generate is not None:
        side = max(1, ds.generate.size // job.downscale)
        return GENERATED_TEST_VIEWS * side * side / 1e6, f"{GENERATED_TEST_VIEWS} test views at {side}x{side}"
    side = max(1, BLENDER_SIZE_PX // job.downscale)
    return BLENDER_TEST_VIEWS * side * side / 1e6, f"{BLENDER_TEST_VIEWS} test views at {side}x{side}"


def _train(job: Job, history: History | None) -> tuple[float, str, str]:
    if history is not None:
        got = history.phase_seconds(job, "train")
        if got is not None:
            secs, n, scope = got
            return secs, f"history (median of {n})", scope
        rate = history.steps_per_second(job)
        if rate is not None:
            sps, n = rate
            secs = job.steps / sps
            detail = f"{job.steps} steps / {sps:.3g} steps/s ({job.host.gpu}, other step counts)"
            if job.max_seconds is not None and job.max_seconds < secs:
                return job.max_seconds, "config", f"max_seconds caps {detail}"
            return secs, f"history (median of {n})", detail
    row, source, detail = _runtime(job)
    secs = job.steps / row.steps_per_second
    detail = f"{job.steps} steps / {row.steps_per_second:g} steps/s ({detail})"
    if job.max_seconds is not None and job.max_seconds < secs:
        return job.max_seconds, "config", f"max_seconds caps {detail}"
    return secs, source, detail


def _staging(job: Job, probe_mirrors: bool) -> tuple[float, str, str]:
    """Generated: views x pixels at the measured rate. Mirrored: the staging module's probe
    (HEAD Content-Length or the file:// copy's size, at an assumed rate) when allowed, else
    the phases.csv default."""
    gen = job.dataset.generate
    if gen is not None:
        per_mpx, src = _default(job.host.provider, "staging_generate_per_megapixel")
        mpx = GENERATED_VIEWS * gen.size * gen.size / 1e6
        return (max(MIN_GENERATE_S, mpx * per_mpx), "assumption",
                f"{GENERATED_VIEWS} views at {gen.size}x{gen.size} = {mpx:.3g} MP at {per_mpx:g} s/MP ({src})")
    if probe_mirrors:
        try:
            from ..staging.estimate import estimate_staging_seconds
            secs, how = estimate_staging_seconds(job.dataset)
            what = {"head": "size from the mirror (HEAD), assumed download rate",
                    "local": "size of the file:// copy, assumed transfer rate",
                    "assumption": "assumed size and download rate"}.get(how, how)
            return float(secs), "assumption", f"{what} (staging.estimate)"
        except Exception as exc:  # noqa: BLE001 - a probe that fails only means "use the default"
            log.debug("staging probe failed for %s: %s", job.dataset.name, exc)
    secs, src = _default(job.host.provider, "staging_mirror")
    return secs, "assumption", src


def _phase_seconds(job: Job, phase: str, history: History | None,
                   probe_mirrors: bool = False) -> tuple[float, str, str]:
    if history is not None and phase != "train":
        got = history.phase_seconds(job, phase)
        if got is not None:
            secs, n, scope = got
            return secs, f"history (median of {n})", scope
    if phase == "train":
        return _train(job, history)
    if phase == "staging":
        return _staging(job, probe_mirrors)
    if phase == "eval":
        row, _source, _d = _runtime(job)
        mpx, what = _eval_megapixels(job)
        videos, vsrc = _default(job.host.provider, "videos")
        secs = mpx / row.eval_megapixels_per_second + videos
        return secs, "runtime table", (f"{what} at {row.eval_megapixels_per_second:g} MP/s "
                                       f"({row.eval_source}) + {videos:g} s videos ({vsrc})")
    if phase == "setup":
        from .env import setup_seconds
        return setup_seconds(job, _default)
    secs, src = _default(job.host.provider, phase)
    return secs, "assumption", src


def estimate_job(job: Job, ledger: Ledger | None = None, *, history: History | None = None,
                 probe_mirrors: bool = True) -> JobEstimate:
    """Per-phase seconds and cost of one job; history from `ledger` refines the tables.
    `probe_mirrors=False` keeps the estimate offline (no HEAD request to a dataset mirror)."""
    if history is None and ledger is not None:
        history = History.from_ledger(ledger)
    price, currency, price_source, price_detail, granularity, _gd = _price(job)
    raw = {p: _phase_seconds(job, p, history, probe_mirrors) for p in PHASES}
    setup_s, staging_s = raw["setup"][0], raw["staging"][0]
    phases = []
    for p in PHASES:
        secs, src, detail = raw[p]
        billed = max(0.0, staging_s - setup_s) if p == "staging" else secs
        if p == "staging":
            detail += f"; overlaps set-up, adds {billed:.3g} s"
        phases.append(PhaseEstimate(p, secs, billed, billed * price / 3600.0, src, detail))
    total = sum(p.billed_seconds for p in phases)
    g = granularity if granularity > 0 else 1.0
    billed_total = math.ceil(total / g - 1e-9) * g if total > 0 else 0.0
    return JobEstimate(job.job_id, job.host.name, job.host.provider, job.host.gpu, currency, price,
                       price_source, price_detail, granularity, tuple(phases), total, billed_total,
                       billed_total * price / 3600.0)


def estimate_plan(jobs: Iterable[Job], ledger: Ledger | None = None, *,
                  probe_mirrors: bool = True) -> PlanEstimate:
    """Every job's estimate, with totals per currency (never silently mixed)."""
    history = History.from_ledger(ledger) if ledger is not None else None
    ests = tuple(estimate_job(j, history=history, probe_mirrors=probe_mirrors) for j in jobs)
    totals: dict[str, float] = {}
    for e in ests:
        totals[e.currency] = totals.get(e.currency, 0.0) + e.total_cost
    return PlanEstimate(ests, MappingProxyType(totals), sum(e.total_seconds for e in ests))
