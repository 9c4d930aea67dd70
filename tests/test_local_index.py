"""The loopback package index (orchestrator/testing/pypi.py) speaks PEP 503 to real pip and uv.

PEP 503 (https://peps.python.org/pep-0503/): `/simple/` lists projects, `/<normalized>/` lists
files as anchors whose URL may carry `#<hashname>=<hex>`; a non-normalized name may redirect to
the normalized one. The wheel installed here is built in the test from a local package.
"""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from orchestrator.testing.pypi import LocalIndex, normalize, project_of
from orchestrator.testing.stockhost import BARE_PYTHON, index_env

NAME = "Orch_Local.Probe"                 # not normalized on purpose: orch-local-probe


def build_wheel(tmp: Path) -> Path:
    src = tmp / "src"
    (src / "orch_local_probe").mkdir(parents=True)
    (src / "orch_local_probe" / "__init__.py").write_text("VALUE = 42\n")
    (src / "setup.py").write_text("from setuptools import setup\n"
                                  f"setup(name={NAME!r}, version='1.0', packages=['orch_local_probe'])\n")
    house = tmp / "wheelhouse"
    house.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "-w", str(house), str(src)],
                   check=True, capture_output=True, timeout=300, env={**os.environ, **index_env("http://127.0.0.1:9/")})
    [wheel] = house.glob("*.whl")
    return wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("local-index"))


def get(url: str) -> tuple[int, dict[str, str], bytes]:
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: object, **kwargs: object) -> None:
            return None
    opener = urllib.request.build_opener(NoRedirect, urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_names_are_normalized_from_file_names() -> None:
    assert normalize("Orch_Local.Probe") == "orch-local-probe" == normalize("orch--local__probe")
    assert project_of("orch_local_probe-1.0-py3-none-any.whl") == "orch-local-probe"
    assert project_of("ffmpeg-python-0.2.0.tar.gz") == "ffmpeg-python"
    assert project_of("README.txt") is None


def test_pages_hashes_and_files(wheel: Path, tmp_path: Path) -> None:
    (tmp_path / wheel.name).write_bytes(wheel.read_bytes())
    wheel = tmp_path / wheel.name
    with LocalIndex(tmp_path) as index:
        base = f"http://127.0.0.1:{index.port}"
        code, headers, body = get(base + "/simple/")
        assert (code, headers["Content-Type"]) == (200, "text/html; charset=utf-8")
        assert '<a href="/simple/orch-local-probe/">orch-local-probe</a>' in body.decode()

        code, headers, body = get(base + "/simple/orch-local-probe/")
        assert code == 200
        links = re.findall(r'<a href="([^"]+)">([^<]+)</a>', body.decode())
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        assert links == [(f"/files/{wheel.name}#sha256={digest}", wheel.name)]

        code, headers, body = get(base + links[0][0].split("#")[0])
        assert (code, headers["Content-Type"]) == (200, "application/octet-stream")
        assert int(headers["Content-Length"]) == wheel.stat().st_size
        assert hashlib.sha256(body).hexdigest() == digest

        # PEP 503: a name that is not normalized is sent to the normalized one
        code, headers, _ = get(base + "/simple/Orch_Local.Probe/")
        assert (code, headers["Location"]) == (301, "/simple/orch-local-probe/")
        assert get(base + "/simple/no-such-project/")[0] == 404
        assert get(base + "/files/no-such-1.0-py3-none-any.whl")[0] == 404
        assert get(base + "/files/..%2Fsetup.py")[0] == 404

        # a wheel replaced while the index runs gets its new hash
        wheel.write_bytes(wheel.read_bytes() + b"\0")
        os.utime(wheel, ns=(1, 1))
        _, _, body = get(base + "/simple/orch-local-probe/")
        new = hashlib.sha256(wheel.read_bytes()).hexdigest()
        assert f"#sha256={new}" in body.decode() and new != digest


@pytest.mark.timeout(600)
@pytest.mark.parametrize("installer", ["pip", "uv"])
def test_pip_and_uv_install_through_it(installer: str, tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path)
    venv = tmp_path / "venv"
    subprocess.run([BARE_PYTHON, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=300)
    py = venv / "bin" / "python"
    with LocalIndex(wheel.parent) as index:
        env = {**os.environ, **index_env(index.url), "UV_CACHE_DIR": str(tmp_path / "uv-cache"),
               "PIP_NO_CACHE_DIR": "1"}
        uv = Path(sys.executable).parent / "uv"
        argv = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", NAME] \
            if installer == "pip" else [str(uv), "pip", "install", "-q", "--python", str(py), NAME]
        res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        assert "/simple/orch-local-probe/" in index.requests and f"/files/{wheel.name}" in index.requests

        # a project the wheelhouse lacks is not found, and nothing else is asked
        res = subprocess.run(argv[:-1] + ["orch-no-such-project"], env=env, capture_output=True,
                             text=True, timeout=300)
        assert res.returncode != 0
        assert "/simple/orch-no-such-project/" in index.requests
    out = subprocess.run([str(py), "-c", "import orch_local_probe as m; print(m.VALUE)"],
                         capture_output=True, text=True, timeout=60)
    assert out.stdout == "42\n"


def test_a_wrong_hash_is_refused_by_pip(wheel: Path, tmp_path: Path) -> None:
    """The fragment is what pip checks: a file that changed under a stale page is refused."""
    house = tmp_path / "house"
    house.mkdir()
    copy = house / wheel.name
    copy.write_bytes(wheel.read_bytes())
    with LocalIndex(house) as index:
        index.sha256(wheel.name)                                  # hash cached
        stat = copy.stat()
        data = bytearray(copy.read_bytes())
        data[-30] ^= 0xFF                                         # same size, same mtime: stale hash
        copy.write_bytes(bytes(data))
        os.utime(copy, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        res = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                              "--disable-pip-version-check", "--no-cache-dir", "-d", str(tmp_path / "dl"), NAME],
                             env={**os.environ, **index_env(index.url)}, capture_output=True, text=True,
                             timeout=300)
    assert res.returncode != 0
    assert "THESE PACKAGES DO NOT MATCH THE HASHES" in res.stderr
