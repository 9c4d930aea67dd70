"""Subcommands of `orchestrate`, one module each, plus what they share: loading a file into
jobs with their estimates, tables (rich, or JSON with `--json`), confirmation prompts."""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def money(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.2f}" if abs(v) >= 1 or v == 0 else f"{v:.4f}"


def print_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table
    table = Table(title=title, title_justify="left")
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*["-" if v is None else str(v) for v in r])
    Console(width=max(100, Console().width)).print(table)


# -- experiments file → jobs with estimates ------------------------------------------------------
@dataclass(frozen=True, slots=True)
class LoadedPlan:
    path: Path
    name: str
    config: Any
    budget: Any
    jobs: list[Any]              # runner.JobPlan
    estimates: list[Any]         # the estimate module's per-job objects (same order)
    total_cost: float
    currency: str
    total_seconds: float

    def estimate_json(self) -> dict[str, Any]:
        return {"name": self.name, "currency": self.currency, "total_cost": self.total_cost,
                "total_seconds": self.total_seconds,
                "jobs": [_jsonable(e) for e in self.estimates]}


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "as_dict"):
        return obj.as_dict()
    if hasattr(obj, "__dataclass_fields__"):
        from dataclasses import asdict
        return json.loads(json.dumps(asdict(obj), default=str))
    return obj


def load_and_plan(path: Path) -> LoadedPlan:
    """Validate the file, expand the matrix, estimate every job (no network, nothing paid)."""
    from ..config import load_config
    from ..estimate import estimate_jobs
    from ..ledger import Ledger
    from ..plan import expand
    from ..runner import JobPlan

    config = load_config(path)
    jobs = expand(config)
    if not jobs:
        raise ConfigError(f"{path}: the experiments expand to no jobs", hint="list scenes and hosts")
    ledger = Ledger.open()
    try:
        est = estimate_jobs(config, jobs, ledger=ledger)
    finally:
        ledger.close()
    plans = []
    for job, e in zip(jobs, est.jobs):
        host = config.hosts[job.host]
        plans.append(JobPlan(job_id=job.job_id, experiment=job.experiment, scene=job.scene,
                             host_name=job.host, host=host, dataset_name=job.dataset,
                             dataset=config.datasets[job.dataset], steps=job.steps, backend=job.backend,
                             device=job.device, max_seconds=job.max_seconds, downscale=job.downscale,
                             seed=job.seed, estimate_cost=e.total_cost, estimate_seconds=e.total_seconds,
                             currency=e.currency, estimate=_jsonable(e)))
    return LoadedPlan(path=path, name=config.name, config=config, budget=config.budget, jobs=plans,
                      estimates=list(est.jobs), total_cost=est.total_cost, currency=est.currency,
                      total_seconds=sum(p.estimate_seconds for p in plans))


def estimate_table(loaded: LoadedPlan, *, title: str, explain: bool = False) -> None:
    """The estimate as people read it: per job, time and cost by phase, and the total."""
    phases = ("boot", "setup", "staging", "train", "eval", "pull", "teardown")
    rows = []
    for plan, e in zip(loaded.jobs, loaded.estimates):
        by_phase = {p.name: p for p in getattr(e, "phases", [])}
        cells = [plan.job_id, plan.host_name, plan.gpu]
        for ph in phases:
            p = by_phase.get(ph)
            cells.append("-" if p is None else f"{p.seconds:.0f}s")
        cells += [f"{e.total_seconds / 60:.1f} min", f"{money(e.total_cost)} {e.currency}"]
        rows.append(cells)
    print_table(title, ["job", "host", "gpu", *phases, "total", "cost"], rows)
    if explain:
        for plan, e in zip(loaded.jobs, loaded.estimates):
            for p in getattr(e, "phases", []):
                sys.stdout.write(f"{plan.job_id} {p.name}: {p.seconds:.1f} s, {money(p.cost)} "
                                 f"{e.currency} — {getattr(p, 'source', '')}\n")
    sys.stdout.write(f"total: {money(loaded.total_cost)} {loaded.currency}, "
                     f"{loaded.total_seconds / 60:.1f} job-minutes\n")


def home_hint() -> str:
    return f"state in {os.environ.get('ORCHESTRATE_HOME') or '~/.local/state/orchestrate'}"
