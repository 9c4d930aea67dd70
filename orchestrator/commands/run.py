"""`orchestrate run experiments.yaml [--yes] [--max-cost X] [--dry-run] [--concurrency N] [--json]`.

Load → plan → estimate → show → budget check → confirm → run jobs → results table. Nothing
paid starts before the estimate was shown and the budget allowed it. SIGINT/SIGTERM set a stop
flag: jobs ask their pipelines to snapshot, then every instance is released.
"""
from __future__ import annotations

import argparse
import json
import logging
import secrets
import signal
import sqlite3
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import BudgetError, ConfigError, LedgerError
from ..ledger import Ledger
from ..ledger.guard import GuardedLedger, replay_journals
from ..run.budget import BudgetGuard, check_estimate, effective_budget
from ..run.live import LiveView
from ..run.runner import JobOutcome, Runner, RunOptions
from ..run.session import SessionRunner
from . import (
    add_json_flag,
    confirm,
    estimate_table,
    is_tty,
    load_and_plan,
    money,
    positive_float,
    positive_int,
    print_table,
)

log = logging.getLogger(__name__)

EXIT_JOB_FAILED = 1
EXIT_INTERRUPTED = 130


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="estimate, then run every job of an experiments file",
                       description="Estimate, check the budget, rent, stage, run, watch, pull results, "
                                   "stop every instance, print the results.")
    p.add_argument("config", type=Path, help="experiments file (YAML)")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    p.add_argument("--max-cost", type=positive_float, default=None, metavar="X",
                   help="refuse when the estimate exceeds X (overrides budget.max_cost)")
    p.add_argument("--dry-run", action="store_true", help="show the estimate; start nothing")
    p.add_argument("--concurrency", type=positive_int, default=4, metavar="N",
                   help="jobs run at the same time (default 4); with sessions, instances at the same "
                        "time, each running one job per GPU (gpus_per_instance)")
    p.add_argument("--one-per-job", action="store_true",
                   help="rent one instance per job (isolation; today's behaviour) instead of sessions "
                        "that run a host entry's jobs one after another on warm instances")
    p.add_argument("--runs-dir", type=Path, default=None,
                   help="where results go (default: runs/ next to the experiments file)")
    add_json_flag(p)
    p.set_defaults(func=main)


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def main(args: argparse.Namespace) -> int:
    loaded = load_and_plan(args.config)
    budget = effective_budget(loaded.budget, args.max_cost)
    out = sys.stdout
    if not args.json:
        estimate_table(loaded, title=f"estimate for {loaded.name} ({len(loaded.jobs)} jobs)")
        from .plan_view import show_plan
        show_plan(loaded, one_per_job=bool(args.one_per_job))
    run_id = new_run_id()
    try:
        check_estimate(loaded.total_cost, budget)
    except BudgetError as exc:
        _record_refusal(args, loaded, budget, run_id, exc)   # best effort: the refusal is the answer
        raise
    ledger = Ledger.open()
    try:
        replay_journals(ledger)
        if args.dry_run:
            if args.json:
                out.write(json.dumps({"dry_run": True, "estimate": loaded.estimate_json()}, indent=2) + "\n")
            else:
                sys.stderr.write("dry run: nothing was started\n")
            return 0
        if not args.yes:
            paid = loaded.total_cost > 0
            if is_tty():
                if not confirm(f"start {len(loaded.jobs)} job(s), estimated "
                               f"{money(loaded.total_cost)} {loaded.currency}?"):
                    sys.stderr.write("not started\n")
                    return 1
            elif paid:
                raise BudgetError("not on a terminal and the run costs money: refusing without confirmation",
                                  hint="pass --yes to confirm the estimate")
        return _execute(args, loaded, budget, ledger, run_id)
    finally:
        ledger.close()


def check_writable(runs_dir: Path) -> None:
    """Create `runs_dir` and write a probe file in it; ConfigError (nothing started) if not."""
    import tempfile
    try:
        runs_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=runs_dir, prefix=".write-probe-"):
            pass
    except OSError as exc:
        raise ConfigError(f"--runs-dir {runs_dir}: results cannot be written there "
                          f"({exc.strerror or exc}); nothing was started",
                          hint="give a writable directory with --runs-dir") from None


def _record_refusal(args: argparse.Namespace, loaded: Any, budget: Any, run_id: str, exc: BudgetError) -> None:
    """Note a budget refusal in the ledger; a ledger that cannot take it (read-only, damaged)
    must not hide the refusal behind a storage error."""
    try:
        ledger = Ledger.open()
    except LedgerError as err:
        log.debug("the refusal is not recorded: %s", err.message)
        return
    try:
        ledger.create_run(run_id, loaded.name, str(args.config.resolve()), budget.max_cost,
                          budget.currency, status="refused")
        ledger.add_event("refused", str(exc), run_id)
        ledger.finish_run(run_id, "refused", note=str(exc))
    except (sqlite3.Error, OSError, LedgerError) as err:
        log.debug("the refusal is not recorded in the ledger: %s", err)
    finally:
        ledger.close()


