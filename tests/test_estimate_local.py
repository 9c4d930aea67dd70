"""A `local` host's first estimate is timed on this machine (estimate/local.py, the payload's
`probe` subcommand): labelled "timed here", cached in ORCHESTRATE_HOME, replaced by history,
and the runtime table when the probe cannot run. The probe's prediction replays the
occupancy-grid schedule (checked against hand arithmetic), and its JSON agrees with itself."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from orchestrator.config import parse_config
from orchestrator.config.plan import expand
from orchestrator.estimate import estimate_plan
from orchestrator.estimate.local import CACHE_NAME, LocalProbe
from orchestrator.ledger import Ledger

ROOT = Path(__file__).resolve().parents[1]


def _config(root: Path, python: str = "") -> str:
    py = f", python: {python}" if python else ""
    return textwrap.dedent(f"""\
        name: probe
        hosts:
          here: {{provider: local, gpu: cpu, price_per_hour: 0, root: {root}{py}}}
        datasets:
          tiny: {{generate: {{size: 16, seed: 0}}}}
        experiments:
          - {{name: p, dataset: tiny, scenes: [default], hosts: [here], steps: [40, 120], backend: torch, device: cpu}}
        """)


def test_prediction_replays_the_grid_schedule() -> None:
    from ngp_train.probe import ProbeResult

    r = ProbeResult("cpu", "test", "torch", 2, import_s=1.0, init_s=1.0, first_step_s=0.5, step_s=0.02,
                    full_update_s=0.4, partial_update_s=0.05, partial_measured=True, steps_timed=10,
                    seconds_timed=1.0, uses_grid=True, grid_warmup_steps=1, grid_update_every=None)
    # steps 1..31 update every step, 32 too (every 2 from there): 32 partial updates in 33 steps
    assert r.train_seconds(33) == pytest.approx(0.5 + 32 * 0.02 + 32 * 0.05)
    assert r.train_seconds(1) == pytest.approx(0.5)
    # every cell for the first 256 steps (the CUDA defaults): full updates
    cuda_like = dataclasses.replace(r, grid_warmup_steps=256)
    assert cuda_like.train_seconds(33) == pytest.approx(0.5 + 32 * 0.02 + 32 * 0.4)
    assert dataclasses.replace(r, uses_grid=False).train_seconds(33) == pytest.approx(0.5 + 32 * 0.02)


def test_probe_command_times_steps_and_predicts_consistently() -> None:
    from ngp_train.probe import ProbeResult

    proc = subprocess.run([sys.executable, "-m", "remote_payload", "probe", "--size", "16", "--steps", "40",
                           "--steps", "120", "--budget-s", "0.5", "--device", "cpu", "--backend", "torch"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    predict = got.pop("predict")
    r = ProbeResult(**got)
    assert r.steps_timed >= 2 and r.step_s > 0 and r.device == "cpu" and r.backend == "torch"
    assert r.seconds_timed < 2 * 0.5 + 10 * max(r.step_s + r.partial_update_s, r.first_step_s)
    assert predict == {"40": pytest.approx(r.train_seconds(40), abs=1e-3),
                       "120": pytest.approx(r.train_seconds(120), abs=1e-3)}
    assert predict["120"] > predict["40"] > r.first_step_s


def test_local_estimate_is_timed_here_once_then_history_replaces_it(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    cfg = tmp_path / "experiments.yaml"
    cfg.write_text(_config(tmp_path / "host"))
    # the user's path: a fresh home, `orchestrate estimate --explain`, the probe on
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "estimate", str(cfg), "--explain"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "ORCHESTRATE_HOME": str(home), "ORCHESTRATE_LOCAL_PROBE": "1",
                               "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    train_lines = [ln for ln in proc.stdout.splitlines() if ln.strip().startswith("train ")]
    assert len(train_lines) == 2 and all("[timed here]" in ln for ln in train_lines), proc.stdout
    cache = json.loads((home / "estimate" / CACHE_NAME).read_text())
    (entry,) = cache.values()                        # one probe for both step counts
    assert set(entry["predict"]) == {"40", "120"} and entry["key"]["size"] == 16

    # in-process, same home: the cached figures are used, nothing is timed again
    def no_run(*_a: object, **_k: object) -> None:
        raise AssertionError("probed again although the cache had the figures")

    monkeypatch.setattr(LocalProbe, "_run", no_run)
    jobs = expand(parse_config(cfg.read_text()))
    est = estimate_plan(jobs, None, local_probe=LocalProbe(home))
    for job, e in zip(jobs, est.jobs):
        train = e.phase("train")
        assert train.source == "timed here"
        start = entry["import_s"] + entry["init_s"]
        assert train.seconds == pytest.approx(entry["predict"][str(job.steps)] + start + 1.0)  # + local train_overhead

    # once a job has finished here, history wins and the probe is not consulted
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.add_job("h", jobs[0].job_id, experiment="p", scene="default", host_name="here", provider="local",
                   gpu="cpu", steps=40, backend="torch", settings={}, dataset="tiny")
    ledger.record_phase("h", jobs[0].job_id, "train", 1000.0, 1012.5)
    ledger.update_job("h", jobs[0].job_id, status="succeeded")
    est = estimate_plan(jobs, ledger, local_probe=LocalProbe(home))
    assert [e.phase("train").source for e in est.jobs] == ["history (median of 1)"] * 2
    assert est.jobs[0].phase("train").seconds == pytest.approx(12.5)
    ledger.close()


def test_a_probe_that_cannot_run_leaves_the_runtime_table(tmp_path: Path) -> None:
    jobs = expand(parse_config(_config(tmp_path / "host", python=str(tmp_path / "no-such-python"))))
    est = estimate_plan(jobs, None, local_probe=LocalProbe(tmp_path / "home"))
    assert [e.phase("train").source for e in est.jobs] == ["runtime table"] * 2
    assert not (tmp_path / "home" / "estimate" / CACHE_NAME).exists()
