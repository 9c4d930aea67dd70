"""Jobs on a `slurm` host: the matrix as one job array, submitted from the cluster's login node.

Per Slurm host: connect to the login node once; push the payload and stage each dataset once
into the work root on the shared filesystem; prepare every job's directory (a finished one is
cleared, an interrupted one keeps its snapshot, one brought home by an earlier run is put back);
record an intent row per task in the ledger; submit ONE array (`%N` = the run's concurrency)
whose tasks `exec` the same `remote_payload run` as any host, each in its own job dir; follow
squeue and every task's status.json (the live view); bill each task from the accounting
(elapsed × allocated GPUs, or CPUs, at `price_per_gpu_hour`); pull results. Ctrl-C or the
budget cap `scancel` the array: the pipelines get SIGTERM and keep their snapshots, which a
rerun of the same file resumes (the job dirs are keyed by job id + settings, as on any host).

A task is one ledger instance row: its GPU interval opens when squeue first shows it running
(at Slurm's start time) and closes at start + elapsed from the accounting, so its billed
seconds are Slurm's own. A task that never started costs nothing.
"""
from __future__ import annotations

import copy
import logging
import shlex
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import JobError, OrchestratorError, ProviderError
from ..ledger import DESTROYED, FAILED, OPEN_STATES
from ..providers.base import make_label
from ..providers.slurm import (
    SlurmProvider,
    TaskState,
    accounting_command,
    array_name,
    batch_script,
    cancel_command,
    parse_accounting,
    parse_sbatch,
    parse_squeue,
    squeue_command,
    time_limit_s,
)
from ..secrets import redact
from ..staging import stage_dataset
from ..transport.base import Transport
from . import payload as pl
from .runner import EXIT_INTERRUPTED, JobOutcome, JobPlan, Runner
from .slurm_login import COMMAND_TIMEOUT_S, login_transport

log = logging.getLogger(__name__)

CANCEL_WAIT_S = 150.0        # Slurm's KillWait (30 s by default) plus the pipeline's snapshot
ACCOUNTING_TRIES = 10


def run_all(runner: Runner) -> list[JobOutcome]:
    """`runner.run_all()`, except that jobs on slurm hosts go to one array per host (in a
    thread per host, beside the runner's own threads for the other jobs)."""
    slurm_jobs = [j for j in runner.jobs if j.host.provider == "slurm"]
    if not slurm_jobs:
        return runner.run_all()
    others = [j for j in runner.jobs if j.host.provider != "slurm"]
    found: dict[str, JobOutcome] = {}
    lock = threading.Lock()

    def collect(outcomes: list[JobOutcome]) -> None:
        with lock:
            found.update((o.job_id, o) for o in outcomes)

    hosts: dict[str, list[JobPlan]] = {}
    for job in slurm_jobs:
        hosts.setdefault(job.host_name, []).append(job)
    threads = [threading.Thread(target=lambda js=js: collect(SlurmArray(runner, js).run()),
                                name=f"slurm-{name}", daemon=True) for name, js in hosts.items()]
    if others:
        rest = copy.copy(runner)
        rest.jobs = others
        threads.append(threading.Thread(target=lambda: collect(rest.run_all()), name="jobs", daemon=True))
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return [found[j.job_id] for j in runner.jobs]


