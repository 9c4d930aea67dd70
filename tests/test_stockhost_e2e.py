"""`orchestrate run` on ssh hosts that look like rented boxes, not like this controller.

Each host is a real sshd on loopback whose `python:` is a stand-in for an image's interpreter
(orchestrator/testing/stockhost.py): a venv with only torch (a stock GPU image without the GPU)
or the distribution's bare /usr/bin/python3. The host's sessions get their environment from
sshd's SetEnv: the package index (the loopback index over the CI wheelhouse,
orchestrator/testing/pypi.py, or a dead one), failures injected into the payload's stages
(`ORCHESTRATE_PAYLOAD_INJECT`, a documented test hook). The controller under test gets the same
index (it downloads wheels for a host without one); pip and uv read no configuration files and
any request that is not to loopback meets a dead proxy.
"""
from __future__ import annotations

import io
import json
import os
import sqlite3
import subprocess
import sys
import time
import zipfile
from datetime import datetime
from pathlib import Path

import pytest

from ngp_train.synth import generate_scene
from orchestrator.staging.mirror_server import MirrorBehaviour, MirrorServer
from orchestrator.testing import pypi
from orchestrator.testing.pypi import LocalIndex
from orchestrator.testing.sshd import SSHServer, find_sshd
from orchestrator.testing.stockhost import BARE_PYTHON, index_env, no_index_env, offline_env, set_env, torch_only_python

local_index = pypi.local_index     # the fixture: the loopback index over the CI wheelhouse

pytestmark = [pytest.mark.sshd,
              pytest.mark.skipif(find_sshd() is None, reason="sshd not installed")]

STEPS = 6
VIDEOS = ("render.mp4", "gt.mp4", "compare.mp4")


@pytest.fixture(scope="session")
def torch_only(local_index: LocalIndex) -> Path:
    return torch_only_python(local_index.url)


def config(tmp: Path, srv: SSHServer, python: str, *, extra: str = "", steps: int = STEPS) -> str:
    return f"""\
name: stockhost
hosts:
  rented:
    provider: ssh
    host: 127.0.0.1
    port: {srv.port}
    user: {srv.user}
    identity_file: {srv.client_key_path}
    gpu: cpu
    price_per_hour: 1.8
    python: {python}
    root: {tmp / 'hostroot'}
    stop_command: "echo stopped >> {tmp / 'stops'}"
    idle_timeout_s: 300
{extra}datasets:
  demo: {{generate: {{size: 16, seed: 0}}}}
experiments:
  - name: ngp
    dataset: demo
    scenes: [default]
    hosts: [rented]
    steps: {steps}
"""


def orchestrate(tmp: Path, *args: str, index_url: str | None = None,
                timeout_s: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **(index_env(index_url) if index_url else offline_env()),
           "ORCHESTRATE_HOME": str(tmp / "home")}
    env.pop("ORCHESTRATE_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)


def run(tmp: Path, index_url: str | None = None, timeout_s: float = 600) -> subprocess.CompletedProcess[str]:
    return orchestrate(tmp, "run", "experiments.yaml", "--yes", "--runs-dir", str(tmp / "runs"),
                       index_url=index_url, timeout_s=timeout_s)


def rows(tmp: Path, sql: str, *args: object) -> list[dict]:
    con = sqlite3.connect(tmp / "home" / "ledger.sqlite")
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute(sql, args)]
    finally:
        con.close()


def last_job(tmp: Path) -> dict:
    return rows(tmp, "SELECT * FROM jobs ORDER BY created_at DESC LIMIT 1")[0]


def assert_released(tmp: Path, n_runs: int = 1) -> None:
    inst = rows(tmp, "SELECT state FROM instances")
    assert [i["state"] for i in inst] == ["destroyed"] * n_runs
    assert (tmp / "stops").read_text() == "stopped\n" * n_runs


