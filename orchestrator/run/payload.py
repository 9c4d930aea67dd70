"""The code the host runs: `remote_payload/` and `ngp_train/`, pushed content-addressed.

The source files are hashed; the host gets them under `<root>/payload/<hash>/` once, and a
second job (or a rerun) on the same host finds `.complete` there and pushes nothing.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shlex
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from remote_payload.contract import EXIT_OK, VISIBLE_DEVICES_ENV

from ..transport.base import Transport

log = logging.getLogger(__name__)

PACKAGES = ("remote_payload", "ngp_train")
SOURCE_ROOT = Path(__file__).resolve().parents[2]   # the checkout (or site-packages) root
_SKIP_DIRS = {"__pycache__", ".pytest_cache"}


@dataclass(frozen=True, slots=True)
class PushedPayload:
    remote_dir: str      # <root>/payload/<hash>
    digest: str
    pushed: bool         # False when the host already had it
    seconds: float


def source_files(source_root: Path = SOURCE_ROOT) -> list[Path]:
    files = []
    for pkg in PACKAGES:
        base = source_root / pkg
        for p in sorted(base.rglob("*")):
            if p.is_file() and not _SKIP_DIRS.intersection(p.relative_to(source_root).parts) \
                    and p.suffix not in (".pyc", ".pyo"):
                files.append(p)
    return files


def payload_digest(source_root: Path = SOURCE_ROOT) -> str:
    """sha256 over (relative path, bytes) of every payload source file; first 16 hex."""
    h = hashlib.sha256()
    for p in source_files(source_root):
        h.update(str(p.relative_to(source_root)).encode() + b"\0")
        h.update(p.read_bytes())
        h.update(b"\0")
    return h.hexdigest()[:16]


_push_locks: dict[str, threading.Lock] = {}
_push_locks_guard = threading.Lock()


def push_payload(transport: Transport, source_root: Path = SOURCE_ROOT) -> PushedPayload:
    """Make `<root>/payload/<hash>/` hold the payload packages; skip when already there.
    Jobs sharing a host push once (a lock per work root here; a unique temp dir and a
    check-before-rename there, in case another controller pushes the same hash)."""
    t0 = time.monotonic()
    digest = payload_digest(source_root)
    remote_dir = f"{transport.root}/payload/{digest}"
    with _push_locks_guard:
        lock = _push_locks.setdefault(transport.root, threading.Lock())
    with lock:
        if transport.read_text(f"{remote_dir}/.complete") is not None:
            return PushedPayload(remote_dir, digest, False, time.monotonic() - t0)
        with tempfile.TemporaryDirectory(prefix="orch-payload-") as tmp:
            staged = Path(tmp) / digest
            for f in source_files(source_root):
                target = staged / f.relative_to(source_root)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, target)
            (staged / ".complete").write_text(digest + "\n")
            q = shlex.quote
            tmp_remote = f"{transport.root}/payload/.tmp-{digest}-{os.getpid()}-{threading.get_ident()}"
            transport.run(f"rm -rf {q(tmp_remote)} && mkdir -p {q(transport.root)}/payload", timeout_s=120)
            transport.put(staged, tmp_remote)
            transport.run(f"if [ -e {q(remote_dir)}/.complete ]; then rm -rf {q(tmp_remote)}; "
                          f"else rm -rf {q(remote_dir)} && mv {q(tmp_remote)} {q(remote_dir)}; fi",
                          timeout_s=120)
    log.debug("payload %s pushed to %s", digest, remote_dir)
    return PushedPayload(remote_dir, digest, True, time.monotonic() - t0)


def payload_command(python: str, payload_dir: str, args: str) -> str:
    """`PYTHONPATH=<payload_dir> <python> -m <args>` (args already shell-quoted)."""
    return f"PYTHONPATH={shlex.quote(payload_dir)} {shlex.quote(python)} -m {args}"


# -- the job on the host ----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RemoteStatus:
    """`JOB_DIR/status.json` as the controller reads it (contract §2)."""
    phase: str
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    psnr: float | None = None
    eta_s: float | None = None
    pid: int = 0
    exit_code: int | None = None
    error: str | None = None
    updated_at: str = ""     # ISO-8601 UTC, written by the pipeline
    cuda_visible_devices: str | None = None   # the GPU the pipeline was given (multi-GPU sessions)

    @classmethod
    def parse(cls, text: str | None) -> RemoteStatus | None:
        import json
        if not text or not text.strip():
            return None
        try:
            data = json.loads(text)
        except ValueError:
            return None   # a torn read cannot happen (atomic writes) but a foreign file can
        if not isinstance(data, dict) or "phase" not in data:
            return None
        def num(k: str) -> float | None:
            v = data.get(k)
            return float(v) if isinstance(v, (int, float)) else None
        return cls(phase=str(data["phase"]), step=int(data.get("step") or 0),
                   total_steps=int(data.get("total_steps") or 0), loss=num("loss"), psnr=num("psnr"),
                   eta_s=num("eta_s"), pid=int(data.get("pid") or 0),
                   exit_code=data.get("exit_code") if isinstance(data.get("exit_code"), int) else None,
                   error=data.get("error") if isinstance(data.get("error"), str) else None,
                   updated_at=str(data.get("updated_at") or ""),
                   cuda_visible_devices=str(data["cuda_visible_devices"])
                   if isinstance(data.get("cuda_visible_devices"), (str, int)) else None)


def job_key(job_id: str, settings: dict[str, object]) -> str:
    """The stable per-host job directory name: `<job_id>-<hash of what shapes the result>`,
    so a rerun of the same experiment finds its snapshot and a changed one starts clean."""
    import json
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return f"{job_id}-{hashlib.sha256(blob).hexdigest()[:8]}"


def claim_job_dir(transport: Transport, key_dir: str, run_id: str,
                  owner_is_live: Callable[[str], bool]) -> str:
    """The job directory this run trains in: `key_dir` (job id + settings hash, so a rerun
    resumes) unless another live run holds it, then `key_dir-<run_id>`. The claim is a file
    beside the directory naming the run, changed only under a lock on the host, so two
    controllers starting together never both take it; a claim whose run is gone (its
    controller died) is taken over, and its pipeline re-attached to."""
    q = shlex.quote
    claim, lock = f"{key_dir}.claim", f"{key_dir}.claim.lock"

    def ask(takeover_from: str) -> str:
        script = (f"cur=$(cat {q(claim)} 2>/dev/null || true); "
                  f"if [ -z \"$cur\" ] || [ \"$cur\" = {q(run_id)} ] || [ \"$cur\" = {q(takeover_from)} ]; "
                  f"then printf %s {q(run_id)} > {q(claim)} && echo +; else printf '%s\\n' \"$cur\"; fi")
        cmd = (f"mkdir -p \"$(dirname {q(claim)})\" && if command -v flock >/dev/null 2>&1; then "
               f"flock -w 60 {q(lock)} bash -c {q(script)}; else bash -c {q(script)}; fi")
        return transport.run(cmd, timeout_s=90).stdout.strip()

    owner = ask("")
    if owner == "+":
        return key_dir
    if owner and not owner_is_live(owner) and ask(owner) == "+":
        log.info("taking over %s from run %s (its controller is gone)", key_dir, owner)
        return key_dir
    log.info("%s is in use by run %s; this run trains in its own directory", key_dir, owner)
    return f"{key_dir}-{run_id}"


def run_args(*, data_dir: str, job_dir: str, steps: int, backend: str, device: str, scene: str,
             max_seconds: float | None, downscale: int, seed: int, cpu_share: int = 1,
             train: Mapping[str, Any] | None = None) -> str:
    args = (f"remote_payload run --data {shlex.quote(data_dir)} --job-dir {shlex.quote(job_dir)}"
            f" --steps {int(steps)} --backend {shlex.quote(backend)} --device {shlex.quote(device)}"
            f" --scene {shlex.quote(scene)} --downscale {int(downscale)} --seed {int(seed)}")
    if max_seconds:
        args += f" --max-seconds {float(max_seconds):g}"
    if cpu_share > 1:
        args += f" --cpu-share {int(cpu_share)}"
    for key, value in sorted((train or {}).items()):
        text = str(value).lower() if isinstance(value, bool) else f"{value:g}" if isinstance(value, float) else str(value)
        args += f" --train-option {shlex.quote(f'{key}={text}')}"
    return args


def watchdog_args(*, job_dir: str, idle_timeout_s: float, deadline_s: float, stop_command: str,
                  poll_s: float = 5.0) -> str:
    return (f"remote_payload watchdog --job-dir {shlex.quote(job_dir)} --idle-timeout {idle_timeout_s:g}"
            f" --deadline {deadline_s:g} --stop-command {shlex.quote(stop_command)} --poll-s {poll_s:g}")


# -- snapshots across hosts -------------------------------------------------------------------
KEY_FILE = ".job_key"


def mark_job_key(local_dir: Path, job_dir: str) -> None:
    """Remember which host job directory (job id + settings hash) `local_dir` came from."""
    (local_dir / KEY_FILE).write_text(job_dir.rsplit("/", 1)[-1] + "\n")


def restore_snapshot(transport: Transport, job_dir: str, runs_dir: Path, job_id: str) -> Path | None:
    """A new host (the old one was destroyed) gets the snapshot that an interrupted run of the
    same job and settings brought home, so a rerun resumes instead of starting over."""
    key = job_dir.rsplit("/", 1)[-1]
    found = []
    for marker in runs_dir.glob(f"*/{job_id}/{KEY_FILE}"):
        snap = marker.parent / "snapshot.pt"
        if (marker.parent / "summary.json").is_file():
            continue        # a finished job: a new run trains afresh (timings and results are real)
        try:
            if marker.read_text().strip() == key and snap.is_file():
                found.append((snap.stat().st_mtime, snap))
        except OSError:
            continue
    if not found:
        return None
    snap = max(found)[1]
    log.info("%s: resuming from %s", job_id, snap)
    transport.put(snap, f"{job_dir}/out/snapshot.pt")
    return snap


def save_snapshot(transport: Transport, job_dir: str, local_dir: Path) -> None:
    """After an interrupt: bring the snapshot home (best effort) for a rerun on another host."""
    from ..errors import OrchestratorError
    try:
        local_dir.mkdir(parents=True, exist_ok=True)
        transport.get(f"{job_dir}/out/snapshot.pt", local_dir / "snapshot.pt")
        mark_job_key(local_dir, job_dir)
    except (OrchestratorError, OSError) as exc:
        log.warning("could not bring the snapshot of %s home: %s", job_dir, exc)


# -- starting and collecting ------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Started:
    pipeline_pid: int
    watchdog_pid: int
    attached: RemoteStatus | None    # set when a live pipeline was found and re-attached to


def attach_or_start(transport: Transport, *, job_dir: str, python: str, payload_dir: str, run_args: str,
                    instance_id: str, self_stop_command: str | None, idle_timeout_s: float,
                    deadline_s: float, runs_dir: Path, job_id: str,
                    visible_devices: str | None = None) -> Started:
    """Never a second pipeline: re-attach to a live one (pid in status.json); else clear a
    finished job dir (a new run must not reuse old results), keep an interrupted one (its
    snapshot resumes), and start pipeline + watchdog detached, both marked with the instance.
    `visible_devices` becomes the pipeline's CUDA_VISIBLE_DEVICES (its GPU on a multi-GPU host)."""
    q = shlex.quote
    current = RemoteStatus.parse(transport.read_text(f"{job_dir}/status.json"))
    if current is not None and current.exit_code is None and current.pid > 0 and \
            transport.run(f"kill -0 {current.pid}", check=False, timeout_s=30).ok:
        log.info("%s: re-attaching to the running pipeline (pid %d)", job_id, current.pid)
        return Started(current.pid, 0, current)
    if current is not None and current.phase == "done" and current.exit_code == EXIT_OK:
        transport.run(f"rm -rf {q(job_dir)}", timeout_s=300)
    transport.run(f"mkdir -p {q(job_dir)}/out && rm -f {q(job_dir)}/status.json && touch {q(job_dir)}/heartbeat",
                  timeout_s=60)
    if not transport.run(f"test -f {q(job_dir)}/out/snapshot.pt", check=False, timeout_s=30).ok:
        restore_snapshot(transport, job_dir, runs_dir, job_id)
    # the markers identify every process of this job (and its children) on the host: teardown
    # and the watchdog end them by marker, never by a PID that may have been reused
    env = {"ORCHESTRATE_INSTANCE": instance_id, "PYTHONUNBUFFERED": "1", JOB_DIR_ENV: job_dir}
    gpu_env = {VISIBLE_DEVICES_ENV: visible_devices} if visible_devices is not None else {}
    pid = transport.start_detached(f"cd {q(transport.root)} && {payload_command(python, payload_dir, run_args)}",
                                   log_path=f"{job_dir}/log.txt", env={**env, **gpu_env, ROLE_ENV: "pipeline"})
    stop_cmd = self_stop_command or stop_command(python, payload_dir, job_dir, "pipeline")
    wd_pid = transport.start_detached(
        payload_command(python, payload_dir, watchdog_args(job_dir=job_dir, idle_timeout_s=idle_timeout_s,
                                                           deadline_s=deadline_s, stop_command=stop_cmd)),
        log_path=f"{job_dir}/watchdog.log", env={**env, ROLE_ENV: "watchdog"})
    return Started(pid, wd_pid, None)


