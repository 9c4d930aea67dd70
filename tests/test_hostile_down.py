"""`orchestrate down` with hostile or careless command lines (issue 18, items 6 and 18), through
the CLI against the fake cloud (a real HTTP server speaking the documented vast.ai API; see
orchestrator/testing/fakecloud.py for the doc sources) and a real SQLite ledger.

`down --orphans` used to destroy at once on a terminal and to call any labelled instance this
ledger did not know an orphan, including one another machine's controller is running. Now it
shows what it would destroy and why, asks (as `--all` does), refuses off a terminal without
--yes (exit 2, like --all), and leaves other controllers' instances alone unless
`--any-controller`. `down` with nothing to do is a usage error (64).
"""
from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.ledger import Ledger
from orchestrator.providers._http import RetryPolicy
from orchestrator.providers.base import InstanceSpec, make_label
from orchestrator.providers.vastai import VastProvider
from orchestrator.run.reconcile import lock_path
from orchestrator.testing.fakecloud import fake_cloud, fake_host, host_config  # noqa: F401 (fixture)
from orchestrator.testing.faultmatrix import Harness

pytestmark = pytest.mark.sshd
FAST = RetryPolicy(deadline_s=5.0, attempt_timeout_s=2.0, backoff_s=0.02, max_backoff_s=0.1)
FOREIGN_RUN = "20991231-235959-beef"      # a run of another machine's ledger


def setup(tmp: Path, fc) -> tuple[Harness, str, str]:
    h = Harness(tmp, fc, "vastai")
    vast = VastProvider(fake_host(fc, "vastai"), policy=FAST)
    led = Ledger.open(h.home)
    led.create_run("dead", "t")
    led.add_job("dead", "j1", experiment="e", scene="s", host_name="cloud", provider="vastai", gpu="g",
                steps=1, backend="torch", dataset="d", status="running")
    lock_path(led, "dead").parent.mkdir(parents=True, exist_ok=True)
    lock_path(led, "dead").write_text("12345")          # nobody holds it: that controller died
    label = make_label("dead", "j1")
    row = led.record_intent(run_id="dead", job_id="j1", host_name="cloud", provider="vastai", label=label,
                            gpu="RTX 4090", price_per_hour=0.44, currency="USD")
    dead_id = vast.create(InstanceSpec(label=label, gpu="RTX 4090"))
    led.instance_created(row, dead_id)
    led.close()
    foreign_id = vast.create(InstanceSpec(label=make_label(FOREIGN_RUN, "j1"), gpu="RTX 4090"))
    return h, dead_id, foreign_id


def on_a_terminal(h: Harness, args: list[str], answer: bytes) -> tuple[int, str]:
    """Run the CLI with stdin and stderr on a pseudo-terminal; answer the first question."""
    master, slave = os.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], env=h.env, cwd=h.dir,
                            stdin=slave, stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    seen = b""
    answered = False
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
        if not answered and b"[y/N]" in seen:
            os.write(master, answer + b"\n")
            answered = True
        if proc.poll() is not None and not ready:
            break
    proc.wait(timeout=60)
    out = proc.stdout.read().decode() if proc.stdout else ""
    os.close(master)
    return proc.returncode, seen.decode(errors="replace") + out


def test_down_orphans_off_a_terminal_refuses_and_names_each_reason(tmp_path: Path, fake_cloud) -> None:
    h, dead_id, foreign_id = setup(tmp_path, fake_cloud)
    res = h.cli("down", "--orphans", "--config", str(h.config))
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert lines == [f"error: would destroy 1 orphan(s): vastai:{dead_id} (job j1 of run dead has no live "
                     "controller); not on a terminal", "hint: pass --yes to confirm"]
    assert "FAILED" not in res.stdout + res.stderr and "Traceback" not in res.stderr
    assert fake_cloud.live_count() == 2


def test_down_orphans_on_a_terminal_asks_and_no_means_nothing(tmp_path: Path, fake_cloud) -> None:
    h, dead_id, foreign_id = setup(tmp_path, fake_cloud)
    code, text = on_a_terminal(h, ["down", "--orphans", "--config", str(h.config)], b"n")
    assert code == 1, text
    assert f"vastai {dead_id} orch-dead-j1: job j1 of run dead has no live controller" in text
    assert "destroy these 1 orphan(s)? [y/N]" in text and "nothing destroyed" in text
    assert foreign_id not in text
    assert fake_cloud.live_count() == 2


def test_down_orphans_yes_on_a_terminal_spares_another_controllers_instance(tmp_path: Path, fake_cloud) -> None:
    h, dead_id, foreign_id = setup(tmp_path, fake_cloud)
    code, text = on_a_terminal(h, ["down", "--orphans", "--config", str(h.config)], b"y")
    assert code == 0, text
    assert f"vastai {dead_id}: destroyed" in text
    vast = VastProvider(fake_host(fake_cloud, "vastai"), policy=FAST)
    assert [i.instance_id for i in vast.list("orch-") if i.state.value != "terminated"] == [foreign_id]
    # asked for explicitly, the other controller's instance goes too
    res = h.cli("down", "--orphans", "--any-controller", "--yes", "--config", str(h.config))
    assert res.returncode == 0, res.stderr
    assert f"vastai {foreign_id}: destroyed" in res.stdout
    assert fake_cloud.live_count() == 0


@pytest.mark.parametrize("args", [["down"], ["down", "--any-controller"]])
def test_down_with_nothing_to_do_is_a_usage_error(tmp_path: Path, args: list[str]) -> None:
    env = {**os.environ, "ORCHESTRATE_HOME": str(tmp_path / "home")}
    res = subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], env=env, capture_output=True,
                         text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert res.returncode == 64, res.stderr
    assert res.stderr.startswith("error: ") and "Traceback" not in res.stderr
