"""A real one-node Slurm cluster for tests, shipped with the package (like `testing.sshd`).

`SlurmCluster` writes a slurm.conf in its own temporary directory (one node with this machine's
CPUs, no gres, ports picked free), and starts munged (its own key and socket), slurmctld and
slurmd in the foreground as children of the test; `stop()` shuts them down and kills what is
left, so no slurm or munge process outlives it. Client commands find the cluster through
`SLURM_CONF` (`env()`, or the `setup` line a host entry can run: `setup_line()`).

Accounting: Debian's Slurm 22.05 has no text-file accounting storage any more (only slurmdbd,
which needs a MySQL/MariaDB server), so this cluster has `AccountingStorageType=none`:
`sacct` answers "accounting storage is disabled", and finished jobs are read from
slurmctld's own records (`scontrol show job`, kept for MinJobAge) — which the `slurm` provider
falls back to. `JobCompType=jobcomp/filetxt` also writes one line per finished job
(`jobcomp_path`): the tests compare the ledger against it, a record the controller never reads.

Needs root (slurmd runs jobs as their users) and the `slurm-wlm` and `munge` packages.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from .sshd import descendants, free_port

log = logging.getLogger(__name__)

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo")
START_TIMEOUT_S = 20.0
NODE = "orchnode"
PARTITION = "debug"


class SlurmClusterError(RuntimeError):
    """The test cluster could not be started (a test-environment problem, not a product error)."""


def missing() -> str | None:
    """Why a cluster cannot start here, or None."""
    if os.geteuid() != 0:
        return "not root (slurmd must run as root)"
    absent = [b for b in BINARIES if _which(b) is None]
    return f"not installed: {', '.join(absent)} (apt-get install slurm-wlm munge)" if absent else None


def _which(name: str) -> str | None:
    return shutil.which(name) or next((f"{d}/{name}" for d in ("/usr/sbin", "/usr/bin")
                                       if os.path.exists(f"{d}/{name}")), None)


def _mem_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 1024


class SlurmCluster:
    """One node, one partition (`debug`), all daemons children of this process."""

    def __init__(self, cpus: int | None = None, *, kill_wait_s: int = 30, min_job_age_s: int = 3600) -> None:
        self.cpus = cpus or os.cpu_count() or 1
        self.kill_wait_s = kill_wait_s
        self.min_job_age_s = min_job_age_s
        self.dir = Path(tempfile.mkdtemp(prefix="orch-slurm-"))
        self.dir.chmod(0o755)
        self.conf_path = self.dir / "slurm.conf"
        self.jobcomp_path = self.dir / "jobcomp.txt"
        self.munge_socket = self.dir / "munge" / "munge.socket"
        self._procs: list[subprocess.Popen] = []
        self.start_seconds = 0.0
        self.stop_seconds = 0.0

    # -- configuration ----------------------------------------------------------------------------
    def _write(self) -> None:
        d = self.dir
        (d / "munge").mkdir(mode=0o711)
        key = d / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        for sub in ("state", "spool"):
            (d / sub).mkdir(mode=0o755)
        ctld, slurmd = free_port(), free_port()
        while slurmd == ctld:
            slurmd = free_port()
        host = os.uname().nodename.split(".")[0]
        mem = max(256, _mem_mb() // 2)
        mem_per_cpu = max(64, mem // (2 * self.cpus))
        self.conf_path.write_text(f"""\
