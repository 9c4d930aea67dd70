"""Build and install a tiny-cuda-nn wheel on the host (standard library only).

`tcnn-build` builds a wheel of the torch bindings for one compute capability with the
environment's python (`pip wheel --no-build-isolation`: it compiles against the torch that is
installed), under a time limit, logging to `<out>/build.log` and writing `<out>/result.json`
({"ok", "wheel", "seconds", "error"}) when it ends. The controller starts it detached while
staging runs, pulls the wheel home and, on later hosts with the same key, pushes it and runs
`tcnn-install`. `--source` and `--import-name` exist so the mechanism can be tested on a CPU
with a small local package; nothing here pretends a CUDA build happened.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .errors import PayloadError
from .status import write_json_atomic

TCNN_SOURCE = "git+https://github.com/NVlabs/tiny-cuda-nn/#subdirectory=bindings/torch"
TCNN_IMPORT = "tinycudann"


BUILD_TOOLS_ARGV = ["-m", "pip", "install", "-q", "--disable-pip-version-check", "setuptools>=70.1", "ninja"]


def arch(compute_capability: str) -> str:
    """'9.0' -> '90' (TCNN_CUDA_ARCHITECTURES)."""
    major, _, minor = compute_capability.partition(".")
    if not (major.isdigit() and (minor or "0").isdigit()):
        raise PayloadError(f"bad compute capability {compute_capability!r} (expected e.g. 9.0)")
    return f"{int(major)}{int(minor or 0)}"


def max_jobs(cpu_count: int | None = None, mem_bytes: int | None = None) -> int:
    """nvcc needs ~2.5 GB per job for tcnn's kernels: min(CPUs, memory / 2.5 GB), at least 1."""
    cpus = cpu_count or os.cpu_count() or 1
    if mem_bytes is None:
        try:
            mem_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            mem_bytes = 0
    by_mem = int(mem_bytes // int(2.5 * (1 << 30))) if mem_bytes else cpus
    return max(1, min(cpus, by_mem))


def build_argv(python: str, out: Path, source: str = TCNN_SOURCE) -> list[str]:
    return [python, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps",
            "--disable-pip-version-check", "-w", str(out), source]


def build_env(compute_capability: str, jobs: int) -> dict[str, str]:
    return {"TCNN_CUDA_ARCHITECTURES": arch(compute_capability), "MAX_JOBS": str(jobs)}


def build_command(python: str, out: Path, compute_capability: str, *, jobs: int,
                  source: str = TCNN_SOURCE) -> str:
    """The shell line a host runs (what `--dry-run` prints)."""
    env = " ".join(f"{k}={v}" for k, v in build_env(compute_capability, jobs).items())
    return f"{env} {' '.join(shlex.quote(a) for a in build_argv(python, out, source))}"


def build(out: Path, *, python: str, compute_capability: str, timeout_s: float,
          source: str = TCNN_SOURCE, jobs: int | None = None) -> dict[str, Any]:
    """Build the wheel into `out`; result.json says how it went (also on timeout/failure)."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.whl"):
        old.unlink()
    (out / "result.json").unlink(missing_ok=True)
    jobs = jobs or max_jobs()
    t0 = time.monotonic()
    env = {**os.environ, **build_env(compute_capability, jobs)}
    if os.path.isdir("/usr/local/cuda/bin"):   # CUDA images keep nvcc there, often off PATH
        env["PATH"] = "/usr/local/cuda/bin:" + env.get("PATH", "")
        env.setdefault("CUDA_HOME", "/usr/local/cuda")
    argv = build_argv(python, out, source)
    with open(out / "build.log", "w") as log:
        # --no-build-isolation builds with the environment's own tools: make sure they exist
        # (setuptools >= 70.1 has bdist_wheel built in; ninja parallelises nvcc)
        log.write(f"$ {' '.join(BUILD_TOOLS_ARGV)}\n")
        log.flush()
        subprocess.run([python, *BUILD_TOOLS_ARGV], stdout=log, stderr=subprocess.STDOUT,
                       stdin=subprocess.DEVNULL, timeout=min(600.0, timeout_s))
        log.write(f"$ {build_command(python, out, compute_capability, jobs=jobs, source=source)}\n")
        log.flush()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)
        try:
            code: int | None = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)      # the compiler's children too
            proc.wait()
            code = None
    seconds = round(time.monotonic() - t0, 1)
    wheels = sorted(out.glob("*.whl"))
    if code is None:
        result = {"ok": False, "wheel": None, "seconds": seconds,
                  "error": f"timed out after {timeout_s:g} s (tcnn_build_timeout_s)"}
    elif code != 0 or not wheels:
        result = {"ok": False, "wheel": None, "seconds": seconds,
                  "error": f"build failed (exit {code}): {why(out / 'build.log')}"}
    else:
        result = {"ok": True, "wheel": wheels[0].name, "seconds": seconds, "error": None}
    result.update(compute_capability=compute_capability, jobs=jobs, source=source)
    write_json_atomic(out / "result.json", result)
    return result


def why(log_path: Path) -> str:
    """The builder's own last lines: inside pip's "[N lines of output] … [end of output]"
    block when there is one (pip's summary after it says nothing), else the log's tail."""
    lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    inner: list[str] = []
    block: list[str] | None = None
    for ln in lines:
        if ln.endswith("lines of output]"):
            block = []
        elif ln == "[end of output]" and block is not None:
            inner, block = block, None
        elif block is not None:
            block.append(ln)
    return " | ".join((inner or lines)[-3:])[-500:]


def install(wheel: Path, *, python: str, import_name: str = TCNN_IMPORT) -> dict[str, Any]:
    """Install `wheel` into `python`'s environment (no dependencies, no index) and import it."""
    res = subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                          "--disable-pip-version-check", "--force-reinstall", str(wheel)],
                         capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        uv = _uv()
        if uv is None:
            raise PayloadError(f"installing {wheel.name} failed: {res.stderr.strip()[-300:]}")
        res = subprocess.run([uv, "pip", "install", "-q", "--no-deps", "--no-index", "--python", python,
                              "--reinstall", str(wheel)], capture_output=True, text=True, timeout=600,
                             stdin=subprocess.DEVNULL)
        if res.returncode != 0:
            raise PayloadError(f"installing {wheel.name} failed: {res.stderr.strip()[-300:]}")
    probe = subprocess.run([python, "-c", f"import {import_name}"], capture_output=True, text=True,
                           timeout=120, stdin=subprocess.DEVNULL)
    ok = probe.returncode == 0
    err = None if ok else (probe.stderr.strip().splitlines() or ["no output"])[-1][:300]
    return {"installed": wheel.name, "imports": ok, "error": err}


def _uv() -> str | None:
    import shutil
    return shutil.which("uv")


def main_build(args: Any) -> int:
    out = Path(args.out).expanduser()
    python = args.python or sys.executable
    if args.dry_run:
        sys.stdout.write(build_command(python, out, args.compute_capability,
                                       jobs=args.max_jobs or max_jobs(), source=args.source) + "\n")
        return 0
    result = build(out, python=python, compute_capability=args.compute_capability,
                   timeout_s=args.timeout_s, source=args.source, jobs=args.max_jobs)
    sys.stdout.write(json.dumps(result) + "\n")
    return 0 if result["ok"] else 3


def main_install(args: Any) -> int:
    result = install(Path(args.wheel).expanduser(), python=args.python or sys.executable,
                     import_name=args.import_name)
    sys.stdout.write(json.dumps(result) + "\n")
    return 0 if result["imports"] else 3
