"""The `slurm` provider: an existing Slurm cluster, reached through its login node over SSH.

Nothing is rented: the matrix becomes one job array (`run.slurm` submits and follows it), and
an "instance" here is one array task, `<array id>_<task index>`. This module is the cluster's
API as text, and nothing else: the batch script, the command lines of sbatch, squeue, sacct and
scancel, and parsers of their output. Running them is the caller's: a provider never opens SSH
(architecture.md, boundaries), so `bind(execute)` hands it a function that runs one shell
command on the login node (run.slurm builds it from the SSH transport).

The array's name is the run's label (`orch-<run_id>`) and its comment lists the job ids in
task order, so `list()` (and `orchestrate down --orphans`) maps every task of a dead run back
to its ledger row.

Accounting: `sacct` when the cluster has slurmdbd; a cluster without it (slurmctld keeps
finished jobs for MinJobAge) answers `scontrol show job` instead. Times are read as epoch
seconds (SLURM_TIME_FORMAT=%s), so the controller's clock and time zone never enter a bill.
"""
from __future__ import annotations

import builtins
import math
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ProviderError
from .base import LABEL_PREFIX, BillingRules, InstanceInfo, InstanceSpec, InstanceState, Offer
from .ssh import SSHProvider

if TYPE_CHECKING:
    from ..config import HostConfig

# (exit code, stdout, stderr) of one shell command on the login node
Execute = Callable[[str], "tuple[int, str, str]"]

TIME_FORMAT_ENV = "SLURM_TIME_FORMAT=%s"
PENDING_STATES = ("PENDING", "CONFIGURING", "REQUEUED", "RESIZING", "SUSPENDED", "REQUEUE_HOLD",
                  "REQUEUE_FED", "SPECIAL_EXIT")
RUNNING_STATES = ("RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING", "STOPPED")
# a task in one of these has ended; anything else is pending or running
DONE_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
               "BOOT_FAIL", "DEADLINE", "REVOKED")
MIN_TIME_LIMIT_S = 600.0


@dataclass(frozen=True, slots=True)
class TaskState:
    """One array task as squeue or the accounting sees it."""
    task: int
    job_id: str              # Slurm's own id of the task ("<array>_<task>")
    state: str               # Slurm's word (COMPLETED, FAILED, CANCELLED, RUNNING, ...)
    start_epoch: float | None = None
    elapsed_s: float | None = None
    alloc_gpus: int = 0
    alloc_cpus: int = 0
    exit_code: str = ""
    reason: str = ""

    @property
    def done(self) -> bool:
        return self.state.split()[0] in DONE_STATES

    def billed_units(self) -> int:
        """Allocated GPUs, or CPUs on a node without GPUs: what the chargeback price is per."""
        return self.alloc_gpus or self.alloc_cpus or 1


def array_name(run_id: str) -> str:
    return f"{LABEL_PREFIX}-{run_id}"


def batch_script(*, host: HostConfig, run_id: str, job_ids: list[str], task_commands: list[str],
                 log_dir: str, concurrency: int, time_limit_s: float) -> str:
    """The sbatch script of the whole matrix: one task per job, `%concurrency` at a time. Each
    task `exec`s its command (the payload writes status.json and log.txt in its own job dir),
    so the signals of `scancel` reach the pipeline itself and it keeps its snapshot."""
    n = len(task_commands)
    lines = ["#!/bin/bash",
             f"#SBATCH --job-name={array_name(run_id)}",
             f"#SBATCH --comment={','.join(job_ids)}",
             f"#SBATCH --array=0-{n - 1}%{max(1, int(concurrency))}",
             f"#SBATCH --output={log_dir}/%A_%a.out",
             "#SBATCH --ntasks=1",
             f"#SBATCH --cpus-per-task={int(host.cpus_per_task)}",
             f"#SBATCH --time={slurm_minutes(time_limit_s)}"]
    for flag, value in (("partition", host.partition), ("account", host.account), ("qos", host.qos),
                        ("gres", host.gres), ("mem", host.mem)):
        if value:
            lines.append(f"#SBATCH --{flag}={value}")
    lines += list(host.sbatch_lines)
    lines += ["set -u", *(host.setup or (":",)), 'case "$SLURM_ARRAY_TASK_ID" in']
    for i, command in enumerate(task_commands):
        lines.append(f"  {i}) {command} ;;")
    lines += ['  *) echo "no task $SLURM_ARRAY_TASK_ID in this array" >&2; exit 2 ;;', "esac", ""]
    return "\n".join(lines)


def slurm_minutes(seconds: float) -> int:
    return max(1, math.ceil(seconds / 60.0))