def host_processes(tmp: Path) -> list[str]:
    """Command lines of live processes working under this test's host root (none may outlive a run)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(tmp / "hostroot") in cmd and "remote_payload" in cmd:
            found.append(cmd)
    return found


def host(tmp: Path, index_url: str | None = None, **env: str) -> SSHServer:
    """A host whose pip and uv see `index_url` alone (None: no index at all)."""
    base = index_env(index_url) if index_url else no_index_env()
    return SSHServer(base_dir=tmp / "sshd", extra_config=set_env(**{**base, **env}))


@pytest.mark.timeout(900)
def test_torch_only_host_succeeds_and_second_run_rebuilds_nothing(tmp_path: Path, torch_only: Path,
                                                                  local_index: LocalIndex) -> None:
    with host(tmp_path, local_index.url) as srv:
        (tmp_path / "experiments.yaml").write_text(config(tmp_path, srv, str(torch_only)))
        first = run(tmp_path, local_index.url)
        assert first.returncode == 0, first.stderr[-3000:]
        job = last_job(tmp_path)
        out = Path(job["out_dir"])
        assert job["status"] == "succeeded"
        metrics = (out / "metrics.csv").read_text().splitlines()
        assert metrics[0] == "frame,psnr,ssim" and len(metrics) > 1
        for name in VIDEOS:
            assert (out / "videos" / name).stat().st_size > 0, name
        env = json.loads((tmp_path / "hostroot" / "env.json").read_text())
        e = env["environment"]
        assert (e["interpreter"], e["reused"], e["interpreter_torch"]) == (str(torch_only), False, "2.13.0+cpu")
        assert e["requirements"]["pillow"] == "13.0.0" and e["requirements"]["torch"] == "2.13.0+cpu"
        assert e["venv"].startswith(str(tmp_path / "hostroot" / "env")) and e["installer"] == "uv"
        assert (env["torch"], env["cuda"], env["backend"]) == ("2.13.0+cpu", False, "torch")
        # the image's torch is reused, not copied into the environment
        assert not list(Path(e["venv"]).glob("lib/python*/site-packages/torch"))
        built_at = e["built_at"]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["tcnn"]["state"] == "not_applicable" and summary["backend"] == "torch"
        assert summary["environment"]["installer"] == "uv" and summary["environment"]["reused"] is False

        second = run(tmp_path, local_index.url)
        assert second.returncode == 0, second.stderr[-3000:]
    env2 = json.loads((tmp_path / "hostroot" / "env.json").read_text())
    assert env2["tcnn_status"] == {"state": "not_applicable", "detail": "torch sees no CUDA device",
                                   "seconds": 0.0, "key": ""}
    e2 = env2["environment"]
    assert (e2["reused"], e2["built_at"], e2["venv"]) == (True, built_at, e["venv"])
    runs = [r["run_id"] for r in rows(tmp_path, "SELECT run_id FROM runs ORDER BY created_at")]
    setup = {r["run_id"]: r["seconds"] for r in rows(tmp_path, "SELECT * FROM phases WHERE phase='setup'")}
    assert setup[runs[1]] < 3.0, setup
    assert_released(tmp_path, 2)
    # the watchdogs end with their jobs (a pipeline that reported its exit may take a moment to go)
    deadline = time.monotonic() + 30
    while host_processes(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert host_processes(tmp_path) == []


@pytest.mark.timeout(300)
def test_bare_python_stops_before_staging_naming_torch(tmp_path: Path) -> None:
    with host(tmp_path) as srv:
        (tmp_path / "experiments.yaml").write_text(config(tmp_path, srv, BARE_PYTHON))
        t0 = time.monotonic()
        res = run(tmp_path)
        took = time.monotonic() - t0
    assert res.returncode != 0 and took < 60, (took, res.stderr[-2000:])
    job = last_job(tmp_path)
    assert job["status"] == "failed"
    assert job["error"].startswith(f"host rented: {BARE_PYTHON} (python 3.")
    assert "has no torch" in job["error"] and "torch: install" in job["error"]
    assert "\n" not in job["error"] and "Traceback" not in res.stderr
    assert any("has no torch" in ln for ln in res.stderr.splitlines())
    assert not (tmp_path / "hostroot" / "cache").exists()          # nothing staged
    assert [p.name for p in (tmp_path / "hostroot" / "env").glob("*/.complete")] == []
    phases = {r["phase"] for r in rows(tmp_path, "SELECT phase FROM phases")}
    assert "staging" not in phases
    assert rows(tmp_path, "SELECT * FROM instances WHERE state NOT IN ('destroyed','stopped')") == []
    assert_released(tmp_path)


def mirrored_archive(tmp: Path, pad_bytes: int) -> bytes:
    """A NeRF-synthetic zip holding scene `default` as `demo/default/...`, padded with random bytes."""
    scene = generate_scene(tmp / "src" / "default", scene="default", size=16, seed=0)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for p in sorted(scene.rglob("*")):
            if p.is_file():
                zf.write(p, f"demo/default/{p.relative_to(scene)}")
        zf.writestr("demo/padding.bin", os.urandom(pad_bytes))
    return buf.getvalue()


def mirrored(text: str, url: str) -> str:
    return text.replace("  demo: {generate: {size: 16, seed: 0}}", f"  demo: {{mirrors: [{url}]}}")


@pytest.mark.timeout(900)
def test_torch_only_host_downloads_while_its_environment_is_built(tmp_path: Path, torch_only: Path,
                                                                  local_index: LocalIndex) -> None:
    archive = mirrored_archive(tmp_path, 1_000_000)
    with MirrorServer({"/demo.zip": archive}, MirrorBehaviour(rate_bytes_per_s=500_000)) as m, \
            host(tmp_path, local_index.url) as srv:
        (tmp_path / "experiments.yaml").write_text(mirrored(config(tmp_path, srv, str(torch_only)),
                                                            m.url("/demo.zip")))
        res = run(tmp_path, local_index.url)
        served = sum(r.bytes_sent for r in m.gets("/demo.zip"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert last_job(tmp_path)["status"] == "succeeded"
    assert len(archive) <= served < 2 * len(archive)        # downloaded once: the staging only validated
    assert len(list((tmp_path / "hostroot").glob("cache/datasets/*/.complete-default"))) == 1
    [staging] = rows(tmp_path, "SELECT started_at FROM phases WHERE phase='staging'")
    built = json.loads((tmp_path / "hostroot" / "env.json").read_text())["environment"]["built_at"]
    # the download began while the environment was being built, not after it
    assert datetime.fromisoformat(staging["started_at"]) < datetime.fromisoformat(built.replace("Z", "+00:00"))
    assert_released(tmp_path)


@pytest.mark.timeout(300)
def test_bare_python_cancels_the_download_that_ran_beside_the_environment(tmp_path: Path) -> None:
    """A mirrored scene downloads with the host's python while the environment is built; the
    preflight's failure ends that download: no process left on the host, nothing marked staged."""
    archive = mirrored_archive(tmp_path, 4_000_000)                     # ~40 s at the mirror's rate
    with MirrorServer({"/demo.zip": archive}, MirrorBehaviour(rate_bytes_per_s=100_000)) as m, \
            host(tmp_path) as srv:
        (tmp_path / "experiments.yaml").write_text(mirrored(config(tmp_path, srv, BARE_PYTHON), m.url("/demo.zip")))
        res = run(tmp_path)
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr[-2000:]
    job = last_job(tmp_path)
    assert job["status"] == "failed" and "has no torch" in job["error"], job["error"]
    # the download was started on the host (its log is kept) before the preflight failed ...
    assert len(list((tmp_path / "hostroot").glob("cache/datasets/*/.stage-default-*.log"))) == 1
    assert host_processes(tmp_path) == []                                # ... and was ended
    assert list((tmp_path / "hostroot").glob("cache/datasets/*/.complete-*")) == []
    assert "staging" not in {r["phase"] for r in rows(tmp_path, "SELECT phase FROM phases")}
    assert_released(tmp_path)


