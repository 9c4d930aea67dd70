"""Instance sessions: rent once, run many.

Per host entry the runner rents up to `max_instances` instances (clouds; an ssh or local host is
one machine, so one) and each instance takes jobs from the entry's queue one after another. An
instance boots once, gets its environment once (bootstrap finds it on the second job), stages
each dataset once, and while one job trains the next job is made ready beside it (payload,
environment check, its dataset staged), and the finished job's pull runs beside the next job,
so between two jobs the GPU waits only for the start. It is
released as soon as the queue is empty. A job that fails leaves the instance running for the
next one unless the instance itself is the cause (it is gone, or it no longer answers); then it
is released and the job goes back to the queue for a new instance.

An instance with N GPUs (`gpus_per_instance`) runs N lanes: each lane takes the next job and
starts it with `CUDA_VISIBLE_DEVICES=<its GPU>`, so up to N jobs of the queue run at once, and
a lane whose job ended takes the next. Jobs starting together build the environment once: a
job prepares the host (environment, bootstrap ║ staging, tiny-cuda-nn) under a lock per
instance, so the next one finds it built (and only its own scene left to stage).

Each job's cost is its own phases (from the end of its set-up and staging to the end of its pull)
plus an even share of the instance's shared time (boot, environment and data set-up, gaps,
teardown); the ledger keeps both (`job_costs`), so per-scene costs compare with
one-instance-per-job runs. While k
jobs run at once (k GPUs busy), each of them owns 1/k of that time (`split_overlaps`): the own
seconds add up to the time any job ran, the shared rest is what no job ran, and the shares add
up to the instance's bill.

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
from ..transport import connect
from ..transport.base import Transport
from . import hostenv
from . import payload as pl
from .failover import FailoverState, provision_with_failover
from .provisioning import Provisioned, note_stopped_by_provider, release
from .runner import HostReady, JobInterrupted, JobOutcome, JobPlan, Runner, _Attempt

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


def instance_gone(provider: Provider, instance_id: str, interruptible: bool = False) -> bool:
    try:
        info = provider.describe(instance_id)
    except InstanceNotFound:
        return True
    except Exception:  # noqa: BLE001 - the API is unreachable: that says nothing about the instance
        return False
    if interruptible and info.state in (InstanceState.STOPPED, InstanceState.STOPPING):
        return True   # we stop nothing while a job runs: the provider took it back (outbid)
    return info.state in (InstanceState.TERMINATED, InstanceState.ERROR)


class _WatchedTransport:
    """The session's transport as the job steps see it: when a command fails and the provider
    says the instance is gone, the job ends at once (InstanceLost) instead of retrying the
    connection until its deadline; the session then puts the job back in the queue."""

    def __init__(self, inner: Transport, provider: Provider, instance_id: str,
                 interruptible: bool = False) -> None:
        self._inner, self._provider, self._iid = inner, provider, instance_id
        self._interruptible = interruptible
        self.gone = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def _check(self) -> None:
        if self.gone or instance_gone(self._provider, self._iid, self._interruptible):
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


def gpus_of(host: Any) -> int:
    """GPUs of one instance of a host entry (`gpus_per_instance`): the jobs it runs at once."""
    return max(1, int(getattr(host, "gpus_per_instance", 1) or 1))


def instances_for(host: Any, n_jobs: int) -> int:
    """How many instances a host entry gets for `n_jobs` jobs (an N-GPU instance runs N at once,
    so no more instances than it takes to give each job a GPU)."""
    if n_jobs <= 0:
        return 0
    if host.provider in ONE_MACHINE_PROVIDERS:
        return 1
    wanted = -(-n_jobs // gpus_of(host))
    return max(1, min(int(getattr(host, "max_instances", 1) or 1), wanted))


@dataclass(frozen=True, slots=True)
class InstancePlan:
    """One planned instance: its host entry and the jobs it is expected to run, in order."""
    host_name: str
    index: int
    job_ids: tuple[str, ...]
    seconds: float             # planned billed seconds (shared + its longest lane)
    cost: float
    gpus: int = 1
    lanes: tuple[tuple[str, ...], ...] = ()   # per GPU, the jobs it is expected to run in order


def plan_instances(jobs: list[JobPlan], *, one_per_job: bool = False) -> list[InstancePlan]:
    """Jobs → instances × queues: the longest job first onto the least loaded lane (one per GPU
    of each instance) of its host entry; an instance's planned time is the shared time plus its
    longest lane. The runner balances at run time by taking from a shared queue; this is what
    it expects. With `one_per_job`, every job is its own instance (all its GPUs, one lane)."""
    out: list[InstancePlan] = []
    groups: dict[str, list[JobPlan]] = {}
    for j in jobs:
        groups.setdefault(j.host_name, []).append(j)
    for host_name, group in groups.items():
        gpus = gpus_of(group[0].host)
        n = len(group) if one_per_job else instances_for(group[0].host, len(group))
        per = 1 if one_per_job else gpus          # lanes per instance
        shared = shared_seconds_of(group[0]) if group else 0.0
        lanes: list[list[JobPlan]] = [[] for _ in range(n * per)]
        loads = [0.0] * (n * per)
        for j in sorted(group, key=lambda j: -own_seconds_of(j)):
            k = min(range(n * per), key=lambda i: loads[i])
            lanes[k].append(j)
            loads[k] += own_seconds_of(j)
        for k in range(n):
            mine = lanes[k * per:(k + 1) * per]
            for lane in mine:
                lane.sort(key=lambda j: group.index(j))
            q = sorted((j for lane in mine for j in lane), key=lambda j: group.index(j))
            seconds = shared + max(loads[k * per:(k + 1) * per])
            price_s = _price_per_s(q[0]) if q else 0.0
            out.append(InstancePlan(host_name, k, tuple(j.job_id for j in q), seconds, seconds * price_s,
                                    gpus, tuple(tuple(j.job_id for j in lane) for lane in mine)))
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


def split_overlaps(intervals: dict[str, list[tuple[float, float]]]) -> dict[str, float]:
    """Each job's own seconds on an instance that ran jobs side by side (one per GPU): every
    stretch of time during which k jobs ran counts 1/k to each of them, so the own seconds add
    up to the time during which any job ran (never more than the instance was billed)."""
    points = sorted({t for spans in intervals.values() for a, b in spans for t in (a, b)})
    out = {j: 0.0 for j in intervals}
    for lo, hi in zip(points, points[1:]):
        mid = (lo + hi) / 2
        on = [j for j, spans in intervals.items() if any(a < mid < b for a, b in spans)]
        for j in on:
            out[j] += (hi - lo) / len(on)
    return out


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
class _Ahead:
    """A job's host preparation done while the job before it trained (`Runner._ready_host`)."""
    thread: threading.Thread | None = None
    ready: HostReady | None = None        # None: it failed (the job prepares again when it starts)
    env_data_s: float = 0.0


