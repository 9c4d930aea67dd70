"""`remote_payload env` parts on this machine: real interpreters, a real uv wheel, real sockets.

The interpreters are this machine's: the distribution's bare /usr/bin/python3 (no torch) and
the cached torch-only venv (orchestrator/testing/stockhost.py).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from orchestrator.config import parse_config
from orchestrator.errors import ConfigError
from orchestrator.testing import pypi
from orchestrator.testing.pypi import LocalIndex
from orchestrator.testing.stockhost import BARE_PYTHON, DEAD_INDEX, torch_only_python
from remote_payload import env

local_index = pypi.local_index     # the fixture: the loopback index over the CI wheelhouse


@pytest.fixture(scope="module")
def torch_only(local_index: LocalIndex) -> Path:
    return torch_only_python(local_index.url)


def test_configured_interpreter_is_used_even_without_torch() -> None:
    info = env.find_interpreter(BARE_PYTHON)
    assert (info["path"], info["torch"]) == (BARE_PYTHON, None)
    assert info["torch_error"].startswith("ModuleNotFoundError: No module named 'torch'")


def test_search_prefers_the_candidate_whose_torch_imports(torch_only: Path, tmp_path: Path) -> None:
    cache = tmp_path / "interpreters.json"
    info = env.find_interpreter(None, candidates=("/nonexistent/python3", BARE_PYTHON, str(torch_only)),
                                cache_file=cache)
    assert (info["path"], info["torch"]) == (str(torch_only), "2.13.0+cpu")
    assert len(json.loads(cache.read_text())) == 2          # both probed, the missing one skipped
    with pytest.raises(env.EnvFailed, match=r"no python >= 3.10 is not usable on this host \(tried: "
                                            r"/nonexistent/python3 \(not found\)\)"):
        env.find_interpreter(None, candidates=("/nonexistent/python3",))


def test_no_torch_under_require_is_one_line_naming_the_interpreter(tmp_path: Path) -> None:
    res = subprocess.run([BARE_PYTHON, "-m", "remote_payload", "env", "--root", str(tmp_path),
                          "--python", BARE_PYTHON], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert res.returncode == 9
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {BARE_PYTHON} (python 3.")
    assert "has no torch" in lines[0] and "torch: install" in lines[0]
    assert list((tmp_path / "env").glob("*/.complete")) == []


def test_index_probe_refused_port_is_unreachable_and_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIP_INDEX_URL", DEAD_INDEX)
    monkeypatch.delenv("UV_DEFAULT_INDEX", raising=False)
    monkeypatch.delenv("UV_INDEX_URL", raising=False)
    assert env.index_reachable(timeout_s=3) == (False, DEAD_INDEX)
    with socket.socket() as srv:       # a listener that answers HTTP: an index is there
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        url = f"http://127.0.0.1:{srv.getsockname()[1]}/simple"
        monkeypatch.setenv("PIP_INDEX_URL", url)
        import threading

        def answer() -> None:
            conn, _ = srv.accept()
            conn.recv(4096)
            conn.sendall(b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            conn.close()
        th = threading.Thread(target=answer, daemon=True)
        th.start()
        assert env.index_reachable(timeout_s=3) == (True, url)
        th.join(5)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    assert env.index_reachable() == (False, "PIP_NO_INDEX")


def test_uv_comes_from_a_pushed_wheel_when_not_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_uv = shutil.which("uv") or str(Path(sys.executable).parent / "uv")
    assert Path(real_uv).is_file()
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "uv-0.13.9-py3-none-manylinux_2_17_x86_64.whl", "w") as zf:
        zf.write(real_uv, "uv-0.13.9.data/scripts/uv")       # the layout of uv's PyPI wheel
    monkeypatch.setenv("PATH", "/nonexistent")
    found = env.find_uv(tmp_path / "root", wheels)
    assert found == str(tmp_path / "root" / "tools" / "uv" / "uv")
    out = subprocess.run([found, "--version"], capture_output=True, text=True, timeout=30).stdout
    assert out.startswith("uv 0.13.9")
    assert env.find_uv(tmp_path / "root", None) == found     # extracted once, found again


@pytest.mark.parametrize("driver, family", [(None, "cpu"), ("580.65.06", "cu129"), ("570.1", "cu128"),
                                            ("560.35.03", "cu126"), ("535.104.05", "cu121"),
                                            ("470.1", "cpu")])
def test_torch_family_follows_the_driver(driver: str | None, family: str) -> None:
    smi = None if driver is None else {"name": "NVIDIA H100", "driver_version": driver}
    assert env.torch_family(smi) == family


def test_env_key_changes_with_requirements_and_interpreter() -> None:
    interp = {"path": "/usr/bin/python3", "prefix": "/usr", "version": "3.11.2", "torch": "2.4.0"}
    k = env.env_key(interp, "numpy==2.4.6\n", "require")
    assert len(k) == 16 and k == env.env_key(interp, "numpy==2.4.6\n", "require")
    assert k != env.env_key(interp, "numpy==2.4.5\n", "require")
    assert k != env.env_key({**interp, "torch": "2.5.0"}, "numpy==2.4.6\n", "require")
    assert k == env.env_key(interp, "numpy==2.4.6\n", "install")   # torch present: mode irrelevant
    assert env.requirement_names(env.REQUIREMENTS.read_text()) == [
        "numpy", "pillow", "imageio-ffmpeg", "ffmpeg-python", "future"]


def test_new_host_keys_are_read_and_checked() -> None:
    base = ("name: t\nhosts:\n  h:\n    provider: ssh\n    host: 10.0.0.1\n    price_per_hour: 1\n"
            "    gpu: cpu\n{extra}datasets:\n  d: {{generate: {{size: 16, seed: 0}}}}\n"
            "experiments:\n  - {{name: a, steps: 10}}\n")
    cfg = parse_config(base.format(extra="    torch: install\n    setup: [\"apt-get install -y ffmpeg\"]\n"
                                         "    tcnn_build_timeout_s: 600\n    proxy_jump: ops@bastion:2222\n"))
    h = cfg.hosts["h"]
    assert (h.torch, h.setup, h.tcnn_build_timeout_s, h.proxy_jump, h.python) == (
        "install", ("apt-get install -y ffmpeg",), 600.0, "ops@bastion:2222", None)
    with pytest.raises(ConfigError, match=r"hosts\.h\.torhc: unknown key; did you mean 'torch'"):
        parse_config(base.format(extra="    torhc: install\n"))
    with pytest.raises(ConfigError, match=r"hosts\.h\.torch: 'maybe' is not allowed"):
        parse_config(base.format(extra="    torch: maybe\n"))
    with pytest.raises(ConfigError, match=r"hosts\.h\.setup: expected a shell line or a list"):
        parse_config(base.format(extra="    setup: {a: 1}\n"))