@pytest.mark.timeout(300)
def test_no_usable_interpreter_stops_before_staging(tmp_path: Path) -> None:
    with host(tmp_path) as srv:
        (tmp_path / "experiments.yaml").write_text(config(tmp_path, srv, "/opt/no-such/python3"))
        res = run(tmp_path)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    err = last_job(tmp_path)["error"]
    assert err == "host rented: python '/opt/no-such/python3' is not found on the host", err
    assert not (tmp_path / "hostroot" / "cache").exists()
    assert_released(tmp_path)


@pytest.mark.timeout(300)
def test_cuda_wanted_on_a_cpu_torch_host_stops_before_staging(tmp_path: Path, torch_only: Path,
                                                              local_index: LocalIndex) -> None:
    with host(tmp_path, local_index.url) as srv:
        text = config(tmp_path, srv, str(torch_only)).replace("gpu: cpu", "gpu: RTX 4090")
        (tmp_path / "experiments.yaml").write_text(text)
        res = run(tmp_path, local_index.url)
    assert res.returncode != 0
    err = last_job(tmp_path)["error"]
    assert err.startswith("host rented: torch 2.13.0+cpu sees no CUDA device (no nvidia-smi on the host)"), err
    assert not (tmp_path / "hostroot" / "cache").exists()
    assert_released(tmp_path)


