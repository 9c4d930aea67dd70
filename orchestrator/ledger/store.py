"""The ledger: the only writer of the controller's SQLite state.

Money rules live here as data. An instance row is written *before* the provider is asked to
create anything (state `intent`), so a controller that dies mid-call still left a trace that
reconciliation can act on. Billing intervals carry the price recorded at provisioning, and a
cost is always recomputed from intervals (duration rounded up to the provider's granularity),
never stored as a running total that could drift.

Safe under concurrent jobs (one connection guarded by a lock inside a process, WAL and a busy
timeout across processes, e.g. `orchestrate status` while a run is going).

The tables and their versions are in `schema.py`; opening a ledger brings an older file up to
the latest version and refuses a newer one. Every INSERT names its columns and every read
names the columns it turns into a row, so a column added by a later migration changes nothing
here until the code asks for it.
"""
from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import Any

from ..errors import LedgerError
from ..home import default_home, iso, utcnow
from ..secrets import redact
from . import schema

# Instance states as the ledger knows them (the provider's own word goes to `note`).
INTENT, CREATING, RUNNING, STOPPED, DESTROYED, FAILED = (
    "intent", "creating", "running", "stopped", "destroyed", "failed")
OPEN_STATES = (INTENT, CREATING, RUNNING, STOPPED)
JOB_DONE_STATES = ("succeeded", "failed", "interrupted", "cancelled", "budget_stopped")


def parse_iso(s: str) -> datetime:
    return datetime.fromisoformat(s)


def ledger_hint(exc: BaseException) -> str:
    """Advice that fits the fault: a damaged file is not a permissions problem."""
    text = str(exc).lower()
    if "malformed" in text or "not a database" in text or "corrupt" in text:
        return ("the ledger file is damaged; `orchestrate status` and `costs` may still read it; "
                "keep a copy, then move it aside to start a new one")
    if "readonly" in text or "read-only" in text or "permission" in text:
        return "make the ledger writable, or set ORCHESTRATE_HOME to a writable directory"
    if "locked" in text or "busy" in text:
        return "another process holds the ledger; wait for it, then run the command again"
    return "set ORCHESTRATE_HOME to a writable directory"


def interval_cost(started_at: str, ended_at: str | None, price_per_hour: float,
                  granularity_s: float, now: datetime | None = None) -> float:
    """Cost of one billing interval: duration rounded up to the granularity × price."""
    end = parse_iso(ended_at) if ended_at else (now or utcnow())
    seconds = max(0.0, (end - parse_iso(started_at)).total_seconds())
    g = granularity_s if granularity_s and granularity_s > 0 else 1.0
    billed = math.ceil(seconds / g - 1e-9) * g if seconds > 0 else 0.0
    return billed * (price_per_hour or 0.0) / 3600.0


@dataclass(frozen=True, slots=True)
class InstanceRow:
    row_id: int
    run_id: str
    job_id: str
    host_name: str
    provider: str
    label: str
    instance_id: str | None
    gpu: str
    price_per_hour: float
    currency: str
    storage_price_per_hour: float
    granularity_s: float
    state: str
    host_key: str | None
    endpoint: str | None
    created_at: str
    updated_at: str | None
    ended_at: str | None
    note: str | None


@dataclass(frozen=True, slots=True)
class JobRow:
    run_id: str
    job_id: str
    experiment: str
    scene: str
    host_name: str
    provider: str
    gpu: str
    steps: int
    backend: str
    settings: dict[str, Any]
    dataset: str
    status: str
    error: str | None
    created_at: str
    started_at: str | None
    ended_at: str | None
    estimate: dict[str, Any] | None
    instance_row: int | None
    out_dir: str | None


@dataclass(frozen=True, slots=True)
class BillingRow:
    id: int
    instance_row: int
    kind: str
    started_at: str
    ended_at: str | None
    price_per_hour: float
    currency: str
    granularity_s: float

    def cost(self, now: datetime | None = None) -> float:
        return interval_cost(self.started_at, self.ended_at, self.price_per_hour,
                             self.granularity_s, now)


def _names(cls: type) -> str:
    """The SELECT list for a row dataclass: its fields, by name."""
    return ", ".join(f.name for f in fields(cls))


# The columns each dict-returning read gives back (the keys callers use).
RUN_COLUMNS = ("run_id", "name", "config_path", "created_at", "ended_at", "status", "budget",
               "currency", "note")
