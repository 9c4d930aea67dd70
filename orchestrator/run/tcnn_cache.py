"""tiny-cuda-nn built once per (compute capability, torch, CUDA, python tag), reused everywhere.

A host whose environment has CUDA and nvcc but no importable tinycudann builds a wheel in the
background while staging runs (`remote_payload tcnn-build`, detached, logged on the host); on
success the wheel comes home to `$ORCHESTRATE_HOME/tcnn/<key>/` and every later host with the
same key gets it pushed and installed in seconds. A failed or timed-out build leaves the job on
the torch backend, and says so (`TcnnStatus`).
"""
from __future__ import annotations

import json
import logging
import re
import shlex
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..transport.base import Transport
from .payload import payload_command

log = logging.getLogger(__name__)

TCNN_SOURCE = "git+https://github.com/NVlabs/tiny-cuda-nn/#subdirectory=bindings/torch"
TCNN_IMPORT = "tinycudann"


@dataclass(frozen=True, slots=True)
class TcnnKey:
    compute_capability: str      # "9.0"
    torch: str                   # "2.13.0+cu128"
    cuda: str                    # "12.8"
    python_tag: str              # "cp311"

    @property
    def slug(self) -> str:
        text = f"sm{self.compute_capability.replace('.', '')}-torch{self.torch}-cuda{self.cuda}-{self.python_tag}"
        return re.sub(r"[^A-Za-z0-9._-]", "_", text)


@dataclass(frozen=True, slots=True)
class TcnnStatus:
    state: str                   # imported | cached | built | failed | not_applicable
    detail: str = ""
    seconds: float = 0.0
    key: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def key_from_env(record: dict[str, Any]) -> TcnnKey | None:
    """The key of a host whose torch sees CUDA (None otherwise)."""
    if not record.get("cuda") or not record.get("compute_capability") or not record.get("torch"):
        return None
    major, minor = (str(record.get("python") or "0.0").split(".") + ["0"])[:2]
    return TcnnKey(str(record["compute_capability"]), str(record["torch"]),
                   str(record.get("cuda_version") or "none"), f"cp{major}{minor}")


def cache_dir(home: Path, key: TcnnKey) -> Path:
    return Path(home) / "tcnn" / key.slug


def cached_wheel(home: Path, key: TcnnKey) -> Path | None:
    wheels = sorted(cache_dir(home, key).glob("*.whl"))
    return wheels[-1] if wheels else None


def remote_dir(t: Transport, key: TcnnKey) -> str:
    return f"{t.root}/tcnn/{key.slug}"


def start_build(t: Transport, *, python: str, payload_dir: str, key: TcnnKey, timeout_s: float,
                source: str = TCNN_SOURCE, env: dict[str, str] | None = None) -> str:
    """Start the build detached on the host; return its directory (result.json appears there)."""
    q = shlex.quote
    rdir = remote_dir(t, key)
    t.run(f"mkdir -p {q(rdir)} && rm -f {q(rdir)}/result.json", timeout_s=60)
    args = (f"remote_payload tcnn-build --out {q(rdir)} --compute-capability {q(key.compute_capability)} "
            f"--timeout-s {timeout_s:g} --python {q(python)} --source {q(source)}")
    t.start_detached(payload_command(python, payload_dir, args), log_path=f"{rdir}/runner.log", env=env)
    log.info("tiny-cuda-nn build started on the host (%s, limit %g s)", key.slug, timeout_s)
    return rdir


def wait_build(t: Transport, rdir: str, *, timeout_s: float, poll_s: float = 2.0) -> dict[str, Any]:
    """result.json of the build; a result that never appears within timeout_s (+ a margin for
    the builder's own kill) counts as a timeout."""
    deadline = time.monotonic() + timeout_s + 30.0
    while time.monotonic() < deadline:
        text = t.read_text(f"{rdir}/result.json")
        if text:
            try:
                return dict(json.loads(text))
            except ValueError:
                pass
        time.sleep(poll_s)
    return {"ok": False, "wheel": None, "error": f"no result within {timeout_s:g} s", "seconds": timeout_s}