@pytest.mark.timeout(300)
def test_failing_setup_line_stops_before_staging(tmp_path: Path, torch_only: Path, local_index: LocalIndex) -> None:
    with host(tmp_path, local_index.url) as srv:
        (tmp_path / "experiments.yaml").write_text(config(
            tmp_path, srv, str(torch_only), extra="    setup: \"echo preparing; exit 3\"\n"))
        res = run(tmp_path, local_index.url)
    assert res.returncode != 0
    err = last_job(tmp_path)["error"]
    assert err == "host rented: a setup: line failed (exit 3): preparing", err
    assert not (tmp_path / "hostroot" / "cache").exists()
    assert_released(tmp_path)


@pytest.mark.timeout(900)
def test_torch_install_on_a_bare_host(tmp_path: Path, local_index: LocalIndex) -> None:
    """`torch: install` puts the CPU torch wheel (from the loopback index; ORCHESTRATE_TORCH_INDEX=none
    keeps download.pytorch.org out) into the host's environment: ~60 s in all here, like the
    other runs in this module."""
    n0 = len(local_index.requests)
    with host(tmp_path, local_index.url, ORCHESTRATE_TORCH_INDEX="none") as srv:
        (tmp_path / "experiments.yaml").write_text(
            config(tmp_path, srv, BARE_PYTHON, extra="    torch: install\n"))
        res = run(tmp_path, local_index.url, timeout_s=850)
    assert res.returncode == 0, res.stderr[-3000:]
    e = json.loads((tmp_path / "hostroot" / "env.json").read_text())["environment"]
    assert e["torch_installed"] == {"spec": "torch==2.13.0+cpu", "family": "cpu"}
    assert e["requirements"]["torch"] == "2.13.0+cpu" and e["interpreter_torch"] is None
    assert "/simple/torch/" in local_index.requests[n0:]
    assert last_job(tmp_path)["status"] == "succeeded"


@pytest.mark.timeout(900)
def test_host_without_index_gets_pushed_wheels(tmp_path: Path, torch_only: Path, local_index: LocalIndex) -> None:
    n0 = len(local_index.requests)
    with host(tmp_path) as srv:            # the host has no index; the controller has the loopback one
        (tmp_path / "experiments.yaml").write_text(config(tmp_path, srv, str(torch_only)))
        res = run(tmp_path, local_index.url)
    assert res.returncode == 0, res.stderr[-3000:]
    assert {"/simple/numpy/", "/simple/uv/"} <= set(local_index.requests[n0:])
    e = json.loads((tmp_path / "hostroot" / "env.json").read_text())["environment"]
    assert (e["index"], e["wheels_pushed"]) == (False, True)
    assert e["requirements"]["numpy"] == "2.4.6"
    cached = list((tmp_path / "home" / "wheels").glob("cp311-x86_64-*/.complete"))
    assert len(cached) == 1
    names = cached[0].read_text().split()
    assert any(n.startswith("numpy-2.4.6-cp311") for n in names) and any(n.startswith("uv-") for n in names)
    assert sorted(p.name for p in (tmp_path / "hostroot" / "wheels").glob("*.whl")) == sorted(names)
    assert last_job(tmp_path)["status"] == "succeeded"