@dataclass(slots=True)
class _Task:
    job: JobPlan
    index: int = -1              # in the array; -1: not submitted (refused, or staging failed)
    job_dir: str = ""
    data_dir: str = ""
    row_id: int | None = None
    start_epoch: float | None = None
    status: pl.RemoteStatus | None = None
    outcome: JobOutcome | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class SlurmArray:
    """The jobs of one Slurm host, as one array (see the module doc)."""

    def __init__(self, runner: Runner, jobs: list[JobPlan]) -> None:
        self.r = runner
        self.host = jobs[0].host
        # no environment discovery on a cluster: `python` after `setup` (python3 when unset)
        self.python = self.host.python or "python3"
        self.tasks = [_Task(j) for j in jobs]
        self.array_id: str | None = None
        self.stop_status: str | None = None

    # -- the whole array ------------------------------------------------------------------------
    def run(self) -> list[JobOutcome]:
        r = self.r
        for t in self.tasks:
            j = t.job
            r.ledger.add_job(r.run_id, j.job_id, experiment=j.experiment, scene=j.scene, host_name=j.host_name,
                             provider=j.host.provider, gpu=j.gpu, steps=j.steps, backend=j.backend,
                             dataset=j.dataset_name, settings=j.settings(), estimate=j.estimate or None)
        todo = []
        for t in self.tasks:
            if r.stop.is_set():
                self._finish(t, "cancelled", "not started: the run was interrupted")
            elif not r.guard.may_start(t.job.job_id, t.job.estimate_cost):
                self._finish(t, "budget_stopped", "not started: it would cross the budget (spent + running estimates)")
            else:
                todo.append(t)
        if not todo:
            return self._outcomes()
        provider = SlurmProvider(self.host)
        transport: Transport | None = None
        try:
            transport = login_transport(provider, self.host)
            self._prepare(provider, transport, todo)
            ready = [t for t in todo if t.outcome is None]
            if ready and not r.stop.is_set():
                self._submit(provider, transport, ready)
                self._follow(provider, transport, ready)
                self._settle(provider, transport, ready)
        except OrchestratorError as exc:
            log.error("%s: %s", self.host.name, redact(str(exc)))
            msg = str(exc) if str(exc).startswith(f"{self.host.name}:") else f"{self.host.name}: {exc}"
            for t in todo:
                if t.outcome is None:
                    self._finish(t, "interrupted" if r.stop.is_set() else "failed", msg)
        except Exception as exc:   # a bug still ends in scancel, closed rows and outcomes
            log.exception("%s: unexpected error", self.host.name)
            for t in todo:
                if t.outcome is None:
                    self._finish(t, "failed", f"internal error: {type(exc).__name__}: {exc}")
        finally:
            self._teardown(provider, transport, todo)
        return self._outcomes()

    def _outcomes(self) -> list[JobOutcome]:
        return [t.outcome for t in self.tasks if t.outcome is not None]

    # -- before the array -----------------------------------------------------------------------
    def _prepare(self, provider: SlurmProvider, tr: Transport, todo: list[_Task]) -> None:
        """Payload once, each dataset scene once (a bad one fails its jobs only), job dirs."""
        r = self.r
        for t in todo:
            r.ledger.update_job(r.run_id, t.job.job_id, status="running")
            r.view.update(t.job.job_id, phase="setup")
        pushed = pl.push_payload(tr)
        self.payload_dir = pushed.remote_dir
        staged: dict[tuple[str, str], str | OrchestratorError] = {}
        for t in todo:
            key = (t.job.dataset_name, t.job.scene)
            if key not in staged:
                r.view.update(t.job.job_id, phase="staging")
                t0 = time.time()
                try:
                    staged[key] = stage_dataset(tr, t.job.dataset, t.job.scene, python=self.python,
                                                payload_dir=pushed.remote_dir, progress=None)
                except OrchestratorError as exc:
                    staged[key] = exc
                r.ledger.record_phase(r.run_id, t.job.job_id, "staging", t0, time.time())
            got = staged[key]
            if isinstance(got, OrchestratorError):
                log.error("%s: %s", t.job.job_id, redact(str(got)))
                self._finish(t, "failed", str(got))
            else:
                t.data_dir = got
        q = shlex.quote
        ready = [t for t in todo if t.outcome is None]
        for t in ready:
            t.job_dir = f"{tr.root}/jobs/{pl.job_key(t.job.job_id, t.job.settings())}"
        # one round trip: a finished dir is cleared (a new run must not reuse old results), an
        # interrupted one keeps its snapshot; then which dirs lack a snapshot
        script = "; ".join(
            f"d={q(t.job_dir)}; if grep -q '\"exit_code\": 0' \"$d/status.json\" 2>/dev/null; then rm -rf \"$d\"; fi; "
            f"mkdir -p \"$d/out\" && rm -f \"$d/status.json\"; test -f \"$d/out/snapshot.pt\" || echo {i}"
            for i, t in enumerate(ready))
        if ready:
            missing = {int(x) for x in tr.run(script, timeout_s=COMMAND_TIMEOUT_S).stdout.split() if x.isdigit()}
            for i in sorted(missing):
                pl.restore_snapshot(tr, ready[i].job_dir, r.opts.runs_dir, ready[i].job.job_id)

    def _command(self, t: _Task) -> str:
        j = t.job
        args = pl.run_args(data_dir=t.data_dir, job_dir=t.job_dir, steps=j.steps, backend=j.backend,
                           device=j.device, scene=j.scene, max_seconds=j.max_seconds, downscale=j.downscale,
                           seed=j.seed, cpu_share=1)
        return (f"cd {shlex.quote(t.job_dir)} && exec env PYTHONUNBUFFERED=1 ORCHESTRATE_INSTANCE=$SLURM_JOB_ID "
                f"{pl.payload_command(self.python, self.payload_dir, args)} >>log.txt 2>&1")

    def _submit(self, provider: SlurmProvider, tr: Transport, ready: list[_Task]) -> None:
        r = self.r
        for i, t in enumerate(ready):
            t.index = i
            t.row_id = r.ledger.record_intent(
                run_id=r.run_id, job_id=t.job.job_id, host_name=self.host.name, provider=provider.name,
                label=make_label(r.run_id, t.job.job_id), gpu=t.job.gpu,
                price_per_hour=float(self.host.price_per_hour or 0.0), currency=self.host.currency,
                granularity_s=provider.billing.granularity_s)
            r.ledger.update_job(r.run_id, t.job.job_id, instance_row=t.row_id)
            r.view.update(t.job.job_id, phase="queued", currency=self.host.currency)
        log_dir = f"{tr.root}/slurm/{r.run_id}"
        limit = time_limit_s(self.host, max(t.job.estimate_seconds for t in ready))
        script = batch_script(host=self.host, run_id=r.run_id, job_ids=[t.job.job_id for t in ready],
                              task_commands=[self._command(t) for t in ready], log_dir=log_dir,
                              concurrency=r.opts.concurrency, time_limit_s=limit)
        path = f"{log_dir}/array.sh"
        tr.run(f"mkdir -p {shlex.quote(log_dir)}", timeout_s=COMMAND_TIMEOUT_S)
        tr.write_text(path, script)
        self.array_id = parse_sbatch(provider.run(f"sbatch --parsable {shlex.quote(path)}", "sbatch"))
        r.ledger.add_event("array_submitted", f"{self.host.name}: array {self.array_id} "
                           f"({array_name(r.run_id)}, {len(ready)} task(s), at most {r.opts.concurrency} at once)",
                           r.run_id)
        log.info("%s: submitted array %s (%d task(s))", self.host.name, self.array_id, len(ready))

    # -- while it runs ---------------------------------------------------------------------------
    def _poll_command(self, ready: list[_Task]) -> str:
        parts = [squeue_command(f"-j {shlex.quote(str(self.array_id))}") + " 2>/dev/null; echo '@@@'"]
        for t in ready:
            parts.append(f"echo '@@ {t.index}'; cat {shlex.quote(t.job_dir)}/status.json 2>/dev/null; echo")
        return "; ".join(parts)

    def _follow(self, provider: SlurmProvider, tr: Transport, ready: list[_Task]) -> None:
        """Until no task of the array is queued or running: the live view, task starts into the
        ledger, and at Ctrl-C or the budget cap one scancel of the array."""
        r = self.r
        limit = time_limit_s(self.host, max(t.job.estimate_seconds for t in ready))
        deadline = time.monotonic() + limit * len(ready) + 3600.0   # the queue may hold them a while
        cancel_deadline: float | None = None
        by_index = {t.index: t for t in ready}
        failures = 0
        while True:
            try:
                text = tr.run(self._poll_command(ready), check=False, timeout_s=COMMAND_TIMEOUT_S).stdout
                failures = 0
            except OrchestratorError as exc:
                failures += 1
                if failures > 30:
                    raise
                log.warning("%s: poll failed (%s); retrying", self.host.name, redact(str(exc)))
                time.sleep(min(10.0, 1.0 + failures))
                continue
            queue_text, _, status_text = text.partition("@@@")
            queued = {row.task: row for row in parse_squeue(queue_text)}
            for chunk in status_text.split("@@ ")[1:]:
                head, _, body = chunk.partition("\n")
                t = by_index.get(int(head)) if head.strip().isdigit() else None
                if t is not None:
                    t.status = pl.RemoteStatus.parse(body) or t.status
            for idx, t in by_index.items():
                row = queued.get(idx)
                if row is not None and row.start_epoch and t.start_epoch is None and row.state != "PENDING":
                    t.start_epoch = row.start_epoch
                    r.ledger.instance_created(t.row_id or 0, f"{self.array_id}_{idx}", at=row.start_epoch)
                    r.ledger.add_event("task_started", f"{self.array_id}_{idx} on {row.reason or 'its node'}",
                                       r.run_id, t.job.job_id)
                s = t.status
                fields: dict[str, Any] = {"cost": r.ledger.instance_cost(t.row_id) if t.row_id else 0.0}
                if s is not None and (row is not None or s.exit_code is not None):
                    fields.update(phase=s.phase, step=s.step, total_steps=s.total_steps, loss=s.loss, psnr=s.psnr)
                elif row is not None:
                    fields.update(phase="queued" if row.state == "PENDING" else "starting")
                if row is not None:
                    fields["note"] = row.reason if row.state == "PENDING" and row.reason != "None" else ""
                r.view.update(t.job.job_id, **fields)
            if not queued:
                return
            if cancel_deadline is None and (r.stop.is_set() or r.guard.over_cap()):
                self.stop_status = "interrupted" if r.stop.is_set() else "budget_stopped"
                log.warning("%s: %s; cancelling array %s (the pipelines keep their snapshots)", self.host.name,
                            "interrupted" if r.stop.is_set() else "budget reached", self.array_id)
                self._cancel(provider)
                cancel_deadline = time.monotonic() + CANCEL_WAIT_S
            if cancel_deadline is not None and time.monotonic() > cancel_deadline:
                raise ProviderError(f"array {self.array_id} still in squeue {CANCEL_WAIT_S:g} s after scancel",
                                    provider="slurm")
            if time.monotonic() > deadline:
                raise JobError(f"array {self.array_id} still queued or running past every time limit")
            time.sleep(r.opts.poll_s)

    def _cancel(self, provider: SlurmProvider) -> None:
        """scancel, retried: a cancel that did not reach the scheduler leaves the tasks running."""
        for attempt in range(5):
            try:
                provider.run(cancel_command([str(self.array_id)]), f"scancel {self.array_id}")
                self.r.ledger.add_event("array_cancelled", f"{self.host.name}: array {self.array_id}", self.r.run_id)
                return
            except OrchestratorError as exc:
                log.warning("%s: scancel failed (%s); retrying", self.host.name, redact(str(exc)))
                time.sleep(1.0 + attempt)
        raise ProviderError(f"scancel {self.array_id} failed 5 times; run `orchestrate down --orphans`",
                            provider="slurm")

    # -- after it ---------------------------------------------------------------------------------
    def _accounting(self, provider: SlurmProvider, ready: list[_Task]) -> dict[int, TaskState]:
        """Every started task's accounting (sacct may lag the end by a few seconds)."""
        want = {t.index for t in ready if t.start_epoch is not None}
        found: dict[int, TaskState] = {}
        for attempt in range(ACCOUNTING_TRIES):
            found = parse_accounting(provider.run(accounting_command(str(self.array_id)), "accounting"))
            if all(i in found and found[i].done and found[i].elapsed_s is not None for i in want):
                return found
            time.sleep(min(5.0, 0.5 * (attempt + 1)))
        return found

    def _settle(self, provider: SlurmProvider, tr: Transport, ready: list[_Task]) -> None:
        acct = self._accounting(provider, ready)
        for t in ready:
            self._bill(t, acct.get(t.index))
        for t in ready:
            jid = t.job.job_id
            try:
                t.status = pl.RemoteStatus.parse(tr.read_text(f"{t.job_dir}/status.json")) or t.status
                self._result(tr, t, acct.get(t.index))
            except OrchestratorError as exc:
                log.error("%s: %s", jid, redact(str(exc)))
                self._finish(t, "failed", str(exc))

    def _bill(self, t: _Task, acct: TaskState | None) -> None:
        """Close the task's row at start + Slurm's elapsed (its allocation is what is charged)."""
        r = self.r
        if t.row_id is None:
            return
        start = t.start_epoch or (acct.start_epoch if acct else None)
        if acct is None or start is None or acct.elapsed_s is None:
            r.ledger.set_instance_state(t.row_id, FAILED, note=f"never started ({acct.state if acct else 'gone'})")
            return
        if t.start_epoch is None:     # it started and ended between two polls
            r.ledger.instance_created(t.row_id, acct.job_id, at=start)
        price = self.host.price_per_gpu_hour * acct.billed_units()
        if abs(price - float(self.host.price_per_hour or 0.0)) > 1e-12:
            # Slurm allocated other than what was asked (a whole node, more CPUs): charge that
            r.ledger.set_instance_price(t.row_id, price)
        r.ledger.set_instance_state(t.row_id, DESTROYED, at=start + acct.elapsed_s,
                                    note=f"{acct.state} exit {acct.exit_code}; elapsed {acct.elapsed_s:g} s, "
                                         f"{acct.billed_units()} unit(s) allocated")
        r.ledger.record_phase(r.run_id, t.job.job_id, "train", start, start + acct.elapsed_s)

    def _result(self, tr: Transport, t: _Task, acct: TaskState | None) -> None:
        r, jid, s = self.r, t.job.job_id, t.status
        local = r.opts.runs_dir / r.run_id / jid
        code = s.exit_code if s else None
        if code == 0:
            r.view.update(jid, phase="pull")
            with r.ledger.phase(r.run_id, jid, "pull"):
                r.ledger.update_job(r.run_id, jid, out_dir=str(local))
                summary = pl.pull_results(tr, t.job_dir, local)
            if summary is None:
                raise JobError("results pulled but summary.json is missing or unreadable", job_id=jid, phase="pull")
            r.ledger.add_result(r.run_id, jid, summary, gpu=t.job.gpu, out_dir=str(local))
            r.view.update(jid, phase="done", psnr=summary.get("psnr_mean"))
            self._finish(t, "succeeded", None, summary=summary, out_dir=str(local))
            return
        if code == EXIT_INTERRUPTED or (self.stop_status and code is None):
            pl.save_snapshot(tr, t.job_dir, local)
            if self.stop_status == "budget_stopped":
                try:
                    pl.pull_results(tr, t.job_dir, local)
                except OrchestratorError as exc:
                    log.warning("%s: partial results not pulled: %s", jid, redact(str(exc)))
            step = f" at step {s.step}/{s.total_steps}" if s else " before it started"
            why = "interrupted"
            if acct is not None and acct.state.startswith("TIMEOUT") and not self.stop_status:
                why = f"stopped by Slurm at its time limit ({self.host.time_limit_s or 'from the estimate'} s)"
            self._finish(t, self.stop_status or "interrupted",
                         f"{why}{step}; the snapshot is kept, rerun the same file to resume", out_dir=str(local))
            return
        if s is not None and code is not None:
            self._finish(t, "failed", f"the pipeline failed in phase {s.phase} (exit {code}): "
                         f"{s.error or 'no error message'}")
            return
        tail = " | ".join((tr.read_text(f"{t.job_dir}/log.txt") or "").strip().splitlines()[-3:])
        state = f"{acct.state}{' (' + acct.reason + ')' if acct and acct.reason and acct.reason != 'None' else ''}" \
            if acct else "gone from the queue"
        self._finish(t, "failed", f"slurm task {self.array_id}_{t.index} ended {state} before the pipeline "
                     f"reported{': ' + tail if tail else ''}")

    def _finish(self, t: _Task, status: str, error: str | None, *, summary: dict[str, Any] | None = None,
                out_dir: str | None = None) -> None:
        r, j = self.r, t.job
        r.ledger.update_job(r.run_id, j.job_id, status=status, error=error and redact(error)[:2000])
        if status != "succeeded":
            r.view.update(j.job_id, phase=status, note="")
        s = summary or {}
        t.outcome = JobOutcome(job_id=j.job_id, scene=j.scene, host_name=j.host_name, gpu=j.gpu, status=status,
                               psnr=s.get("psnr_mean"), ssim=s.get("ssim_mean"), train_seconds=s.get("train_seconds"),
                               cost=r.ledger.instance_cost(t.row_id) if t.row_id else 0.0,
                               currency=self.host.currency, out_dir=out_dir, error=error and redact(error))

    def _teardown(self, provider: SlurmProvider, tr: Transport | None, todo: list[_Task]) -> None:
        """Nothing of ours may stay queued: scancel whatever is left (an error mid-follow), and
        close every row still open (a task cancelled before it started never billed)."""
        r = self.r
        try:
            if self.array_id is not None and tr is not None:
                try:
                    rows = parse_squeue(provider.run(squeue_command(f"-j {shlex.quote(self.array_id)}")
                                                     + " 2>/dev/null || true", "squeue"))
                    if rows:
                        self._cancel(provider)
                except OrchestratorError as exc:
                    r.ledger.add_event("release_failed", f"slurm array {self.array_id}: {redact(str(exc))}", r.run_id)
                    log.error("%s: could not make sure array %s is gone: %s (run `orchestrate down --orphans`)",
                              self.host.name, self.array_id, redact(str(exc)))
            for t in todo:
                row = r.ledger.instance(t.row_id) if t.row_id else None
                if row is not None and row.state in OPEN_STATES:
                    r.ledger.set_instance_state(t.row_id or 0, FAILED if row.instance_id is None else DESTROYED,
                                                note="closed at the end of the run")
                if t.outcome is None:
                    self._finish(t, "interrupted" if r.stop.is_set() else "failed", "ended without a result")
        finally:
            if tr is not None:
                tr.close()