# written by orchestrator.testing.slurm: a one-node test cluster
ClusterName=orchtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld}
SlurmdPort={slurmd}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={self.jobcomp_path}
MinJobAge={self.min_job_age_s}
KillWait={self.kill_wait_s}
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
MessageTimeout=10
NodeName={NODE} NodeHostname={host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={mem} State=UNKNOWN
PartitionName={PARTITION} Nodes={NODE} Default=YES MaxTime=INFINITE DefMemPerCPU={mem_per_cpu} State=UP
""")

    def env(self) -> dict[str, str]:
        """The environment a Slurm client command needs to reach this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf_path)}

    def setup_line(self) -> str:
        """A host entry's `setup:` for this cluster (a real one would `module load slurm`)."""
        return f"export SLURM_CONF={self.conf_path}"

    def command(self, *args: str, timeout_s: float = 30.0, check: bool = True) -> str:
        """Run a Slurm client command (squeue, scontrol, ...) against this cluster; its stdout."""
        proc = subprocess.run(list(args), env=self.env(), capture_output=True, text=True, timeout=timeout_s,
                              stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise SlurmClusterError(f"{' '.join(args)}: exit {proc.returncode}: {proc.stderr.strip()[-500:]}")
        return proc.stdout

    # -- start and stop ---------------------------------------------------------------------------
    def _spawn(self, name: str, *args: str) -> subprocess.Popen:
        log_file = open(self.dir / f"{name}.out", "wb")
        try:
            proc = subprocess.Popen([_which(name) or name, *args], env=self.env(), stdin=subprocess.DEVNULL,
                                    stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log_file.close()
        self._procs.append(proc)
        return proc

    def start(self) -> SlurmCluster:
        why = missing()
        if why:
            raise SlurmClusterError(f"cannot start a test Slurm cluster: {why}")
        t0 = time.monotonic()
        self._write()
        m = self.dir / "munge"
        self._spawn("munged", "--foreground", "--force", "--num-threads=10", f"--socket={self.munge_socket}",
                    f"--key-file={m / 'munge.key'}", f"--pid-file={m / 'munged.pid'}",
                    f"--seed-file={m / 'munged.seed'}", f"--log-file={m / 'munged.log'}")
        try:
            self._wait(lambda: self.munge_socket.exists(), "munged to create its socket")
            self._spawn("slurmctld", "-D", "-i", "-f", str(self.conf_path))
            self._spawn("slurmd", "-D", "-N", NODE, "-f", str(self.conf_path))
            self._wait(lambda: self.node_state() == "idle", "the node to be idle")
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - t0
        return self

    def node_state(self) -> str:
        try:
            return self.command("sinfo", "-h", "-n", NODE, "-o", "%T", timeout_s=10, check=False).strip()
        except subprocess.TimeoutExpired:
            return ""

    def _wait(self, ready, what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            dead = [p for p in self._procs if p.poll() is not None]
            if dead:
                name = Path(str(dead[0].args[0] if isinstance(dead[0].args, list) else dead[0].args)).name
                raise SlurmClusterError(f"{name} exited ({dead[0].returncode}) "
                                        f"waiting for {what}: {self.log_tail()}")
            if ready():
                return
            time.sleep(0.2)
        raise SlurmClusterError(f"timed out after {START_TIMEOUT_S:g} s waiting for {what}: {self.log_tail()}")

    def log_tail(self) -> str:
        out = []
        for name in ("munged.out", "slurmctld.out", "slurmd.out", "slurmctld.log", "slurmd.log"):
            p = self.dir / name
            if p.exists():
                out += [f"{name}: {line}" for line in p.read_text(errors="replace").strip().splitlines()[-3:]]
        return " | ".join(out)

    def pids(self) -> list[int]:
        """Every live process of this cluster: the daemons, and what they started, found by the
        SLURM_CONF in their environment (slurmstepd daemonizes away from slurmd, and a job's
        processes inherit the submitter's environment) or our directory on their command line."""
        found = {p.pid for p in self._procs if p.poll() is None}
        for p in self._procs:
            found.update(descendants(p.pid))
        marker = f"SLURM_CONF={self.conf_path}".encode()
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                env = Path(f"/proc/{entry}/environ").read_bytes()
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if marker in env.split(b"\0") or str(self.dir).encode() in cmd:
                found.add(int(entry))
        return sorted(found)

    def stop(self) -> None:
        """Cancel every job (waiting at most 8 s for the queue to drain), stop the daemons
        (SIGTERM, then SIGKILL after 5 s), and kill any process they left; remove the directory."""
        t0 = time.monotonic()
        if any(p.poll() is None for p in self._procs):
            try:   # jobs first: slurmd and slurmctld stop at once when no step is running
                self.command("scancel", "--user=root", timeout_s=5, check=False)
                deadline = time.monotonic() + 8
                while time.monotonic() < deadline and self.command("squeue", "-h", timeout_s=5, check=False).strip():
                    time.sleep(0.1)
            except subprocess.TimeoutExpired:
                pass
        leftovers = self.pids()
        for p in reversed(self._procs):      # slurmd, slurmctld, munged
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5     # a step still launching can hold slurmd: then SIGKILL
        for p in self._procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        for pid in leftovers + self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self._procs.clear()
        shutil.rmtree(self.dir, ignore_errors=True)
        self.stop_seconds = time.monotonic() - t0

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
