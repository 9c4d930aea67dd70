"""What a person sees while jobs run: a rich live table on a terminal, log lines otherwise.

The runner calls `update(job_id, ...)` from its job threads; the view is thread-safe. Not on
a TTY, a line is logged when a job changes phase and at most every `log_every_s` while
training, so CI logs stay short.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, replace
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class JobView:
    job_id: str
    host: str
    phase: str = "pending"
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    psnr: float | None = None
    started_mono: float = 0.0
    cost: float = 0.0
    currency: str = "USD"
    note: str = ""


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


class LiveView:
    def __init__(self, jobs: list[tuple[str, str]], *, tty: bool, log_every_s: float = 10.0) -> None:
        now = time.monotonic()
        self._jobs = {jid: JobView(jid, host, started_mono=now) for jid, host in jobs}
        self._tty = tty
        self._log_every_s = log_every_s
        self._last_log: dict[str, float] = {}
        self._lock = threading.Lock()
        self._live: Any = None

    def __enter__(self) -> LiveView:
        if self._tty:
            from rich.console import Console
            from rich.live import Live
            self._live = Live(self._table(), console=Console(stderr=True), refresh_per_second=2,
                              get_renderable=self._table)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)
            self._live = None

    def update(self, job_id: str, **fields: Any) -> None:
        with self._lock:
            old = self._jobs.get(job_id) or JobView(job_id, "?", started_mono=time.monotonic())
            new = replace(old, **fields)
            self._jobs[job_id] = new
        if not self._tty:
            self._log_line(old, new)

    def _log_line(self, old: JobView, new: JobView) -> None:
        now = time.monotonic()
        changed = old.phase != new.phase or bool(new.note and old.note != new.note)
        if not changed and now - self._last_log.get(new.job_id, 0.0) < self._log_every_s:
            return
        if not changed and new.phase != "train":
            return
        self._last_log[new.job_id] = now
        progress = f" step {new.step}/{new.total_steps}" if new.total_steps else ""
        metrics = ""
        if new.loss is not None:
            metrics += f" loss {new.loss:.4f}"
        if new.psnr is not None:
            metrics += f" psnr {new.psnr:.2f}"
        note = f" ({new.note})" if new.note else ""
        log.info("%s [%s] %s%s%s elapsed %.0fs cost %.4f %s%s", new.job_id, new.host, new.phase,
                 progress, metrics, now - new.started_mono, new.cost, new.currency, note)

    def _table(self) -> Any:
        from rich.table import Table
        table = Table(title="orchestrate", expand=False)
        for col in ("job", "host", "phase", "step", "loss", "PSNR", "elapsed", "cost"):
            table.add_column(col, justify="right" if col in ("step", "loss", "PSNR", "elapsed", "cost") else "left")
        now = time.monotonic()
        with self._lock:
            jobs = list(self._jobs.values())
        for j in jobs:
            table.add_row(j.job_id, j.host, j.phase + (f" ({j.note})" if j.note else ""),
                          f"{j.step}/{j.total_steps}" if j.total_steps else "-",
                          _fmt(j.loss, ".4f"), _fmt(j.psnr, ".2f"), f"{now - j.started_mono:.0f}s",
                          f"{j.cost:.4f} {j.currency}")
        return table
