"""The estimate: time and cost of every job, per phase, before anything is rented.

`core` computes it from the catalog (`orchestrator.catalog`) and, once jobs have finished,
from this user's history in the ledger (`history`). How it is shown (`--explain`) is the
estimate command's business.
"""
from __future__ import annotations

from .core import PHASES, JobEstimate, PhaseEstimate, PlanEstimate, estimate_job, estimate_plan
from .history import History

__all__ = ["PHASES", "History", "JobEstimate", "PhaseEstimate", "PlanEstimate", "estimate_job",
           "estimate_plan"]
