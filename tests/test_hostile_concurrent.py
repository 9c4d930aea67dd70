"""Two runs at once on one ORCHESTRATE_HOME and one local host (issue 18, item 7), through the
CLI: both generate the same scene (one does it under the host-side lock, the other waits and
finds it), and they train in two job directories, never sharing one (a shared one would hand
both runs one training, and the first teardown would end the other's pipeline)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest


def config(tmp: Path) -> str:
    return f"""\
name: twins
hosts:
  here: {{provider: local, price_per_hour: 3.6, root: {tmp / 'hostroot'}}}
datasets:
  demo: {{generate: {{size: 16, seed: 1}}}}
experiments:
  - {{name: ngp, dataset: demo, scenes: [default], hosts: [here], steps: 20}}
"""


@pytest.mark.timeout(900)
def test_two_runs_at_once_share_neither_generation_nor_job_dir(tmp_path: Path) -> None:
    (tmp_path / "experiments.yaml").write_text(config(tmp_path))
    env = {**os.environ, "ORCHESTRATE_HOME": str(tmp_path / "home")}
    env.pop("ORCHESTRATE_DEBUG", None)
    procs = []
    for i in range(2):
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "run", "experiments.yaml", "--yes", "--json",
             "--runs-dir", str(tmp_path / f"runs{i}")], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        time.sleep(0.05)
    results = [p.communicate(timeout=800) for p in procs]
    for p, (_out, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
        assert "Traceback" not in err and "PIL" not in err
    outs = [json.loads(out) for out, _ in results]
    assert outs[0]["run_id"] != outs[1]["run_id"]
    for o in outs:
        [job] = o["jobs"]
        assert job["status"] == "succeeded" and job["psnr"] > 5
        assert (Path(job["out_dir"]) / "summary.json").is_file()
    jobs_root = tmp_path / "hostroot" / "jobs"
    dirs = sorted(p.name for p in jobs_root.iterdir() if p.is_dir())
    assert len(dirs) == 2 and dirs[1].startswith(dirs[0] + "-")         # key, key-<run id>
    assert dirs[1].removeprefix(dirs[0] + "-") in {o["run_id"] for o in outs}
    # each job dir trained its own pipeline
    pids = {json.loads((jobs_root / d / "status.json").read_text())["pid"] for d in dirs}
    assert len(pids) == 2
    # one generated scene, complete, no temp directory left behind
    [cache] = list((tmp_path / "hostroot" / "cache" / "datasets").iterdir())
    assert (cache / ".complete").is_file() and not list(cache.glob(".tmp-*"))
