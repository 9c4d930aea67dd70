"""`orchestrate estimate experiments.yaml [--explain] [--json]`: time and cost by phase."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..catalog import format_money
from . import add_json_flag, estimate_table, load_and_plan

if TYPE_CHECKING:
    from ..estimate import PlanEstimate


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("estimate", help="time and cost per job and phase, without starting anything",
                       description="Per job and in total: time and cost by phase (boot, setup, staging, "
                                   "train, eval, pull, teardown), each figure with its source.")
    p.add_argument("config", type=Path, help="experiments file (YAML)")
    p.add_argument("--one-per-job", action="store_true", help="plan one instance per job (no sessions)")
    p.add_argument("--explain", action="store_true", help="say where every figure comes from")
    add_json_flag(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from .plan_view import missing_secrets, plan_json, show_plan
    loaded = load_and_plan(args.config, require_secrets=False)   # the catalog needs no key
    missing = missing_secrets(loaded)
    note = [f"{m}: estimated from the catalog; live prices need the key" for m in missing]
    one = bool(getattr(args, "one_per_job", False))
    if args.json:
        data = {**loaded.estimate_json(), "plan": plan_json(loaded, one_per_job=one), "notes": note}
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
        return 0
    estimate_table(loaded, title=f"estimate for {loaded.name} ({len(loaded.jobs)} jobs)",
                   explain=explain(loaded.estimate) if args.explain else None)
    show_plan(loaded, one_per_job=one)
    for line in note:
        sys.stdout.write(line + "\n")
    return 0


def fmt_seconds(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def explain(plan: PlanEstimate) -> str:
    """`--explain`: every figure of the estimate with the row or rule it comes from."""
    lines: list[str] = []
    for j in plan.jobs:
        lines.append(f"{j.job_id}  ({j.host}: {j.provider}, {j.gpu})")
        lines.append(f"  price     {format_money(j.price_per_hour)} {j.currency}/h  [{j.price_source}] "
                     f"{j.price_detail}")
        for p in j.phases:
            added = "" if p.billed_seconds == p.seconds else f" (adds {fmt_seconds(p.billed_seconds)})"
            lines.append(f"  {p.phase:<9} {fmt_seconds(p.seconds):>9}{added}  "
                         f"{format_money(p.cost)} {j.currency}  [{p.source}] {p.detail}")
        lines.append(f"  total     {fmt_seconds(j.total_seconds):>9}  billed {fmt_seconds(j.billed_seconds)} "
                     f"(granularity {j.granularity_s:g} s)  {format_money(j.total_cost)} {j.currency}")
    lines.append("")
    lines.append(f"{len(plan.jobs)} jobs, {fmt_seconds(plan.total_seconds)} of billed time in all")
    for cur, value in sorted(plan.totals.items()):
        lines.append(f"total {cur}: {format_money(value)}")
    if len(plan.totals) > 1:
        lines.append("currencies are kept apart; a budget in one currency converts the others "
                     "with the rates in catalog/fx.csv")
    lines.append("sources: config = your file; catalog = prices.csv; runtime table = runtimes.csv; "
                 "assumption = phases.csv defaults; history = median of your finished jobs")
    return "\n".join(lines)
