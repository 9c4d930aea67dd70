"""The job state machine and the concurrency over jobs.

One job: record → provision → connect → push payload → bootstrap ║ stage → start the pipeline
detached (+ the watchdog beside it) → poll status.json (heartbeat each poll) → pull results →
record → teardown. Teardown is in `finally`: success, error, Ctrl-C and lost connections all
end with the instance released and its billing interval closed (or, when the provider refuses,
an event saying `orchestrate down` must retry).

A Ctrl-C sets `stop`; a job that is training sends SIGINT to its remote pipeline, which saves a
snapshot and exits 5; the job is marked `interrupted`. The per-host job directory is keyed by
job id + settings hash (`payload.job_key`), so a rerun of the same file resumes from it.
"""
from __future__ import annotations

import contextlib
import logging
import shlex
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from remote_payload.contract import EXIT_INTERRUPTED

from ..config import DatasetConfig, HostConfig
from ..errors import JobError, OrchestratorError, TransportError
from ..ledger import Ledger
from ..providers import make_provider
from ..providers.base import Provider, make_label
from ..secrets import redact
from ..staging import prefetch_dataset, stage_dataset
from ..transport import connect
from ..transport.base import Transport
from . import hostenv
from . import payload as pl
from .budget import BudgetGuard
from .live import LiveView
from .provisioning import Provisioned, provision, release

log = logging.getLogger(__name__)

LOCAL_POLL_S = 0.25          # seconds between status polls of a local host (see Runner._poll_s)


@dataclass(frozen=True, slots=True)
class JobPlan:
    """Everything the runner needs about one job (built from the config's plan)."""
    job_id: str
    experiment: str
    scene: str
    host_name: str
    host: HostConfig
    dataset_name: str
    dataset: DatasetConfig
    steps: int
    backend: str = "auto"
    device: str = "auto"
    max_seconds: float | None = None
    downscale: int = 1
    seed: int = 0
    estimate_cost: float = 0.0
    estimate_seconds: float = 0.0
    currency: str = "USD"
    estimate: dict[str, Any] = field(default_factory=dict)
    train: Mapping[str, Any] = field(default_factory=dict)   # TrainConfig fields (`train:`)

    @property
    def gpu(self) -> str:
        return self.host.gpu or "cpu"

    def settings(self) -> dict[str, Any]:
        gen = self.dataset.generate
        out = {"dataset": self.dataset_name, "scene": self.scene, "steps": self.steps,
               "backend": self.backend, "device": self.device, "max_seconds": self.max_seconds,
               "downscale": self.downscale, "seed": self.seed,
               "generate": repr(gen) if gen is not None else None}
        if self.train:   # only when set: the job key (and so a resumable job dir) stays as it was
            out["train"] = dict(sorted(self.train.items()))
        return out


@dataclass(frozen=True, slots=True)
class RunOptions:
    runs_dir: Path
    concurrency: int = 4
    poll_s: float = 1.0
    reconnect_deadline_s: float = 300.0
    interrupt_grace_s: float = 90.0
    ready_timeout_s: float = 900.0


@dataclass(frozen=True, slots=True)
class JobOutcome:
    job_id: str
    scene: str
    host_name: str
    gpu: str
    status: str               # succeeded | failed | interrupted | cancelled | budget_stopped
    psnr: float | None = None
    ssim: float | None = None
    train_seconds: float | None = None
    cost: float = 0.0
    currency: str = "USD"
    out_dir: str | None = None
    error: str | None = None


class JobInterrupted(OrchestratorError):
    exit_code = 130


