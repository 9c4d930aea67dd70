"""A run's view of the ledger that survives ledger faults without losing billing.

A run must not be wrecked by its own bookkeeping: a write that fails mid-run (disk full, a
lock held too long, a file made read-only, an I/O error) is kept in memory, in order, with the
instant it happened, retried before every later write and at the end of the run, and, when
the ledger still refuses it then, saved as a journal beside the ledger that the next command
replays. The run meanwhile goes on as after any other error: results are pulled, instances
released, the cost printed.

The file itself is watched too: SQLite keeps writing into a ledger that was deleted (the inode
lives while the connection is open) and every row of the run would vanish with it. Before each
write the path is compared with the file that was opened; when it is gone, the open copy is
backed up to the path (every row, not just this run's) and writing goes on there; when another
file took its place, the copy goes beside it (`ledger-recovered-<run>.sqlite`), never over it.

This wraps `Ledger` from outside (its connection is swapped under its own lock) so the ledger
module itself stays as it is.
"""
from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import LedgerError
from ..home import iso
from ..secrets import redact
from .store import JOB_DONE_STATES, Ledger, ledger_hint

log = logging.getLogger(__name__)

# writes that may be deferred; `record_intent` is not among them: an instance is never rented
# without its intent row on disk first
DEFERRABLE = ("create_run", "finish_run", "add_event", "add_job", "update_job", "record_phase",
              "add_result", "instance_created", "set_instance_state", "set_endpoint", "pin_host_key")
JOURNAL_GLOB = "pending-*.json"
FAULTS = (sqlite3.Error, OSError)


