"""The tiny-cuda-nn build-and-cache mechanism, on a CPU, over a real sshd on loopback.

No CUDA build happens here and none is pretended: the mechanism (detached build under a time
limit, build.log and result.json on the host, the wheel pulled into the controller's cache by
key, pushed to and installed on a second host, failure and timeout leaving the torch backend)
is exercised with a real wheel built from a small local package (`--source`, `--import-name`).
The build command an H100 host would run is checked as a dry run. The build's tools
(setuptools, ninja) come from the loopback index over the CI wheelhouse (orchestrator/testing/pypi.py),
named to the host's pip by sshd's SetEnv.
"""
from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.run import tcnn_cache
from orchestrator.run.payload import push_payload
from orchestrator.run.tcnn_cache import PendingBuild, TcnnKey, TcnnStatus
from orchestrator.testing import pypi
from orchestrator.testing.pypi import LocalIndex
from orchestrator.testing.sshd import SSHServer, find_sshd
from orchestrator.testing.stockhost import BARE_PYTHON, index_env, set_env
from orchestrator.transport.endpoint import Endpoint
from orchestrator.transport.ssh import SSHAuth, SSHTransport

local_index = pypi.local_index     # the fixture: the loopback index over the CI wheelhouse

pytestmark = pytest.mark.sshd

KEY = TcnnKey("8.6", "2.13.0+cpu", "none", "cp311")    # a CPU stand-in key: same mechanism


@pytest.fixture
def sshd_server(local_index: LocalIndex, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SSHServer]:
    """A host whose pip sees the loopback index alone."""
    if find_sshd() is None:
        pytest.skip("sshd not installed (apt-get install openssh-server)")
    with SSHServer(base_dir=tmp_path_factory.mktemp("sshd"),
                   extra_config=set_env(**index_env(local_index.url))) as srv:
        yield srv


def transport(srv: SSHServer, root: Path) -> SSHTransport:
    return SSHTransport(lambda: Endpoint(srv.host, srv.port, srv.user), root=str(root),
                        auth=SSHAuth(identity_file=str(srv.client_key_path), allow_agent=False,
                                     look_for_keys=False))


def package(tmp: Path, name: str, setup_body: str = "") -> Path:
    src = tmp / f"src-{name}"
    (src / name).mkdir(parents=True)
    (src / name / "__init__.py").write_text("VALUE = 42\n")
    (src / "setup.py").write_text(f"import sys, time\n{setup_body}\nfrom setuptools import setup\n"
                                  f"setup(name={name!r}, version='1.0', packages=[{name!r}])\n")
    return src


def host_python(tmp: Path, name: str) -> str:
    """A fresh venv per host (pip + setuptools from ensurepip), like an environment's python."""
    venv = tmp / name
    subprocess.run([BARE_PYTHON, "-m", "venv", str(venv)], check=True, timeout=300, capture_output=True)
    return str(venv / "bin" / "python")


def imports(python: str, module: str) -> bool:
    return subprocess.run([python, "-c", f"import {module}; assert {module}.VALUE == 42"],
                          capture_output=True, timeout=60).returncode == 0


@pytest.mark.timeout(600)
def test_build_pull_cache_push_install(sshd_server: SSHServer, tmp_path: Path) -> None:
    home = tmp_path / "home"
    src = package(tmp_path, "orch_tcnn_probe")
    py1, py2 = host_python(tmp_path, "env1"), host_python(tmp_path, "env2")
    with transport(sshd_server, tmp_path / "host1") as t1:
        payload = push_payload(t1).remote_dir
        pending = tcnn_cache.ensure(t1, python=py1, payload_dir=payload, home=home, key=KEY,
                                    timeout_s=300, source=str(src), import_name="orch_tcnn_probe")
        assert isinstance(pending, PendingBuild)          # nothing cached: a build started
        status = pending.finish()
    assert status.state == "built", status
    assert status.key == "sm86-torch2.13.0_cpu-cudanone-cp311"
    [wheel] = (home / "tcnn" / status.key).glob("*.whl")
    assert wheel.name == "orch_tcnn_probe-1.0-py3-none-any.whl"
    meta = json.loads((home / "tcnn" / status.key / "meta.json").read_text())
    assert (meta["ok"], meta["compute_capability"], meta["key"]["torch"]) == (True, "8.6", "2.13.0+cpu")
    log = (tmp_path / "host1" / "tcnn" / status.key / "build.log").read_text()
    assert "\n$ TCNN_CUDA_ARCHITECTURES=86 MAX_JOBS=" in log
    assert imports(py1, "orch_tcnn_probe")

    # a second host with the same key: the cached wheel is pushed and installed, nothing built
    with transport(sshd_server, tmp_path / "host2") as t2:
        payload = push_payload(t2).remote_dir
        second = tcnn_cache.ensure(t2, python=py2, payload_dir=payload, home=home, key=KEY,
                                   timeout_s=300, source=str(tmp_path / "nonexistent"),
                                   import_name="orch_tcnn_probe")
    assert isinstance(second, TcnnStatus) and second.state == "cached", second
    assert second.seconds < status.seconds
    assert not (tmp_path / "host2" / "tcnn" / status.key / "build.log").exists()
    assert imports(py2, "orch_tcnn_probe")


