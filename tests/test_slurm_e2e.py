"""`orchestrate run` on a `slurm` host, against a REAL one-node Slurm (orchestrator.testing.slurm:
munged, slurmctld and slurmd from Debian's slurm-wlm) whose login node is a real OpenSSH sshd on
loopback (orchestrator.testing.sshd). Nothing of Slurm is mocked: sbatch, squeue, scontrol and
scancel are the real commands, run over SSH by the controller.

What Slurm wrote is the truth the ledger is checked against: the job-completion file
(JobCompType=jobcomp/filetxt, one line per finished task with its start, end and state), which
the controller never reads. Slurm commands: https://slurm.schedmd.com/sbatch.html,
https://slurm.schedmd.com/squeue.html, https://slurm.schedmd.com/scancel.html,
https://slurm.schedmd.com/job_array.html, https://slurm.schedmd.com/slurm.conf.html (JobCompType,
MinJobAge, KillWait).
"""
from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from orchestrator.config import load_config
from orchestrator.ledger import Ledger
from orchestrator.run.budget import Budget, BudgetGuard
from orchestrator.run.live import LiveView
from orchestrator.run.runner import JobPlan, Runner, RunOptions
from orchestrator.run.slurm import run_all
from orchestrator.testing.slurm import SlurmCluster, missing
from orchestrator.testing.sshd import SSHServer

pytestmark = [pytest.mark.sshd, pytest.mark.slurm]

PRICE_PER_CPU_HOUR = 3.6     # chargeback: 0.001 per allocated CPU-second, so billed time shows as cost


@pytest.fixture(scope="module")
def cluster() -> Iterator[SlurmCluster]:
    why = missing()
    if why:
        pytest.skip(f"no test Slurm cluster: {why}")
    with SlurmCluster() as c:
        yield c


@pytest.fixture(scope="module")
def login() -> Iterator[SSHServer]:
    with SSHServer() as s:
        yield s


def write_config(tmp: Path, cluster: SlurmCluster, login: SSHServer, *, steps: int,
                 scenes: str = "[default, spheres]", bad: bool = False,
                 price: float = PRICE_PER_CPU_HOUR) -> None:
    """The cluster's `python` is whatever `setup` puts first on PATH (here the controller's venv,
    as `module load` or `conda activate` would on a real cluster), on the login node and in tasks."""
    bad_parts = ""
    if bad:
        scene = tmp / "broken" / "lego"
        scene.mkdir(parents=True)
        (scene / "transforms_train.json").write_text("{not json")
        bad_parts = f"""\
  broken: {{mirrors: ["file://{tmp / 'broken'}"], scenes: [lego]}}
"""
    (tmp / "experiments.yaml").write_text(f"""\
name: slurm-e2e
hosts:
  cluster:
    provider: slurm
    host: {login.host}
    port: {login.port}
    user: {login.user}
    identity_file: {login.client_key_path}
    gres: none
    python: python
    root: {tmp / 'shared'}
    setup: "{cluster.setup_line()}; export PATH={Path(sys.executable).parent}:$PATH"
    price_per_gpu_hour: {price}
datasets:
  demo: {{generate: {{size: 16, seed: 0}}}}
{bad_parts}experiments:
  - name: ngp
    dataset: demo
    scenes: {scenes}
    hosts: [cluster]
    steps: {steps}
    device: cpu
""" + (f"""\
  - name: bad
    dataset: broken
    scenes: [lego]
    hosts: [cluster]
    steps: {steps}
    device: cpu
""" if bad else ""))


def env_for(tmp: Path) -> dict[str, str]:
    env = {**os.environ, "ORCHESTRATE_HOME": str(tmp / "home")}
    env.pop("ORCHESTRATE_DEBUG", None)
    env.pop("SLURM_CONF", None)      # the controller reaches Slurm only through the login node
    return env


def cli(tmp: Path, *args: str, timeout_s: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=tmp, env=env_for(tmp),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout_s)


def popen_run(tmp: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", "experiments.yaml", "--yes", "--json"],
                            cwd=tmp, env=env_for(tmp), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def rows(tmp: Path, sql: str) -> list[dict[str, Any]]:
    con = sqlite3.connect(tmp / "home" / "ledger.sqlite")
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute(sql)]
    finally:
        con.close()


def completions(cluster: SlurmCluster) -> list[dict[str, str]]:
    """Slurm's own job-completion records (one line per finished task)."""
    if not cluster.jobcomp_path.exists():
        return []
    return [dict(tok.split("=", 1) for tok in line.split() if "=" in tok)
            for line in cluster.jobcomp_path.read_text().splitlines() if line.strip()]


