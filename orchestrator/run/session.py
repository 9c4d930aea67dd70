"""Instance sessions: rent once, run many.

Per host entry the runner rents up to `max_instances` instances (clouds; an ssh or local host is
one machine, so one) and each instance takes jobs from the entry's queue one after another. An
instance boots once, gets its environment once (bootstrap finds it on the second job), stages
each dataset once, and while one job trains the next job's dataset is staged beside it. It is
released as soon as the queue is empty. A job that fails leaves the instance running for the
next one unless the instance itself is the cause (it is gone, or it no longer answers); then it
is released and the job goes back to the queue for a new instance.

Each job's cost is its own phases (from the end of its set-up and staging to the end of its pull)
plus an even share of the instance's shared time (boot, environment and data set-up, gaps,
teardown); the ledger
keeps both (`job_costs`), so per-scene costs compare with one-instance-per-job runs.

The per-job steps are `Runner`'s own (`_on_host`: push, bootstrap ║ stage, attach, watch,
pull); this module only decides who provisions, which job runs where and when to release.
Between two jobs the finished job's watchdog stays alive (and its heartbeat fresh) until the
next job's watchdog runs, so a controller that dies in the gap still leaves a guard.
"""
from __future__ import annotations

import logging
import shlex
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import InstanceNotFound, OrchestratorError, ProviderError, TransportError
from ..providers.base import InstanceState, Provider, make_label
from ..secrets import redact
from ..staging import stage_dataset
from ..transport import connect
from ..transport.base import Transport
from . import hostenv
from . import payload as pl
from .failover import FailoverState, provision_with_failover
from .provisioning import Provisioned, release
from .runner import JobInterrupted, JobOutcome, JobPlan, Runner, _Attempt

log = logging.getLogger(__name__)

# ssh and local hosts are one machine each: one session, whatever max_instances says
ONE_MACHINE_PROVIDERS = ("local", "ssh")
# how many instances of one queue may be lost (gone, unreachable) before its jobs fail
MAX_LOST_INSTANCES = 2
GUARD_BEAT_S = 5.0
SNAPSHOT_EVERY_S = 15.0      # a running job's snapshot comes home at most this often...
SNAPSHOT_SHARE = 0.25        # ...and its transfers take at most this share of the time


class InstanceLost(ProviderError):
    """The provider no longer lists the instance (preempted, or destroyed by someone else)."""


def instance_gone(provider: Provider, instance_id: str) -> bool:
    try:
        info = provider.describe(instance_id)
    except InstanceNotFound:
        return True
    except Exception:  # noqa: BLE001 - the API is unreachable: that says nothing about the instance
        return False
    return info.state in (InstanceState.TERMINATED, InstanceState.ERROR)


