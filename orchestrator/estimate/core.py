"""What a job will take and cost, phase by phase, and where each figure came from.

Phases: boot, setup, staging, train, eval, pull, teardown. Each `PhaseEstimate` names its
source: "config" (the user's own figure), "catalog" (prices.csv), "runtime table"
(runtimes.csv), "assumption" (phases.csv defaults), "timed here" (a `local` host before any
history: a few training steps timed on this machine, `local.py`) or "history (median of N)"
(this user's finished jobs in the ledger, which replace the tables as soon as they exist).

Training is a start-up (interpreter, imports, model, data to the device, the first full
occupancy-grid pass) plus a time per step: short jobs are mostly start-up, so a speed alone
(steps/s) over-predicts long jobs from short ones and under-predicts short ones from long ones.

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
    from .local import LocalProbe

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


def _capped(job: Job, secs: float, source: str, detail: str) -> tuple[float, str, str]:
    if job.max_seconds is not None and job.max_seconds < secs:
        return job.max_seconds, "config", f"max_seconds caps {detail}"
    return secs, source, detail


def _probe_train(job: Job, got: dict[str, Any]) -> tuple[float, str, str]:
    loop = float(got["predict"][str(int(job.steps))])
    start = float(got.get("import_s", 0.0)) + float(got.get("init_s", 0.0))
    extra, extra_src = _default(job.host.provider, "train_overhead")
    detail = (f"{job.steps} steps: {loop:.3g} s of steps ({1e3 * float(got['step_s']):.3g} ms a step, "
              f"{float(got['first_step_s']):.2g} s the first, grid updates {1e3 * float(got['partial_update_s']):.3g} ms) "
              f"+ {start:.2g} s start (imports, model) + {extra:g} s ({extra_src}); timed here: "
              f"{got.get('steps_timed')} steps at {got.get('key', {}).get('size')} px on {got.get('device_name')}, "
              f"{got.get('at', '')}")
    return _capped(job, loop + start + extra, "timed here", detail)


def _fit_train(job: Job, points: list[tuple[int, float, int]]) -> tuple[float, float, str]:
    """(start-up s, s per step, how) from (steps, median training s, count) of finished jobs of
    other step counts: a least-squares line through them when there are two step counts or
    more; with one, the start-up is the table's and the rest is per step."""
    xs = [float(s) for s, _t, _c in points]
    ys = [t for _s, t, _c in points]
    if len(points) >= 2:
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        sxx = sum((x - mx) ** 2 for x in xs)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx > 0 else 0.0
        if slope > 0:
            start = max(0.0, my - slope * mx)
            per_step = (my - start) / mx if start == 0.0 else slope
            return start, per_step, f"a line through finished jobs at {', '.join(str(int(x)) for x in xs)} steps"
    start, src = _default(job.host.provider, "train_startup")
    s0, t0 = xs[0], ys[0]
    start = min(start, 0.5 * t0)          # never more than half of what a whole job took
    return start, (t0 - start) / s0, f"finished jobs at {int(s0)} steps less the table's start-up ({src})"


def _train_known(job: Job, history: History) -> bool:
    return history.phase_seconds(job, "train") is not None or bool(history.train_points(job))


def _train(job: Job, history: History | None, probe: LocalProbe | None = None) -> tuple[float, str, str]:
    if history is not None:
        got = history.phase_seconds(job, "train")
        if got is not None:
            secs, n, scope = got
            return secs, f"history (median of {n})", scope
        points = history.train_points(job)
        if points:
            start, per_step, how = _fit_train(job, points)
            n = sum(c for _s, _t, c in points)
            detail = (f"{start:.3g} s start + {job.steps} steps x {1e3 * per_step:.3g} ms "
                      f"({job.host.gpu}; {how})")
            return _capped(job, start + job.steps * per_step, f"history (median of {n})", detail)
    if probe is not None:
        got_probe = probe.result(job)
        if got_probe is not None:
            return _probe_train(job, got_probe)
    row, source, detail = _runtime(job)
    start, start_src = _default(job.host.provider, "train_startup")
    secs = start + job.steps / row.steps_per_second
    detail = (f"{start:g} s start ({start_src}) + {job.steps} steps / {row.steps_per_second:g} steps/s "
              f"({detail})")
    return _capped(job, secs, source, detail)


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


def _videos(job: Job, mpx: float) -> tuple[float, str]:
    fixed, src = _default(job.host.provider, "videos")
    per_mpx, psrc = _default(job.host.provider, "videos_per_megapixel")
    return fixed + per_mpx * mpx, f"{fixed:g} s + {per_mpx:g} s/MP videos ({src}; {psrc})"


def _eval(job: Job) -> tuple[float, str, str]:
    mpx, what = _eval_megapixels(job)
    videos, vdetail = _videos(job, mpx)
    row, _source, _d = _runtime(job)
    secs = mpx / row.eval_megapixels_per_second + videos
    return secs, "runtime table", (f"{what} at {row.eval_megapixels_per_second:g} MP/s "
                                   f"({row.eval_source}) + {vdetail}")


def _phase_seconds(job: Job, phase: str, history: History | None,
                   probe_mirrors: bool = False, probe: LocalProbe | None = None) -> tuple[float, str, str]:
    if history is not None and phase != "train":
        got = history.phase_seconds(job, phase)
        if got is not None:
            secs, n, scope = got
            return secs, f"history (median of {n})", scope
    if phase == "train":
        return _train(job, history, probe)
    if phase == "staging":
        return _staging(job, probe_mirrors)
    if phase == "eval":
        return _eval(job)
    if phase == "setup":
        from .env import setup_seconds
        return setup_seconds(job, _default)
    secs, src = _default(job.host.provider, phase)
    return secs, "assumption", src


def estimate_job(job: Job, ledger: Ledger | None = None, *, history: History | None = None,
                 probe_mirrors: bool = True, local_probe: LocalProbe | None = None) -> JobEstimate:
    """Per-phase seconds and cost of one job; history from `ledger` refines the tables.
    `probe_mirrors=False` keeps the estimate offline (no HEAD request to a dataset mirror);
    `local_probe` times training steps on this machine for a `local` job without history."""
    if history is None and ledger is not None:
        history = History.from_ledger(ledger)
    price, currency, price_source, price_detail, granularity, _gd = _price(job)
    raw = {p: _phase_seconds(job, p, history, probe_mirrors, local_probe) for p in PHASES}
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
                  probe_mirrors: bool = True, local_probe: LocalProbe | None = None) -> PlanEstimate:
    """Every job's estimate, with totals per currency (never silently mixed). With
    `local_probe`, the `local` jobs that history cannot estimate are timed here, once per
    training setting for all their step counts."""
    jobs = list(jobs)
    history = History.from_ledger(ledger) if ledger is not None else None
    if local_probe is not None:
        local_probe.prepare(j for j in jobs if history is None or not _train_known(j, history))
    ests = tuple(estimate_job(j, history=history, probe_mirrors=probe_mirrors, local_probe=local_probe)
                 for j in jobs)
    totals: dict[str, float] = {}
    for e in ests:
        totals[e.currency] = totals.get(e.currency, 0.0) + e.total_cost
    return PlanEstimate(ests, MappingProxyType(totals), sum(e.total_seconds for e in ests))
