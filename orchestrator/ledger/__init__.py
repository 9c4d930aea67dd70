"""The ledger: the controller's SQLite state (runs, jobs, phases, results, instances with
intent, billing intervals, events).

`store.py` holds the `Ledger` and its rows; `schema.py` the tables, built by ordered
migrations recorded in the file's `PRAGMA user_version`. The names below are the ones
`orchestrator.ledger` has always exported.
"""
from __future__ import annotations

from .schema import LATEST_VERSION, MIGRATIONS, SCHEMA, Migration
from .store import (
    CREATING,
    DESTROYED,
    FAILED,
    INTENT,
    JOB_DONE_STATES,
    OPEN_STATES,
    RUNNING,
    STOPPED,
    BillingRow,
    InstanceRow,
    JobRow,
    Ledger,
    default_home,
    interval_cost,
    iso,
    parse_iso,
    utcnow,
)

__all__ = [
    "CREATING", "DESTROYED", "FAILED", "INTENT", "JOB_DONE_STATES", "LATEST_VERSION",
    "MIGRATIONS", "OPEN_STATES", "RUNNING", "SCHEMA", "STOPPED", "BillingRow", "InstanceRow",
    "JobRow", "Ledger", "Migration", "default_home", "interval_cost", "iso", "parse_iso",
    "utcnow",
]