class Runner:
    def __init__(self, jobs: list[JobPlan], *, ledger: Ledger, run_id: str, options: RunOptions,
                 guard: BudgetGuard, view: LiveView, stop: threading.Event,
                 provider_factory: Callable[[Any], Provider] = make_provider) -> None:
        self.jobs = jobs
        self.ledger = ledger
        self.run_id = run_id
        self.opts = options
        self.guard = guard
        self.view = view
        self.stop = stop
        self.provider_factory = provider_factory
        self._providers: dict[str, Provider] = {}
        self._plock = threading.Lock()
        self._stage_locks: dict[tuple[str, str, str], threading.Lock] = {}
        self.attempts: dict[str, _Attempt] = {}   # job id -> its bookkeeping (for benchmarks)

    def provider_for(self, job: JobPlan) -> Provider:
        with self._plock:
            if job.host_name not in self._providers:
                self._providers[job.host_name] = self.provider_factory(job.host)
            return self._providers[job.host_name]

    def run_all(self) -> list[JobOutcome]:
        for job in self.jobs:
            self.ledger.add_job(self.run_id, job.job_id, experiment=job.experiment, scene=job.scene,
                                host_name=job.host_name, provider=job.host.provider,
                                gpu=job.gpu, steps=job.steps, backend=job.backend, dataset=job.dataset_name,
                                settings=job.settings(), estimate=job.estimate or None)
        workers = max(1, min(self.opts.concurrency, len(self.jobs)))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="job") as pool:
            futures = [pool.submit(self.run_job, job) for job in self.jobs]
            return [f.result() for f in futures]

    # -- one job --------------------------------------------------------------------------
    def run_job(self, job: JobPlan) -> JobOutcome:
        """Never raises: every ending is an outcome (and a ledger status). The cost is read
        after teardown, so it includes the last billed second."""
        outcome = self._run_job(job)
        attempt = self.attempts.get(job.job_id)
        if attempt is not None and attempt.row_id is not None:
            outcome = replace(outcome, cost=self.ledger.instance_cost(attempt.row_id))
        return outcome

    def _run_job(self, job: JobPlan) -> JobOutcome:
        jid = job.job_id
        if self.stop.is_set():
            return self._finish(job, "cancelled", None, "not started: the run was interrupted")
        if not self.guard.may_start(jid, job.estimate_cost):
            return self._finish(job, "budget_stopped", None,
                                "not started: it would cross the budget (spent + running estimates)")
        self.ledger.update_job(self.run_id, jid, status="running")
        prov: Provisioned | None = None
        provider: Provider | None = None
        transport: Transport | None = None
        attempt = self.attempts[jid] = _Attempt()
        try:
            provider = self.provider_for(job)
            self.view.update(jid, phase="boot")
            with self.ledger.phase(self.run_id, jid, "boot"):
                prov = provision(provider, job.host, ledger=self.ledger, run_id=self.run_id, job_id=jid,
                                 label=make_label(self.run_id, jid), ready_timeout_s=self.opts.ready_timeout_s,
                                 stop=self.stop)
                attempt.row_id = prov.row_id
                self.ledger.update_job(self.run_id, jid, instance_row=prov.row_id)
                self.view.update(jid, currency=prov.currency)
                transport = connect(provider, prov.instance_id, job.host, ledger=self.ledger,
                                    instance_row=prov.row_id, stop=self.stop)
            attempt.host_ready = time.time()
            summary = self._on_host(job, provider, prov, transport, attempt)
            out = self._result(job, prov, summary, attempt)
            attempt.succeeded = True
            return out
        except JobInterrupted as exc:
            if attempt.stop_status == "budget_stopped" and transport is not None and attempt.job_dir:
                self._pull_partial(job, transport, attempt)
            return self._finish(job, attempt.stop_status or "interrupted", prov, str(exc),
                                out_dir=attempt.out_dir)
        except OrchestratorError as exc:
            if self.stop.is_set():   # e.g. a boot wait or a command cut short by Ctrl-C
                return self._finish(job, "interrupted", prov, f"interrupted: {exc}")
            message = str(exc)
            if transport is not None and attempt.started:   # training began: its results come home
                local = Path(attempt.out_dir) if attempt.out_dir else self._pull_partial(job, transport, attempt)
                message += hostenv.came_home(local, self.run_id, jid)
            log.error("%s: %s", jid, redact(message))
            return self._finish(job, "failed", prov, message, out_dir=attempt.out_dir)
        except Exception as exc:   # a bug must still end in teardown and a clean outcome
            log.exception("%s: unexpected error", jid)
            return self._finish(job, "failed", prov, f"internal error: {type(exc).__name__}: {exc}")
        finally:
            self._teardown(job, provider, prov, transport, attempt)

    def _on_host(self, job: JobPlan, provider: Provider, prov: Provisioned, t: Transport,
                 attempt: _Attempt) -> dict[str, Any]:
        jid = job.job_id
        ready = self._ready_host(job, provider, prov, t, attempt)
        self._check_stop()
        attempt.set_up = time.time()    # environment and data ready: the job's own time starts

        job_dir = pl.claim_job_dir(t, f"{t.root}/jobs/{pl.job_key(jid, job.settings())}", self.run_id,
                                   self._run_is_live)
        attempt.job_dir = job_dir
        status = self._attach_or_start(job, provider, prov, t, ready.python, ready.payload_dir, ready.data_dir,
                                       attempt)
        self._watch(job, prov, t, attempt, status)
        summary = self._pull(job, t, attempt)
        return ready.setup.annotate(summary, attempt.out_dir) if ready.setup is not None else summary

    def _ready_host(self, job: JobPlan, provider: Provider, prov: Provisioned, t: Transport,
                    attempt: _Attempt) -> HostReady:
        """The payload pushed, the environment and the job's data ready (what a job needs before
        its pipeline can start; nothing of it uses the GPU)."""
        self.view.update(job.job_id, phase="setup")
        setup_t0 = time.time()
        pushed = pl.push_payload(t)
        self._check_stop()
        # jobs starting together on one instance (a multi-GPU session) prepare it one at a time:
        # the first builds the environment (and tiny-cuda-nn), the others find it built
        with self._host_lock(job) or contextlib.nullcontext():
            python, data_dir, setup = self._prepare_host(job, provider, prov, t, pushed.remote_dir,
                                                         attempt, setup_t0)
        return HostReady(pushed.remote_dir, python, data_dir, setup)

    def _prepare_host(self, job: JobPlan, provider: Provider, prov: Provisioned, t: Transport,
                      payload_dir: str, attempt: _Attempt,
                      setup_t0: float) -> tuple[str, str, hostenv.HostSetup | None]:
        """Environment (checked first on a rented host), bootstrap ║ staging, tiny-cuda-nn: the
        python to use, the staged scene's directory, and the host's set-up (None on this machine)."""
        self._check_stop()   # a Ctrl-C while this job waited for the host lock
        jid = job.job_id
        python = host_python(job.host, provider)
        setup = None
        prefetch = None
        if provider.transport_kind != "local":   # a rented host: its own environment, checked first
            # A mirrored scene's download needs only the host's own python: it runs while the
            # environment is built (on a fresh instance the two longest waits before training).
            # Validation needs the environment, so stage() below still validates; a preflight
            # failure cancels the download (the instance is released either way).
            if job.dataset.generate is None and job.dataset.mirrors:
                prefetch = _Prefetch(t, job, python, payload_dir, self.stop)
            try:
                setup = hostenv.set_up_host(t, job, provider, prov, payload_dir=payload_dir,
                                            ledger=self.ledger, run_id=self.run_id, view=self.view)
            except BaseException:
                if prefetch is not None:
                    prefetch.cancel()
                raise
            python = setup.python
            self._check_stop()
        with self._plock:   # two jobs staging the same scene on one host: one does it
            lock = self._stage_locks.setdefault((job.host_name, job.dataset_name, job.scene), threading.Lock())

        def stage() -> str:
            self.view.update(jid, phase="staging")
            with lock:
                return stage_dataset(t, job.dataset, job.scene, python=python,
                                     payload_dir=payload_dir, progress=None, stop=self.stop)

        ready = pl.bootstrap_and_stage(t, python=python, payload_dir=payload_dir, stage=stage)
        staging_started = ready.staging_started
        if prefetch is not None:    # stage() waited on the host's cache lock for the download
            prefetch.cancel()
            staging_started = min(staging_started, prefetch.started)
        self.ledger.record_phase(self.run_id, jid, "setup", setup_t0, ready.setup_ended)
        self.ledger.record_phase(self.run_id, jid, "staging", staging_started, ready.staging_ended)
        attempt.env_data_s = ready.env_data_s
        if ready.error is not None:
            raise ready.error
        if setup is not None:
            setup.finish(self.view, jid)   # a tiny-cuda-nn build started before staging
        return python, ready.data_dir, setup

    def _attach_or_start(self, job: JobPlan, provider: Provider, prov: Provisioned, t: Transport,
                         python: str, payload_dir: str, data_dir: str, attempt: _Attempt) -> pl.RemoteStatus | None:
        idle_s = float(job.host.idle_timeout_s or 600.0)
        deadline_s = float(job.host.deadline_s or max(3600.0, 3 * job.estimate_seconds))
        attempt.stop_command = pl.stop_command(python, payload_dir, attempt.job_dir)
        started = pl.attach_or_start(
            t, job_dir=attempt.job_dir, python=python, payload_dir=payload_dir,
            run_args=pl.run_args(data_dir=data_dir, job_dir=attempt.job_dir, steps=job.steps,
                                 backend=job.backend, device=job.device, scene=job.scene,
                                 max_seconds=job.max_seconds, downscale=job.downscale, seed=job.seed,
                                 cpu_share=self._cpu_share(job, provider), train=job.train),
            instance_id=prov.instance_id, self_stop_command=provider.self_stop_command(prov.instance_id),
            idle_timeout_s=idle_s, deadline_s=deadline_s, runs_dir=self.opts.runs_dir, job_id=job.job_id,
            visible_devices=self._visible_devices(job, provider))
        attempt.started = time.time()
        attempt.pipeline_pid, attempt.watchdog_pid = started.pipeline_pid, started.watchdog_pid
        if started.attached is None:
            self.ledger.add_event("pipeline_started", f"pid {started.pipeline_pid} in {attempt.job_dir}",
                                  self.run_id, job.job_id)
        return started.attached

    def _host_lock(self, job: JobPlan) -> threading.Lock | None:
        """A lock held while `job` prepares its host (environment, bootstrap, staging, tcnn),
        when several jobs may start on one instance together (a multi-GPU session)."""
        return None

    def _visible_devices(self, job: JobPlan, provider: Provider) -> str | None:
        """The job's CUDA_VISIBLE_DEVICES; None leaves the host's own (one job per instance)."""
        return None

    def _run_is_live(self, run_id: str) -> bool:
        """Whether the run holding a job directory may still be using it: a run this ledger
        does not know (another home's controller) counts as live."""
        from .reconcile import run_is_live
        if self.ledger.run(run_id) is None:
            return True
        return run_is_live(self.ledger, run_id)

    def _poll_s(self, job: JobPlan) -> float:
        """A local poll is a process spawn, not a network round trip: poll a local host more
        often, so the end of a job is seen within LOCAL_POLL_S instead of up to poll_s later (on
        a 10 s job a 1 s poll alone made the measured time wander by ~5%)."""
        if str(getattr(job.host, "provider", "")) == "local":
            return min(self.opts.poll_s, LOCAL_POLL_S)
        return self.opts.poll_s

    def _cpu_share(self, job: JobPlan, provider: Provider) -> int:
        """How many jobs may run at once on the machine behind `job`'s host: every instance of a
        provider with `shares_machine` (this machine, an SSH host) is the same computer."""
        if not provider.shares_machine:
            return 1
        same = sum(1 for j in self.jobs if j.host_name == job.host_name)
        return max(1, min(same, self.opts.concurrency))

    def _watch(self, job: JobPlan, prov: Provisioned, t: Transport, attempt: _Attempt,
               status: pl.RemoteStatus | None) -> None:
        """Poll until the pipeline has ended; forward a stop request as SIGINT to it."""
        jid, jd = job.job_id, shlex.quote(attempt.job_dir)
        poll = f"touch {jd}/heartbeat; cat {jd}/status.json 2>/dev/null || true"
        train_t0 = time.time()
        eval_t0: float | None = None
        lost_since: float | None = None
        interrupt_deadline: float | None = None
        no_status_deadline = time.monotonic() + 120.0
        while True:
            try:
                text = t.run(poll, check=False, timeout_s=60).stdout
                lost_since = None
            except TransportError as exc:
                if self.stop.is_set():   # Ctrl-C while the host is unreachable: no more waiting
                    attempt.stop_status = attempt.stop_status or "interrupted"
                    raise JobInterrupted(f"interrupted while the host was unreachable: {exc}") from None
                now = time.monotonic()
                lost_since = lost_since or now
                if now - lost_since > self.opts.reconnect_deadline_s:
                    raise JobError(f"lost contact with the host for {now - lost_since:.0f} s: {exc}",
                                   job_id=jid, phase="train") from None
                log.warning("%s: poll failed (%s); retrying", jid, redact(str(exc)))
                time.sleep(min(10.0, 1.0 + (now - lost_since) / 4))
                continue
            status = pl.RemoteStatus.parse(text) or status
            if status is not None:
                if eval_t0 is None and status.phase not in ("check", "train"):
                    eval_t0 = time.time()
                    self.ledger.record_phase(self.run_id, jid, "train", train_t0, eval_t0)
                self.view.update(jid, phase=status.phase, step=status.step, total_steps=status.total_steps,
                                 loss=status.loss, psnr=status.psnr,
                                 cost=self.ledger.instance_cost(prov.row_id))
                if status.exit_code is not None:
                    break
            else:
                gone = bool(attempt.pipeline_pid) and not t.run(
                    f"kill -0 {attempt.pipeline_pid} 2>/dev/null", check=False, timeout_s=30).ok
                if gone:   # it may have written its final status just after our read
                    status = pl.RemoteStatus.parse(t.read_text(f"{attempt.job_dir}/status.json"))
                    if status is not None:
                        continue
                if gone or time.monotonic() > no_status_deadline:
                    tail = (t.read_text(f"{attempt.job_dir}/log.txt") or "").strip().splitlines()[-3:]
                    why = "exited" if gone else "wrote no status within 120 s"
                    raise JobError(f"the pipeline {why} before reporting: {' | '.join(tail)}",
                                   job_id=jid, phase="start")
            if interrupt_deadline is None and (self.stop.is_set() or self.guard.over_cap()):
                attempt.stop_status = "interrupted" if self.stop.is_set() else "budget_stopped"
                pid = status.pid if status and status.pid else attempt.pipeline_pid
                log.warning("%s: %s; asking the pipeline (pid %s) to snapshot and stop", jid,
                            "interrupted" if self.stop.is_set() else "budget reached", pid)
                self.view.update(jid, note="stopping")
                if pid:
                    t.run(f"kill -INT {int(pid)}", check=False, timeout_s=30)
                interrupt_deadline = time.monotonic() + self.opts.interrupt_grace_s
            if interrupt_deadline is not None and time.monotonic() > interrupt_deadline:
                raise JobInterrupted(f"the pipeline did not stop within {self.opts.interrupt_grace_s:g} s")
            time.sleep(self._poll_s(job))
        end = time.time()
        attempt.exit_seen = time.time()
        attempt.final_status = status
        if eval_t0 is None:
            self.ledger.record_phase(self.run_id, jid, "train", train_t0, end)
        else:
            self.ledger.record_phase(self.run_id, jid, "eval", eval_t0, end)
        code = status.exit_code if status else None
        if code == 0:
            return
        if code == EXIT_INTERRUPTED or attempt.stop_status:
            pl.save_snapshot(t, attempt.job_dir, self.opts.runs_dir / self.run_id / job.job_id)
            step = f" at step {status.step}/{status.total_steps}" if status else ""
            raise JobInterrupted(f"interrupted{step}; the snapshot is kept, rerun the same file to resume")
        err = (status.error if status else None) or "no error message"
        raise JobError(f"the pipeline failed in phase {status.phase if status else '?'} "
                       f"(exit {code}): {err}", job_id=jid, phase=status.phase if status else "",
                       exit_code=code)

    def _pull(self, job: JobPlan, t: Transport, attempt: _Attempt) -> dict[str, Any]:
        self.view.update(job.job_id, phase="pull")
        local = self.opts.runs_dir / self.run_id / job.job_id
        with self.ledger.phase(self.run_id, job.job_id, "pull"):
            attempt.out_dir = str(local)
            self.ledger.update_job(self.run_id, job.job_id, out_dir=str(local))
            summary = pl.pull_results(t, attempt.job_dir, local)
        if summary is None:
            raise JobError("results pulled but summary.json is missing or unreadable",
                           job_id=job.job_id, phase="pull")
        hostenv.note_summary(summary, self.ledger, self.run_id, job.job_id)
        return summary

    def _pull_partial(self, job: JobPlan, t: Transport, attempt: _Attempt) -> Path | None:
        """A job stopped at the budget or failed after training started keeps what it made
        (snapshot, train_log, renders, log): pull it before the instance is released. Best
        effort: a failure is logged, teardown goes on. Returns the local directory."""
        try:
            self._pull(job, t, attempt)
        except OrchestratorError as exc:
            log.warning("%s: partial results: %s", job.job_id, redact(str(exc)))
        return Path(attempt.out_dir) if attempt.out_dir else None

    def _result(self, job: JobPlan, prov: Provisioned, summary: dict[str, Any],
                attempt: _Attempt) -> JobOutcome:
        self.ledger.add_result(self.run_id, job.job_id, summary, gpu=job.gpu, out_dir=attempt.out_dir or "")
        self.view.update(job.job_id, phase="done", psnr=summary.get("psnr_mean"))
        return self._finish(job, "succeeded", prov, None, summary=summary, out_dir=attempt.out_dir)

    def _finish(self, job: JobPlan, status: str, prov: Provisioned | None, error: str | None, *,
                summary: dict[str, Any] | None = None, out_dir: str | None = None) -> JobOutcome:
        self.ledger.update_job(self.run_id, job.job_id, status=status, error=error and redact(error)[:2000])
        if status != "succeeded":
            self.view.update(job.job_id, phase=status, note="")
        s = summary or {}
        return JobOutcome(job_id=job.job_id, scene=job.scene, host_name=job.host_name, gpu=job.gpu,
                          status=status, psnr=s.get("psnr_mean"), ssim=s.get("ssim_mean"),
                          train_seconds=s.get("train_seconds"),
                          cost=self.ledger.instance_cost(prov.row_id) if prov else 0.0,
                          currency=prov.currency if prov else job.currency, out_dir=out_dir,
                          error=error and redact(error))

    def _teardown(self, job: JobPlan, provider: Provider | None, prov: Provisioned | None,
                  t: Transport | None, attempt: _Attempt) -> None:
        if provider is None or prov is None:
            return
        jid = job.job_id
        attempt.teardown_started = time.time()
        self.view.update(jid, note="teardown")
        t0 = time.time()
        try:
            if t is not None and attempt.stop_command:
                try:   # watchdog and pipeline (and their children), found by marker, not pid
                    t.run(attempt.stop_command, check=False, timeout_s=60)
                except OrchestratorError as exc:
                    log.warning("%s: could not end the job's processes: %s", jid, exc)
            keep = bool(job.host.keep_on_failure) and not attempt.succeeded \
                and not attempt.stop_status
            if keep:
                log.warning("%s: keep_on_failure: stopping (not destroying) %s for inspection", jid,
                            prov.instance_id)
            release(provider, prov.instance_id, prov.row_id, ledger=self.ledger, destroy=not keep,
                    run_id=self.run_id, job_id=jid, host=job.host)
        finally:
            if t is not None:
                try:
                    t.close()
                except Exception:  # noqa: BLE001 - closing a dead connection must not mask the outcome
                    pass
            attempt.released = time.time()
            self.ledger.record_phase(self.run_id, jid, "teardown", t0, time.time())
            self.view.update(jid, note="", cost=self.ledger.instance_cost(prov.row_id))

    def _check_stop(self) -> None:
        if self.stop.is_set():
            raise JobInterrupted("interrupted before training started")


