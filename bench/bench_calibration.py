"""Estimate error on a small matrix after calibration (target: within ±10% of actual).

    python bench/bench_calibration.py [--calibration-runs 2] [--size 16] [--steps 100 300]

Two calibration passes put 4 finished jobs behind each estimate (the median of 4 damps one
slow run on a shared machine); 100 and 300 steps keep the jobs ~10-20 s, long enough that a
second of scheduling jitter is not the whole error (with 1 pass at 10/30 steps, 6-10 s jobs,
the worst job was off by 17%; 40/120 steps gave 10-20 s jobs until the CPU step got faster,
then 6-9 s jobs and a worst error of 18%).

On the local provider (CPU), in a fresh ORCHESTRATE_HOME (after one warm-up pass under another
ledger that fills the host's caches): run the matrix (scenes × step counts)
`--calibration-runs` times so the ledger holds history, then run it once more and
print, per job, the estimate that run used (from history) against the actual billed seconds,
and the error; finally the mean and worst absolute error and how many jobs fell within ±10%.
Everything goes through the real CLI (`orchestrate run --yes --json`, `orchestrate report
--json`). The first pass's errors (catalog-only estimates) are printed too, as the baseline.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_PCT = 10.0


def cli(home: Path, cwd: Path, *argv: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", *argv], cwd=cwd,
                          env={**os.environ, "ORCHESTRATE_HOME": str(home)}, capture_output=True,
                          text=True, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


def experiments(size: int, steps: list[int], scenes: list[str], price: float, root: Path) -> str:
    return (f"name: calibration-bench\n"
            f"hosts:\n  here: {{provider: local, gpu: cpu, price_per_hour: {price}, root: {root}}}\n"
            f"datasets:\n  tiny: {{generate: {{size: {size}, seed: 0}}}}\n"
            f"experiments:\n  - {{name: cal, dataset: tiny, scenes: [{', '.join(scenes)}], "
            f"hosts: [here], steps: [{', '.join(map(str, steps))}], backend: torch, device: cpu}}\n")


def one_pass(home: Path, cfg: Path) -> list[dict]:
    run = cli(home, cfg.parent, "run", str(cfg), "--yes", "--json", "--concurrency", "1")
    if run["status"] != "succeeded":
        raise SystemExit(f"run {run['run_id']} did not succeed: {run}")
    for job in run["jobs"]:             # every measured job trained from step 0
        summary = json.loads((Path(job["out_dir"]) / "summary.json").read_text())
        if summary.get("resumed_from_step") is not None:
            raise SystemExit(f"{job['job']} resumed from step {summary['resumed_from_step']}")
    return cli(home, cfg.parent, "report", run["run_id"], "--json")["estimate_vs_actual"]


def show(title: str, rows: list[dict]) -> list[float]:
    print(title)
    print(f"  {'job':34s} {'estimate s':>10s} {'actual s':>9s} {'error %':>8s}  source")
    errors = []
    for r in rows:
        err = r["seconds_error_pct"]
        errors.append(abs(err))
        print(f"  {r['job']:34s} {r['estimate_s']:10.1f} {r['actual_s']:9.1f} {err:+8.1f}  {r['source']}")
    return errors


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calibration-runs", type=int, default=2)
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--steps", type=int, nargs="+", default=[100, 300])
    ap.add_argument("--scenes", nargs="+", default=["default", "spheres"])
    ap.add_argument("--price-per-hour", type=float, default=36.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-cal-") as tmp:
        home, cfg = Path(tmp) / "home", Path(tmp) / "experiments.yaml"
        cfg.write_text(experiments(args.size, args.steps, args.scenes, args.price_per_hour,
                                   Path(tmp) / "host"))
        t0 = time.monotonic()
        # Warm the host's caches (payload, environment, generated scenes) under another ledger,
        # so pass 1 has no history and no pass pays for a cold cache the others do not.
        one_pass(Path(tmp) / "warm-up-home", cfg)
        baseline = None
        for _ in range(args.calibration_runs):
            rows = one_pass(home, cfg)
            if baseline is None:
                baseline = show("pass 1 (catalog only):", rows)
        final = show(f"after {args.calibration_runs} calibration pass(es) (history):", one_pass(home, cfg))
        within = sum(e <= TARGET_PCT for e in final)
        print(f"baseline mean |error| {sum(baseline or [0]) / max(1, len(baseline or [])):.1f} %; "
              f"calibrated mean |error| {sum(final) / len(final):.1f} %, worst {max(final):.1f} %, "
              f"{within}/{len(final)} jobs within ±{TARGET_PCT:g} % "
              f"({time.monotonic() - t0:.0f} s wall)")
        return 0 if within == len(final) else 1


if __name__ == "__main__":
    sys.exit(main())
