"""What the host offers: CUDA, the GPU, torch, tiny-cuda-nn. Recorded in env.json.

A second call is fast: env.json carries a cache key (python executable + installed torch
version, read from package metadata without importing torch) and is reused when it matches.
Without tiny-cuda-nn on a CUDA host the payload falls back to the torch backend with a
warning and says how tcnn would be built for this GPU's compute capability.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from .status import utc_now_iso, write_json_atomic

log = logging.getLogger(__name__)

TCNN_PIP = "pip install --no-build-isolation git+https://github.com/NVlabs/tiny-cuda-nn/#subdirectory=bindings/torch"


def _dist_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def cache_key() -> str:
    # tinycudann too: a wheel installed into the environment later must be probed again
    return (f"{os.path.realpath(sys.executable)}|torch={_dist_version('torch')}"
            f"|tinycudann={_dist_version('tinycudann')}")


def tcnn_build_hint(compute_capability: tuple[int, int]) -> str:
    arch = f"{compute_capability[0]}{compute_capability[1]}"
    return f"TCNN_CUDA_ARCHITECTURES={arch} {TCNN_PIP}"


def _nvidia_smi() -> dict[str, str] | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    line = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""
    parts = [p.strip() for p in line.split(",")]
    if len(parts) < 3:
        return None
    return {"name": parts[0], "driver_version": parts[1], "memory_total": parts[2]}


def _probe_tcnn() -> tuple[bool, str | None]:
    try:
        import tinycudann  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - an ImportError, or a CUDA error from a broken build
        return False, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip()
    return True, None


def probe() -> dict[str, Any]:
    """Inspect the host (imports torch). Values only; no files written."""
    env: dict[str, Any] = {
        "python": sys.version.split()[0], "python_executable": os.path.realpath(sys.executable),
        "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "torch": None, "cuda": False, "cuda_version": None, "gpu_name": None,
        "compute_capability": None, "gpu_count": 0, "tcnn": False, "tcnn_error": None,
        "backend": "torch", "device": "cpu", "warnings": [], "tcnn_build": None,
        "nvidia_smi": _nvidia_smi(),
        "versions": {n: _dist_version(n) for n in ("numpy", "pillow", "imageio-ffmpeg",
                                                    "ffmpeg-python")},
    }
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - a broken torch install is recorded, not fatal here
        env["warnings"].append(f"torch is not importable ({type(exc).__name__}: {exc}); "
                               "install torch for this host's CUDA before training")
        return env
    env["torch"] = torch.__version__
    env["cuda_version"] = torch.version.cuda
    if torch.cuda.is_available():
        env["cuda"] = True
        env["device"] = "cuda"
        env["gpu_count"] = torch.cuda.device_count()
        env["gpu_name"] = torch.cuda.get_device_name(0)
        cc = torch.cuda.get_device_capability(0)
        env["compute_capability"] = f"{cc[0]}.{cc[1]}"
        ok, err = _probe_tcnn()
        env["tcnn"], env["tcnn_error"] = ok, err
        if ok:
            env["backend"] = "tcnn"
        else:
            env["tcnn_build"] = tcnn_build_hint(cc)
            env["warnings"].append(
                f"tiny-cuda-nn is not importable ({err}); using the torch backend. "
                f"To build it for this GPU: {env['tcnn_build']}")
    elif env["nvidia_smi"] is not None:
        env["warnings"].append(
            f"nvidia-smi sees {env['nvidia_smi']['name']} but torch {torch.__version__} has no usable "
            "CUDA (a CPU-only wheel or a driver mismatch): install the torch build for this CUDA "
            "driver, or training runs on the CPU")
    else:
        env["warnings"].append("no CUDA device: training runs on the CPU with the torch backend")
    return env


def bootstrap(out: Path, *, force: bool = False) -> dict[str, Any]:
    """Return the host record, reusing `out` when its cache key matches; write it otherwise."""
    key = cache_key()
    if not force:
        try:
            cached = json.loads(Path(out).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            cached = None
        if isinstance(cached, dict) and cached.get("cache_key") == key:
            log.info("env.json is current (%s); not probing again", out)
            return {**cached, "cached": True}
    env = probe()
    for w in env["warnings"]:
        log.warning("%s", w)
    env = {**env, "cache_key": key, "probed_at": utc_now_iso()}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(out), env)
    return {**env, "cached": False}