@dataclass(frozen=True, slots=True)
class HostReady:
    """What `Runner._ready_host` made ready for a job on its host."""
    payload_dir: str
    python: str
    data_dir: str
    setup: hostenv.HostSetup | None


@dataclass(slots=True)
class _Attempt:
    """Mutable bookkeeping of one job attempt."""
    job_dir: str = ""
    row_id: int | None = None
    pipeline_pid: int = 0
    watchdog_pid: int = 0
    stop_command: str = ""           # ends the job's own processes on the host (teardown)
    out_dir: str | None = None
    stop_status: str | None = None
    succeeded: bool = False
    guard_kept: bool = False         # a session kept its watchdog as the instance's guard
    # wall-clock instants (time.time()), read by bench/bench_overhead.py
    host_ready: float = 0.0          # instance RUNNING and transport connected
    env_data_s: float = 0.0          # bootstrap ║ staging wall time (environment and data work)
    set_up: float = 0.0              # environment and data ready: the job's own time starts here
    started: float = 0.0             # pipeline + watchdog started (detached)
    exit_seen: float = 0.0           # the controller saw the pipeline's exit code
    teardown_started: float = 0.0
    released: float = 0.0            # instance released (billing closed)
    final_status: Any = None


class _Prefetch:
    """`prefetch_dataset` in a thread: a mirrored scene downloading while the environment is
    built. Best effort: its failures are the full staging's to report. It is its own stop flag:
    the run's Ctrl-C or this job's cancel() ends the download."""

    def __init__(self, t: Transport, job: JobPlan, python: str, payload_dir: str, stop: Any) -> None:
        self.started = time.time()
        self._cancelled = threading.Event()
        self._run_stop = stop

        def work() -> None:
            try:
                prefetch_dataset(t, job.dataset, job.scene, python=python, payload_dir=payload_dir, stop=self)
            except Exception as exc:  # noqa: BLE001 - best effort: the full staging tries again and reports
                log.debug("%s: prefetch: %s", job.job_id, redact(str(exc)))

        self._thread = threading.Thread(target=work, name=f"prefetch-{job.job_id}", daemon=True)
        self._thread.start()

    def is_set(self) -> bool:
        return self._cancelled.is_set() or (self._run_stop is not None and self._run_stop.is_set())

    def cancel(self) -> None:
        """Stop a download still running (the host's stage process is killed) and wait for it."""
        self._cancelled.set()
        self._thread.join(timeout=120)


def host_python(host: HostConfig, provider: Provider) -> str:
    """The interpreter on the host. For the local provider an unset (or default `python3`)
    entry means this controller's own interpreter: the venv that has torch."""
    python = host.python
    if provider.transport_kind == "local" and python in (None, "", "python3"):
        import sys
        return sys.executable
    return str(python or "python3")
