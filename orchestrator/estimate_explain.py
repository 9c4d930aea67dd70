"""Plain-text breakdown of a PlanEstimate for `orchestrate estimate --explain`."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .estimate import PlanEstimate


def fmt_seconds(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def fmt_money(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"


def explain(plan: "PlanEstimate") -> str:
    lines: list[str] = []
    for j in plan.jobs:
        lines.append(f"{j.job_id}  ({j.host}: {j.provider}, {j.gpu})")
        lines.append(f"  price     {fmt_money(j.price_per_hour)} {j.currency}/h  [{j.price_source}] "
                     f"{j.price_detail}")
        for p in j.phases:
            added = "" if p.billed_seconds == p.seconds else f" (adds {fmt_seconds(p.billed_seconds)})"
            lines.append(f"  {p.phase:<9} {fmt_seconds(p.seconds):>9}{added}  "
                         f"{fmt_money(p.cost)} {j.currency}  [{p.source}] {p.detail}")
        lines.append(f"  total     {fmt_seconds(j.total_seconds):>9}  billed {fmt_seconds(j.billed_seconds)} "
                     f"(granularity {j.granularity_s:g} s)  {fmt_money(j.total_cost)} {j.currency}")
    lines.append("")
    lines.append(f"{len(plan.jobs)} jobs, {fmt_seconds(plan.total_seconds)} of billed time in all")
    for cur, value in sorted(plan.totals.items()):
        lines.append(f"total {cur}: {fmt_money(value)}")
    if len(plan.totals) > 1:
        lines.append("currencies are kept apart; a budget in one currency converts the others "
                     "with the rates in catalog/fx.csv")
    lines.append("sources: config = your file; catalog = prices.csv; runtime table = runtimes.csv; "
                 "assumption = phases.csv defaults; history = median of your finished jobs")
    return "\n".join(lines)
