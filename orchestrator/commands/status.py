"""`orchestrate status [--json]`: recent runs, their jobs, and instances still open (accruing)."""
from __future__ import annotations

import argparse
import json
import sys

from ..ledger import Ledger
from . import add_json_flag, money, print_table


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="runs, jobs and open instances with their cost so far")
    p.add_argument("--runs", type=int, default=5, metavar="N", help="how many recent runs (default 5)")
    add_json_flag(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    ledger = Ledger.open()
    try:
        runs = ledger.runs()[-max(1, args.runs):]
        jobs = [j for r in runs for j in ledger.jobs(r["run_id"])]
        open_rows = ledger.instances(open_only=True)
        run_rows = [{**r, "cost": ledger.run_cost(r["run_id"])} for r in runs]
        inst_rows = [{"row_id": i.row_id, "run_id": i.run_id, "job_id": i.job_id, "host": i.host_name,
                      "provider": i.provider, "instance_id": i.instance_id, "gpu": i.gpu,
                      "state": i.state, "price_per_hour": i.price_per_hour, "currency": i.currency,
                      "since": i.created_at, "cost": ledger.instance_cost(i.row_id)} for i in open_rows]
        orphans = _orphan_lines(ledger)
    finally:
        ledger.close()
    if args.json:
        sys.stdout.write(json.dumps({
            "runs": run_rows,
            "jobs": [{"run_id": j.run_id, "job_id": j.job_id, "scene": j.scene, "host": j.host_name,
                      "gpu": j.gpu, "status": j.status, "error": j.error, "out_dir": j.out_dir}
                     for j in jobs],
            "open_instances": inst_rows, "orphans": orphans}, indent=2) + "\n")
        return 0
    for line in orphans:
        sys.stderr.write(line + "\n")
    if not runs and not inst_rows:
        sys.stdout.write("no runs yet\n")
        return 0
    print_table("runs", ["run", "name", "status", "created", "cost"],
                [[r["run_id"], r["name"], r["status"], r["created_at"][:19],
                  f"{money(r['cost'])} {r['currency']}"] for r in run_rows])
    if jobs:
        print_table("jobs", ["run", "job", "host", "gpu", "status", "error"],
                    [[j.run_id, j.job_id, j.host_name, j.gpu, j.status,
                      (j.error or "").splitlines()[0][:80] if j.error else ""] for j in jobs])
    if inst_rows:
        print_table("open instances (still billing)", ["row", "provider", "instance", "host", "state",
                                                       "price/h", "cost so far"],
                    [[i["row_id"], i["provider"], i["instance_id"] or "(intent)", i["host"], i["state"],
                      i["price_per_hour"], f"{money(i['cost'])} {i['currency']}"] for i in inst_rows])
        sys.stdout.write("stop them with `orchestrate down --all`\n")
    else:
        sys.stdout.write("no open instances\n")
    return 0


def _orphan_lines(ledger: Ledger) -> list[str]:
    """Labelled instances of dead runs at the clouds this ledger's runs used (listed, not touched)."""
    from ..providers._http import RetryPolicy
    from ..run.reconcile import check_orphans, providers_for

    providers = providers_for(None, ledger, policy=RetryPolicy(deadline_s=15.0, attempt_timeout_s=10.0))
    return check_orphans(ledger, providers)
