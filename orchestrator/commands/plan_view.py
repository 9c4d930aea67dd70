"""The plan before launch: instances × queues, each instance's timeline and cost, and the saving
against one instance per job; and which secrets are missing (estimate works without them)."""
from __future__ import annotations

import sys
from typing import Any

from ..errors import ConfigError
from ..run.session import plan_instances, shared_seconds_of


def _fmt_s(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def plan_json(loaded: Any, *, one_per_job: bool = False) -> dict[str, Any]:
    sessions = plan_instances(loaded.jobs, one_per_job=one_per_job)
    single = plan_instances(loaded.jobs, one_per_job=True)
    by_id = {j.job_id: j for j in loaded.jobs}
    return {"mode": "one-per-job" if one_per_job else "sessions",
            "instances": [{"host": p.host_name, "index": p.index, "jobs": list(p.job_ids),
                           "gpus": p.gpus, "lanes": [list(lane) for lane in p.lanes],
                           "seconds": p.seconds, "cost": p.cost,
                           "interruptible": any(_interruptible(by_id[j]) for j in p.job_ids[:1])}
                          for p in sessions],
            "cost": sum(p.cost for p in sessions), "one_per_job_cost": sum(p.cost for p in single)}


def show_plan(loaded: Any, *, one_per_job: bool = False, out: Any = None) -> None:
    """Instances × queues with a timeline each; the saving against one instance per job."""
    out = out or sys.stdout
    by_id = {j.job_id: j for j in loaded.jobs}
    plans = plan_instances(loaded.jobs, one_per_job=one_per_job)
    single = plan_instances(loaded.jobs, one_per_job=True)
    mode = "one instance per job" if one_per_job else "sessions"
    out.write(f"plan ({mode}): {len(plans)} instance(s) for {len(loaded.jobs)} job(s)\n")
    for p in plans:
        if not p.job_ids:
            continue
        first = by_id[p.job_ids[0]]
        gpus = f" ({p.gpus} GPUs)" if p.gpus > 1 else ""
        lanes = [lane for lane in p.lanes if lane] or [p.job_ids]

        def queue(ids: tuple[str, ...]) -> str:
            return " → ".join(f"{jid} {_fmt_s(max(0.0, _own(by_id[jid], one_per_job)))}" for jid in ids)

        head = f"boot+environment+teardown {_fmt_s(shared_seconds_of(first))}"
        out.write(f"  {p.host_name}#{p.index + 1}{gpus}: {_fmt_s(p.seconds)}, {p.cost:.4f} {first.currency}"
                  f"{_bid_note(first)}: "
                  + head + (" → " + queue(lanes[0]) if len(lanes) == 1 else ", then side by side:") + "\n")
        if len(lanes) > 1:     # one line per GPU; the instance's time is its longest lane
            for g, lane in enumerate(lanes):
                out.write(f"      GPU {g}: {queue(lane)}\n")
    if not one_per_job:
        a, b = sum(p.cost for p in plans), sum(p.cost for p in single)
        sa, sb = sum(p.seconds for p in plans), sum(p.seconds for p in single)
        if b > 0:
            out.write(f"  against one instance per job ({len(single)} instances, {_fmt_s(sb)}, {b:.4f}): "
                      f"saves {b - a:.4f} ({100 * (b - a) / b:.0f} %), {_fmt_s(max(0.0, sb - sa))} less billed"
                      " (--one-per-job to rent one each)\n")


def _interruptible(job: Any) -> bool:
    return bool(getattr(job.host, "interruptible", False))


def _bid_note(job: Any) -> str:
    """An interruptible entry is planned at its bid: say so, and what the bid is at most."""
    if not _interruptible(job):
        return ""
    price = (job.estimate or {}).get("price_per_hour")
    return f" (interruptible, bid ≤ {price:g} {job.currency}/h)" if isinstance(price, (int, float)) \
        else " (interruptible)"


def _own(job: Any, one_per_job: bool) -> float:
    from ..run.session import own_seconds_of
    if one_per_job:
        return float(job.estimate_seconds or 0.0) - shared_seconds_of(job)
    return own_seconds_of(job)


def missing_secrets(loaded: Any) -> list[str]:
    """One line per host whose API key (or password) cannot be read now."""
    from ..config import check_secrets
    out = []
    for name in sorted({j.host_name for j in loaded.jobs}):
        try:
            check_secrets(loaded.config, [name])
        except ConfigError as exc:
            out.append(exc.message.split(": ", 1)[-1] if ": " in exc.message else exc.message)
    return out
