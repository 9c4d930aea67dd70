"""`orchestrate costs [--by provider|gpu|run|day] [--run RUN…] [--json]`."""
from __future__ import annotations

import argparse
import json
import sys

from ..ledger import Ledger
from ..report.costs import GROUPINGS, spend, totals, useful_time
from . import add_json_flag, money

HELP = "spend by provider, GPU, run or day (GPU and storage apart; failed launches counted)"


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("costs", help=HELP, description=HELP)
    parser.add_argument("--by", choices=GROUPINGS, default=None,
                        help="one grouping (default: all four)")
    parser.add_argument("--run", dest="runs", action="append", default=None, metavar="RUN",
                        help="only these run ids (repeatable)")
    add_json_flag(parser)
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    groupings = [args.by] if args.by else list(GROUPINGS)
    ledger = Ledger.open()
    try:
        tables = {by: spend(ledger, by, runs=args.runs) for by in groupings}
        useful = useful_time(ledger, runs=args.runs)
    finally:
        ledger.close()
    all_rows = tables[groupings[0]]
    if args.json:
        payload = {"by": {by: [r.as_dict() for r in rows] for by, rows in tables.items()},
                   "total": totals(all_rows), "useful": [u.as_dict() for u in useful]}
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(110, Console().width))
    if not all_rows:
        console.print("No billed instances in the ledger yet.")
        return 0
    for by, rows in tables.items():
        t = Table(title=f"spend by {by}", title_justify="left")
        for col in (by, "currency", "GPU", "storage", "total", "GPU h", "instances",
                    "failed launches"):
            t.add_column(col, justify="left" if col in (by, "currency") else "right")
        for r in rows:
            t.add_row(r.key, r.currency, money(r.gpu_cost), money(r.storage_cost),
                      money(r.total) + (" (accruing)" if r.accruing else ""),
                      f"{r.gpu_hours:.2f}", str(r.instances),
                      f"{r.failed_launches}" + (f" ({money(r.failed_cost)})" if r.failed_cost else ""))
        console.print(t)
    if useful:
        t = Table(title="useful time by run (train + eval / billed GPU time)", title_justify="left")
        for col in ("run", "billed", "train + eval", "useful"):
            t.add_column(col, justify="left" if col == "run" else "right")
        for u in useful:
            t.add_row(u.run_id, f"{u.billed_s:.0f} s", f"{u.useful_s:.0f} s",
                      "-" if u.ratio is None else f"{100 * u.ratio:.0f} %")
        console.print(t)
    console.print("total: " + ", ".join(f"{money(v)} {c}" for c, v in sorted(totals(all_rows).items())))
    return 0
