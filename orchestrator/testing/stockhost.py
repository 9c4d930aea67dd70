"""Stand-ins for a rented host's python, for tests (like `fabric.testing`).

- the distribution's bare `/usr/bin/python3` (no packages): a box with no torch;
- `torch_only_python()`: a venv over it holding only torch — a stock GPU image's python, minus
  the GPU. Built once per (torch version, python version) under a cache directory
  (`ORCHESTRATE_TEST_CACHE`, else `<tmp>/orchestrate-test-cache`), so a test session does not
  reinstall torch; pip installs torch from the loopback index it is given
  (`orchestrator.testing.pypi`), never from this machine's configured indexes.
- `set_env(...)`: sshd `SetEnv` lines that give the host's sessions an environment
  (the package index, injected failures).
- `index_env(url)`: pip and uv on the loopback index alone, every other request refused;
  `no_index_env()`: no index at all.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

BARE_PYTHON = "/usr/bin/python3"
DEAD_INDEX = "http://127.0.0.1:9/simple"     # the discard port: nothing listens, connects are refused
DEAD_PROXY = "http://127.0.0.1:9"            # a request that tries to leave the machine fails loudly


def cache_root() -> Path:
    return Path(os.environ.get("ORCHESTRATE_TEST_CACHE") or Path(tempfile.gettempdir()) / "orchestrate-test-cache")


def _python_version(python: str) -> str:
    return subprocess.run([python, "-c", "import sys; print('%d%d' % sys.version_info[:2])"],
                          capture_output=True, text=True, check=True, timeout=30).stdout.strip()


def torch_only_python(index_url: str, torch_version: str = "2.13.0", *, base: str = BARE_PYTHON,
                      timeout_s: float = 1200.0) -> Path:
    """`<cache>/torch-only-<torch>-py<XY>/bin/python`: a venv over `base` with only torch,
    installed from `index_url` (the loopback index) when the cache does not have it yet."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    venv = root / f"torch-only-{torch_version}-py{_python_version(base)}"
    python = venv / "bin" / "python"
    with open(root / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)      # two sessions building at once: one builds
        if (venv / ".complete").is_file() and python.exists():
            return python
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([base, "-m", "venv", str(venv)], check=True, timeout=300,
                       capture_output=True, stdin=subprocess.DEVNULL)
        proc = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                               f"torch=={torch_version}"], capture_output=True, text=True,
                              env={**os.environ, **index_env(index_url)},
                              timeout=timeout_s, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise RuntimeError(f"installing torch=={torch_version} into {venv} failed: {proc.stderr[-1000:]}")
        (venv / ".complete").write_text(torch_version + "\n")
    return python


def set_env(**values: str) -> dict[str, str]:
    """sshd_config lines giving every session these environment variables."""
    return {"SetEnv": " ".join(f"{k}={v}" for k, v in values.items())} if values else {}


def offline_env() -> dict[str, str]:
    """No configuration files for pip or uv (this machine's pip.conf names other indexes and
    wheel directories) and a dead proxy for anything but loopback."""
    return {"PIP_CONFIG_FILE": os.devnull, "UV_NO_CONFIG": "1",
            "http_proxy": DEAD_PROXY, "https_proxy": DEAD_PROXY, "HTTP_PROXY": DEAD_PROXY,
            "HTTPS_PROXY": DEAD_PROXY, "no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost"}


def index_env(url: str) -> dict[str, str]:
    """pip and uv resolve from `url` (the loopback index) alone."""
    return {**offline_env(), "PIP_INDEX_URL": url, "UV_INDEX_URL": url, "UV_DEFAULT_INDEX": url}


def no_index_env() -> dict[str, str]:
    """A host that cannot reach any package index: pip and uv point at a dead port and read
    no configuration files (this machine's own pip.conf names local wheel directories)."""
    return {**index_env(DEAD_INDEX), "PIP_RETRIES": "0"}
