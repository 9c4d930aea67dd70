"""The host's environment, controller side: provision it, push wheels when the host has no
package index, and check it against the job before staging is paid for.

`prepare_env` runs `remote_payload env` (see remote_payload/env.py) on the host. Its answers:
exit 0 → env.json (the environment's python is what every later payload command uses);
exit 9 → torch missing under `torch: require` (one line, the job ends before staging);
exit 10 → no index and no wheels: the wheels are downloaded here once per (python tag,
platform, requirements) into `$ORCHESTRATE_HOME/wheels/` and pushed, then the command runs again.
`preflight` turns "CUDA wanted, none usable" into one line before any staging.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import JobError, OrchestratorError
from ..transport.base import Transport
from .payload import payload_command

log = logging.getLogger(__name__)

UV_VERSION = "0.13.9"        # the uv pushed to hosts without an index (the one our tests use)
EXIT_ENV_FAILED, EXIT_NO_TORCH, EXIT_NEED_WHEELS = 8, 9, 10
REQUIREMENTS = Path(__file__).resolve().parents[2] / "remote_payload" / "requirements.txt"
TORCH_MODES = ("require", "install")

# any python >= 3.10 can run `remote_payload env` (standard library only); it then chooses
FIND_RUNNER = ("for c in python3 /opt/conda/bin/python /usr/local/bin/python3 /usr/bin/python3 python; do "
               "p=$(command -v \"$c\" 2>/dev/null) || continue; "
               "\"$p\" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null "
               "&& { echo \"$p\"; exit 0; }; done; exit 3")


class HostEnvError(JobError):
    """The host cannot run the job as configured (no torch, no CUDA, no interpreter)."""


@dataclass(frozen=True, slots=True)
class HostEnv:
    python: str                   # <root>/env/<key>/bin/python
    record: dict[str, Any]        # env.json
    seconds: float
    wheels_pushed: bool


def _last_error(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("error: "):
            return ln[len("error: "):]
    return " | ".join(lines[-3:]) or "no output"


def runner_python(t: Transport, configured: str | None, host_name: str) -> str:
    """The interpreter that runs `remote_payload env`: the configured one (checked: it exists
    and is >= 3.10), else the first python >= 3.10 on the host."""
    if configured:
        q = shlex.quote(configured)
        res = t.run(f"command -v {q} >/dev/null 2>&1 || exit 3; "
                    f"{q} -c 'import sys; sys.exit(4 if sys.version_info < (3, 10) else 0)'",
                    check=False, timeout_s=60)
        if res.exit_code != 0:
            why = "not found" if res.exit_code == 3 else "older than 3.10" if res.exit_code == 4 \
                else f"does not run (exit {res.exit_code})"
            raise HostEnvError(f"host {host_name}: python {configured!r} is {why} on the host",
                               phase="setup", hint="set `python:` to an interpreter >= 3.10 on the host, "
                                                   "or remove it to let the host be searched")
        return configured
    res = t.run(FIND_RUNNER, check=False, timeout_s=60)
    if res.exit_code != 0 or not res.stdout.strip():
        raise HostEnvError(f"host {host_name}: no python >= 3.10 found (tried python3, "
                           "/opt/conda/bin/python, /usr/local/bin/python3, /usr/bin/python3, python)",
                           phase="setup", hint="install python3 in the image or set `python:` for the host")
    return res.stdout.strip().splitlines()[-1]


def _env_command(python: str, payload_dir: str, root: str, *, configured: str | None, torch: str,
                 wheels: str | None, plan: bool = False) -> str:
    q = shlex.quote
    args = f"remote_payload env --root {q(root)} --torch {q(torch)} --out {q(root + '/env.json')}"
    if configured:
        args += f" --python {q(configured)}"
    if wheels:
        args += f" --wheels {q(wheels)}"
    if plan:
        args += " --plan"
    return payload_command(python, payload_dir, args)


def prepare_env(t: Transport, *, host: Any, payload_dir: str, home: Path,
                timeout_s: float = 2400.0) -> HostEnv:
    """Provision `<root>/env/<key>/` on the host (reused when built) and return env.json."""
    t0 = time.monotonic()
    name = str(getattr(host, "name", "") or "host")
    configured = getattr(host, "python", None) or None
    torch = str(getattr(host, "torch", None) or "require")
    runner = runner_python(t, configured, name)
    wheels_remote = f"{t.root}/wheels"
    pushed = False
    for _attempt in (1, 2):
        cmd = _env_command(runner, payload_dir, t.root, configured=configured, torch=torch,
                           wheels=wheels_remote if pushed else None)
        res = t.run(cmd, check=False, timeout_s=timeout_s)
        if res.exit_code == 0:
            record = json.loads(res.stdout.strip().splitlines()[-1])
            env = record.get("environment") or {}
            log.info("%s: environment %s (%s, %s) in %.1f s", name, env.get("venv"),
                     "reused" if env.get("reused") else f"built with {env.get('installer')}",
                     "pushed wheels" if pushed else "index", time.monotonic() - t0)
            return HostEnv(python=str(env["python"]), record=record,
                           seconds=time.monotonic() - t0, wheels_pushed=pushed)
        why = _last_error(res.stderr or res.stdout)
        if res.exit_code == EXIT_NO_TORCH:
            raise HostEnvError(f"host {name}: {why}", phase="setup")
        if res.exit_code == EXIT_NEED_WHEELS and not pushed:
            plan_res = t.run(_env_command(runner, payload_dir, t.root, configured=configured, torch=torch,
                                          wheels=None, plan=True), check=False, timeout_s=300)
            if plan_res.exit_code != 0:
                raise HostEnvError(f"host {name}: {_last_error(plan_res.stderr)}", phase="setup")
            plan = json.loads(plan_res.stdout.strip().splitlines()[-1])
            local = ensure_wheels(home, plan)
            log.info("%s: no package index from the host; pushing %d wheels", name,
                     len(list(local.glob("*.whl"))))
            t.put(local, wheels_remote)
            pushed = True
            continue
        raise HostEnvError(f"host {name}: environment set-up failed: {why}", phase="setup",
                           hint="see remote_payload/requirements.txt; `python:` and `torch:` choose "
                                "the interpreter and whether torch may be installed")
    raise HostEnvError(f"host {name}: environment set-up failed after pushing wheels", phase="setup")


# -- wheels for hosts without an index ----------------------------------------------------------------
def platform_tags(plat: dict[str, str]) -> list[str]:
    """pip's --platform values for a Linux host: manylinux up to its glibc, then plain linux."""
    machine = plat.get("machine") or "x86_64"
    tags: list[str] = []
    if plat.get("libc") == "glibc" and plat.get("libc_version"):
        major, minor = (int(x) for x in plat["libc_version"].split(".")[:2])
        tags += [f"manylinux_{major}_{m}_{machine}" for m in range(minor, 16, -1)] if major == 2 else []
        tags += [f"manylinux2014_{machine}"]
    tags.append(f"linux_{machine}")
    return tags