@dataclass(slots=True)
class _Session:
    """One rented instance and what runs on it."""
    host_name: str
    provider: Provider
    prov: Provisioned
    transport: Transport
    queue: _Queue
    opened: float = field(default_factory=time.time)
    intervals: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # job id -> its time here
    job_ids: list[str] = field(default_factory=list)
    ahead: deque[JobPlan] = field(default_factory=deque)   # claimed from the queue (the first, those staged ahead)
    prestages: list[threading.Thread] = field(default_factory=list)
    prepared: dict[str, _Ahead] = field(default_factory=dict)   # job id -> its host made ready ahead
    freed: dict[str, threading.Event] = field(default_factory=dict)   # job id -> set when its lane may go on
    guard_dir: str = ""                           # the finished job whose watchdog still guards
    guard_pid: int = 0
    guard_stop: str = ""                          # ... and the command that ends its processes
    lost: bool = False
    failed_jobs: int = 0
    running: dict[str, tuple[JobPlan, _Attempt]] = field(default_factory=dict)  # now (their snapshots come home)
    lanes: int = 1                                # jobs at once: one per GPU
    lane_of: dict[str, int] = field(default_factory=dict)   # job id -> the GPU it was given
    raw: Transport | None = None
    host: Any = None                              # the entry it was rented from (failover may change it)
    beat_stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    setup_lock: threading.Lock = field(default_factory=threading.Lock)   # host preparation, one job at a time

    def claim(self) -> JobPlan | None:
        """The next job for a free lane: one claimed (and staged) ahead, else the queue's next."""
        with self.lock:
            if self.ahead:
                return self.ahead.popleft()
        return self.queue.take()