def _execute(args: argparse.Namespace, loaded: Any, budget: Any, plain: Ledger, run_id: str) -> int:
    from ..run.reconcile import hold_run_lock

    ledger: Any = GuardedLedger(plain, run_id)    # a ledger fault mid-run loses no billing
    runs_dir = (args.runs_dir or args.config.resolve().parent / "runs").resolve()
    check_writable(runs_dir)      # before renting: results that cannot be saved are paid for and lost
    stop = threading.Event()
    ledger.create_run(run_id, loaded.name, str(args.config.resolve()), budget.max_cost, budget.currency)
    ledger.add_event("started", f"{len(loaded.jobs)} job(s), estimate {loaded.total_cost:.4f} "
                     f"{loaded.currency}", run_id)
    log.info("run %s: %d job(s); results in %s", run_id, len(loaded.jobs), runs_dir / run_id)
    _check_orphans(loaded.config, ledger)
    signals = _install_handlers(stop)
    t0 = time.monotonic()
    try:
        with hold_run_lock(ledger, run_id), \
                LiveView([(j.job_id, j.host_name) for j in loaded.jobs], tty=is_tty() and not args.json) as view:
            runner_class = Runner if args.one_per_job else SessionRunner
            runner = runner_class(loaded.jobs, ledger=ledger, run_id=run_id,
                            options=RunOptions(runs_dir=runs_dir, concurrency=args.concurrency),
                            guard=BudgetGuard(budget, ledger, run_id), view=view, stop=stop)
            from ..run.slurm import run_all  # jobs on slurm hosts go as one array per host
            outcomes = run_all(runner)
    finally:
        _restore_handlers(signals)
    statuses = {o.status for o in outcomes}
    status = ("interrupted" if stop.is_set() else "succeeded" if statuses == {"succeeded"} else "failed")
    ledger.finish_run(run_id, status)
    flushed = ledger.flush()
    _print_results(args, run_id, outcomes, ledger, time.monotonic() - t0, runs_dir)
    if not flushed or ledger.relocated_to is not None:
        _report_ledger_fault(ledger, run_id)
        return EXIT_JOB_FAILED
    if stop.is_set():
        return EXIT_INTERRUPTED
    return 0 if status == "succeeded" else EXIT_JOB_FAILED


def _check_orphans(config: Any, ledger: Ledger) -> None:
    """Instances of dead runs still listed by the clouds of this file: named on stderr (with the
    command that destroys them); Lambda's, which nothing on the host can stop, are terminated."""
    from ..providers._http import RetryPolicy
    from ..run.reconcile import TERMINATE_ON_SIGHT, check_orphans, providers_for

    providers = providers_for(config, ledger, policy=RetryPolicy(deadline_s=15.0, attempt_timeout_s=10.0))
    for line in check_orphans(ledger, providers, terminate=TERMINATE_ON_SIGHT):
        sys.stderr.write(line + "\n")
        ledger.add_event("orphan_seen", line)


def _report_ledger_fault(ledger: Any, run_id: str) -> None:
    """The run's records could not all reach the ledger file: say where they are and what the
    run cost so far (from the copy this process holds, which has every interval)."""
    try:
        cost = f"{money(ledger.run_cost(run_id))}"
    except LedgerError:
        cost = "unknown"
    if ledger.relocated_to is not None:
        sys.stderr.write(f"error: the ledger file was replaced during run {run_id}; its records are in "
                         f"{ledger.relocated_to}; cost so far {cost}\n")
        return
    journal = ledger.save_journal()
    sys.stderr.write(f"error: the ledger refused {ledger.pending} change(s) of run {run_id} "
                     f"({ledger.last_fault}); they are kept in {journal} and written by the next "
                     "`orchestrate run` or `status`; "
                     f"cost so far {cost}\n")


def _install_handlers(stop: threading.Event) -> dict[int, Any]:
    """SIGINT/SIGTERM set `stop` (jobs wind down and tear down); a second SIGINT is ignored so
    teardown is never cut short: teardown itself is bounded by deadlines."""
    old: dict[int, Any] = {}
    if threading.current_thread() is not threading.main_thread():
        return old

    def handler(signum: int, frame: Any) -> None:
        if not stop.is_set():
            sys.stderr.write(f"\n{signal.Signals(signum).name}: stopping jobs (snapshots are kept), "
                             "then releasing every instance...\n")
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        old[sig] = signal.signal(sig, handler)
    return old


def _restore_handlers(old: dict[int, Any]) -> None:
    for sig, h in old.items():
        signal.signal(sig, h)


def _print_results(args: argparse.Namespace, run_id: str, outcomes: list[JobOutcome], ledger: Ledger,
                   seconds: float, runs_dir: Path) -> None:
    rows = [{"job": o.job_id, "scene": o.scene, "host": o.host_name, "gpu": o.gpu, "status": o.status,
             "psnr": o.psnr, "ssim": o.ssim, "train_s": o.train_seconds, "cost": o.cost,
             "currency": o.currency, "out_dir": o.out_dir, "error": o.error} for o in outcomes]
    total = ledger.run_cost(run_id)
    if args.json:
        sys.stdout.write(json.dumps({"run_id": run_id, "status": (ledger.run(run_id) or {}).get("status"),
                                     "jobs": rows, "total_cost": total, "seconds": round(seconds, 2),
                                     "runs_dir": str(runs_dir / run_id)}, indent=2) + "\n")
        return
    print_table(f"results of run {run_id}",
                ["job", "scene", "host", "gpu", "status", "PSNR", "SSIM", "train s", "cost"],
                [[r["job"], r["scene"], r["host"], r["gpu"], r["status"],
                  "-" if r["psnr"] is None else f"{r['psnr']:.2f}",
                  "-" if r["ssim"] is None else f"{r['ssim']:.4f}",
                  "-" if r["train_s"] is None else f"{r['train_s']:.1f}",
                  f"{money(r['cost'])} {r['currency']}"] for r in rows])
    for o in outcomes:
        if o.error:
            sys.stderr.write(f"{o.job_id}: {o.status}: {o.error.splitlines()[0]}\n")
    sys.stdout.write(f"total cost {money(total)}; {seconds:.0f} s; results in {runs_dir / run_id}\n")