def task_records(cluster: SlurmCluster, run_id: str) -> list[dict[str, str]]:
    return sorted((c for c in completions(cluster) if c.get("Name") == f"orch-{run_id}"),
                  key=lambda c: int(c["ArrayTaskId"]))


def slurm_seconds(rec: dict[str, str]) -> float:
    fmt = "%Y-%m-%dT%H:%M:%S"
    return (datetime.strptime(rec["EndTime"], fmt) - datetime.strptime(rec["StartTime"], fmt)).total_seconds()


def billed_seconds(tmp: Path, row_id: int) -> float:
    [b] = rows(tmp, f"SELECT * FROM billing WHERE instance_row={row_id}")
    return (datetime.fromisoformat(b["ended_at"]) - datetime.fromisoformat(b["started_at"])).total_seconds()


def queue(cluster: SlurmCluster) -> str:
    return cluster.command("squeue", "-h", "-r").strip()


def job_dirs(tmp: Path) -> dict[str, Path]:
    return {d.name.rsplit("-", 1)[0]: d for d in (tmp / "shared" / "jobs").glob("*") if d.is_dir()}


def status_of(d: Path) -> dict[str, Any]:
    try:
        return json.loads((d / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def training_starts(d: Path) -> list[int]:
    text = (d / "log.txt").read_text() if (d / "log.txt").exists() else ""
    return [int(m) for m in dict.fromkeys(re.findall(r"training .* from step (\d+) to \d+", text))]


def interrupt_when(proc: subprocess.Popen, ready: Callable[[], bool], timeout_s: float = 300,
                   sig: int = signal.SIGINT) -> str:
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and proc.poll() is None and not ready():
            time.sleep(0.3)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert ready(), "not ready before the deadline"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=300)
        return err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def assert_closed(tmp: Path) -> None:
    instances = rows(tmp, "SELECT * FROM instances")
    assert instances and all(i["state"] in ("destroyed", "failed") for i in instances), instances
    assert all(b["ended_at"] for b in rows(tmp, "SELECT * FROM billing"))


# -- the fixture itself -----------------------------------------------------------------------------
def test_fixture_starts_and_stops_within_30_s_and_leaves_no_process() -> None:
    why = missing()
    if why:
        pytest.skip(why)
    c = SlurmCluster()
    try:
        c.start()
        assert c.node_state() == "idle"
        assert c.command("sbatch", "--parsable", "-o", "/dev/null", "--wrap", "sleep 60").strip().isdigit()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and "RUNNING" not in c.command("squeue", "-h", "-o", "%T"):
            time.sleep(0.2)
        assert "RUNNING" in c.command("squeue", "-h", "-o", "%T")
        pids = c.pids()
        assert len(pids) >= 4                 # munged, slurmctld, slurmd, the job's slurmstepd and sleep
    finally:
        c.stop()
    assert c.start_seconds + c.stop_seconds < 30, (c.start_seconds, c.stop_seconds)
    assert c.pids() == []
    alive = [p for p in pids if Path(f"/proc/{p}").exists() and
             Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
    assert alive == []
    assert not c.dir.exists()


# -- a run ------------------------------------------------------------------------------------------
@pytest.mark.timeout(900)
def test_two_scene_matrix_runs_as_one_array_and_bills_slurm_elapsed(tmp_path: Path, cluster: SlurmCluster,
                                                                    login: SSHServer) -> None:
    """Two good scenes and one broken dataset: ONE array of two tasks, both COMPLETED, results and
    videos home, each task billed exactly Slurm's elapsed; the broken dataset's job fails with the
    payload's one line (its check, on the login node) and never reaches the queue."""
    write_config(tmp_path, cluster, login, steps=20, bad=True)
    res = cli(tmp_path, "run", "experiments.yaml", "--yes", "--json", timeout_s=840)
    assert res.returncode == 1, res.stderr[-3000:]          # one job failed, the others succeeded
    assert "Traceback" not in res.stderr
    out = json.loads(res.stdout)
    run_id = out["run_id"]
    by_job = {j["job"]: j for j in out["jobs"]}
    assert {k: v["status"] for k, v in by_job.items()} == {
        "ngp-default-cluster": "succeeded", "ngp-spheres-cluster": "succeeded", "bad-lego-cluster": "failed"}
    err = by_job["bad-lego-cluster"]["error"]
    assert "transforms_train.json: not valid JSON" in err and "\n" not in err

    # one array, its two tasks COMPLETED (Slurm's own records)
    [submitted] = [e for e in rows(tmp_path, "SELECT * FROM events") if e["kind"] == "array_submitted"]
    assert "2 task(s)" in submitted["message"]
    recs = task_records(cluster, run_id)
    assert [r["ArrayTaskId"] for r in recs] == ["0", "1"]
    assert len({r["ArrayJobId"] for r in recs}) == 1
    assert [r["JobState"] for r in recs] == ["COMPLETED", "COMPLETED"]
    scontrol = cluster.command("scontrol", "-o", "show", "job", recs[0]["ArrayJobId"])
    assert scontrol.count("JobState=COMPLETED") == 2

    # results and videos home
    for job in ("ngp-default-cluster", "ngp-spheres-cluster"):
        local = Path(by_job[job]["out_dir"])
        summary = json.loads((local / "summary.json").read_text())
        assert summary["steps"] == 20 and summary["psnr_mean"] > 8
        for video in ("render", "gt", "compare"):
            assert (local / "videos" / f"{video}.mp4").stat().st_size > 1000

    # billing: a ledger row per task, billed seconds = Slurm's elapsed, cost = seconds x price x CPUs
    insts = {i["job_id"]: i for i in rows(tmp_path, "SELECT * FROM instances")}
    assert set(insts) == {"ngp-default-cluster", "ngp-spheres-cluster"}
    for rec, job in zip(recs, ("ngp-default-cluster", "ngp-spheres-cluster")):
        inst = insts[job]
        assert inst["instance_id"] == f"{rec['ArrayJobId']}_{rec['ArrayTaskId']}"
        assert inst["state"] == "destroyed" and inst["provider"] == "slurm"
        seconds = billed_seconds(tmp_path, inst["row_id"])
        assert abs(seconds - slurm_seconds(rec)) <= 1.0, (seconds, rec)
        cpus = int(rec["ProcCnt"])
        assert by_job[job]["cost"] == pytest.approx(seconds * cpus * PRICE_PER_CPU_HOUR / 3600, abs=1e-9)
    assert out["total_cost"] == pytest.approx(by_job["ngp-default-cluster"]["cost"]
                                              + by_job["ngp-spheres-cluster"]["cost"])
    assert_closed(tmp_path)
    assert queue(cluster) == ""


@pytest.mark.timeout(900)
def test_ctrl_c_cancels_the_array_keeps_snapshots_and_rerun_resumes(tmp_path: Path, cluster: SlurmCluster,
                                                                    login: SSHServer) -> None:
    write_config(tmp_path, cluster, login, steps=400)

    def training(min_starts: int) -> Callable[[], bool]:
        def ready() -> bool:
            dirs = job_dirs(tmp_path)
            return len(dirs) == 2 and all(
                status_of(d).get("phase") == "train" and status_of(d).get("step", 0) >= 1
                and len(training_starts(d)) >= min_starts for d in dirs.values())
        return ready

    first = popen_run(tmp_path)
    err = interrupt_when(first, training(1))
    assert first.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    assert queue(cluster) == ""                                   # the array is gone
    [run] = rows(tmp_path, "SELECT * FROM runs")
    recs = task_records(cluster, run["run_id"])
    assert len(recs) == 2 and {r["JobState"] for r in recs} <= {"CANCELLED", "FAILED"}, recs
    assert any(e["kind"] == "array_cancelled" for e in rows(tmp_path, "SELECT * FROM events"))
    assert {j["status"] for j in rows(tmp_path, "SELECT * FROM jobs")} == {"interrupted"}
    assert_closed(tmp_path)
    stopped_at = {}
    for job, d in job_dirs(tmp_path).items():
        st = status_of(d)
        assert st["phase"] == "interrupted" and st["exit_code"] == 5, st
        assert 0 < st["step"] < 400 and (d / "out" / "snapshot.pt").is_file()
        assert (tmp_path / "runs" / run["run_id"] / job / "snapshot.pt").is_file()   # brought home too
        stopped_at[job] = st["step"]
    for rec, inst in zip(recs, sorted(rows(tmp_path, "SELECT * FROM instances"), key=lambda i: i["instance_id"])):
        assert abs(billed_seconds(tmp_path, inst["row_id"]) - slurm_seconds(rec)) <= 1.0

    second = popen_run(tmp_path)
    err = interrupt_when(second, training(2))
    assert second.returncode == 130, err[-3000:]
    for job, d in job_dirs(tmp_path).items():
        assert training_starts(d) == [0, stopped_at[job]]          # resumed from the snapshot
    assert queue(cluster) == ""
    assert [r["status"] for r in rows(tmp_path, "SELECT * FROM runs")] == ["interrupted", "interrupted"]


@pytest.mark.timeout(600)
def test_down_orphans_cancels_the_tasks_of_a_dead_run(tmp_path: Path, cluster: SlurmCluster,
                                                      login: SSHServer) -> None:
    """SIGKILL to the controller (no teardown runs): its tasks stay in Slurm, one running and
    one queued behind it (--concurrency 1); `status` names both, `down --orphans` finds them by
    the array's name and comment, cancels them and closes their rows: the running one billed
    to now, the queued one nothing."""
    write_config(tmp_path, cluster, login, steps=400)
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", "experiments.yaml", "--yes",
                             "--concurrency", "1"], cwd=tmp_path, env=env_for(tmp_path), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    interrupt_when(proc, lambda: any(status_of(d).get("phase") == "train" for d in job_dirs(tmp_path).values())
                   and len(rows(tmp_path, "SELECT * FROM billing")) == 1, sig=signal.SIGKILL)
    [run] = rows(tmp_path, "SELECT * FROM runs")
    names = cluster.command("squeue", "-h", "-r", "-o", "%j|%T").split()
    assert sorted(names) == [f"orch-{run['run_id']}|PENDING", f"orch-{run['run_id']}|RUNNING"]
    status = cli(tmp_path, "status", timeout_s=120)          # names them, touches nothing
    assert status.returncode == 0, status.stderr[-3000:]
    named = [line for line in (status.stdout + status.stderr).splitlines() if line.startswith("orphan slurm ")]
    assert len(named) == 2 and all("run `orchestrate down --orphans`" in line for line in named), named
    assert names == cluster.command("squeue", "-h", "-r", "-o", "%j|%T").split()
    res = cli(tmp_path, "down", "--orphans", "--yes", "--json", timeout_s=300)
    assert res.returncode == 0, res.stderr[-3000:]
    released = json.loads(res.stdout)["released"]
    assert sorted(r["result"] for r in released) == ["destroyed", "destroyed"]
    assert any("no live controller" in r["reason"] for r in released)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and queue(cluster):
        time.sleep(0.5)
    assert queue(cluster) == ""
    assert_closed(tmp_path)
    started, queued = sorted(rows(tmp_path, "SELECT * FROM instances"), key=lambda i: i["instance_id"] is None)
    assert started["state"] == "destroyed" and billed_seconds(tmp_path, started["row_id"]) > 0
    assert queued["state"] == "destroyed"
    assert rows(tmp_path, f"SELECT * FROM billing WHERE instance_row={queued['row_id']}") == []


@pytest.mark.timeout(900)
def test_a_task_whose_data_went_bad_in_the_queue_fails_alone(tmp_path: Path, cluster: SlurmCluster,
                                                             login: SSHServer) -> None:
    """The data is checked when staged, but a shared filesystem can change while tasks queue
    (a scratch purge, another user). The array is held 8 s (`--begin`, through sbatch_lines);
    meanwhile one scene's staged copy is broken: its task FAILS in Slurm with the payload's one
    line in the job's error, the other task COMPLETES, and each is billed its own elapsed."""
    write_config(tmp_path, cluster, login, steps=20)
    text = (tmp_path / "experiments.yaml").read_text().replace(
        "    price_per_gpu_hour:", '    sbatch_lines: ["#SBATCH --begin=now+8"]\n    price_per_gpu_hour:')
    (tmp_path / "experiments.yaml").write_text(text)
    proc = popen_run(tmp_path)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None and not (
                list((tmp_path / "shared" / "slurm").glob("*/array.sh")) and queue(cluster)):
            time.sleep(0.2)
        assert "PENDING" in cluster.command("squeue", "-h", "-r", "-o", "%T")     # still held
        [staged] = list((tmp_path / "shared" / "cache" / "datasets").glob("*/spheres/transforms_train.json"))
        staged.write_text("{not json")
        out_text, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, err[-3000:]
    assert "Traceback" not in err
    out = json.loads(out_text)
    by_job = {j["job"]: j for j in out["jobs"]}
    assert by_job["ngp-default-cluster"]["status"] == "succeeded"
    bad = by_job["ngp-spheres-cluster"]
    assert bad["status"] == "failed"
    assert bad["error"].startswith("the pipeline failed in phase ") and " (exit 2): " in bad["error"]   # BadData
    assert "transforms_train.json" in bad["error"] and "\n" not in bad["error"]
    recs = task_records(cluster, out["run_id"])
    assert [(r["ArrayTaskId"], r["JobState"], r["ExitCode"]) for r in recs] == [
        ("0", "COMPLETED", "0:0"), ("1", "FAILED", "2:0")]
    insts = {i["job_id"]: i for i in rows(tmp_path, "SELECT * FROM instances")}
    for rec, job in zip(recs, ("ngp-default-cluster", "ngp-spheres-cluster")):
        assert abs(billed_seconds(tmp_path, insts[job]["row_id"]) - slurm_seconds(rec)) <= 1.0
    assert_closed(tmp_path)
    assert queue(cluster) == ""


@pytest.mark.timeout(600)
def test_the_budget_cap_cancels_the_array_and_keeps_what_the_task_made(tmp_path: Path, cluster: SlurmCluster,
                                                                       login: SSHServer,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Price 3600/h per CPU = 1 USD per billed second. Two long jobs estimated at 15 USD each under
    a 25 USD cap: the second is refused before the array is submitted (one task), the first is
    cancelled when spend + the stop reserve reaches the cap; its snapshot and log come home,
    and the run's total stays within one granule of the cap."""
    cap, estimate = 25.0, 15.0
    monkeypatch.setenv("ORCHESTRATE_HOME", str(tmp_path / "home"))
    write_config(tmp_path, cluster, login, steps=200_000, price=3600.0)
    cfg = load_config(tmp_path / "experiments.yaml")
    host = cfg.hosts["cluster"]
    jobs = [JobPlan(job_id=f"long-{scene}", experiment="long", scene=scene, host_name="cluster", host=host,
                    dataset_name="demo", dataset=cfg.datasets["demo"], steps=200_000, device="cpu",
                    estimate_cost=estimate, estimate_seconds=estimate, currency="USD")
            for scene in ("default", "spheres")]
    ledger = Ledger.open(tmp_path / "home")
    ledger.create_run("r1", "budget", budget=cap, currency="USD")
    guard = BudgetGuard(Budget(cap, "USD"), ledger, "r1", stop_reserve_s=12.0)
    with LiveView([(j.job_id, j.host_name) for j in jobs], tty=False) as view:
        runner = Runner(jobs, ledger=ledger, run_id="r1", guard=guard, view=view, stop=threading.Event(),
                        options=RunOptions(runs_dir=tmp_path / "runs", concurrency=2, poll_s=0.5))
        first, second = run_all(runner)
    assert (first.status, second.status) == ("budget_stopped", "budget_stopped")
    assert second.error.startswith("not started: it would cross the budget") and second.cost == 0
    assert first.error.startswith("interrupted at step ")
    kinds = [e["kind"] for e in ledger.events("r1")]
    assert {"budget_refused", "array_submitted", "budget_cap", "array_cancelled"} <= set(kinds)
    [rec] = task_records(cluster, "r1")                       # one task: the refused job was never queued
    assert rec["JobState"] in ("CANCELLED", "FAILED")
    [inst] = ledger.instances(run_id="r1")
    seconds = billed_seconds(tmp_path, inst.row_id)
    assert abs(seconds - slurm_seconds(rec)) <= 1.0
    assert ledger.run_cost("r1") <= cap + 1.0, ledger.run_cost("r1")
    local = tmp_path / "runs" / "r1" / "long-default"
    assert (local / "snapshot.pt").is_file() and "training" in (local / "log.txt").read_text()
    assert queue(cluster) == ""
    ledger.close()


@pytest.mark.timeout(300)
def test_a_partition_the_cluster_does_not_have_is_one_line_and_nothing_queued(tmp_path: Path, cluster: SlurmCluster,
                                                                               login: SSHServer) -> None:
    write_config(tmp_path, cluster, login, steps=20, scenes="[default]")
    text = (tmp_path / "experiments.yaml").read_text()
    text = text.replace("    gres: none\n", "    gres: none\n    partition: nosuch\n")
    (tmp_path / "experiments.yaml").write_text(text)
    res = cli(tmp_path, "run", "experiments.yaml", "--yes", "--json", timeout_s=240)
    assert res.returncode == 1, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    [job] = json.loads(res.stdout)["jobs"]
    assert job["status"] == "failed" and job["cost"] == 0
    assert job["error"].startswith("cluster: sbatch failed (exit 1): ") and "invalid partition" in job["error"].lower()
    assert "\n" not in job["error"]
    assert queue(cluster) == ""
    [inst] = rows(tmp_path, "SELECT * FROM instances")
    assert inst["state"] == "failed" and rows(tmp_path, "SELECT * FROM billing") == []