JOB_DIR_ENV = "ORCHESTRATE_JOB_DIR"   # = remote_payload.procs.JOB_DIR_ENV (the host side)
ROLE_ENV = "ORCHESTRATE_ROLE"


def stop_command(python: str, payload_dir: str, job_dir: str, role: str = "all",
                 grace_s: float = 20.0) -> str:
    """The host command that ends this job's processes of `role` (pipeline, watchdog, all),
    found by their environment markers: a shared host (ssh, local) keeps running other work."""
    return payload_command(python, payload_dir,
                           f"remote_payload stop --job-dir {shlex.quote(job_dir)} --role {role} "
                           f"--grace-s {grace_s:g}")


def pull_results(transport: Transport, job_dir: str, local: Path) -> dict[str, Any] | None:
    """Copy JOB_DIR/out (+ log.txt, status.json, secrets scrubbed) to `local`; the summary."""
    import json

    from ..secrets import redact
    transport.get(f"{job_dir}/out", local)
    for extra in ("log.txt", "status.json"):
        text = transport.read_text(f"{job_dir}/{extra}")
        if text is not None:
            (local / extra).write_text(redact(text))
    mark_job_key(local, job_dir)
    try:
        summary = json.loads((local / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


@dataclass(slots=True)
class Prepared:
    """Outcome of environment set-up overlapped with staging (wall-clock instants)."""
    setup_started: float
    setup_ended: float = 0.0
    staging_started: float = 0.0
    staging_ended: float = 0.0
    env_data_s: float = 0.0
    data_dir: str = ""
    error: BaseException | None = None


def bootstrap_and_stage(transport: Transport, *, python: str, payload_dir: str,
                        stage: Callable[[], str]) -> Prepared:
    """Run `remote_payload bootstrap` in a thread while `stage()` stages the dataset (DESIGN:
    environment set-up ║ staging). The first error of either is returned in `error`."""
    out = Prepared(setup_started=time.time())
    errors: list[BaseException] = []

    def bootstrap() -> None:
        try:
            transport.run(payload_command(python, payload_dir, "remote_payload bootstrap --out env.json"),
                          timeout_s=900)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            errors.append(exc)
        finally:
            out.setup_ended = time.time()

    th = threading.Thread(target=bootstrap, name="bootstrap", daemon=True)
    th.start()
    out.staging_started = time.time()
    try:
        out.data_dir = stage()
    except BaseException as exc:  # noqa: BLE001 - handed to the caller, which raises the first
        errors.insert(0, exc)
    finally:
        out.staging_ended = time.time()
        th.join(timeout=900)
        out.setup_ended = out.setup_ended or time.time()
        out.env_data_s = time.time() - out.staging_started
    out.error = errors[0] if errors else None
    return out