def pull_wheel(t: Transport, rdir: str, result: dict[str, Any], home: Path, key: TcnnKey) -> Path:
    """Bring the built wheel home into the cache (with the build's result as meta.json)."""
    dest = cache_dir(home, key)
    dest.mkdir(parents=True, exist_ok=True)
    wheel = str(result["wheel"])
    t.get(f"{rdir}/{wheel}", dest / wheel)
    (dest / "meta.json").write_text(json.dumps({**result, "key": asdict(key)}, indent=1) + "\n")
    return dest / wheel


def push_and_install(t: Transport, *, python: str, payload_dir: str, wheel: Path, key: TcnnKey,
                     import_name: str = TCNN_IMPORT) -> dict[str, Any]:
    rdir = remote_dir(t, key)
    t.put(wheel, f"{rdir}/{wheel.name}")
    return install(t, python=python, payload_dir=payload_dir, remote_wheel=f"{rdir}/{wheel.name}",
                   import_name=import_name)


def install(t: Transport, *, python: str, payload_dir: str, remote_wheel: str,
            import_name: str = TCNN_IMPORT) -> dict[str, Any]:
    q = shlex.quote
    res = t.run(payload_command(python, payload_dir, f"remote_payload tcnn-install --wheel {q(remote_wheel)} "
                                f"--python {q(python)} --import-name {q(import_name)}"),
                check=False, timeout_s=900)
    try:
        return dict(json.loads(res.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        return {"installed": None, "imports": False,
                "error": (res.stderr.strip().splitlines() or ["no output"])[-1][:300]}


def ensure(t: Transport, *, python: str, payload_dir: str, home: Path, key: TcnnKey,
           timeout_s: float, source: str = TCNN_SOURCE, import_name: str = TCNN_IMPORT,
           env: dict[str, str] | None = None) -> PendingBuild | TcnnStatus:
    """A cached wheel is pushed and installed now; otherwise a build starts (PendingBuild)."""
    t0 = time.monotonic()
    wheel = cached_wheel(home, key)
    if wheel is not None:
        res = push_and_install(t, python=python, payload_dir=payload_dir, wheel=wheel, key=key,
                               import_name=import_name)
        if res.get("imports"):
            return TcnnStatus("cached", f"installed {wheel.name} from the cache",
                              round(time.monotonic() - t0, 2), key.slug)
        return TcnnStatus("failed", f"cached {wheel.name} does not import: {res.get('error')}",
                          round(time.monotonic() - t0, 2), key.slug)
    rdir = start_build(t, python=python, payload_dir=payload_dir, key=key, timeout_s=timeout_s,
                       source=source, env=env)
    return PendingBuild(t, rdir, python=python, payload_dir=payload_dir, home=home, key=key,
                        timeout_s=timeout_s, import_name=import_name, started=time.monotonic())


@dataclass(slots=True)
class PendingBuild:
    t: Transport
    rdir: str
    python: str
    payload_dir: str
    home: Path
    key: TcnnKey
    timeout_s: float
    import_name: str
    started: float

    def finish(self) -> TcnnStatus:
        """Wait for the build (bounded), pull the wheel home, install it here."""
        left = max(1.0, self.timeout_s - (time.monotonic() - self.started))
        result = wait_build(self.t, self.rdir, timeout_s=left)
        took = round(time.monotonic() - self.started, 2)
        if not result.get("ok"):
            log.warning("tiny-cuda-nn build failed (%s); the torch backend is used", result.get("error"))
            return TcnnStatus("failed", str(result.get("error")), took, self.key.slug)
        wheel = pull_wheel(self.t, self.rdir, result, self.home, self.key)
        res = install(self.t, python=self.python, payload_dir=self.payload_dir,
                      remote_wheel=f"{self.rdir}/{wheel.name}", import_name=self.import_name)
        if not res.get("imports"):
            return TcnnStatus("failed", f"built {wheel.name} but it does not import: {res.get('error')}",
                              took, self.key.slug)
        return TcnnStatus("built", f"built {wheel.name} in {result.get('seconds')} s; cached at {wheel.parent}",
                          took, self.key.slug)