def time_limit_s(host: HostConfig, longest_estimate_s: float) -> float:
    """The host's time_limit, else twice the longest job's estimate plus ten minutes (a task
    past its limit is killed by Slurm, and its snapshot lets a rerun resume)."""
    if host.time_limit_s:
        return float(host.time_limit_s)
    return max(MIN_TIME_LIMIT_S, 2.0 * longest_estimate_s + MIN_TIME_LIMIT_S)


def with_setup(host: HostConfig, command: str) -> str:
    """A login-node command after the host's `setup` (module loads, SLURM_CONF, a conda env)."""
    setup = "\n".join(host.setup).strip()
    return f"{{ {setup}\n}} >/dev/null 2>&1; {command}" if setup else command


def parse_sbatch(out: str) -> str:
    """`sbatch --parsable` prints `<id>` or `<id>;<cluster>`."""
    first = out.strip().splitlines()[-1] if out.strip() else ""
    jid = first.split(";", 1)[0].strip()
    if not jid.isdigit():
        raise ProviderError(f"sbatch printed no job id: {out.strip()[:200]!r}", provider="slurm")
    return jid


def squeue_command(selector: str) -> str:
    """Pending and running tasks, one per line (`-r`): array id, task, state, start, reason,
    name and comment. `selector` is `-j <id>` or `-n <name>` (already quoted)."""
    return f"{TIME_FORMAT_ENV} squeue -h -r {selector} -o '%A|%F|%K|%T|%S|%r|%j|%k'"


@dataclass(frozen=True, slots=True)
class QueueRow:
    job_id: str
    array_id: str
    task: int
    state: str
    start_epoch: float | None
    reason: str
    name: str
    comment: str


def parse_squeue(out: str) -> list[QueueRow]:
    rows = []
    for line in out.splitlines():
        parts = line.strip().split("|", 7)
        if len(parts) < 8 or not parts[2].isdigit():
            continue     # a pending array's summary line ("1-3%2") is expanded by -r; skip others
        rows.append(QueueRow(job_id=f"{parts[1]}_{parts[2]}", array_id=parts[1], task=int(parts[2]),
                             state=parts[3], start_epoch=_epoch(parts[4]), reason=parts[5],
                             name=parts[6], comment=parts[7]))
    return rows


def accounting_command(array_id: str) -> str:
    """sacct of every task of the array; when the cluster keeps no accounting database, the
    controller's own records (`scontrol show job`, kept MinJobAge seconds after the end)."""
    a = shlex.quote(array_id)
    return (f"{TIME_FORMAT_ENV} sacct -X -P -n -j {a} -o JobID,State,Start,ElapsedRaw,AllocTRES,ExitCode "
            f"2>/dev/null | grep . || {{ echo '#scontrol'; {TIME_FORMAT_ENV} scontrol -o show job {a}; }}")


def parse_accounting(out: str) -> dict[int, TaskState]:
    """Task index → its accounting, from either form `accounting_command` prints."""
    lines = out.strip().splitlines()
    if lines and lines[0].strip() == "#scontrol":
        return _parse_scontrol(lines[1:])
    found: dict[int, TaskState] = {}
    for line in lines:
        parts = line.strip().split("|")
        if len(parts) < 6 or "_" not in parts[0]:
            continue
        array, _, task = parts[0].partition("_")
        if not task.isdigit():
            continue         # "<id>_[0-3]": tasks that never started are listed as one line
        tres = _tres(parts[4])
        found[int(task)] = TaskState(task=int(task), job_id=parts[0], state=parts[1],
                                     start_epoch=_epoch(parts[2]), elapsed_s=_num(parts[3]),
                                     alloc_gpus=tres.get("gres/gpu", 0), alloc_cpus=tres.get("cpu", 0),
                                     exit_code=parts[5])
    return found


def _parse_scontrol(lines: list[str]) -> dict[int, TaskState]:
    found: dict[int, TaskState] = {}
    for line in lines:
        f = dict(tok.split("=", 1) for tok in line.split() if "=" in tok)
        task = f.get("ArrayTaskId", "")
        if not task.isdigit():
            continue
        tres = _tres(f.get("TRES", ""))
        found[int(task)] = TaskState(
            task=int(task), job_id=f"{f.get('ArrayJobId', '')}_{task}", state=f.get("JobState", "UNKNOWN"),
            start_epoch=_epoch(f.get("StartTime", "")), elapsed_s=_duration_s(f.get("RunTime", "")),
            alloc_gpus=tres.get("gres/gpu", 0), alloc_cpus=tres.get("cpu", 0),
            exit_code=f.get("ExitCode", ""), reason=f.get("Reason", ""))
    return found


