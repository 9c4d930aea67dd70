"""Per-step CPU training time of this tree against another git revision, in one run.

Each round runs one child process per version, alternating (A B A B ...), so both see the same
machine load; a child trains on the same generated scene, warms up, then times
`Trainer.train_step` for a number of steps (the CPU default batch: ~8k samples per step). The
other revision's `ngp_train/` is taken with `git archive`, nothing in the work tree changes.
Prints per-round medians, the median over rounds and the spread (min-max), and one JSON line.
`--clock cpu` (process CPU time per step; use it with --threads 1) is what to compare on a
shared, loaded machine, where wall time mostly measures the other tenants.

    python bench/bench_step.py                    # HEAD~1 vs the work tree, 5 rounds
    python bench/bench_step.py --base main --rounds 7 --steps 60
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time, statistics, torch
from ngp_train.train import TrainConfig, Trainer
torch.set_num_threads(int(sys.argv[3]))
torch.manual_seed(0)
cfg = TrainConfig(steps=10 ** 9, device="cpu", backend="torch", eval=False)
tr = Trainer(sys.argv[1], sys.argv[2], cfg)
for _ in range(int(sys.argv[4])):
    tr.train_step()
times, cpu, samples = [], [], []
for _ in range(int(sys.argv[5])):
    t0, c0 = time.perf_counter(), time.process_time()
    _, n = tr.train_step()
    times.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
    samples.append(n)
print(json.dumps({"wall_ms": 1e3 * statistics.median(times), "cpu_ms": 1e3 * statistics.median(cpu),
                  "wall_mean_ms": 1e3 * statistics.fmean(times), "cpu_mean_ms": 1e3 * statistics.fmean(cpu),
                  "samples_median": statistics.median(samples), "rays": tr.n_rays}))
"""


def export_revision(rev: str, dest: Path) -> None:
    """`ngp_train/` of `rev` into dest/ngp_train (git archive; the work tree is not touched)."""
    data = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", rev, "ngp_train"],
                          capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(data)) as tf:
        tf.extractall(dest, filter="data")


def time_version(code_dir: Path, scene: Path, threads: int, warmup: int, steps: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code_dir)}
    with tempfile.TemporaryDirectory(prefix="bench_step_out_") as out:
        res = subprocess.run([sys.executable, "-c", CHILD, str(scene), out, str(threads), str(warmup), str(steps)],
                             capture_output=True, text=True, env=env, cwd=code_dir, timeout=1800, check=False)
    if res.returncode != 0:
        raise SystemExit(f"error: timing run in {code_dir} failed: {res.stderr.strip().splitlines()[-1:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="HEAD~1", help="git revision to compare against (default HEAD~1)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=40, help="untimed steps first (grid warm-up, batch size settles)")
    ap.add_argument("--steps", type=int, default=60, help="timed steps per child")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from ngp_train.synth import generate_scene

    with tempfile.TemporaryDirectory(prefix="bench_step_") as tmp:
        base_dir = Path(tmp) / "base"
        base_dir.mkdir()
        export_revision(args.base, base_dir)
        scene = generate_scene(Path(tmp) / "scene", "default", args.size, 0)
        rows: dict[str, list[dict]] = {"base": [], "new": []}
        for r in range(args.rounds):
            for name, code in (("base", base_dir), ("new", ROOT)) if r % 2 == 0 else (("new", ROOT), ("base", base_dir)):
                rows[name].append(time_version(code, scene, args.threads, args.warmup, args.steps))
            key = f"{args.clock}_ms"
            print(f"round {r + 1}: base {rows['base'][-1][key]:.1f} ms, new {rows['new'][-1][key]:.1f} ms "
                  f"(samples {rows['base'][-1]['samples_median']:.0f} / {rows['new'][-1]['samples_median']:.0f})",
                  flush=True)
    summary = {}
    for name, rs in rows.items():
        med = [x[f"{args.clock}_ms"] for x in rs]
        # the mean step includes the occupancy-grid updates (every few steps at this point of
        # training), the median is a step without one
        means = [x[f"{args.clock}_mean_ms"] for x in rs]
        summary[name] = {"median_ms": statistics.median(med), "min_ms": min(med), "max_ms": max(med),
                         "mean_ms": statistics.median(means),
                         "samples_median": statistics.median(x["samples_median"] for x in rs)}
    b, n = summary["base"], summary["new"]
    print(f"{args.clock} time per step at ~{n['samples_median']:.0f} samples: {args.base} {b['median_ms']:.1f} ms "
          f"({b['min_ms']:.1f}-{b['max_ms']:.1f}) -> this tree {n['median_ms']:.1f} ms ({n['min_ms']:.1f}-{n['max_ms']:.1f}), "
          f"x{b['median_ms'] / n['median_ms']:.2f}; load average {os.getloadavg()[0]:.2f}")
    print(f"mean step with its grid updates (median over rounds): {args.base} {b['mean_ms']:.1f} ms -> "
          f"this tree {n['mean_ms']:.1f} ms, x{b['mean_ms'] / n['mean_ms']:.2f}")
    print(json.dumps({"base": args.base, "clock": args.clock, "threads": args.threads, "size": args.size, "rounds": args.rounds,
                      "steps": args.steps, **summary}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
