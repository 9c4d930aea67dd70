"""The environment part of the set-up estimate: a fresh environment on a rented host, and
tiny-cuda-nn built (first host of its GPU) or installed from the cache (later hosts).

Used by `estimate.core._phase_seconds("setup")` when the ledger has no history for the job's
provider and GPU; history (the recorded setup phase) replaces all of it once a job succeeded.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

# compute capability per catalog GPU (NVIDIA's CUDA GPUs table): which tcnn cache key a host gets
COMPUTE_CAPABILITY = {
    "H100 SXM": "9.0", "H100 PCIe": "9.0", "H200": "9.0", "GH200": "9.0",
    "A100 80GB": "8.0", "A100 80GB PCIe": "8.0", "A100 40GB": "8.0", "A10": "8.6", "A40": "8.6",
    "RTX 3090": "8.6", "RTX A6000": "8.6", "RTX 4090": "8.9", "L4": "8.9", "L40S": "8.9",
    "L40": "8.9", "RTX 6000 Ada": "8.9", "RTX 5090": "12.0", "B200": "10.0", "V100": "7.0",
    "T4": "7.5",
}


def tcnn_cached(home: Path, gpu: str) -> bool:
    """A cached wheel for this GPU's compute capability (any torch/CUDA/python: the estimate
    cannot know those before renting)."""
    cc = COMPUTE_CAPABILITY.get(gpu)
    if cc is None:
        return False
    return any((Path(home) / "tcnn").glob(f"sm{cc.replace('.', '')}-*/*.whl"))


def setup_seconds(job: Any, default: Callable[[str, str], tuple[float, str]],
                  home: Path | None = None) -> tuple[float, str, str]:
    provider = job.host.provider
    base, src = default(provider, "setup")
    if provider == "local":
        return base, "assumption", src
    env_s, env_src = default(provider, "env_fresh")
    secs = base + env_s
    detail = f"{base:g} s payload + bootstrap ({src}) + {env_s:g} s environment ({env_src})"
    gpu = str(job.host.gpu or "cpu")
    if gpu.lower() != "cpu" and job.device != "cpu" and job.backend != "torch":
        if home is None:
            from ..home import default_home
            home = default_home()
        phase = "tcnn_cached_install" if tcnn_cached(home, gpu) else "tcnn_build"
        t_s, t_src = default(provider, phase)
        secs += t_s
        detail += (f" + {t_s:g} s tiny-cuda-nn " + ("from the cache" if phase == "tcnn_cached_install"
                                                    else "build (first host of this GPU)") + f" ({t_src})")
    return secs, "assumption", detail
