"""The set-up estimate includes the environment: a fresh environment on a rented host, and
tiny-cuda-nn built on the first host of a GPU (catalog figure) or installed from the cache."""
from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.config import parse_config
from orchestrator.config.plan import expand
from orchestrator.estimate import estimate_job


def job(gpu: str, *, provider: str = "ssh", backend: str = "auto", device: str = "auto"):
    host = ("    provider: local\n" if provider == "local" else
            f"    provider: ssh\n    host: 10.0.0.1\n    price_per_hour: 2\n    gpu: {gpu}\n")
    text = ("name: t\nhosts:\n  h:\n" + host + "datasets:\n  gen: {generate: {size: 16, seed: 0}}\n"
            f"experiments:\n  - {{name: a, steps: 100, backend: {backend}, device: {device}}}\n")
    (j,) = expand(parse_config(text))
    return j


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ORCHESTRATE_HOME", str(tmp_path))
    return tmp_path


def test_first_gpu_host_builds_tcnn_later_hosts_install_it(home: Path) -> None:
    first = estimate_job(job("RTX 4090")).phase("setup")
    # phases.csv: ssh setup 30 + env_fresh 20 + tcnn_build 900
    assert first.seconds == 950
    assert "tiny-cuda-nn build (first host of this GPU)" in first.detail and "environment" in first.detail
    wheel_dir = home / "tcnn" / "sm89-torch2.13.0_cu128-cuda12.8-cp311"
    wheel_dir.mkdir(parents=True)
    (wheel_dir / "tinycudann-2.0-cp311-cp311-linux_x86_64.whl").write_bytes(b"")
    later = estimate_job(job("RTX 4090")).phase("setup")
    assert later.seconds == 30 + 20 + 15 and "tiny-cuda-nn from the cache" in later.detail
    # another GPU (compute capability 9.0) still builds
    assert estimate_job(job("H100 SXM")).phase("setup").seconds == 950


def test_no_tcnn_for_cpu_hosts_torch_backend_or_local(home: Path) -> None:
    assert estimate_job(job("cpu")).phase("setup").seconds == 50
    assert estimate_job(job("RTX 4090", backend="torch")).phase("setup").seconds == 50
    assert estimate_job(job("RTX 4090", device="cpu")).phase("setup").seconds == 50
    assert estimate_job(job("cpu", provider="local")).phase("setup").seconds == 2