def _tres(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        if value.isdigit():
            out[key] = int(value)
    return out


def _num(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _epoch(text: str) -> float | None:
    v = _num(text.strip())
    return v if v and v > 0 else None


def _duration_s(text: str) -> float | None:
    """Slurm's `[D-]HH:MM:SS` (RunTime)."""
    days, _, rest = text.rpartition("-")
    parts = rest.split(":")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        return None
    h, m, s = (int(p) for p in parts)
    return float((int(days) if days.isdigit() else 0) * 86400 + h * 3600 + m * 60 + s)


def cancel_command(ids: list[str]) -> str:
    """scancel: SIGTERM to every step (the pipeline saves its snapshot within KillWait), then
    Slurm's SIGKILL; pending tasks are removed."""
    return "scancel " + " ".join(shlex.quote(i) for i in ids)


class SlurmProvider(SSHProvider):
    """The cluster's login node (ssh endpoint fields) and its scheduler (see the module doc)."""

    name = "slurm"
    shares_machine = False         # each task gets its own allocation
    transport_kind = "ssh"
    billing = BillingRules(granularity_s=1.0)

    def __init__(self, host: HostConfig, *, home: Path | str | None = None, policy: object = None) -> None:
        # `policy` is the HTTP retry policy the clouds take (orphan checks pass it to every
        # provider); Slurm's calls are shell commands, bounded by the login node's transport.
        super().__init__(host, home=home)
        self.stop_command = None
        self.shutdown_on_host = False
        self._execute: Execute | None = None

    def bind(self, execute: Execute) -> None:
        """Give the provider its way to the login node (a provider opens no SSH itself)."""
        self._execute = execute

    def run(self, command: str, what: str) -> str:
        if self._execute is None:
            raise ProviderError(f"{self.host_name}: no connection to the login node", provider=self.name)
        code, out, err = self._execute(with_setup(self.host_cfg, command))
        if code != 0:
            tail = " | ".join((err or out).strip().splitlines()[-3:])
            raise ProviderError(f"{self.host_name}: {what} failed (exit {code}): {tail}", provider=self.name)
        return out

    # -- the Provider calls, over array tasks ---------------------------------------------------
    def offers(self, gpu: str) -> builtins.list[Offer]:
        return [Offer(provider=self.name, gpu=self.gpu or gpu, price_per_hour=self.price_per_hour or 0.0,
                      currency=self.currency, region=self.host_name)]

    def create(self, spec: InstanceSpec) -> str:
        raise ProviderError("a Slurm host runs jobs as one array (run.slurm), not instance by instance",
                            provider=self.name)

    def start(self, instance_id: str) -> None:
        self.create(InstanceSpec(label="", gpu=""))

    def stop(self, instance_id: str) -> None:
        self.destroy(instance_id)

    def destroy(self, instance_id: str) -> None:
        """scancel the task (a task already gone is fine: scancel of an ended job fails, so
        its absence from squeue is checked instead)."""
        if not self.describe(instance_id).state == InstanceState.TERMINATED:
            self.run(cancel_command([instance_id]), f"scancel {instance_id}")

    def describe(self, instance_id: str) -> InstanceInfo:
        rows = parse_squeue(self.run(squeue_command(f"-j {shlex.quote(instance_id)}") + " 2>/dev/null || true",
                                     "squeue"))
        row = next((r for r in rows if r.job_id == instance_id), None)
        if row is None:
            return InstanceInfo(instance_id, InstanceState.TERMINATED, raw_state="gone from squeue")
        state = InstanceState.RUNNING if row.state in RUNNING_STATES else InstanceState.PENDING
        return self._task_info(row, state)

    def list(self, label_prefix: str) -> builtins.list[InstanceInfo]:
        """Every pending or running task of an array whose name starts with `label_prefix`."""
        out = []
        for row in parse_squeue(self.run(squeue_command("--me") + " 2>/dev/null || "
                                         + squeue_command(""), "squeue")):
            if row.name.startswith(label_prefix):
                state = InstanceState.RUNNING if row.state in RUNNING_STATES else InstanceState.PENDING
                out.append(self._task_info(row, state))
        return out

    def _task_info(self, row: QueueRow, state: InstanceState) -> InstanceInfo:
        job_ids = row.comment.split(",")
        run_id = row.name[len(LABEL_PREFIX) + 1:]
        label = f"{LABEL_PREFIX}-{run_id}-{job_ids[row.task]}" if row.task < len(job_ids) else row.name
        return InstanceInfo(instance_id=row.job_id, state=state, label=label, gpu=self.gpu,
                            price_per_hour=self.price_per_hour, currency=self.currency, raw_state=row.state)

    def host_shutdown_command(self, instance_id: str) -> str | None:
        return None             # never shut a login node down

    def self_stop_command(self, instance_id: str) -> str | None:
        return None