def _ident(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _stamp(name: str, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Pin the instants a deferred write would otherwise take from the clock when it runs."""
    kwargs = dict(kwargs)
    if name in ("instance_created", "set_instance_state") and kwargs.get("at") is None and len(args) < 3:
        kwargs["at"] = time.time()
    if name == "update_job":
        if kwargs.get("status") in JOB_DONE_STATES and "ended_at" not in kwargs:
            kwargs["ended_at"] = iso()
        if kwargs.get("status") == "running" and "started_at" not in kwargs:
            kwargs["started_at"] = iso()
    return kwargs


class GuardedLedger:
    """Everything `Ledger` offers; the writes in DEFERRABLE never raise a storage fault."""

    def __init__(self, inner: Ledger, run_id: str) -> None:
        self._inner = inner
        self.run_id = run_id
        self._lock = threading.RLock()
        self._pending: list[tuple[str, tuple, dict[str, Any]]] = []
        self._ident = _ident(inner.path)
        self.last_fault: str | None = None
        self.faults = 0
        self.relocated_to: Path | None = None      # set when another file took the ledger's place
        self.recreated = False

    # -- delegation -------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name in DEFERRABLE:
            def write(*args: Any, **kwargs: Any) -> None:
                self._write(name, args, kwargs)
            return write
        if callable(attr):
            def read(*args: Any, **kwargs: Any) -> Any:
                try:
                    return attr(*args, **kwargs)
                except FAULTS as exc:
                    raise LedgerError(f"the ledger at {self._inner.path} failed ({name}): {exc}",
                                      hint=ledger_hint(exc)) from None
            return read
        return attr

    @contextmanager
    def phase(self, run_id: str, job_id: str, phase: str) -> Iterator[None]:
        """As `Ledger.phase`, but the record goes through the guard (delegating would write
        through the inner ledger and raise on a fault)."""
        t0 = time.time()
        try:
            yield
        finally:
            self._write("record_phase", (run_id, job_id, phase, t0, time.time()), {})

    @property
    def pending(self) -> int:
        return len(self._pending)

    # -- writes -----------------------------------------------------------------------------
    def _write(self, name: str, args: tuple, kwargs: dict[str, Any]) -> None:
        kwargs = _stamp(name, args, kwargs)
        with self._lock:
            self._follow_file()
            self._pending.append((name, args, kwargs))
            self._drain()

    def _drain(self) -> bool:
        """Apply pending writes in order; stop at the first fault. True when none is left."""
        while self._pending:
            name, args, kwargs = self._pending[0]
            try:
                getattr(self._inner, name)(*args, **kwargs)
            except FAULTS as exc:
                self.faults += 1
                text = f"{type(exc).__name__}: {exc}"
                if text != self.last_fault:
                    log.warning("the ledger refused a write (%s); %d change(s) kept in memory and retried",
                                text, len(self._pending))
                self.last_fault = text
                return False
            self._pending.pop(0)
        return True

    def flush(self, *, tries: int = 5, pause_s: float = 1.0) -> bool:
        """Retry what is pending a few times (bounded); True when everything is written."""
        with self._lock:
            self._follow_file()
            for i in range(tries):
                if self._drain():
                    return True
                if i + 1 < tries:
                    time.sleep(pause_s)
            return False

    def save_journal(self) -> Path:
        """Write what is still pending beside the ledger (replayed by the next command)."""
        path = self._inner.path.parent / f"pending-{self.run_id}.json"
        rows = [{"call": n, "args": list(a), "kwargs": k} for n, a, k in self._pending]
        tmp = path.with_suffix(".tmp")
        tmp.write_text(redact(json.dumps(rows, default=str, indent=1)))
        os.replace(tmp, path)
        return path

    # -- the file under the connection ----------------------------------------------------
    def _follow_file(self) -> None:
        path = self._inner.path
        now = _ident(path)
        if now is not None and now == self._ident:
            return
        target = path if now is None else path.with_name(f"ledger-recovered-{self.run_id}.sqlite")
        try:
            self._relink(target)
        except FAULTS as exc:
            log.error("the ledger file %s was %s and could not be recreated: %s", path,
                      "removed" if now is None else "replaced", exc)
            self._ident = now           # do not try again on every write; the end reports it
            return
        if now is None:
            self.recreated = True
            log.warning("the ledger file %s was removed during the run; recreated it from the open "
                        "copy (every row kept)", path)
        else:
            self.relocated_to = target
            log.error("the ledger file %s was replaced by another file during the run; this run's "
                      "records go to %s", path, target)

    def _relink(self, target: Path) -> None:
        inner = self._inner
        with inner._lock:   # the swap must exclude every other use
            fresh = sqlite3.connect(str(target), timeout=30, isolation_level=None, check_same_thread=False)
            try:
                inner._conn.backup(fresh)
                fresh.row_factory = sqlite3.Row
                fresh.execute("PRAGMA journal_mode=WAL")
                fresh.execute("PRAGMA busy_timeout=30000")
            except BaseException:
                fresh.close()
                raise
            old, inner._conn = inner._conn, fresh
            if target != inner.path:
                inner.path = target
            try:
                old.close()
            except sqlite3.Error:
                pass
        self._ident = _ident(target)


def replay_journals(ledger: Ledger) -> int:
    """Apply journals left by runs whose ledger writes failed; return how many changes were
    written. A journal that still cannot be applied stays for the next command."""
    done = 0
    for path in sorted(ledger.path.parent.glob(JOURNAL_GLOB)):
        try:
            rows = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            log.warning("cannot read the pending-changes journal %s: %s", path, exc)
            continue
        left = list(rows)
        while left:
            row = left[0]
            if row.get("call") not in DEFERRABLE:
                left.pop(0)
                continue
            try:
                getattr(ledger, row["call"])(*row.get("args", []), **row.get("kwargs", {}))
            except FAULTS as exc:
                log.warning("the ledger still refuses the changes in %s: %s", path, exc)
                break
            except LedgerError as exc:    # e.g. a row that no longer exists: nothing to keep
                log.warning("a pending change in %s was dropped: %s", path, exc)
            left.pop(0)
            done += 1
        if left:
            path.write_text(json.dumps(left, indent=1))
        else:
            path.unlink(missing_ok=True)
    if done:
        log.warning("wrote %d ledger change(s) left pending by an earlier run", done)
    return done