@pytest.mark.timeout(900)
def test_video_failure_is_a_warning_and_setup_lines_run_once(tmp_path: Path, torch_only: Path,
                                                             local_index: LocalIndex) -> None:
    setup = ('    setup:\n      - echo "python is $ORCHESTRATE_PYTHON" > setup-proof.txt\n'
             """      - '"$ORCHESTRATE_PYTHON" -c "import PIL, numpy; print(numpy.__version__)"'\n""")
    with host(tmp_path, local_index.url, ORCHESTRATE_PAYLOAD_INJECT="videos") as srv:
        (tmp_path / "experiments.yaml").write_text(config(tmp_path, srv, str(torch_only), extra=setup))
        res = run(tmp_path, local_index.url)
    assert res.returncode == 0, res.stderr[-3000:]
    env_python = json.loads((tmp_path / "hostroot" / "env.json").read_text())["environment"]["python"]
    assert (tmp_path / "hostroot" / "setup-proof.txt").read_text() == f"python is {env_python}\n"
    assert (tmp_path / "hostroot" / "setup.log").read_text() == "2.4.6\n"
    assert len(list((tmp_path / "hostroot").glob(".setup-rented-*"))) == 1
    job = last_job(tmp_path)
    out = Path(job["out_dir"])
    assert job["status"] == "succeeded"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["videos_missing"] == {v: "RuntimeError: injected failure in videos "
                                            "(ORCHESTRATE_PAYLOAD_INJECT)" for v in VIDEOS}
    assert (out / "metrics.csv").is_file() and summary["psnr_mean"] > 5
    events = [e["message"] for e in rows(tmp_path, "SELECT * FROM events WHERE kind='videos_missing'")]
    assert len(events) == 1 and "render.mp4" in events[0]
    assert "videos missing" in res.stderr


@pytest.mark.timeout(900)
def test_metrics_failure_keeps_renders_and_eval_completes_it(tmp_path: Path, torch_only: Path,
                                                             local_index: LocalIndex) -> None:
    with host(tmp_path, local_index.url, ORCHESTRATE_PAYLOAD_INJECT="metrics") as srv:
        (tmp_path / "experiments.yaml").write_text(config(tmp_path, srv, str(torch_only)))
        res = run(tmp_path, local_index.url)
    assert res.returncode != 0
    job = last_job(tmp_path)
    out = Path(job["out_dir"])
    assert job["status"] == "failed"
    assert "injected failure in metrics" in job["error"]
    assert f"came home to {out}: snapshot.pt, train_log.csv, renders/" in job["error"]
    assert f"`orchestrate eval {job['run_id']} {job['job_id']}`" in job["error"]
    assert (out / "snapshot.pt").stat().st_size > 0 and not (out / "metrics.csv").exists()
    n_renders = len(list((out / "renders").glob("*.png")))
    assert n_renders > 0 and n_renders == len(list((out / "gt").glob("*.png")))
    assert_released(tmp_path)

    ev = orchestrate(tmp_path, "eval", job["run_id"], job["job_id"])
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert ev.stdout.startswith(f"{job['job_id']}: PSNR ")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_scored"] == n_renders and summary["psnr_mean"] > 5
    for name in VIDEOS:
        assert (out / "videos" / name).stat().st_size > 0
    assert last_job(tmp_path)["status"] == "succeeded"
    result = rows(tmp_path, "SELECT * FROM results")
    assert len(result) == 1 and abs(result[0]["psnr_mean"] - summary["psnr_mean"]) < 1e-9
