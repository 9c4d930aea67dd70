"""Subcommands of `orchestrate`, one module each, plus what they share: loading a file into
jobs with their estimates, tables (rich, or JSON with `--json`), confirmation prompts."""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config.source import printable
from ..errors import ConfigError


def positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0: {text!r}")
    return v


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1: {text!r}")
    return v


def add_json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")


def is_tty() -> bool:
    return sys.stdin.isatty() and sys.stderr.isatty()


def confirm(question: str) -> bool:
    sys.stderr.write(f"{question} [y/N] ")
    sys.stderr.flush()
    try:
        answer = sys.stdin.readline()
    except (OSError, KeyboardInterrupt):
        return False
    return answer.strip().lower() in ("y", "yes")


def money(v: float | str | None) -> str:
    """An amount from a table row (a float, or a number a JSON round trip left as text)."""
    from ..catalog import format_money
    return format_money(None if v is None else float(v))


def print_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text
    table = Table(title=title, title_justify="left")
    for c in columns:
        table.add_column(c)
    for r in rows:
        # control characters (an ESC from a name or an error text) would drive the terminal, and
        # rich would read `[...]` in them as markup: plain Text, escaped
        table.add_row(*[Text("-" if v is None else printable(str(v))) for v in r])
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)   # logs and pipes: never squeeze the columns
    console.print(table)


# -- experiments file → jobs with estimates ------------------------------------------------------
@dataclass(frozen=True, slots=True)
class LoadedPlan:
    path: Path
    name: str
    config: Any
    budget: Any
    jobs: list[Any]              # runner.JobPlan
    estimate: Any                # estimate.PlanEstimate
    total_cost: float            # in `currency` (the budget's, converted when needed)
    currency: str
    total_seconds: float
    notes: list[str]             # currency conversions used

    def estimate_json(self) -> dict[str, Any]:
        return {"name": self.name, "currency": self.currency, "total_cost": self.total_cost,
                "total_seconds": self.total_seconds, "conversions": self.notes,
                **self.estimate.to_dict()}


def load_and_plan(path: Path, *, require_secrets: bool = True) -> LoadedPlan:
    """Validate the file, expand the matrix, estimate every job (no network, nothing paid).
    `require_secrets=False` (estimate) plans without the API keys: the catalog needs none."""
    from .. import catalog
    from ..config import check_secrets, load_config
    from ..config.plan import expand
    from ..estimate import estimate_plan
    from ..ledger import Ledger
    from ..run.runner import JobPlan

    config = load_config(path)
    jobs = expand(config)
    if not jobs:
        raise ConfigError(f"{path}: the experiments expand to no jobs", hint="list scenes and hosts")
    if require_secrets:
        check_secrets(config, sorted({j.host.name for j in jobs}))
    from ..errors import LedgerError
    try:
        ledger: Ledger | None = Ledger.open()
    except LedgerError as exc:   # history only sharpens the estimate; the run itself reports it
        logging.getLogger(__name__).debug("estimating without the ledger's history: %s", exc.message)
        ledger = None
    from ..estimate import local as local_estimate
    from ..home import default_home
    probe = local_estimate.LocalProbe(default_home()) if local_estimate.enabled() else None
    try:
        est = estimate_plan(jobs, ledger, local_probe=probe)
    finally:
        if ledger is not None:
            ledger.close()
    if config.budget is not None:
        currency = config.budget.currency
    else:
        currency = next(iter(est.totals), "USD") if len(est.totals) == 1 else "USD"
    total, notes = est.total_in(currency)
    plans = []
    for job, e in zip(jobs, est.jobs):
        cost, _ = catalog.convert(e.total_cost, e.currency, currency)
        plans.append(JobPlan(job_id=job.job_id, experiment=job.experiment, scene=job.scene,
                             host_name=job.host.name, host=job.host, dataset_name=job.dataset.name,
                             dataset=job.dataset, steps=job.steps, backend=job.backend,
                             device=job.device, max_seconds=job.max_seconds, downscale=job.downscale,
                             seed=job.seed, estimate_cost=cost, estimate_seconds=e.total_seconds,
                             currency=e.currency, estimate=e.to_dict(), train=job.train))
    return LoadedPlan(path=path, name=config.name, config=config, budget=config.budget, jobs=plans,
                      estimate=est, total_cost=total, currency=currency,
                      total_seconds=est.total_seconds, notes=notes)


PHASES = ("boot", "setup", "staging", "train", "eval", "pull", "teardown")


def estimate_table(loaded: LoadedPlan, *, title: str, explain: str | None = None) -> None:
    """The estimate as people read it: per job, time by phase, billed time and cost; the total."""
    rows = []
    for plan, e in zip(loaded.jobs, loaded.estimate.jobs):
        by_phase = {p.phase: p for p in e.phases}
        cells = [plan.job_id, plan.host_name, plan.gpu]
        for ph in PHASES:
            p = by_phase.get(ph)
            cells.append("-" if p is None else f"{p.seconds:.0f}s")
        cells += [f"{e.billed_seconds / 60:.1f} min", f"{money(e.total_cost)} {e.currency}"]
        rows.append(cells)
    print_table(title, ["job", "host", "gpu", *PHASES, "billed", "cost"], rows)
    if explain:
        sys.stdout.write(explain.rstrip("\n") + "\n")
    for note in loaded.notes:
        sys.stdout.write(f"converted: {note}\n")
    sys.stdout.write(f"total: {money(loaded.total_cost)} {loaded.currency}, "
                     f"{loaded.total_seconds / 60:.1f} job-minutes\n")
