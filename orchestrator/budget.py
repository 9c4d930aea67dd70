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

from .errors import BudgetError
from .ledger import Ledger


@dataclass(frozen=True, slots=True)
class Budget:
    max_cost: float | None       # None: no cap
    currency: str = "USD"
    source: str = "budget.max_cost"   # where the cap came from, for messages


def effective_budget(config_budget: object | None, max_cost_flag: float | None) -> Budget:
    """The cap in force: `--max-cost` wins over the file's `budget.max_cost`."""
    currency = str(getattr(config_budget, "currency", None) or "USD")
    if max_cost_flag is not None:
        return Budget(float(max_cost_flag), currency, "--max-cost")
    cap = getattr(config_budget, "max_cost", None)
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
    """Thread-safe spend guard for one run."""

    def __init__(self, budget: Budget, ledger: Ledger, run_id: str) -> None:
        self.budget = budget
        self.ledger = ledger
        self.run_id = run_id
        self._committed: dict[str, float] = {}   # job id -> estimated cost of jobs started
        self._lock = threading.Lock()

    def spent(self) -> float:
        return self.ledger.run_cost(self.run_id)

    def may_start(self, job_id: str, job_estimate: float) -> bool:
        """Reserve `job_estimate` for `job_id` when it fits under the cap; False otherwise."""
        with self._lock:
            if self.budget.max_cost is not None:
                spent = self.spent()
                # Running jobs count at their estimate (what they are expected to cost in the end).
                expected = max(spent, sum(self._committed.values()))
                if expected + job_estimate > self.budget.max_cost + 1e-12:
                    return False
            self._committed[job_id] = job_estimate
            return True

    def over_cap(self) -> bool:
        """True when the real spend of the run has reached the cap."""
        return self.budget.max_cost is not None and self.spent() >= self.budget.max_cost