EVENT_COLUMNS = ("id", "at", "run_id", "job_id", "kind", "message")
PHASE_COLUMNS = ("id", "run_id", "job_id", "phase", "started_at", "ended_at", "seconds")
RESULT_COLUMNS = ("run_id", "job_id", "scene", "gpu", "backend", "psnr_mean", "ssim_mean",
                  "train_seconds", "steps", "device", "n_test_images", "out_dir", "summary")
_RUNS, _EVENTS, _PHASES, _RESULTS = (", ".join(c) for c in (RUN_COLUMNS, EVENT_COLUMNS,
                                                              PHASE_COLUMNS, RESULT_COLUMNS))
_INSTANCES, _JOBS, _BILLING = _names(InstanceRow), _names(JobRow), _names(BillingRow)


_JOB_COSTS = "run_id, job_id, instance_row, own_seconds, shared_seconds, own_cost, shared_cost"

class Ledger:
    """`Ledger(path)` opens (creating or migrating) the file; `with Ledger(path) as led:`
    closes it on the way out, as does `close()`."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(str(self.path), timeout=30, isolation_level=None,
                                   check_same_thread=False)
        except (sqlite3.Error, OSError) as exc:
            raise self._cannot_open(exc) from None
        try:
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA busy_timeout=30000")
            # migrations first: a file they refuse is left as it was (WAL mode rewrites the header)
            schema.migrate(conn, self.path)
            conn.execute("PRAGMA journal_mode=WAL")
            self.schema_version = schema.user_version(conn)
        except BaseException as exc:
            conn.close()
            if isinstance(exc, (sqlite3.Error, OSError)):
                raise self._cannot_open(exc) from None
            raise
        self._conn = conn
        self._lock = threading.RLock()

    def _cannot_open(self, exc: BaseException) -> LedgerError:
        return LedgerError(f"cannot open the ledger at {self.path}: {exc}", hint=ledger_hint(exc))

    @classmethod
    def open(cls, home: Path | str | None = None) -> Ledger:
        home = Path(home) if home else default_home()
        return cls(home / "ledger.sqlite")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing -------------------------------------------------------------------------
    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                try:
                    self._conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                raise

    def _query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    # -- runs -----------------------------------------------------------------------------
    def create_run(self, run_id: str, name: str, config_path: str = "", budget: float | None = None,
                   currency: str = "USD", status: str = "running") -> None:
        with self._tx() as c:
            c.execute("INSERT INTO runs (run_id, name, config_path, created_at, ended_at, status,"
                      " budget, currency, note) VALUES (?,?,?,?,?,?,?,?,?)",
                      (run_id, name, config_path, iso(), None, status, budget, currency, None))

    def finish_run(self, run_id: str, status: str, note: str | None = None) -> None:
        with self._tx() as c:
            c.execute("UPDATE runs SET status=?, ended_at=?, note=COALESCE(?, note) WHERE run_id=?",
                      (status, iso(), note and redact(note), run_id))

    def runs(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._query(f"SELECT {_RUNS} FROM runs ORDER BY created_at")]

    def run(self, run_id: str) -> dict[str, Any] | None:
        rows = self._query(f"SELECT {_RUNS} FROM runs WHERE run_id=?", (run_id,))
        return dict(rows[0]) if rows else None

    # -- events ---------------------------------------------------------------------------
    def add_event(self, kind: str, message: str, run_id: str | None = None,
                  job_id: str | None = None) -> None:
        with self._tx() as c:
            c.execute("INSERT INTO events (at, run_id, job_id, kind, message) VALUES (?,?,?,?,?)",
                      (iso(), run_id, job_id, kind, redact(message)))

    def events(self, run_id: str | None = None) -> list[dict[str, Any]]:
        if run_id is None:
            return [dict(r) for r in self._query(f"SELECT {_EVENTS} FROM events ORDER BY id")]
        return [dict(r) for r in self._query(f"SELECT {_EVENTS} FROM events WHERE run_id=? ORDER BY id",
                                             (run_id,))]

    # -- jobs -----------------------------------------------------------------------------
    def add_job(self, run_id: str, job_id: str, *, experiment: str, scene: str, host_name: str,
                provider: str, gpu: str, steps: int, backend: str, dataset: str,
                settings: dict[str, Any] | None = None, estimate: dict[str, Any] | None = None,
                status: str = "pending") -> None:
        with self._tx() as c:
            c.execute(
                "INSERT OR REPLACE INTO jobs (run_id, job_id, experiment, scene, host_name, provider,"
                " gpu, steps, backend, settings, dataset, status, created_at, estimate)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (run_id, job_id, experiment, scene, host_name, provider, gpu, steps, backend,
                 json.dumps(settings or {}), dataset, status, iso(),
                 json.dumps(estimate) if estimate is not None else None))

    def update_job(self, run_id: str, job_id: str, **fields: Any) -> None:
        allowed = {"status", "error", "started_at", "ended_at", "instance_row", "out_dir", "estimate"}
        bad = set(fields) - allowed
        if bad:
            raise LedgerError(f"update_job: unknown fields {sorted(bad)}")
        if "error" in fields and fields["error"] is not None:
            fields["error"] = redact(str(fields["error"]))
        if "estimate" in fields and fields["estimate"] is not None:
            fields["estimate"] = json.dumps(fields["estimate"])
        if fields.get("status") in JOB_DONE_STATES and "ended_at" not in fields:
            fields["ended_at"] = iso()
        if fields.get("status") == "running" and "started_at" not in fields:
            fields["started_at"] = iso()
        cols = ", ".join(f"{k}=?" for k in fields)
        with self._tx() as c:
            c.execute(f"UPDATE jobs SET {cols} WHERE run_id=? AND job_id=?",
                      (*fields.values(), run_id, job_id))

    def jobs(self, run_id: str | None = None) -> list[JobRow]:
        rows = (self._query(f"SELECT {_JOBS} FROM jobs WHERE run_id=? ORDER BY created_at", (run_id,))
                if run_id else self._query(f"SELECT {_JOBS} FROM jobs ORDER BY created_at"))
        out = []
        for r in rows:
            d = dict(r)
            d["settings"] = json.loads(d["settings"] or "{}")
            d["estimate"] = json.loads(d["estimate"]) if d["estimate"] else None
            out.append(JobRow(**d))
        return out

    def record_phase(self, run_id: str, job_id: str, phase: str, started_at: float,
                     ended_at: float) -> None:
        """Record a phase timing (epoch seconds from time.time())."""
        with self._tx() as c:
            c.execute("INSERT INTO phases (run_id, job_id, phase, started_at, ended_at, seconds)"
                      " VALUES (?,?,?,?,?,?)",
                      (run_id, job_id, phase, iso(started_at), iso(ended_at),
                       max(0.0, ended_at - started_at)))

    @contextmanager
    def phase(self, run_id: str, job_id: str, phase: str) -> Iterator[None]:
        """Time a phase; it is recorded even when the body raises."""
        t0 = time.time()
        try:
            yield
        finally:
            self.record_phase(run_id, job_id, phase, t0, time.time())

    def phases(self, run_id: str | None = None, job_id: str | None = None) -> list[dict[str, Any]]:
        sql, args = f"SELECT {_PHASES} FROM phases WHERE 1=1", []
        if run_id:
            sql += " AND run_id=?"
            args.append(run_id)
        if job_id:
            sql += " AND job_id=?"
            args.append(job_id)
        return [dict(r) for r in self._query(sql + " ORDER BY id", tuple(args))]

    # -- results --------------------------------------------------------------------------
    def add_result(self, run_id: str, job_id: str, summary: dict[str, Any], *, gpu: str,
                   out_dir: str) -> None:
        with self._tx() as c:
            c.execute(f"INSERT OR REPLACE INTO results ({_RESULTS})"
                      " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                      (run_id, job_id, summary.get("scene"), gpu, summary.get("backend"),
                       summary.get("psnr_mean"), summary.get("ssim_mean"),
                       summary.get("train_seconds"), summary.get("steps"),
                       summary.get("device"), summary.get("n_test_images"), out_dir,
                       redact(json.dumps(summary))))

    def results(self, run_ids: list[str] | None = None) -> list[dict[str, Any]]:
        if run_ids:
            marks = ",".join("?" * len(run_ids))
            rows = self._query(f"SELECT {_RESULTS} FROM results WHERE run_id IN ({marks})",
                               tuple(run_ids))
        else:
            rows = self._query(f"SELECT {_RESULTS} FROM results")
        return [dict(r) for r in rows]

    # -- a job's share of an instance that ran several jobs -----------------------------------
    def record_job_cost(self, run_id: str, job_id: str, instance_row: int, *, own_seconds: float,
                        shared_seconds: float, own_cost: float, shared_cost: float) -> None:
        """A job's own phases and its even share of the instance's shared time (boot,
        environment, gaps, teardown), both kept so per-job costs compare across runs."""
        with self._tx() as c:
            c.execute("INSERT OR REPLACE INTO job_costs (run_id, job_id, instance_row, own_seconds, "
                      "shared_seconds, own_cost, shared_cost) VALUES (?,?,?,?,?,?,?)",
                      (run_id, job_id, instance_row, own_seconds, shared_seconds, own_cost, shared_cost))

    def job_costs(self, run_id: str | None = None) -> list[dict[str, Any]]:
        if run_id is None:
            return [dict(r) for r in self._query(f"SELECT {_JOB_COSTS} FROM job_costs ORDER BY rowid")]
        return [dict(r) for r in self._query(f"SELECT {_JOB_COSTS} FROM job_costs WHERE run_id=? ORDER BY rowid",
                                             (run_id,))]

    # -- instances and billing -------------------------------------------------------------
    def record_intent(self, *, run_id: str, job_id: str, host_name: str, provider: str,
                      label: str, gpu: str, price_per_hour: float, currency: str,
                      granularity_s: float = 1.0, storage_price_per_hour: float = 0.0) -> int:
        """Write the instance row BEFORE the paid create call; returns its row id."""
        with self._tx() as c:
            cur = c.execute(
                "INSERT INTO instances (run_id, job_id, host_name, provider, label, gpu,"
                " price_per_hour, currency, storage_price_per_hour, granularity_s, state,"
                " created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (run_id, job_id, host_name, provider, label, gpu, price_per_hour, currency,
                 storage_price_per_hour, granularity_s, INTENT, iso(), iso()))
            assert cur.lastrowid is not None   # an INSERT into a rowid table always sets it
            return int(cur.lastrowid)

    def instance_created(self, row_id: int, instance_id: str, at: float | None = None) -> None:
        """The provider returned an id: GPU billing starts now (at the create call)."""
        t = iso(at) if at is not None else iso()
        with self._tx() as c:
            row = c.execute(f"SELECT {_INSTANCES} FROM instances WHERE row_id=?", (row_id,)).fetchone()
            if row is None:
                raise LedgerError(f"no instance row {row_id}")
            c.execute("UPDATE instances SET instance_id=?, state=?, updated_at=? WHERE row_id=?",
                      (instance_id, CREATING, t, row_id))
            self._open_interval(c, row, "gpu", t)

    def set_instance_state(self, row_id: int, state: str, *, at: float | None = None,
                           note: str | None = None) -> None:
        """Move an instance between running/stopped/destroyed/failed, closing and opening
        billing intervals: GPU while running (or creating), storage while stopped."""
        t = iso(at) if at is not None else iso()
        with self._tx() as c:
            row = c.execute(f"SELECT {_INSTANCES} FROM instances WHERE row_id=?", (row_id,)).fetchone()
            if row is None:
                raise LedgerError(f"no instance row {row_id}")
            if state in (RUNNING, CREATING):
                self._close_intervals(c, row_id, t, kind="storage")
                if not self._has_open(c, row_id, "gpu") and row["instance_id"]:
                    self._open_interval(c, row, "gpu", t)
            elif state == STOPPED:
                self._close_intervals(c, row_id, t, kind="gpu")
                if (row["storage_price_per_hour"] or 0) > 0 and not self._has_open(c, row_id, "storage"):
                    self._open_interval(c, row, "storage", t)
            elif state in (DESTROYED, FAILED):
                self._close_intervals(c, row_id, t)
            ended = t if state in (DESTROYED, FAILED) else None
            c.execute("UPDATE instances SET state=?, updated_at=?, ended_at=COALESCE(?, ended_at),"
                      " note=COALESCE(?, note) WHERE row_id=?",
                      (state, t, ended, note and redact(note), row_id))

    def set_instance_price(self, row_id: int, price_per_hour: float) -> None:
        """The price the provider placed the instance at, once known (it can differ from the
        offer recorded with the intent): the row and its open GPU interval take it, from the
        interval's start, since the placed price is what billed from the create on."""
        with self._tx() as c:
            c.execute("UPDATE instances SET price_per_hour=?, updated_at=? WHERE row_id=?",
                      (price_per_hour, iso(), row_id))
            c.execute("UPDATE billing SET price_per_hour=? WHERE instance_row=? AND kind='gpu'"
                      " AND ended_at IS NULL", (price_per_hour, row_id))

    def set_endpoint(self, row_id: int, endpoint: str) -> None:
        with self._tx() as c:
            c.execute("UPDATE instances SET endpoint=?, updated_at=? WHERE row_id=?",
                      (endpoint, iso(), row_id))

    def pin_host_key(self, row_id: int, host_key: str) -> None:
        """Pin `host_key` ("<type> <base64>") to the instance; first contact only."""
        with self._tx() as c:
            c.execute("UPDATE instances SET host_key=COALESCE(host_key, ?) WHERE row_id=?",
                      (host_key, row_id))

    def host_key(self, row_id: int) -> str | None:
        rows = self._query("SELECT host_key FROM instances WHERE row_id=?", (row_id,))
        return rows[0]["host_key"] if rows else None

    def instance(self, row_id: int) -> InstanceRow | None:
        rows = self._query(f"SELECT {_INSTANCES} FROM instances WHERE row_id=?", (row_id,))
        return InstanceRow(**dict(rows[0])) if rows else None

    def instances(self, *, open_only: bool = False, run_id: str | None = None,
                  provider: str | None = None) -> list[InstanceRow]:
        sql, args = f"SELECT {_INSTANCES} FROM instances WHERE 1=1", list[Any]()
        if open_only:
            sql += f" AND state IN ({','.join('?' * len(OPEN_STATES))})"
            args += OPEN_STATES
        if run_id:
            sql += " AND run_id=?"
            args.append(run_id)
        if provider:
            sql += " AND provider=?"
            args.append(provider)
        return [InstanceRow(**dict(r)) for r in self._query(sql + " ORDER BY row_id", tuple(args))]

    def find_instance(self, provider: str, instance_id: str) -> InstanceRow | None:
        rows = self._query(f"SELECT {_INSTANCES} FROM instances WHERE provider=? AND instance_id=?"
                           " ORDER BY row_id DESC", (provider, instance_id))
        return InstanceRow(**dict(rows[0])) if rows else None

    def billing(self, row_id: int | None = None) -> list[BillingRow]:
        rows = (self._query(f"SELECT {_BILLING} FROM billing WHERE instance_row=? ORDER BY id", (row_id,))
                if row_id is not None else self._query(f"SELECT {_BILLING} FROM billing ORDER BY id"))
        return [BillingRow(**dict(r)) for r in rows]

    def instance_cost(self, row_id: int, now: datetime | None = None) -> float:
        return sum(b.cost(now) for b in self.billing(row_id))

    def run_cost(self, run_id: str, now: datetime | None = None) -> float:
        return sum(self.instance_cost(r.row_id, now) for r in self.instances(run_id=run_id))

    def open_billing(self) -> list[BillingRow]:
        return [BillingRow(**dict(r)) for r in
                self._query(f"SELECT {_BILLING} FROM billing WHERE ended_at IS NULL ORDER BY id")]

    # -- interval helpers (inside a transaction) -------------------------------------------
    @staticmethod
    def _has_open(c: sqlite3.Connection, row_id: int, kind: str) -> bool:
        return c.execute("SELECT 1 FROM billing WHERE instance_row=? AND kind=? AND ended_at IS NULL",
                         (row_id, kind)).fetchone() is not None

    @staticmethod
    def _open_interval(c: sqlite3.Connection, row: sqlite3.Row, kind: str, t: str) -> None:
        price = row["price_per_hour"] if kind == "gpu" else row["storage_price_per_hour"]
        c.execute("INSERT INTO billing (instance_row, kind, started_at, ended_at, price_per_hour,"
                  " currency, granularity_s) VALUES (?,?,?,?,?,?,?)",
                  (row["row_id"], kind, t, None, price or 0.0, row["currency"],
                   row["granularity_s"] or 1.0))

    @staticmethod
    def _close_intervals(c: sqlite3.Connection, row_id: int, t: str, kind: str | None = None) -> None:
        if kind:
            c.execute("UPDATE billing SET ended_at=? WHERE instance_row=? AND kind=? AND ended_at IS NULL",
                      (t, row_id, kind))
        else:
            c.execute("UPDATE billing SET ended_at=? WHERE instance_row=? AND ended_at IS NULL",
                      (t, row_id))
