"""The budget: checked before anything paid starts, and consulted while jobs run.

Before a run: the estimate's total must not exceed the cap (`budget.max_cost` or
`--max-cost`), else `BudgetError` and nothing is started. While running: a job may start only
when what is already spent (recomputed from the ledger's billing intervals) plus what the
running jobs are still expected to cost plus this job's estimate stays under the cap; and
`over_cap()` tells the runner to stop jobs when the real spend reaches it.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

from ..config import Budget as ConfigBudget
from ..errors import BudgetError
from ..ledger import JOB_DONE_STATES, Ledger


@dataclass(frozen=True, slots=True)
class Budget:
    max_cost: float | None       # None: no cap
    currency: str = "USD"
    source: str = "budget.max_cost"   # where the cap came from, for messages


def effective_budget(config_budget: ConfigBudget | None, max_cost_flag: float | None) -> Budget:
    """The cap in force: `--max-cost` wins over the file's `budget.max_cost`."""
    currency = (config_budget.currency if config_budget else None) or "USD"
    if max_cost_flag is not None:
        return Budget(float(max_cost_flag), currency, "--max-cost")
    cap = config_budget.max_cost if config_budget else None
    return Budget(float(cap) if cap is not None else None, currency, "budget.max_cost")


def check_estimate(total_cost: float, budget: Budget) -> None:
    """Raise BudgetError when the estimated total exceeds the cap."""
    if budget.max_cost is None:
        return
    if total_cost > budget.max_cost + 1e-12:
        raise BudgetError(
            f"estimated cost {total_cost:.4f} {budget.currency} exceeds the budget of "
            f"{budget.max_cost:.4f} {budget.currency} ({budget.source}); nothing was started",
            hint="raise the budget, use --max-cost, or run fewer/shorter jobs (see `orchestrate estimate`)")


class BudgetGuard:
    """Thread-safe spend guard for one run.

    Projected spend = what the ledger says is spent (every billing interval of the run,
    open ones accrued to now) + what each running job is still expected to cost (its
    estimate minus what it has accrued, never below zero). A job starts only when the
    projection plus its own estimate fits under the cap.

    The cap is enforced early enough to hold: stopping a job is not instant (the pipeline
    snapshots, results are pulled, the instance is released) and the last billing granule
    is rounded up. So `over_cap()` trips when spent + a stop reserve reaches the cap, the
    reserve being every open instance's price × (`stop_reserve_s` + one granule). Each
    decision is written to the ledger's events with its figures (kinds `budget_refused`,
    `budget_cap`).
    """

    def __init__(self, budget: Budget, ledger: Ledger, run_id: str, *,
                 stop_reserve_s: float = 10.0) -> None:
        self.budget = budget
        self.ledger = ledger
        self.run_id = run_id
        self.stop_reserve_s = stop_reserve_s
        self._committed: dict[str, float] = {}   # job id -> estimated cost of jobs started
        self._cap_recorded = False
        self._lock = threading.Lock()

    def _in_budget_currency(self, amount: float, currency: str | None) -> float:
        if not amount or not currency or currency.upper() == self.budget.currency.upper():
            return amount
        from ..catalog import convert  # the rates the pre-run check used
        return convert(amount, currency, self.budget.currency)[0]

    def _accrued_by_job(self) -> dict[str, float]:
        accrued: dict[str, float] = {}
        for inst in self.ledger.instances(run_id=self.run_id):
            cost = self._in_budget_currency(self.ledger.instance_cost(inst.row_id), inst.currency)
            accrued[inst.job_id] = accrued.get(inst.job_id, 0.0) + cost
        return accrued

    def spent(self) -> float:
        """The run's spend so far in the budget's currency (open intervals accrued to now)."""
        return sum(self._accrued_by_job().values())

    def projected(self) -> tuple[float, float]:
        """(spent, remaining estimate of the running jobs)."""
        accrued = self._accrued_by_job()
        spent = sum(accrued.values())
        done = {j.job_id for j in self.ledger.jobs(self.run_id) if j.status in JOB_DONE_STATES}
        remaining = sum(max(0.0, est - accrued.get(jid, 0.0))
                        for jid, est in self._committed.items() if jid not in done)
        return spent, remaining

    def may_start(self, job_id: str, job_estimate: float) -> bool:
        """Reserve `job_estimate` for `job_id` when it fits under the cap; False otherwise."""
        with self._lock:
            if self.budget.max_cost is not None:
                spent, remaining = self.projected()
                if spent + remaining + job_estimate > self.budget.max_cost + 1e-12:
                    self.ledger.add_event(
                        "budget_refused",
                        f"{job_id} not started: spent {spent:.4f} + running jobs' remaining "
                        f"estimate {remaining:.4f} + its estimate {job_estimate:.4f} "
                        f"> cap {self.budget.max_cost:.4f} {self.budget.currency}",
                        self.run_id, job_id)
                    return False
            self._committed[job_id] = job_estimate
            return True

    def stop_reserve(self) -> float:
        """What stopping every open instance of the run may still cost."""
        reserve = 0.0
        for b in self.ledger.open_billing():
            inst = self.ledger.instance(b.instance_row)
            if inst is not None and inst.run_id == self.run_id:
                per_s = self._in_budget_currency((b.price_per_hour or 0.0) / 3600.0, b.currency)
                reserve += per_s * (self.stop_reserve_s + (b.granularity_s or 1.0))
        return reserve

    def over_cap(self) -> bool:
        """True when the run's spend plus the cost of stopping has reached the cap."""
        if self.budget.max_cost is None:
            return False
        spent, reserve = self.spent(), self.stop_reserve()
        hit = spent + reserve >= self.budget.max_cost
        if hit:
            with self._lock:
                if not self._cap_recorded:
                    self._cap_recorded = True
                    self.ledger.add_event(
                        "budget_cap",
                        f"stopping running jobs: spent {spent:.4f} + stop reserve {reserve:.4f} "
                        f">= cap {self.budget.max_cost:.4f} {self.budget.currency}", self.run_id)
        return hit
