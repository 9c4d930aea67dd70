"""The ledger's tables, built by an ordered list of migrations.

A ledger file records how far it has been built in SQLite's `PRAGMA user_version`: the
version of the last migration applied (0 for a new file, and for ledgers written before
versions existed). Opening a ledger applies the migrations above its version, in order, in one
transaction with the version bump, so a file is always at exactly one known version.

Rules for changing the tables:
- A migration that has shipped is never edited, reordered or removed: users' files were built
  by it. A change is a new `Migration` appended to `MIGRATIONS` with the next version.
- Code reads and writes columns by name (no positional INSERT, no `SELECT *` read by position),
  so adding a column never moves another.
- A file whose version is newer than `LATEST_VERSION` was written by a newer orchestrate; it
  is refused (`LedgerTooNew`) before anything is written to it.

Migration 1 is the layout of the ledger before versions existed. On an empty file it creates
the tables; on an unversioned file that already has them it adopts them (its statements are
all `IF NOT EXISTS`), after checking that every table has the columns migration 1 defines.
"""
from __future__ import annotations

import logging
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import LedgerError, LedgerTooNew

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]


_V1 = (
    """CREATE TABLE IF NOT EXISTS runs (
  run_id TEXT PRIMARY KEY, name TEXT, config_path TEXT, created_at TEXT, ended_at TEXT,
  status TEXT, budget REAL, currency TEXT, note TEXT)""",
    """CREATE TABLE IF NOT EXISTS instances (
  row_id INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT, job_id TEXT, host_name TEXT,
  provider TEXT, label TEXT, instance_id TEXT, gpu TEXT, price_per_hour REAL, currency TEXT,
  storage_price_per_hour REAL DEFAULT 0, granularity_s REAL DEFAULT 1, state TEXT,
  host_key TEXT, endpoint TEXT, created_at TEXT, updated_at TEXT, ended_at TEXT, note TEXT)""",
    "CREATE INDEX IF NOT EXISTS instances_by_id ON instances(provider, instance_id)",
    """CREATE TABLE IF NOT EXISTS billing (
  id INTEGER PRIMARY KEY AUTOINCREMENT, instance_row INTEGER REFERENCES instances(row_id),
  kind TEXT, started_at TEXT, ended_at TEXT, price_per_hour REAL, currency TEXT,
  granularity_s REAL)""",
    """CREATE TABLE IF NOT EXISTS jobs (
  run_id TEXT, job_id TEXT, experiment TEXT, scene TEXT, host_name TEXT, provider TEXT,
  gpu TEXT, steps INTEGER, backend TEXT, settings TEXT, dataset TEXT, status TEXT, error TEXT,
  created_at TEXT, started_at TEXT, ended_at TEXT, estimate TEXT, instance_row INTEGER,
  out_dir TEXT, PRIMARY KEY (run_id, job_id))""",
    """CREATE TABLE IF NOT EXISTS phases (
  id INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT, job_id TEXT, phase TEXT,
  started_at TEXT, ended_at TEXT, seconds REAL)""",
    """CREATE TABLE IF NOT EXISTS results (
  run_id TEXT, job_id TEXT, scene TEXT, gpu TEXT, backend TEXT, psnr_mean REAL,
  ssim_mean REAL, train_seconds REAL, steps INTEGER, device TEXT, n_test_images INTEGER,
  out_dir TEXT, summary TEXT, PRIMARY KEY (run_id, job_id))""",
    """CREATE TABLE IF NOT EXISTS events (
  id INTEGER PRIMARY KEY AUTOINCREMENT, at TEXT, run_id TEXT, job_id TEXT, kind TEXT,
  message TEXT)""",
)

# An instance that ran several jobs (sessions): each job's own seconds and its even share of the
# instance's shared time (boot, environment, gaps, teardown), with both costs.
_V2 = (
    """CREATE TABLE IF NOT EXISTS job_costs (
  run_id TEXT, job_id TEXT, instance_row INTEGER, own_seconds REAL, shared_seconds REAL,
  own_cost REAL, shared_cost REAL, PRIMARY KEY (run_id, job_id, instance_row))""",
)

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "the tables of the unversioned ledger: runs, instances, billing, jobs, "
                 "phases, results, events", _V1),
    Migration(2, "job_costs: a job's own and shared cost on an instance that ran several jobs", _V2),
)
LATEST_VERSION = MIGRATIONS[-1].version

# The unversioned module exported its DDL under this name; it is migration 1's statements.
SCHEMA = ";\n".join(_V1) + ";\n"


def user_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def refuse_newer(conn: sqlite3.Connection, path: Path | str,
                 latest: int = LATEST_VERSION) -> int:
    """The file's version; `LedgerTooNew` if it is past what this code knows. Reads only."""
    version = user_version(conn)
    if version > latest:
        raise LedgerTooNew(
            f"the ledger at {path} has schema version {version}, newer than this orchestrate "
            f"knows (up to {latest}); it was left unchanged",
            hint="upgrade orchestrate to the version that wrote it (or newer)")
    return version


def migrate(conn: sqlite3.Connection, path: Path | str = "",
            migrations: Sequence[Migration] = MIGRATIONS) -> tuple[int, ...]:
    """Apply the migrations above the file's version, in order; returns the versions applied.

    `conn` must be in autocommit mode (isolation_level=None) and outside a transaction: the
    migrations and the version bump commit together or not at all."""
    _check_numbering(migrations)
    latest = migrations[-1].version
    if refuse_newer(conn, path, latest) == latest:
        return ()                                # the usual case: no write lock taken
    if conn.in_transaction:
        raise ValueError("migrate() needs a connection outside a transaction")
    conn.execute("BEGIN IMMEDIATE")
    try:
        # another process may have migrated between the read above and the lock
        version = refuse_newer(conn, path, latest)
        adopting = version == 0 and _has_tables(conn)
        applied = []
        for m in migrations[version:]:
            for statement in m.statements:
                conn.execute(statement)
            if adopting and m.version == 1:
                _check_adopted(conn, path, m)
            conn.execute(f"PRAGMA user_version = {int(m.version)}")
            applied.append(m.version)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:              # SQLite may have rolled back already (disk full)
            conn.execute("ROLLBACK")
        raise
    if version > 0 or adopting:
        log.info("ledger %s: schema version %d -> %d%s", path, version, latest,
                 " (adopted the unversioned tables)" if adopting else "")
    return tuple(applied)


def _check_numbering(migrations: Sequence[Migration]) -> None:
    versions = [m.version for m in migrations]
    if versions != list(range(1, len(versions) + 1)):
        raise ValueError(f"migrations must be numbered 1, 2, 3, ... in order; got {versions}")


def _has_tables(conn: sqlite3.Connection) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type='table'"
                        " AND name NOT LIKE 'sqlite_%' LIMIT 1").fetchone() is not None


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}


def _check_adopted(conn: sqlite3.Connection, path: Path | str, first: Migration) -> None:
    """An unversioned file's tables must have every column migration 1 defines."""
    reference = sqlite3.connect(":memory:")
    try:
        for statement in first.statements:
            reference.execute(statement)
        tables = [r[0] for r in reference.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'")]
        missing = [f"{t}.{c}" for t in tables
                   for c in sorted(_columns(reference, t) - _columns(conn, t))]
    finally:
        reference.close()
    if missing:
        raise LedgerError(
            f"the ledger at {path} has no schema version and lacks columns this orchestrate "
            f"needs ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); "
            "it was left unchanged",
            hint="move that file aside, or set ORCHESTRATE_HOME to another directory")