def wheels_key(plan: dict[str, Any]) -> str:
    interp, plat = plan["interpreter"], plan["platform"]
    blob = json.dumps({"tag": interp["tag"], "platform": platform_tags(plat),
                       "requirements": plan["requirements"], "uv": UV_VERSION}, sort_keys=True)
    return f"{interp['tag']}-{plat.get('machine')}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def ensure_wheels(home: Path, plan: dict[str, Any]) -> Path:
    """`$ORCHESTRATE_HOME/wheels/<tag>-<machine>-<hash>/`: the payload's requirements and uv as
    wheels for the host's python and platform, downloaded once (by this machine's pip)."""
    dest = Path(home) / "wheels" / wheels_key(plan)
    done = dest / ".complete"
    if done.is_file():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    interp = plan["interpreter"]
    major, minor = interp["version"].split(".")[:2]
    req = dest / "requirements.txt"
    req.write_text(plan["requirements"])
    base = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
            "--only-binary=:all:", "--implementation", "cp", "--python-version", f"{major}.{minor}",
            "--abi", interp["tag"], "--abi", "abi3", "--abi", "none", "--dest", str(dest)]
    for tag in platform_tags(plan["platform"]):
        base += ["--platform", tag]
    for args in (["-r", str(req)], ["--no-deps", f"uv=={UV_VERSION}"]):
        try:
            proc = subprocess.run([*base, *args], capture_output=True, text=True, timeout=900,
                                  stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise OrchestratorError(f"downloading wheels for the host failed: {exc}") from None
        if proc.returncode != 0:
            tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
            raise OrchestratorError(f"downloading wheels for the host ({interp['tag']}, "
                                    f"{plan['platform'].get('machine')}) failed: {tail}",
                                    hint="this machine needs pip and a package index to fetch them once")
    req.unlink()
    done.write_text("\n".join(sorted(p.name for p in dest.glob("*.whl"))) + "\n")
    return dest


# -- preflight ------------------------------------------------------------------------------------
def wants_cuda(*, device: str, backend: str, gpu: str) -> bool:
    """CUDA requested, or `device: auto` on a host whose configured GPU is a real GPU."""
    return device == "cuda" or backend == "tcnn" or (device == "auto" and gpu.lower() not in ("", "cpu"))


def preflight(record: dict[str, Any], *, host_name: str, device: str, backend: str, gpu: str) -> None:
    """Raise HostEnvError (one line) when the host cannot run the job as asked."""
    if not record.get("torch"):
        raise HostEnvError(f"host {host_name}: torch is not importable in the environment "
                           f"({record.get('environment', {}).get('python')})", phase="setup")
    if wants_cuda(device=device, backend=backend, gpu=gpu) and not record.get("cuda"):
        smi = record.get("nvidia_smi") or (record.get("environment") or {}).get("nvidia_smi")
        driver = f"driver {smi['driver_version']}" if isinstance(smi, dict) and smi.get("driver_version") \
            else "no nvidia-smi on the host"
        asked = f"device {device}" + (f" on a {gpu} host" if device == "auto" else "")
        raise HostEnvError(
            f"host {host_name}: torch {record.get('torch')} sees no CUDA device ({driver}); "
            f"the job asks for {asked}", phase="setup",
            hint="use an image whose torch matches the host's CUDA driver, `torch: install`, "
                 "or gpu: cpu / device: cpu for a CPU run")


# -- the runner's glue ------------------------------------------------------------------------------
@dataclass(slots=True)
class HostSetup:
    """What `set_up_host` prepared: the python to use, env.json, and tiny-cuda-nn's state (a
    build may still be running on the host while staging goes on)."""
    python: str
    record: dict[str, Any]
    env_seconds: float
    tcnn: Any                     # tcnn_cache.TcnnStatus | tcnn_cache.PendingBuild
    backend: str = "auto"
    host_name: str = ""
    transport: Any = None         # to record tcnn's outcome in the host's env.json

    def record_tcnn(self) -> None:
        """env.json on the host says what became of tiny-cuda-nn (and why), next to the probe."""
        if self.transport is None or not hasattr(self.tcnn, "to_dict"):
            return
        self.record = {**self.record, "tcnn_status": self.tcnn.to_dict()}
        try:
            self.transport.write_text(f"{self.transport.root}/env.json", json.dumps(self.record, indent=1))
        except OrchestratorError as exc:   # a record, never a reason to fail the job
            log.warning("could not record tcnn's state in env.json: %s", exc)

    def finish(self, view: Any = None, job_id: str = "") -> Any:
        """After staging: wait for a tcnn build (bounded by tcnn_build_timeout_s)."""
        from .tcnn_cache import PendingBuild
        if isinstance(self.tcnn, PendingBuild):
            if view is not None:
                view.update(job_id, note="building tiny-cuda-nn")
            self.tcnn = self.tcnn.finish()
            self.record_tcnn()
            if view is not None:
                view.update(job_id, note=f"tcnn {self.tcnn.state}")
        if self.backend == "tcnn" and self.tcnn.state not in ("imported", "cached", "built"):
            raise HostEnvError(f"host {self.host_name}: backend tcnn asked but tiny-cuda-nn is not "
                               f"available ({self.tcnn.state}: {self.tcnn.detail})", phase="setup",
                               hint="use backend: auto to fall back to the torch backend")
        return self.tcnn

    def annotate(self, summary: dict[str, Any], out_dir: str | None) -> dict[str, Any]:
        """summary.json (here and in the ledger) says how the environment and tcnn went."""
        e = self.record.get("environment") or {}
        tcnn = self.tcnn.to_dict() if hasattr(self.tcnn, "to_dict") else {"state": "unknown"}
        summary = {**summary, "tcnn": tcnn, "environment": {
            k: e.get(k) for k in ("venv", "interpreter", "installer", "reused", "wheels_pushed",
                                  "torch_installed", "requirements")}}
        if out_dir:
            try:
                (Path(out_dir) / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
            except OSError as exc:
                log.warning("could not add the environment to %s: %s", out_dir, exc)
        return summary


def set_up_host(t: Transport, job: Any, provider: Any, prov: Any, *, payload_dir: str, ledger: Any,
                run_id: str, view: Any) -> HostSetup:
    """Environment, preflight, the user's `setup:` lines, tiny-cuda-nn (cached wheel installed,
    or a build started in the background). Raises HostEnvError before anything is staged."""
    from ..home import default_home
    home = Path(ledger.path).parent if getattr(ledger, "path", None) else default_home()
    view.update(job.job_id, phase="setup", note="environment")
    env = prepare_env(t, host=job.host, payload_dir=payload_dir, home=home)
    rec = env.record
    e = rec.get("environment") or {}
    ledger.add_event("environment", f"{e.get('venv')}: {'reused' if e.get('reused') else 'built'} "
                     f"with {e.get('installer')} in {env.seconds:.1f} s; python {rec.get('python')}, "
                     f"torch {rec.get('torch')}, cuda {rec.get('cuda')}, backend {rec.get('backend')}, "
                     f"tcnn {rec.get('tcnn')}" + ("; wheels pushed" if env.wheels_pushed else ""),
                     run_id, job.job_id)
    preflight(rec, host_name=job.host_name, device=job.device, backend=job.backend, gpu=job.gpu)
    lines = getattr(job.host, "setup", None)
    if lines:
        view.update(job.job_id, phase="setup", note="setup lines")
        run_setup(t, lines, instance_id=prov.instance_id, host_name=job.host_name, env_python=env.python)
    tcnn = tcnn_plan(t, rec, python=env.python, payload_dir=payload_dir, home=home, backend=job.backend,
                     timeout_s=float(getattr(job.host, "tcnn_build_timeout_s", None) or 1800.0))
    ledger.add_event("tcnn", f"{getattr(tcnn, 'state', 'building')}: {getattr(tcnn, 'detail', '')}",
                     run_id, job.job_id)
    view.update(job.job_id, note="")
    setup = HostSetup(python=env.python, record=rec, env_seconds=env.seconds, tcnn=tcnn,
                      backend=job.backend, host_name=job.host_name, transport=t)
    setup.record_tcnn()
    return setup


def tcnn_plan(t: Transport, rec: dict[str, Any], *, python: str, payload_dir: str, home: Path,
              backend: str, timeout_s: float) -> Any:
    """TcnnStatus now, or a PendingBuild: imported already; not applicable (no CUDA, backend
    torch); a cached wheel installed; a build started (CUDA and nvcc); no nvcc → torch backend."""
    from . import tcnn_cache
    from .tcnn_cache import TcnnStatus
    if rec.get("tcnn"):
        return TcnnStatus("imported", "tinycudann imports in the environment")
    key = tcnn_cache.key_from_env(rec)
    if key is None:
        return TcnnStatus("not_applicable", "torch sees no CUDA device")
    if backend == "torch":
        return TcnnStatus("not_applicable", "backend torch")
    if tcnn_cache.cached_wheel(home, key) is None and not t.run(
            "command -v nvcc >/dev/null || test -x /usr/local/cuda/bin/nvcc", check=False, timeout_s=30).ok:
        return TcnnStatus("failed", "no nvcc on the host (a CUDA -runtime image?): the torch backend is "
                          "used; a CUDA -devel image (image:) lets tiny-cuda-nn be built", key=key.slug)
    return tcnn_cache.ensure(t, python=python, payload_dir=payload_dir, home=home, key=key,
                             timeout_s=timeout_s)


def run_setup(t: Transport, lines: Any, *, instance_id: str, host_name: str, env_python: str,
              timeout_s: float = 3600.0) -> bool:
    """Run the host's `setup:` shell lines once per instance (a marker under the root keyed by
    instance and the lines), logged to <root>/setup.log. Returns False when already done."""
    text = "\n".join(lines) if isinstance(lines, (list, tuple)) else str(lines)
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    marker = f"{t.root}/.setup-{instance_id}-{digest}"
    if t.run(f"test -f {shlex.quote(marker)}", check=False, timeout_s=30).ok:
        return False
    q = shlex.quote
    script = f"set -e\nexport ORCHESTRATE_PYTHON={q(env_python)}\n{text}\n"
    res = t.run(f"bash -c {q(script)} >> {q(t.root + '/setup.log')} 2>&1", check=False, timeout_s=timeout_s)
    if res.exit_code != 0:
        tail = (t.read_text(f"{t.root}/setup.log") or "").strip().splitlines()[-3:]
        raise HostEnvError(f"host {host_name}: a setup: line failed (exit {res.exit_code}): "
                           f"{' | '.join(tail) or 'no output'}", phase="setup",
                           hint=f"see {t.root}/setup.log on the host")
    t.run(f"touch {q(marker)}", timeout_s=30)
    return True


def came_home(local: Path | None, run_id: str, job_id: str) -> str:
    """' (came home: …)' for a failed job's message: what of out/ reached this machine."""
    if local is None or not local.is_dir():
        return " (nothing came home)"
    parts = []
    for name in ("snapshot.pt", "train_log.csv", "metrics.csv", "summary.json"):
        if (local / name).is_file():
            parts.append(name)
    for name in ("renders", "gt", "videos"):
        n = len(list((local / name).glob("*"))) if (local / name).is_dir() else 0
        if n:
            parts.append(f"{name}/ ({n} files)")
    if not parts:
        return f" (nothing of out/ came home; logs in {local})"
    hint = ""
    if (local / "renders").is_dir() and not (local / "metrics.csv").is_file():
        hint = f"; `orchestrate eval {run_id} {job_id}` completes metrics and videos here"
    return f" (came home to {local}: {', '.join(parts)}{hint})"


def note_summary(summary: dict[str, Any], ledger: Any, run_id: str, job_id: str) -> None:
    """A job whose videos failed still succeeds: say which are missing and why."""
    missing = summary.get("videos_missing")
    if missing:
        text = "; ".join(f"{k}: {v}" for k, v in missing.items())
        log.warning("%s: videos missing (%s); metrics are complete", job_id, text)
        ledger.add_event("videos_missing", text, run_id, job_id)