@pytest.mark.timeout(300)
def test_timeout_and_failure_leave_the_torch_backend(sshd_server: SSHServer, tmp_path: Path) -> None:
    home = tmp_path / "home"
    py = host_python(tmp_path, "env")
    slow = package(tmp_path, "orch_slow", "time.sleep(120)")
    broken = package(tmp_path, "orch_broken", "sys.exit('boom: no nvcc on this host')")
    with transport(sshd_server, tmp_path / "host") as t:
        payload = push_payload(t).remote_dir
        key_slow = TcnnKey("9.0", "2.13.0+cpu", "none", "cp311")
        pending = tcnn_cache.ensure(t, python=py, payload_dir=payload, home=home, key=key_slow,
                                    timeout_s=4, source=str(slow), import_name="orch_slow")
        assert isinstance(pending, PendingBuild)
        timed_out = pending.finish()
        pending = tcnn_cache.ensure(t, python=py, payload_dir=payload, home=home, key=KEY,
                                    timeout_s=120, source=str(broken), import_name="orch_broken")
        assert isinstance(pending, PendingBuild)
        failed = pending.finish()
    assert (timed_out.state, timed_out.detail) == ("failed", "timed out after 4 s (tcnn_build_timeout_s)")
    assert timed_out.seconds < 40
    assert failed.state == "failed" and failed.detail.startswith("build failed (exit 1): ")
    assert "boom: no nvcc on this host" in failed.detail
    assert not (home / "tcnn").exists() or not list((home / "tcnn").rglob("*.whl"))   # nothing cached


def test_h100_dry_run_prints_the_exact_build_command(tmp_path: Path) -> None:
    out = "/root/orchestrate/tcnn/sm90-torch2.13.0_cu128-cuda12.8-cp311"
    py = "/root/orchestrate/env/0123456789abcdef/bin/python"
    res = subprocess.run([sys.executable, "-m", "remote_payload", "tcnn-build", "--out", out,
                          "--compute-capability", "9.0", "--python", py, "--max-jobs", "16", "--dry-run"],
                         capture_output=True, text=True, timeout=60, cwd=Path(__file__).parents[1])
    assert res.returncode == 0, res.stderr
    assert res.stdout == (
        f"TCNN_CUDA_ARCHITECTURES=90 MAX_JOBS=16 {py} -m pip wheel --no-build-isolation --no-deps "
        f"--disable-pip-version-check -w {out} "
        "'git+https://github.com/NVlabs/tiny-cuda-nn/#subdirectory=bindings/torch'\n")
    assert not Path(out).exists()
    key = tcnn_cache.key_from_env({"cuda": True, "compute_capability": "9.0", "torch": "2.13.0+cu128",
                                   "cuda_version": "12.8", "python": "3.11.2"})
    assert key is not None and key.slug == "sm90-torch2.13.0_cu128-cuda12.8-cp311"
    assert tcnn_cache.key_from_env({"cuda": False, "torch": "2.13.0+cpu", "python": "3.11.2"}) is None


def test_max_jobs_is_bounded_by_memory() -> None:
    from remote_payload.tcnn import max_jobs
    gib = 1 << 30
    assert max_jobs(cpu_count=64, mem_bytes=16 * gib) == 6      # 16 GiB / 2.5 GiB per nvcc job
    assert max_jobs(cpu_count=8, mem_bytes=256 * gib) == 8
    assert max_jobs(cpu_count=4, mem_bytes=1 * gib) == 1