class _WatchedTransport:
    """The session's transport as the job steps see it: when a command fails and the provider
    says the instance is gone, the job ends at once (InstanceLost) instead of retrying the
    connection until its deadline; the session then puts the job back in the queue."""

    def __init__(self, inner: Transport, provider: Provider, instance_id: str) -> None:
        self._inner, self._provider, self._iid = inner, provider, instance_id
        self.gone = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def _check(self) -> None:
        if self.gone or instance_gone(self._provider, self._iid):
            self.gone = True
            raise InstanceLost(f"{self._provider.name}: instance {self._iid} is gone (preempted?)",
                               provider=self._provider.name, instance_id=self._iid)

    def run(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return self._inner.run(*args, **kwargs)
        except TransportError:
            self._check()
            raise

    def read_text(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return self._inner.read_text(*args, **kwargs)
        except TransportError:
            self._check()
            raise


def instances_for(host: Any, n_jobs: int) -> int:
    """How many instances a host entry gets for `n_jobs` jobs."""
    if n_jobs <= 0:
        return 0
    if host.provider in ONE_MACHINE_PROVIDERS:
        return 1
    return max(1, min(int(getattr(host, "max_instances", 1) or 1), n_jobs))


@dataclass(frozen=True, slots=True)
class InstancePlan:
    """One planned instance: its host entry and the jobs it is expected to run, in order."""
    host_name: str
    index: int
    job_ids: tuple[str, ...]
    seconds: float             # planned billed seconds (shared + each job's own)
    cost: float


def plan_instances(jobs: list[JobPlan], *, one_per_job: bool = False) -> list[InstancePlan]:
    """Jobs → instances × queues: the longest job first onto the least loaded instance of its
    host entry (the runner balances at run time by taking from a shared queue; this is what
    it expects). With `one_per_job`, every job is its own instance."""
    out: list[InstancePlan] = []
    groups: dict[str, list[JobPlan]] = {}
    for j in jobs:
        groups.setdefault(j.host_name, []).append(j)
    for host_name, group in groups.items():
        n = len(group) if one_per_job else instances_for(group[0].host, len(group))
        shared = shared_seconds_of(group[0]) if group else 0.0
        queues: list[list[JobPlan]] = [[] for _ in range(n)]
        loads = [shared] * n
        for j in sorted(group, key=lambda j: -own_seconds_of(j)):
            k = min(range(n), key=lambda i: loads[i])
            queues[k].append(j)
            loads[k] += own_seconds_of(j)
        for k, q in enumerate(queues):
            q.sort(key=lambda j: group.index(j))
            price_s = _price_per_s(q[0]) if q else 0.0
            out.append(InstancePlan(host_name, k, tuple(j.job_id for j in q), loads[k], loads[k] * price_s))
    return out


def _phase(job: JobPlan, name: str) -> float:
    phases = (job.estimate or {}).get("phases") or {}
    v = phases.get(name)
    if isinstance(v, dict):      # the estimate's JSON: {"seconds": ..., "cost": ..., ...}
        v = v.get("seconds")
    return float(v) if isinstance(v, (int, float)) else 0.0


def shared_seconds_of(job: JobPlan) -> float:
    """What an instance pays once, whatever it runs: boot, environment, teardown."""
    return _phase(job, "boot") + _phase(job, "setup") + _phase(job, "teardown")


def own_seconds_of(job: JobPlan) -> float:
    """What one job adds on a warm instance (its staging overlaps the previous training): the
    total less the shared phases and less what staging added beyond set-up (its billed part)."""
    total = float(job.estimate_seconds or 0.0)
    phases = (job.estimate or {}).get("phases") or {}
    staging = phases.get("staging")
    billed = staging.get("billed_seconds") if isinstance(staging, dict) else None
    staging_s = float(billed) if isinstance(billed, (int, float)) else _phase(job, "staging")
    return max(0.0, total - shared_seconds_of(job) - staging_s) or total


def _price_per_s(job: JobPlan) -> float:
    total = float(job.estimate_seconds or 0.0)
    return float(job.estimate_cost or 0.0) / total if total > 0 else 0.0


@dataclass(frozen=True, slots=True)
class JobShare:
    job_id: str
    own_seconds: float
    shared_seconds: float
    own_cost: float
    shared_cost: float


def share_costs(billed_cost: float, billed_s: float, own_s: dict[str, float]) -> dict[str, JobShare]:
    """Split one instance's bill: each job pays its own seconds at the instance's average rate,
    and the rest (boot, environment, gaps, teardown) evenly. Own seconds that overlap (two jobs
    on two GPUs) are scaled so that their sum never exceeds what was billed. The shares add up
    to `billed_cost` exactly."""
    if not own_s:
        return {}
    total_own = sum(max(0.0, s) for s in own_s.values())
    scale = min(1.0, billed_s / total_own) if total_own > 0 else 0.0
    rate = billed_cost / billed_s if billed_s > 0 else 0.0
    own = {j: max(0.0, s) * scale for j, s in own_s.items()}
    shared_s = max(0.0, billed_s - sum(own.values())) / len(own_s)
    own_cost = {j: s * rate for j, s in own.items()}
    shared_cost = (billed_cost - sum(own_cost.values())) / len(own_s)
    return {j: JobShare(j, own[j], shared_s, own_cost[j], shared_cost) for j in own_s}


@dataclass(slots=True)
class _Queue:
    """The jobs of one host entry still to run, shared by its instances."""
    host_name: str
    jobs: deque[JobPlan]
    lock: threading.Lock = field(default_factory=threading.Lock)
    lost: int = 0                     # instances of this queue that were lost
    last_error: str | None = None     # why the last provisioning failed

    def take(self) -> JobPlan | None:
        with self.lock:
            return self.jobs.popleft() if self.jobs else None

    def put_back(self, job: JobPlan) -> None:
        with self.lock:
            self.jobs.appendleft(job)

    def drain(self) -> list[JobPlan]:
        with self.lock:
            out = list(self.jobs)
            self.jobs.clear()
            return out


@dataclass(slots=True)
class _Session:
    """One rented instance and what runs on it."""
    host_name: str
    provider: Provider
    prov: Provisioned
    transport: Transport
    queue: _Queue
    opened: float = field(default_factory=time.time)
    own_s: dict[str, float] = field(default_factory=dict)
    job_ids: list[str] = field(default_factory=list)
    next_job: JobPlan | None = None               # claimed from the queue, staged ahead
    prestage: threading.Thread | None = None
    guard_dir: str = ""                           # the finished job whose watchdog still guards
    guard_pid: int = 0
    lost: bool = False
    failed_jobs: int = 0
    current: tuple[JobPlan, _Attempt] | None = None   # the job running now (its snapshots come home)
    raw: Transport | None = None
    host: Any = None                              # the entry it was rented from (failover may change it)
    beat_stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)


class SessionRunner(Runner):
    """`Runner` with instance sessions: the same job steps, a different outer flow."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.failover = FailoverState()
        self._sessions: dict[str, _Session] = {}      # job id -> the session it runs in
        self._slock = threading.Lock()
        self.instance_log: list[dict[str, Any]] = []  # one record per instance (for benchmarks)

    def run_all(self) -> list[JobOutcome]:
        for job in self.jobs:
            self.ledger.add_job(self.run_id, job.job_id, experiment=job.experiment, scene=job.scene,
                                host_name=job.host_name, provider=job.host.provider,
                                gpu=job.gpu, steps=job.steps, backend=job.backend, dataset=job.dataset_name,
                                settings=job.settings(), estimate=job.estimate or None)
        outcomes: dict[str, JobOutcome] = {}
        workers: list[tuple[_Queue, int]] = []
        for plan in plan_instances(self.jobs):
            if plan.index == 0:
                group = [j for j in self.jobs if j.host_name == plan.host_name]
                queue = _Queue(plan.host_name, deque(group))
            workers.append((queue, plan.index))
        n = max(1, min(self.opts.concurrency, len(workers)))
        with ThreadPoolExecutor(max_workers=n, thread_name_prefix="instance") as pool:
            futures = [pool.submit(self._instance_worker, q, i, outcomes) for q, i in workers]
            for f in futures:
                f.result()
        # what no instance took: cancelled by Ctrl-C, else failed for want of an instance
        for job in self.jobs:
            if job.job_id not in outcomes:
                outcomes[job.job_id] = self._not_run(job)
        return [self._with_share(outcomes[j.job_id]) for j in self.jobs]

    # -- one instance -----------------------------------------------------------------------
    def _instance_worker(self, queue: _Queue, index: int, outcomes: dict[str, JobOutcome]) -> None:
        """Rent, run jobs from the queue until it is empty, release; again after a lost
        instance (bounded by MAX_LOST_INSTANCES for the queue)."""
        serial = 0
        while not self.stop.is_set():
            job = queue.take()
            if job is None:
                return
            if not self.guard.may_start(job.job_id, job.estimate_cost):
                outcomes[job.job_id] = self._finish(
                    job, "budget_stopped", None, "not started: it would cross the budget (spent + running estimates)")
                continue
            serial += 1
            sess = self._open(queue, index, serial, job)
            if sess is None:
                if self.stop.is_set():
                    queue.put_back(job)
                    return
                err = queue.last_error or "no instance could be rented"
                outcomes[job.job_id] = self._finish(job, "failed", None, err)
                for other in queue.drain():
                    outcomes[other.job_id] = self._finish(other, "failed", None,
                                                          f"not started: no instance for its host entry ({err})")
                return
            try:
                self._run_queue(sess, job, outcomes)
            finally:
                self._close(sess)
            if sess.lost:
                queue.lost += 1
                if queue.lost >= MAX_LOST_INSTANCES:
                    for other in queue.drain():
                        outcomes[other.job_id] = self._finish(
                            other, "failed", None, f"not run: {queue.lost} instances of {queue.host_name} were lost")
                    return

    def _open(self, queue: _Queue, index: int, serial: int, first: JobPlan) -> _Session | None:
        """Provision (with failover) and connect; None when nothing could be rented."""
        provider = self.provider_for(first)
        jid = first.job_id
        self.view.update(jid, phase="boot")
        prov: Provisioned | None = None
        t0 = time.time()
        try:
            prov, provider, host = provision_with_failover(
                self, first, label=make_label(self.run_id, f"{first.host_name}-{index}-{serial}"),
                state=self.failover)
            t = connect(provider, prov.instance_id, host, ledger=self.ledger, instance_row=prov.row_id,
                        stop=self.stop)
        except OrchestratorError as exc:
            queue.last_error = str(exc)
            log.error("%s: %s", first.host_name, redact(str(exc)))
            if prov is not None:
                release(provider, prov.instance_id, prov.row_id, ledger=self.ledger, destroy=True,
                        run_id=self.run_id, job_id=jid, host=first.host)
            return None
        finally:
            self.ledger.record_phase(self.run_id, jid, "boot", t0, time.time())
        sess = _Session(first.host_name, provider, prov, _WatchedTransport(t, provider, prov.instance_id),  # type: ignore[arg-type]
                        queue, opened=t0, raw=t, host=host)
        sess.next_job = first
        threading.Thread(target=self._guard_beat, args=(sess,), name="guard-beat", daemon=True).start()
        self.ledger.add_event("session_opened", f"{provider.name} {prov.instance_id} for {first.host_name}",
                              self.run_id, jid)
        return sess

    def _run_queue(self, sess: _Session, first: JobPlan, outcomes: dict[str, JobOutcome]) -> None:
        while True:
            job = sess.next_job
            sess.next_job = None
            if job is None:
                job = sess.queue.take()
            if job is None:
                return
            if self.stop.is_set():
                sess.queue.put_back(job)
                return
            if job is not first and not self.guard.may_start(job.job_id, job.estimate_cost):
                outcomes[job.job_id] = self._finish(
                    job, "budget_stopped", None, "not started: it would cross the budget (spent + running estimates)")
                continue
            if sess.host is not None and job.host.name != sess.host.name:   # failed over to another entry
                job = replace(job, host_name=sess.host.name, host=sess.host)
            outcome = self._session_job(sess, job)
            if outcome is None:        # the instance was the cause: the job goes back to the queue
                sess.queue.put_back(job)
                if sess.next_job is not None:
                    sess.queue.put_back(sess.next_job)
                    sess.next_job = None
                return
            outcomes[job.job_id] = outcome
            if sess.lost:
                return

    def _session_job(self, sess: _Session, job: JobPlan) -> JobOutcome | None:
        """One job on the session's instance (mirrors `Runner._run_job` without provisioning or
        teardown). None when the instance, not the job, failed."""
        jid = job.job_id
        with self._slock:
            self._sessions[jid] = sess
        sess.job_ids.append(jid) if jid not in sess.job_ids else None
        self.ledger.update_job(self.run_id, jid, status="running", instance_row=sess.prov.row_id)
        self.view.update(jid, currency=sess.prov.currency)
        attempt = self.attempts[jid] = _Attempt()
        attempt.row_id = sess.prov.row_id
        attempt.host_ready = t0 = time.time()
        sess.current = (job, attempt)
        try:
            summary = self._on_host(job, sess.provider, sess.prov, sess.transport, attempt)
            out = self._result(job, sess.prov, summary, attempt)
            attempt.succeeded = True
            return out
        except JobInterrupted as exc:
            if attempt.stop_status == "budget_stopped" and attempt.job_dir:
                self._pull_partial(job, sess.transport, attempt)
            return self._finish(job, attempt.stop_status or "interrupted", sess.prov, str(exc),
                                out_dir=attempt.out_dir)
        except OrchestratorError as exc:
            if self.stop.is_set():
                return self._finish(job, "interrupted", sess.prov, f"interrupted: {exc}")
            if not self._instance_alive(sess):
                sess.lost = True
                log.error("%s: the instance %s is lost (%s); the job goes back to the queue", jid,
                          sess.prov.instance_id, redact(str(exc)))
                self.ledger.add_event("instance_lost", f"{sess.provider.name} {sess.prov.instance_id}: "
                                      f"{redact(str(exc))[:300]}", self.run_id, jid)
                self.ledger.update_job(self.run_id, jid, status="pending")
                if sess.queue.lost + 1 < MAX_LOST_INSTANCES:
                    return None
            message = str(exc)
            if attempt.started:   # training began: what it made comes home before the next job
                local = Path(attempt.out_dir) if attempt.out_dir else self._pull_partial(job, sess.transport, attempt)
                message += hostenv.came_home(local, self.run_id, jid)
            log.error("%s: %s", jid, redact(message))
            sess.failed_jobs += 1
            return self._finish(job, "failed", sess.prov, message, out_dir=attempt.out_dir)
        except Exception as exc:   # a bug must still end in a clean outcome; the session goes on
            log.exception("%s: unexpected error", jid)
            sess.failed_jobs += 1
            return self._finish(job, "failed", sess.prov, f"internal error: {type(exc).__name__}: {exc}")
        finally:
            sess.current = None
            # Set-up and staging (the environment, the data) are the instance's shared time, as
            # the plan counts them: a job's own time starts when they are done.
            sess.own_s[jid] = sess.own_s.get(jid, 0.0) + (time.time() - max(t0, attempt.set_up))
            self._keep_as_guard(sess, attempt)

    def _instance_alive(self, sess: _Session) -> bool:
        """Whether the provider still lists the instance as running and it answers a command."""
        try:
            info = sess.provider.describe(sess.prov.instance_id)
            if info.state != InstanceState.RUNNING:
                return False
            return sess.transport.run("true", check=False, timeout_s=30).ok
        except OrchestratorError:
            return False
        except Exception:  # noqa: BLE001 - a health check that cannot ask says nothing about the instance
            return False

    def _not_run(self, job: JobPlan) -> JobOutcome:
        if self.stop.is_set():
            return self._finish(job, "cancelled", None, "not started: the run was interrupted")
        return self._finish(job, "failed", None, "not started: no instance took it")

    # -- overridden per-job hooks ----------------------------------------------------------
    def _attach_or_start(self, job: JobPlan, provider: Provider, prov: Provisioned, t: Transport,
                         python: str, payload_dir: str, data_dir: str, attempt: _Attempt) -> pl.RemoteStatus | None:
        status = Runner._attach_or_start(self, job, provider, prov, t, python, payload_dir, data_dir, attempt)
        sess = self._sessions.get(job.job_id)
        if sess is not None:
            if attempt.watchdog_pid:
                self._end_guard(sess)      # the new job's watchdog guards from now on
            self._start_prestage(sess, python, payload_dir)
        return status

    def _cpu_share(self, job: JobPlan, provider: Provider) -> int:
        return 1    # one job at a time on a session's machine

    # -- staging ahead ---------------------------------------------------------------------
    def _start_prestage(self, sess: _Session, python: str, payload_dir: str) -> None:
        if sess.next_job is None and not self.stop.is_set():
            sess.next_job = sess.queue.take()
        nxt = sess.next_job
        if nxt is None:
            return
        with self._plock:
            entry = sess.host.name if sess.host is not None else nxt.host_name
            lock = self._stage_locks.setdefault((entry, nxt.dataset_name, nxt.scene), threading.Lock())

        def stage() -> None:
            t0 = time.time()
            try:
                with lock:
                    stage_dataset(sess.transport, nxt.dataset, nxt.scene, python=python,
                                  payload_dir=payload_dir, progress=None, stop=self.stop)
                self.ledger.record_phase(self.run_id, nxt.job_id, "prestage", t0, time.time())
            except Exception as exc:  # noqa: BLE001 - the job stages again itself and reports a real failure
                log.warning("%s: staging ahead failed (%s); it stages when it starts", nxt.job_id,
                            redact(str(exc)))

        sess.prestage = threading.Thread(target=stage, name=f"prestage-{nxt.job_id}", daemon=True)
        sess.prestage.start()

    # -- the guard between jobs ------------------------------------------------------------
    def _keep_as_guard(self, sess: _Session, attempt: _Attempt) -> None:
        """The finished job's watchdog keeps guarding the instance until the next one runs."""
        if not attempt.watchdog_pid or not attempt.job_dir:
            return
        with sess.lock:
            old = (sess.guard_dir, sess.guard_pid)
            sess.guard_dir, sess.guard_pid = attempt.job_dir, attempt.watchdog_pid
        if old[1] and old[1] != attempt.watchdog_pid:
            self._kill_watchdog(sess, old[1])

    def _end_guard(self, sess: _Session) -> None:
        with sess.lock:
            pid, sess.guard_pid, sess.guard_dir = sess.guard_pid, 0, ""
        if pid:
            self._kill_watchdog(sess, pid)

    def _kill_watchdog(self, sess: _Session, pid: int) -> None:
        try:
            sess.transport.run(f"kill -TERM {int(pid)} 2>/dev/null || true", check=False, timeout_s=20)
        except OrchestratorError as exc:
            log.warning("%s: could not end watchdog %s: %s", sess.host_name, pid, exc)

    def _guard_beat(self, sess: _Session) -> None:
        """Keep the guarding (finished) job's heartbeat fresh while the controller lives, and
        bring the running job's snapshot home when it changed (so a preempted job resumes)."""
        t = sess.raw or sess.transport
        snap_state: dict[str, Any] = {"next": time.monotonic() + SNAPSHOT_EVERY_S, "mtime": None}
        while not sess.beat_stop.wait(GUARD_BEAT_S):
            with sess.lock:
                d = sess.guard_dir
            try:
                if d:
                    t.run(f"touch {shlex.quote(d)}/heartbeat", check=False, timeout_s=20)
                cur = sess.current
                if cur is not None and cur[1].job_dir and time.monotonic() >= snap_state["next"]:
                    self._snapshot_home(t, cur[0], cur[1].job_dir, snap_state)
            except Exception as exc:  # noqa: BLE001 - a lost host shows in the job's own polls
                log.debug("%s: guard beat: %s", sess.host_name, exc)

    def _snapshot_home(self, t: Transport, job: JobPlan, job_dir: str, state: dict[str, Any]) -> None:
        """Copy `out/snapshot.pt` home when it changed; rate-limited so that transfers take at
        most SNAPSHOT_SHARE of the time (a big snapshot on a slow link comes home less often)."""
        import os
        path = f"{job_dir}/out/snapshot.pt"
        res = t.run(f"stat -c '%Y %s' {shlex.quote(path)} 2>/dev/null || true", check=False, timeout_s=20)
        fields = (res.stdout or "").split()
        if len(fields) != 2 or fields[0] == state["mtime"]:
            state["next"] = time.monotonic() + SNAPSHOT_EVERY_S
            return
        local = self.opts.runs_dir / self.run_id / job.job_id
        local.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        part = local / "snapshot.pt.part"
        t.get(path, part)
        os.replace(part, local / "snapshot.pt")
        pl.mark_job_key(local, job_dir)
        took = time.monotonic() - t0
        state["mtime"] = fields[0]
        state["next"] = time.monotonic() + max(SNAPSHOT_EVERY_S, took / SNAPSHOT_SHARE)
        log.debug("%s: snapshot home (%s bytes, %.1f s)", job.job_id, fields[1], took)

    # -- release and costs -----------------------------------------------------------------
    def _close(self, sess: _Session) -> None:
        """Release the instance (retried inside `release`), then split its bill over its jobs."""
        last = sess.job_ids[-1] if sess.job_ids else None
        t0 = time.time()
        sess.beat_stop.set()
        if sess.next_job is not None:          # claimed but not run (Ctrl-C, a lost instance)
            sess.queue.put_back(sess.next_job)
            sess.next_job = None
        if sess.prestage is not None:
            sess.prestage.join(timeout=120)
        try:
            self._end_guard(sess)
            keep = bool(sess.prov and self._host_of(sess).keep_on_failure) and sess.failed_jobs > 0 \
                and not self.stop.is_set() and not sess.lost
            release(sess.provider, sess.prov.instance_id, sess.prov.row_id, ledger=self.ledger,
                    destroy=not keep, run_id=self.run_id, job_id=last, host=self._host_of(sess))
        finally:
            try:
                sess.transport.close()
            except Exception:  # noqa: BLE001 - closing a dead connection must not mask the outcome
                pass
            if last is not None:
                self.ledger.record_phase(self.run_id, last, "teardown", t0, time.time())
            self._record_shares(sess)

    def _host_of(self, sess: _Session) -> Any:
        return sess.host or next(j.host for j in self.jobs if j.host_name == sess.host_name)

    def _record_shares(self, sess: _Session) -> None:
        row = sess.prov.row_id
        billed_s = sum(_billed_seconds(b) for b in self.ledger.billing(row) if b.kind == "gpu")
        cost = self.ledger.instance_cost(row)
        shares = share_costs(cost, billed_s, sess.own_s)
        for s in shares.values():
            self.ledger.record_job_cost(self.run_id, s.job_id, row, own_seconds=s.own_seconds,
                                        shared_seconds=s.shared_seconds, own_cost=s.own_cost,
                                        shared_cost=s.shared_cost)
        self.instance_log.append({"host": sess.host_name, "instance_id": sess.prov.instance_id, "row_id": row,
                                  "jobs": list(sess.job_ids), "billed_s": billed_s, "cost": cost,
                                  "lost": sess.lost})

    def _with_share(self, outcome: JobOutcome) -> JobOutcome:
        shares = [c for c in self.ledger.job_costs(self.run_id) if c["job_id"] == outcome.job_id]
        if not shares:
            return replace(outcome, cost=0.0)
        return replace(outcome, cost=sum(c["own_cost"] + c["shared_cost"] for c in shares))


def _billed_seconds(b: Any) -> float:
    import math

    from ..ledger import parse_iso, utcnow
    end = parse_iso(b.ended_at) if b.ended_at else utcnow()
    seconds = max(0.0, (end - parse_iso(b.started_at)).total_seconds())
    g = b.granularity_s or 1.0
    return math.ceil(seconds / g - 1e-9) * g if seconds > 0 else 0.0
