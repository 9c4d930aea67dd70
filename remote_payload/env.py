"""The payload's own environment on a stock host: `<root>/env/<key>/`, built once, reused.

A rented box has its image's python (torch maybe with CUDA, maybe none) and nothing else we
need. `remote_payload env` runs under any python >= 3.10 with the standard library only:

1. find the interpreter: the configured one, else the first usable of `CANDIDATES`, preferring
   one whose torch imports and, where nvidia-smi sees a GPU, sees CUDA;
2. key = hash(interpreter, its torch, requirements.txt, torch mode); `<root>/env/<key>/` is a
   venv with --system-site-packages over it plus a .pth naming the interpreter's own
   site-packages (so an image whose torch lives in a venv or conda env is reused too), holding
   the pinned `requirements.txt` of this payload. `.complete` marks a finished build: a later
   job on the host only probes;
3. install with uv (on PATH, or extracted from a uv wheel the controller pushed) and fall back
   to pip; without a reachable package index (probed in a few seconds) only the wheels the
   controller pushed to `--wheels` are used;
4. torch missing: mode `require` stops with one line; `install` installs the wheel family the
   driver supports (CPU wheel on a host without nvidia-smi).

Test hooks (environment of the host session; documented, not user settings):
`ORCHESTRATE_PAYLOAD_INSTALLER=uv|pip` forces the installer; `ORCHESTRATE_TORCH_INDEX=URL|none`
replaces the download.pytorch.org index that `torch: install` adds (`none`: only the host's own
pip/uv configuration).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import stat
import subprocess
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import PayloadError
from .status import utc_now_iso, write_json_atomic

log = logging.getLogger(__name__)

CANDIDATES = ("python3", "/opt/conda/bin/python", "/usr/local/bin/python3", "/usr/bin/python3",
              "python")
REQUIREMENTS = Path(__file__).with_name("requirements.txt")
TORCH_VERSION = "2.13.0"          # what `torch: install` installs (pyproject's payload extra admits it)
TORCH_INDEX = "https://download.pytorch.org/whl/{family}"
INDEX_PROBE_TIMEOUT_S = 3.0
PROBE_TIMEOUT_S = 120.0           # importing torch on a cold disk can take a while
INSTALL_TIMEOUT_S = 1800.0


class EnvFailed(PayloadError):
    """The environment could not be provisioned (one line: what and what to do)."""
    exit_code = 8


class NoTorch(PayloadError):
    """`torch: require` and the interpreter has no importable torch."""
    exit_code = 9


class NeedWheels(PayloadError):
    """No package index from this host and no pushed wheels: the controller must push them."""
    exit_code = 10


# the probe runs under each candidate: standard library + an optional torch import
_PROBE = r"""
import json, sys, sysconfig
r = {"executable": sys.executable, "prefix": sys.prefix, "base_prefix": sys.base_prefix,
     "version": "%d.%d.%d" % sys.version_info[:3], "tag": "cp%d%d" % sys.version_info[:2],
     "site": sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}),
     "torch": None, "cuda": False, "cuda_version": None, "gpu_name": None,
     "compute_capability": None, "torch_error": None, "ensurepip": False}
try:
    import ensurepip
    r["ensurepip"] = True
except Exception:
    pass
if sys.version_info >= (3, 10) and "--no-torch" not in sys.argv:
    try:
        import torch
        r["torch"] = torch.__version__
        r["cuda_version"] = torch.version.cuda
        if torch.cuda.is_available():
            r["cuda"] = True
            r["gpu_name"] = torch.cuda.get_device_name(0)
            r["compute_capability"] = "%d.%d" % torch.cuda.get_device_capability(0)
    except Exception as exc:
        r["torch_error"] = (type(exc).__name__ + ": " + str(exc)).splitlines()[0][:300]
