"""Where the money went: spend by provider, GPU, run or day, from the ledger's billing rows.

Read-only. Every figure is recomputed from billing intervals (duration rounded up to the
provider's granularity × the price recorded at provisioning), the same rule the ledger uses,
so `orchestrate costs` and the run totals agree to the cent. GPU time and storage (a stopped
instance's disk) are shown apart. Launches that failed (an intent that never became an
instance, or an instance the provider reported failed) are counted, with whatever they were
billed, because a failed launch can still cost money. Open intervals accrue until `now`.

By day (UTC): an interval that crosses midnight is split across the days it covers, its cost
shared in proportion to the seconds in each day (so the rounding-up is shared too and the
days add up to the interval's cost).
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from ..errors import OrchestratorError
from ..ledger import FAILED, INTENT, BillingRow, InstanceRow, Ledger, parse_iso, utcnow

GROUPINGS = ("provider", "gpu", "run", "day")


class CostsError(OrchestratorError):
    pass


@dataclass(frozen=True, slots=True)
class SpendRow:
    key: str
    currency: str
    gpu_cost: float
    storage_cost: float
    gpu_hours: float
    storage_hours: float
    instances: int
    failed_launches: int
    failed_cost: float
    accruing: bool             # an interval in this row is still open

    @property
    def total(self) -> float:
        return self.gpu_cost + self.storage_cost

    def as_dict(self) -> dict[str, object]:
        return {"key": self.key, "currency": self.currency, "gpu_cost": self.gpu_cost,
                "storage_cost": self.storage_cost, "total": self.total,
                "gpu_hours": self.gpu_hours, "storage_hours": self.storage_hours,
                "instances": self.instances, "failed_launches": self.failed_launches,
                "failed_cost": self.failed_cost, "accruing": self.accruing}


@dataclass(frozen=True, slots=True)
class _Piece:
    """A share of one billing interval attributed to one key."""
    key: str
    kind: str
    cost: float
    seconds: float
    accruing: bool


def is_failed_launch(inst: InstanceRow) -> bool:
    """A launch that never became a usable instance: refused, or an intent left behind."""
    return inst.state == FAILED or (inst.state == INTENT and not inst.instance_id)


def _day(t: datetime) -> str:
    return t.astimezone(timezone.utc).date().isoformat()


def split_by_day(b: BillingRow, now: datetime) -> Iterator[tuple[str, float, float]]:
    """(day, cost share, seconds) for each UTC day the interval covers."""
    start = parse_iso(b.started_at)
    end = parse_iso(b.ended_at) if b.ended_at else now
    total_s = max(0.0, (end - start).total_seconds())
    cost = b.cost(now)
    if total_s == 0:
        yield _day(start), cost, 0.0
        return
    t = start
    while t < end:
        midnight = datetime.combine(t.astimezone(timezone.utc).date() + timedelta(days=1),
                                    datetime.min.time(), timezone.utc)
        upto = min(end, midnight)
        secs = (upto - t).total_seconds()
        yield _day(t), cost * secs / total_s, secs
        t = upto


def _key(inst: InstanceRow, by: str) -> str:
    if by == "provider":
        return inst.provider or "?"
    if by == "gpu":
        return inst.gpu or "?"
    if by == "run":
        return inst.run_id or "?"
    return _day(parse_iso(inst.ended_at or inst.created_at))   # unbilled: the day it ended


def spend(ledger: Ledger, by: str = "provider", *, now: datetime | None = None,
          runs: list[str] | None = None) -> list[SpendRow]:
    """Spend grouped by `by` (one of GROUPINGS) and currency, sorted by key."""
    if by not in GROUPINGS:
        raise CostsError(f"cannot group costs by {by!r}", hint=f"use --by {'|'.join(GROUPINGS)}")
    now = now or utcnow()
    instances = [i for i in ledger.instances() if not runs or i.run_id in runs]
    billing: dict[int, list[BillingRow]] = defaultdict(list)
    for b in ledger.billing():
        billing[b.instance_row].append(b)

    pieces: dict[tuple[str, str], list[_Piece]] = defaultdict(list)
    members: dict[tuple[str, str], set[int]] = defaultdict(set)
    failed: dict[tuple[str, str], set[int]] = defaultdict(set)
    failed_cost: dict[tuple[str, str], float] = defaultdict(float)
    for inst in instances:
        bad = is_failed_launch(inst)
        rows = billing.get(inst.row_id, [])
        if not rows:                      # nothing billed: still counted where it was made
            k = (_key(inst, by), inst.currency or "")
            members[k].add(inst.row_id)
            if bad:
                failed[k].add(inst.row_id)
            continue
        for b in rows:
            currency = b.currency or inst.currency or ""
            shares = (split_by_day(b, now) if by == "day" else
                      [(_key(inst, by), b.cost(now), _seconds(b, now))])
            for key, cost, secs in shares:
                k = (key, currency)
                pieces[k].append(_Piece(key, b.kind, cost, secs, b.ended_at is None))
                members[k].add(inst.row_id)
                if bad:
                    failed[k].add(inst.row_id)
                    failed_cost[k] += cost

    out = []
    for k in sorted(members):
        ps = pieces.get(k, [])
        out.append(SpendRow(
            key=k[0], currency=k[1],
            gpu_cost=sum(p.cost for p in ps if p.kind != "storage"),
            storage_cost=sum(p.cost for p in ps if p.kind == "storage"),
            gpu_hours=sum(p.seconds for p in ps if p.kind != "storage") / 3600.0,
            storage_hours=sum(p.seconds for p in ps if p.kind == "storage") / 3600.0,
            instances=len(members[k]), failed_launches=len(failed.get(k, ())),
            failed_cost=failed_cost.get(k, 0.0), accruing=any(p.accruing for p in ps)))
    return out


def _seconds(b: BillingRow, now: datetime) -> float:
    end = parse_iso(b.ended_at) if b.ended_at else now
    return max(0.0, (end - parse_iso(b.started_at)).total_seconds())


def totals(rows: list[SpendRow]) -> dict[str, float]:
    """Total spend per currency (never adds USD to CNY)."""
    out: dict[str, float] = defaultdict(float)
    for r in rows:
        out[r.currency] += r.total
    return dict(out)


@dataclass(frozen=True, slots=True)
class UsefulTime:
    """Per run: GPU seconds billed, seconds spent training and evaluating, and their ratio."""
    run_id: str
    billed_s: float
    useful_s: float

    @property
    def ratio(self) -> float | None:
        return self.useful_s / self.billed_s if self.billed_s > 0 else None

    def as_dict(self) -> dict[str, Any]:
        return {"run": self.run_id, "billed_s": self.billed_s, "useful_s": self.useful_s, "ratio": self.ratio}


USEFUL_PHASES = ("train", "eval")


def useful_time(ledger: Ledger, *, now: datetime | None = None, runs: list[str] | None = None) -> list[UsefulTime]:
    """How much of the billed GPU time trained or evaluated (the rest is boot, environment,
    staging, pulls, gaps and teardown), per run that billed anything."""
    now = now or utcnow()
    billed: dict[str, float] = defaultdict(float)
    run_of = {i.row_id: i.run_id for i in ledger.instances() if not runs or i.run_id in runs}
    for b in ledger.billing():
        if b.kind != "storage" and b.instance_row in run_of:
            billed[run_of[b.instance_row]] += _seconds(b, now)
    useful: dict[str, float] = defaultdict(float)
    for p in ledger.phases():
        if p["phase"] in USEFUL_PHASES and p["run_id"] in billed:
            useful[p["run_id"]] += float(p["seconds"] or 0.0)
    return [UsefulTime(r, billed[r], useful.get(r, 0.0)) for r in sorted(billed)]