def _on_entry(sess: _Session, job: JobPlan) -> JobPlan:
    """`job` as run on the session's host entry (another one than planned after a failover)."""
    if sess.host is not None and job.host.name != sess.host.name:
        return replace(job, host_name=sess.host.name, host=sess.host)
    return job


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
        watched = _WatchedTransport(t, provider, prov.instance_id, bool(getattr(host, "interruptible", False)))
        sess = _Session(first.host_name, provider, prov, watched,  # type: ignore[arg-type]
                        queue, opened=t0, raw=t, host=host,
                        lanes=gpus_of(host))    # every GPU paid for runs a job (--concurrency counts instances)
        sess.ahead.append(first)
        threading.Thread(target=self._guard_beat, args=(sess,), name="guard-beat", daemon=True).start()
        self.ledger.add_event("session_opened", f"{provider.name} {prov.instance_id} for {first.host_name}",
                              self.run_id, jid)
        return sess

    def _run_queue(self, sess: _Session, first: JobPlan, outcomes: dict[str, JobOutcome]) -> None:
        """The session's lanes, one per GPU, take jobs until the queue is empty."""
        if sess.lanes == 1:
            self._lane(sess, 0, first, outcomes)
            return
        errors: list[BaseException] = []

        def lane(gpu: int) -> None:
            try:
                self._lane(sess, gpu, first, outcomes)
            except BaseException as exc:  # noqa: BLE001 - raised below, after every lane has ended
                errors.append(exc)

        threads = [threading.Thread(target=lane, args=(g,), name=f"lane-{sess.host_name}-{g}", daemon=True)
                   for g in range(sess.lanes)]
        for th in threads:
            th.start()
        for th in threads:     # each lane ends when the queue is empty, the instance lost or Ctrl-C
            th.join()
        if errors:
            raise errors[0]

    def _lane(self, sess: _Session, gpu: int, first: JobPlan, outcomes: dict[str, JobOutcome]) -> None:
        """One GPU of the instance: its jobs one after another. A job's pull (and its
        bookkeeping) runs beside the next job: the lane takes the next one as soon as the
        pipeline has exited successfully (`_gpu_free`); any other ending frees it only once the
        job is fully handled, as before."""
        pending: list[threading.Thread] = []
        try:
            while not sess.lost:
                job = sess.claim()
                if job is None:
                    return
                if self.stop.is_set():
                    sess.queue.put_back(job)
                    return
                if job is not first and not self.guard.may_start(job.job_id, job.estimate_cost):
                    outcomes[job.job_id] = self._finish(
                        job, "budget_stopped", None,
                        "not started: it would cross the budget (spent + running estimates)")
                    continue
                job = _on_entry(sess, job)
                freed = threading.Event()
                with sess.lock:
                    sess.lane_of[job.job_id] = gpu
                    sess.freed[job.job_id] = freed

                def run_one(job: JobPlan = job, freed: threading.Event = freed) -> None:
                    try:
                        outcome = self._session_job(sess, job)
                        if outcome is None:        # the instance was the cause: the job goes back to the queue
                            sess.queue.put_back(job)
                        else:
                            outcomes[job.job_id] = outcome
                    finally:
                        with sess.lock:
                            sess.freed.pop(job.job_id, None)
                        freed.set()

                th = threading.Thread(target=run_one, name=f"job-{job.job_id}", daemon=True)
                pending.append(th)
                th.start()
                freed.wait()
        finally:
            for th in pending:    # pulls still under way end before the instance is released
                th.join()

    def _watch(self, job: JobPlan, prov: Provisioned, t: Transport, attempt: _Attempt,
               status: pl.RemoteStatus | None) -> None:
        super()._watch(job, prov, t, attempt, status)
        self._gpu_free(job, attempt)

    def _gpu_free(self, job: JobPlan, attempt: _Attempt) -> None:
        """The pipeline exited with success: its watchdog guards the instance from now until the
        next job's runs, and the lane may start the next job while this one is pulled."""
        sess = self._sessions.get(job.job_id)
        if sess is None:
            return
        self._keep_as_guard(sess, attempt)
        with sess.lock:
            freed = sess.freed.pop(job.job_id, None)
        if freed is not None:
            freed.set()

    def _session_job(self, sess: _Session, job: JobPlan) -> JobOutcome | None:
        """One job on the session's instance (mirrors `Runner._run_job` without provisioning or
        teardown). None when the instance, not the job, failed."""
        jid = job.job_id
        with self._slock:
            self._sessions[jid] = sess
        with sess.lock:
            sess.job_ids.append(jid) if jid not in sess.job_ids else None
        self.ledger.update_job(self.run_id, jid, status="running", instance_row=sess.prov.row_id)
        self.view.update(jid, currency=sess.prov.currency)
        attempt = self.attempts[jid] = _Attempt()
        attempt.row_id = sess.prov.row_id
        attempt.host_ready = t0 = time.time()
        with sess.lock:
            sess.running[jid] = (job, attempt)
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
                note_stopped_by_provider(sess.provider, sess.prov, self.ledger, run_id=self.run_id, job_id=jid)
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
            with sess.lock:
                sess.running.pop(jid, None)
                # Set-up and staging (the environment, the data) are the instance's shared time, as
                # the plan counts them: a job's own time starts when they are done.
                sess.intervals.setdefault(jid, []).append((max(t0, attempt.set_up), time.time()))
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
        sess = self._sessions.get(job.job_id)
        return sess.lanes if sess is not None else 1    # the jobs at once on a session's machine

    def _host_lock(self, job: JobPlan) -> threading.Lock | None:
        sess = self._sessions.get(job.job_id)
        return sess.setup_lock if sess is not None else None

    def _visible_devices(self, job: JobPlan, provider: Provider) -> str | None:
        """The GPU of the job's lane (only when the instance runs several jobs at once). On this
        machine (local provider) an index into the controller's own CUDA_VISIBLE_DEVICES, if set."""
        sess = self._sessions.get(job.job_id)
        if sess is None or sess.lanes <= 1:
            return None
        with sess.lock:
            gpu = sess.lane_of.get(job.job_id, 0)
        if provider.transport_kind == "local":
            import os
            mine = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
            if len(mine) > gpu:
                return mine[gpu]
        return str(gpu)

    # -- preparing ahead -------------------------------------------------------------------
    def _start_prestage(self, sess: _Session, python: str, payload_dir: str) -> None:
        """Claim the queue's next job and make its host ready (payload, environment check, its
        dataset staged) while this one trains, so the gap between the two is the pull and the
        start (at most one claimed ahead per lane, so other instances of the queue are not
        starved)."""
        if self.stop.is_set() or sess.lost:
            return
        with sess.lock:
            if len(sess.ahead) >= sess.lanes:
                return
            nxt = sess.queue.take()
            if nxt is None:
                return
            nxt = _on_entry(sess, nxt)
            sess.ahead.append(nxt)
            slot = sess.prepared[nxt.job_id] = _Ahead()
        with self._slock:
            self._sessions[nxt.job_id] = sess     # its host lock is the session's

        def prepare() -> None:
            t0 = time.time()
            scratch = _Attempt()
            try:
                slot.ready = Runner._ready_host(self, nxt, sess.provider, sess.prov, sess.transport, scratch)
                slot.env_data_s = scratch.env_data_s
                self.ledger.record_phase(self.run_id, nxt.job_id, "prestage", t0, time.time())
                self.view.update(nxt.job_id, phase="pending", note="ready")
            except Exception as exc:  # noqa: BLE001 - the job prepares again itself and reports a real failure
                if self.stop.is_set():
                    return
                log.warning("%s: preparing ahead failed (%s); it prepares when it starts", nxt.job_id,
                            redact(str(exc)))

        th = slot.thread = threading.Thread(target=prepare, name=f"prestage-{nxt.job_id}", daemon=True)
        with sess.lock:
            sess.prestages.append(th)
        th.start()

    def _ready_host(self, job: JobPlan, provider: Provider, prov: Provisioned, t: Transport,
                    attempt: _Attempt) -> HostReady:
        """What was made ready ahead for this job (waiting for it if it is still under way),
        else the preparation now."""
        sess = self._sessions.get(job.job_id)
        slot = None
        if sess is not None:
            with sess.lock:
                slot = sess.prepared.pop(job.job_id, None)
        if slot is not None:
            if slot.thread is not None:
                slot.thread.join()
            if slot.ready is not None:
                attempt.env_data_s = slot.env_data_s
                self.view.update(job.job_id, phase="setup", note="")
                return slot.ready
        return super()._ready_host(job, provider, prov, t, attempt)

    # -- the guard between jobs ------------------------------------------------------------
    def _keep_as_guard(self, sess: _Session, attempt: _Attempt) -> None:
        """The finished job's watchdog keeps guarding the instance until the next one runs
        (once per attempt: after the next job ended it, the pid may belong to another process)."""
        if not attempt.watchdog_pid or not attempt.job_dir or attempt.guard_kept:
            return
        attempt.guard_kept = True
        with sess.lock:
            old = (sess.guard_dir, sess.guard_pid)
            sess.guard_dir, sess.guard_pid = attempt.job_dir, attempt.watchdog_pid
            sess.guard_stop = attempt.stop_command
        if old[1] and old[1] != attempt.watchdog_pid:
            self._kill_watchdog(sess, old[1])

    def _end_guard(self, sess: _Session, *, last: bool = False) -> None:
        """End the guarding watchdog (a new job's watchdog guards now). At the end of the
        session (`last`) the guard job's own stop command ends it and whatever of that job still
        runs (a pipeline that reported its exit may still be shutting down), as one-per-job
        teardown does."""
        with sess.lock:
            pid, sess.guard_pid, sess.guard_dir = sess.guard_pid, 0, ""
            stop, sess.guard_stop = sess.guard_stop, ""
        if last and stop:
            try:
                sess.transport.run(stop, check=False, timeout_s=60)
                return
            except OrchestratorError as exc:
                log.warning("%s: could not end the last job's processes: %s", sess.host_name, exc)
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
        snap_states: dict[str, dict[str, Any]] = {}     # per running job
        while not sess.beat_stop.wait(GUARD_BEAT_S):
            with sess.lock:
                d = sess.guard_dir
                running = list(sess.running.values())
            try:
                if d:
                    t.run(f"touch {shlex.quote(d)}/heartbeat", check=False, timeout_s=20)
                for job, attempt in running:
                    st = snap_states.setdefault(job.job_id, {"next": time.monotonic() + SNAPSHOT_EVERY_S,
                                                             "mtime": None})
                    if attempt.job_dir and time.monotonic() >= st["next"]:
                        self._snapshot_home(t, job, attempt.job_dir, st)
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
        with sess.lock:                         # claimed but not run (Ctrl-C, a lost instance)
            claimed = list(sess.ahead)
            sess.ahead.clear()
            sess.prepared.clear()
            prestages = list(sess.prestages)
        for job in reversed(claimed):
            sess.queue.put_back(job)
        for th in prestages:
            th.join(timeout=120)
        try:
            self._end_guard(sess, last=True)
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
        shares = share_costs(cost, billed_s, split_overlaps(sess.intervals))
        for s in shares.values():
            self.ledger.record_job_cost(self.run_id, s.job_id, row, own_seconds=s.own_seconds,
                                        shared_seconds=s.shared_seconds, own_cost=s.own_cost,
                                        shared_cost=s.shared_cost)
        self.instance_log.append({"host": sess.host_name, "instance_id": sess.prov.instance_id, "row_id": row,
                                  "jobs": list(sess.job_ids), "billed_s": billed_s, "cost": cost,
                                  "lost": sess.lost, "gpus": sess.lanes, "lane_of": dict(sess.lane_of),
                                  "intervals": {j: list(v) for j, v in sess.intervals.items()}})

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
