"""The report shows each job's backend with tiny-cuda-nn's fate on its host (summary.json
`tcnn`, written by the runner): a failed build is visible next to the torch backend."""
from __future__ import annotations

import json
from datetime import datetime, timezone

from orchestrator.ledger import Ledger
from orchestrator.report import collect
from orchestrator.report.synthetic import FakeJob, add_finished_job

T0 = datetime(2026, 3, 1, 10, tzinfo=timezone.utc).timestamp()


def test_backend_column_names_tcnn_state(tmp_path) -> None:
    led = Ledger.open(tmp_path / "home")
    runs = tmp_path / "runs"
    led.create_run("r1", "demo", "experiments.yaml")
    states = {"ngp-a-h100": ("tcnn", "built"), "ngp-b-4090": ("torch", "failed"),
              "ngp-c-cpu": ("torch", "not_applicable")}
    for i, (jid, (backend, state)) in enumerate(states.items()):
        out = add_finished_job(led, "r1", FakeJob(jid, "lego", gpu="H100", backend=backend,
                                                  psnrs=(30.0, 31.0), ssims=(0.9, 0.91),
                                                  video=False),
                               runs_root=runs, start_epoch=T0 + 1000 * i)
        summary = json.loads((out / "summary.json").read_text())
        (out / "summary.json").write_text(json.dumps({**summary, "tcnn": {"state": state, "detail": "x"}}))
    data = collect(led, ["r1"], runs_root=runs)
    got = {j.job_id: j.backend for j in data.jobs}
    assert got == {"ngp-a-h100": "tcnn (tcnn built)", "ngp-b-4090": "torch (tcnn failed)",
                   "ngp-c-cpu": "torch"}
    led.close()
