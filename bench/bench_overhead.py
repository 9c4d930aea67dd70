"""Benchmark: the controller's own overhead per job on the local provider.

    python bench/bench_overhead.py [--steps 10] [--size 24]

Runs one tiny job through the real runner (local provider, local transport, detached pipeline,
watchdog, SQLite ledger in a temp ORCHESTRATE_HOME) and measures, excluding training, data and
environment work (bootstrap ║ staging, rendering/metrics/videos):

  A. host ready → training started: payload push, job-dir check, detached start of pipeline and
     watchdog  = (pipeline started − host ready) − (bootstrap ║ staging wall time)
  B. training finished → instance stopped: noticing the exit (poll), pulling results, recording,
     ending the watchdog, destroying the instance = released − pipeline exit (status.json time)

Baseline in the same run: the same steps done by a bare shell script (cp the payload, run the
pipeline in the foreground, cp the results back), timed the same way. Target: A, B ≤ 5 s.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TARGET_S = 5.0


def _ts(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def controller_run(work: Path, steps: int, size: int) -> dict[str, float]:
    os.environ["ORCHESTRATE_HOME"] = str(work / "home")
    from orchestrator.commands import load_and_plan
    from orchestrator.ledger import Ledger
    from orchestrator.run.budget import Budget, BudgetGuard
    from orchestrator.run.live import LiveView
    from orchestrator.run.runner import Runner, RunOptions

    cfg = work / "experiments.yaml"
    cfg.write_text(f"""name: bench
hosts:
  here: {{provider: local}}
datasets:
  demo: {{generate: {{size: {size}, seed: 0}}}}
experiments:
  - {{name: ngp, dataset: demo, scenes: [default], hosts: [here], steps: {steps}}}
""")
    loaded = load_and_plan(cfg)
    ledger = Ledger.open()
    ledger.create_run("bench", "bench")
    with LiveView([(j.job_id, j.host_name) for j in loaded.jobs], tty=False) as view:
        runner = Runner(loaded.jobs, ledger=ledger, run_id="bench",
                        options=RunOptions(runs_dir=work / "runs"), guard=BudgetGuard(Budget(None), ledger, "bench"),
                        view=view, stop=threading.Event())
        t0 = time.time()
        [outcome] = runner.run_all()
    if outcome.status != "succeeded":
        raise SystemExit(f"bench job failed: {outcome.error}")
    a = runner.attempts[outcome.job_id]
    exit_wall = _ts(a.final_status.updated_at) if a.final_status and a.final_status.updated_at else a.exit_seen
    ledger.close()
    return {"boot (provision+connect)": a.host_ready - t0,
            "env+data (excluded)": a.env_data_s,
            "A: host ready -> training started": (a.started - a.host_ready) - a.env_data_s,
            "B: training finished -> instance stopped": a.released - exit_wall,
            "  of which: noticing the exit": a.exit_seen - exit_wall,
            "  of which: pull+record+release": a.released - a.exit_seen}


BASELINE = r"""
set -euo pipefail
now() { date +%s.%N; }
ROOT="$1"; SRC="$2"; DEST="$3"; PY="$4"; STEPS="$5"; SIZE="$6"
T0=$(now)
mkdir -p "$ROOT/payload/p" && cp -r "$SRC/remote_payload" "$SRC/ngp_train" "$ROOT/payload/p/"
T_PUSHED=$(now)
export PYTHONPATH="$ROOT/payload/p"
( "$PY" -m remote_payload bootstrap --out "$ROOT/env.json" >/dev/null ) &
"$PY" -c "from ngp_train.synth import generate_scene; generate_scene('$ROOT/scene', scene='default', size=$SIZE, seed=0)"
wait
T_ENV=$(now)
mkdir -p "$ROOT/job"
T_START=$(now)
"$PY" -m remote_payload run --data "$ROOT/scene" --job-dir "$ROOT/job" --steps "$STEPS" --scene default >/dev/null 2>&1
T_EXIT=$(now)
mkdir -p "$DEST" && cp -r "$ROOT/job/out/." "$DEST/"
T_DONE=$(now)
echo "{\"t0\": $T0, \"pushed\": $T_PUSHED, \"env\": $T_ENV, \"start\": $T_START, \"exit\": $T_EXIT, \"done\": $T_DONE}"
"""


def baseline_run(work: Path, steps: int, size: int) -> dict[str, float]:
    res = subprocess.run(["bash", "-c", BASELINE, "bench", str(work / "root"), str(REPO), str(work / "dest"),
                          sys.executable, str(steps), str(size)], capture_output=True, text=True, check=True)
    t = json.loads(res.stdout.strip().splitlines()[-1])
    status = json.loads((work / "root" / "job" / "status.json").read_text())
    exit_wall = _ts(status["updated_at"])
    return {"env+data (excluded)": t["env"] - t["pushed"],
            "A: host ready -> training started": (t["start"] - t["t0"]) - (t["env"] - t["pushed"]),
            "B: training finished -> instance stopped": t["done"] - exit_wall}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--size", type=int, default=24)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        work = Path(tmp)
        (work / "c").mkdir()
        (work / "b").mkdir()
        ours = controller_run(work / "c", args.steps, args.size)
        base = baseline_run(work / "b", args.steps, args.size)
    print(f"controller overhead per job, local provider ({args.steps} steps, {args.size}px scene)")
    print(f"{'measure':45s} {'orchestrate':>12s} {'bare script':>12s}")
    for k, v in ours.items():
        b = base.get(k)
        print(f"{k:45s} {v:11.2f}s {'' if b is None else f'{b:11.2f}s':>12s}")
    ok = all(ours[k] <= TARGET_S for k in ("A: host ready -> training started",
                                           "B: training finished -> instance stopped"))
    print(f"target: A and B <= {TARGET_S:g} s each: {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