print(json.dumps(r))
"""

_TORCH_DIST = ("import importlib.metadata as m, sys\n"
               "try:\n    print(m.version('torch'))\nexcept Exception:\n    print('-')\n")


def _run(argv: list[str], *, timeout_s: float, env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess[str]:
    if env is None and argv and os.path.basename(argv[0]) == "uv" and not os.environ.get("SSL_CERT_FILE"):
        # trust the system's CA store as pip does (a host behind a TLS-inspecting proxy);
        # uv's default is its own bundled roots
        env = {**os.environ, "UV_NATIVE_TLS": "1", "UV_SYSTEM_CERTS": "1"}
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s,
                          stdin=subprocess.DEVNULL, env=env)


def _tail(text: str, n: int = 3) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return " | ".join(lines[-n:])[-600:]


def nvidia_smi() -> dict[str, str] | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = _run([exe, "--query-gpu=name,driver_version,compute_cap", "--format=csv,noheader"],
                   timeout_s=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    parts = [p.strip() for p in (out.stdout.strip().splitlines() or [""])[0].split(",")]
    if out.returncode != 0 or len(parts) < 2:
        return None
    return {"name": parts[0], "driver_version": parts[1],
            "compute_cap": parts[2] if len(parts) > 2 else ""}


# -- interpreters -------------------------------------------------------------------------------
def probe_interpreter(path: str, cache: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """What `path` offers (None: not an interpreter we can run). Cached by (path, torch dist
    version): asking for the version costs ~50 ms, importing torch seconds."""
    exe = shutil.which(path) if "/" not in path else (path if os.access(path, os.X_OK) else None)
    if exe is None:
        return None
    exe = os.path.abspath(exe)
    try:
        dist = _run([exe, "-c", _TORCH_DIST], timeout_s=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if dist.returncode != 0:
        return None
    key = f"{exe}|{os.path.realpath(exe)}|torch={dist.stdout.strip()}"
    if cache is not None and isinstance(cache.get(key), dict):
        return cache[key]
    try:
        res = _run([exe, "-c", _PROBE], timeout_s=PROBE_TIMEOUT_S)
        info = json.loads(res.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        return None
    info["path"] = exe
    if cache is not None:
        cache[key] = info
    return info


def _usable(info: dict[str, Any]) -> bool:
    major, minor = (int(x) for x in info["version"].split(".")[:2])
    return (major, minor) >= (3, 10)


def find_interpreter(configured: str | None, *, candidates: tuple[str, ...] = CANDIDATES,
                     cache_file: Path | None = None, gpu_host: bool = False) -> dict[str, Any]:
    """The configured interpreter, else the best candidate: torch with CUDA (on a GPU host) >
    torch > any python >= 3.10. Raises EnvFailed naming what was tried."""
    cache: dict[str, Any] = {}
    if cache_file is not None:
        try:
            loaded = json.loads(cache_file.read_text())
            cache = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            cache = {}
    tried: list[str] = []
    found: list[dict[str, Any]] = []
    seen: set[str] = set()
    for cand in ([configured] if configured else list(candidates)):
        info = probe_interpreter(cand, cache)
        if info is None:
            tried.append(f"{cand} (not found)")
            continue
        ident = f"{os.path.realpath(info['path'])}|{info['prefix']}"
        if ident in seen:
            continue
        seen.add(ident)
        if not _usable(info):
            tried.append(f"{cand} (python {info['version']} < 3.10)")
            continue
        found.append(info)
    if cache_file is not None:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(cache_file, cache)
        except OSError:
            pass
    if not found:
        what = f"python {configured!r}" if configured else "no python >= 3.10"
        raise EnvFailed(f"{what} is not usable on this host (tried: {', '.join(tried)}); "
                        "set `python:` for the host to an interpreter >= 3.10")

    def rank(info: dict[str, Any]) -> tuple[int, int]:
        return (1 if info["torch"] else 0, 1 if (gpu_host and info["cuda"]) else 0)

    best = max(found, key=lambda i: (rank(i)[1], rank(i)[0]))   # max keeps the first of equals
    return best


# -- the package index ----------------------------------------------------------------------------
def index_url() -> str:
    for name in ("UV_DEFAULT_INDEX", "UV_INDEX_URL", "PIP_INDEX_URL"):
        if os.environ.get(name):
            return os.environ[name].split()[0]
    return "https://pypi.org/simple"


def index_reachable(timeout_s: float = INDEX_PROBE_TIMEOUT_S) -> tuple[bool, str]:
    """Can pip/uv here reach a package index? (reachable, url). Any HTTP answer counts; a
    refused or silent connection does not."""
    if os.environ.get("PIP_NO_INDEX", "").lower() in ("1", "true", "yes"):
        return False, "PIP_NO_INDEX"
    url = index_url()
    if url.startswith("file://"):
        return os.path.isdir(url[7:]), url
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/pip/", timeout=timeout_s):
            return True, url
    except urllib.error.HTTPError:
        return True, url
    except (OSError, ValueError):
        return False, url


# -- keys and the plan ------------------------------------------------------------------------------
def requirement_names(text: str) -> list[str]:
    names = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)", line)
        if m and m.group(1).lower() not in names:
            names.append(m.group(1).lower())
    return names


def env_key(interp: dict[str, Any], requirements: str, torch_mode: str) -> str:
    blob = json.dumps({"python": interp["path"], "prefix": interp["prefix"], "version": interp["version"],
                       "torch": interp["torch"], "requirements": requirements,
                       "torch_mode": torch_mode if not interp["torch"] else "present"},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def platform_info() -> dict[str, str]:
    libc, ver = platform.libc_ver()
    return {"machine": platform.machine(), "libc": libc or "", "libc_version": ver or "",
            "system": platform.system().lower()}


def find_uv(root: Path, wheels: Path | None) -> str | None:
    """uv on PATH, or one extracted earlier under <root>/tools, or from a pushed uv wheel."""
    found = shutil.which("uv")
    if found:
        return found
    tool = root / "tools" / "uv" / "uv"
    if tool.is_file() and os.access(tool, os.X_OK):
        return str(tool)
    for whl in sorted(wheels.glob("uv-*.whl")) if wheels and wheels.is_dir() else []:
        with zipfile.ZipFile(whl) as zf:
            member = next((n for n in zf.namelist() if n.endswith(".data/scripts/uv")), None)
            if member is None:
                continue
            tool.parent.mkdir(parents=True, exist_ok=True)
            tmp = tool.with_name(f".uv.{os.getpid()}")
            with zf.open(member) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
            tmp.chmod(tmp.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
            os.replace(tmp, tool)
            return str(tool)
    return None


def plan(root: Path, *, configured: str | None, torch_mode: str) -> dict[str, Any]:
    """Everything the controller must know before staging (cheap: a cached interpreter probe
    and an index probe only when the environment is not built yet)."""
    smi = nvidia_smi()
    interp = find_interpreter(configured, cache_file=root / "env" / "interpreters.json",
                              gpu_host=smi is not None)
    requirements = REQUIREMENTS.read_text(encoding="utf-8")
    key = env_key(interp, requirements, torch_mode)
    env_dir = root / "env" / key
    ready = (env_dir / ".complete").is_file() and (env_dir / "bin" / "python").exists()
    out: dict[str, Any] = {
        "interpreter": interp, "key": key, "env_dir": str(env_dir), "ready": ready,
        "torch_mode": torch_mode, "nvidia_smi": smi, "platform": platform_info(),
        "requirements": requirements, "index": None, "index_url": None, "uv": shutil.which("uv"),
    }
    if not ready:
        out["index"], out["index_url"] = index_reachable()
    return out


def check_torch(p: dict[str, Any]) -> None:
    interp = p["interpreter"]
    if interp["torch"] or p["torch_mode"] == "install":
        return
    why = f" ({interp['torch_error']})" if interp.get("torch_error") else ""
    raise NoTorch(f"{interp['path']} (python {interp['version']}) has no torch{why}: install torch "
                  "in the host's image, point `python:` at an interpreter that has it, or set "
                  "`torch: install` for this host")


# -- building ---------------------------------------------------------------------------------------
@contextmanager
def _lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)   # a second job on this host waits for the first build
        yield
    finally:
        os.close(fd)


def torch_family(smi: dict[str, str] | None) -> str:
    """The torch wheel family the driver supports: `cpu` without nvidia-smi, else the newest
    CUDA family whose minimum driver the reported driver meets (NVIDIA's compatibility table)."""
    if smi is None:
        return "cpu"
    try:
        major = int(smi["driver_version"].split(".")[0])
    except (KeyError, ValueError):
        return "cpu"
    for minimum, family in ((575, "cu129"), (570, "cu128"), (560, "cu126"), (525, "cu121")):
        if major >= minimum:
            return family
    return "cpu"


def _installer(root: Path, wheels: Path | None) -> tuple[str, str | None]:
    forced = os.environ.get("ORCHESTRATE_PAYLOAD_INSTALLER", "").strip().lower()
    uv = None if forced == "pip" else find_uv(root, wheels)
    if forced == "uv" and uv is None:
        raise EnvFailed("ORCHESTRATE_PAYLOAD_INSTALLER=uv but no uv on this host or in the pushed wheels")
    return ("uv", uv) if uv else ("pip", None)


def _check(res: subprocess.CompletedProcess[str], what: str) -> None:
    if res.returncode != 0:
        raise EnvFailed(f"{what} failed (exit {res.returncode}): {_tail(res.stderr + res.stdout)}")


def _site_packages(env_dir: Path, version: str) -> Path:
    major, minor = version.split(".")[:2]
    return env_dir / "lib" / f"python{major}.{minor}" / "site-packages"


def build(root: Path, p: dict[str, Any], *, wheels: Path | None) -> dict[str, Any]:
    """Make `<root>/env/<key>/` (venv + requirements [+ torch]); idempotent. Returns the record."""
    env_dir = Path(p["env_dir"])
    interp = p["interpreter"]
    t0 = time.monotonic()
    with _lock(root / "env" / f"{p['key']}.lock"):
        if (env_dir / ".complete").is_file():
            rec = json.loads((env_dir / "provision.json").read_text())
            return {**rec, "reused": True, "seconds": round(time.monotonic() - t0, 3)}
        offline = p.get("index") is False
        have_wheels = bool(wheels and wheels.is_dir() and any(wheels.glob("*.whl")))
        if offline and not have_wheels:
            raise NeedWheels(f"no package index reachable from this host ({p.get('index_url')}) "
                             "and no wheels pushed")
        kind, uv = _installer(root, wheels if have_wheels else None)
        shutil.rmtree(env_dir, ignore_errors=True)     # a build cut short: start over
        if uv is not None:
            _check(_run([uv, "venv", "-q", "--system-site-packages", "--python", interp["path"],
                         str(env_dir)], timeout_s=300), "uv venv")
        else:
            if not interp.get("ensurepip"):
                raise EnvFailed(f"{interp['path']} cannot make a venv with pip (no ensurepip: "
                                "apt-get install python3-venv) and no uv is available")
            _check(_run([interp["path"], "-m", "venv", "--system-site-packages", str(env_dir)],
                        timeout_s=300), "python -m venv")
        py = env_dir / "bin" / "python"
        # the interpreter's own site-packages after the venv's: an image whose torch lives in a
        # venv or conda env (not the base prefix) is reused too; the pinned packages still win
        site = _site_packages(env_dir, interp["version"])
        site.mkdir(parents=True, exist_ok=True)
        (site / "_orchestrate_base.pth").write_text("".join(f"{d}\n" for d in interp["site"]))
        source = ["--no-index", "--find-links", str(wheels)] if offline else \
            (["--find-links", str(wheels)] if have_wheels else [])

        def install(args: list[str], what: str) -> None:
            if uv is not None:
                argv = [uv, "pip", "install", "-q", "--python", str(py), *source, *args]
            else:
                argv = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        *source, *args]
            _check(_run(argv, timeout_s=INSTALL_TIMEOUT_S), what)

        torch_installed = None
        if not interp["torch"]:
            family = torch_family(p.get("nvidia_smi"))
            spec = f"torch=={TORCH_VERSION}" + ("+cpu" if family == "cpu" else "")
            index = os.environ.get("ORCHESTRATE_TORCH_INDEX", TORCH_INDEX.format(family=family))
            extra = [] if offline or index == "none" else ["--extra-index-url", index]
            if uv is not None and extra:
                extra += ["--index-strategy", "unsafe-best-match"]
            log.info("installing %s (%s wheels)", spec, family)
            install([spec, *extra], f"installing {spec}")
            torch_installed = {"spec": spec, "family": family}
        install(["-r", str(REQUIREMENTS)], "installing the payload's requirements")
        names = requirement_names(p["requirements"])
        ver = _run([str(py), "-c", "import importlib.metadata as m, json, sys\n"
                    "out = {}\nfor n in sys.argv[1:]:\n    try:\n        out[n] = m.version(n)\n"
                    "    except m.PackageNotFoundError:\n        out[n] = None\nprint(json.dumps(out))",
                    *names, "torch"], timeout_s=60)
        _check(ver, "reading installed versions")
        versions = json.loads(ver.stdout.strip().splitlines()[-1])
        rec = {"key": p["key"], "venv": str(env_dir), "python": str(py), "interpreter": interp["path"],
               "interpreter_version": interp["version"], "installer": kind,
               "index": p.get("index"), "index_url": p.get("index_url"), "wheels_pushed": have_wheels,
               "torch_installed": torch_installed, "requirements": versions,
               "built_at": utc_now_iso(), "build_seconds": round(time.monotonic() - t0, 3)}
        write_json_atomic(env_dir / "provision.json", rec)
        (env_dir / ".complete").write_text(p["key"] + "\n")
        return {**rec, "reused": False, "seconds": rec["build_seconds"]}


def payload_dir() -> str:
    return str(Path(__file__).resolve().parents[1])


def provision(root: Path, *, configured: str | None, torch_mode: str, wheels: Path | None,
              out: Path, plan_only: bool = False) -> dict[str, Any]:
    """`remote_payload env`: plan (+ build + probe with the env's python); the env.json record."""
    p = plan(root, configured=configured, torch_mode=torch_mode)
    check_torch(p)
    if plan_only:
        return p
    rec = build(root, p, wheels=wheels)
    # probe torch/CUDA/tcnn with the environment's own interpreter (bootstrap reuses its cache)
    res = _run([rec["python"], "-m", "remote_payload", "bootstrap", "--out", str(out)],
               timeout_s=PROBE_TIMEOUT_S, env={**os.environ, "PYTHONPATH": payload_dir()})
    _check(res, "bootstrap with the environment's python")
    env = json.loads(res.stdout)
    env["environment"] = {**rec, "interpreter_torch": p["interpreter"]["torch"],
                          "nvidia_smi": p["nvidia_smi"], "platform": p["platform"]}
    env.pop("cached", None)
    write_json_atomic(out, env)
    return env
