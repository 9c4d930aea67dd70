"""Paired per-step CPU time of this tree against another git revision, in one process.

Both versions' `ngp_train` are loaded side by side (the other revision's with `git archive`),
each builds a Trainer on the same generated scene with the same seed, and their steps alternate
(the order swapped every step) with each trainer's own RNG state restored around its step, so
both train exactly the same batches. For a change meant to leave training unchanged this also
checks it: the losses must be equal bit for bit (else the run says they differ). Per step,
process CPU time; a step's pair shares the machine's load of that moment, which makes the
ratio much steadier on a shared machine than separate runs (bench_step.py).

    python bench/bench_step_paired.py --base bc4eeef                      # steps 0-300, grid updates included
    python bench/bench_step_paired.py --base bc4eeef --start 300 --steps 150 --no-grid
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_step import export_revision  # noqa: E402


def load_package(code_dir: Path) -> tuple[ModuleType, ModuleType]:
    """`ngp_train.train` and `ngp_train.synth` from `code_dir`, as a separate copy of the package."""
    for name in [k for k in sys.modules if k == "ngp_train" or k.startswith("ngp_train.")]:
        del sys.modules[name]
    sys.path.insert(0, str(code_dir))
    try:
        return importlib.import_module("ngp_train.train"), importlib.import_module("ngp_train.synth")
    finally:
        sys.path.remove(str(code_dir))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="HEAD~1", help="git revision to compare against (default HEAD~1)")
    ap.add_argument("--start", type=int, default=0, help="untimed steps first (both versions)")
    ap.add_argument("--steps", type=int, default=300, help="timed steps per version")
    ap.add_argument("--no-grid", action="store_true", help="time the steps without occupancy-grid updates")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                    help="process CPU time (default; the steadier figure on a shared machine) or wall "
                         "time (what counts with --threads 2 or more, where CPU time adds up the threads)")
    args = ap.parse_args(argv)
    if args.start < 0 or args.steps < 1 or args.threads < 1:
        print("error: --start must be >= 0, --steps and --threads >= 1", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    with tempfile.TemporaryDirectory(prefix="bench_step_paired_") as tmp:
        base_dir = Path(tmp) / "base"
        base_dir.mkdir()
        try:
            export_revision(args.base, base_dir)
        except Exception as e:  # noqa: BLE001 - a bad revision: one line, no traceback
            print(f"error: cannot export {args.base!r}: {type(e).__name__}", file=sys.stderr)
            return 2
        scene = Path(tmp) / "scene"
        trainers, rng = {}, {}
        for name, code_dir in (("base", base_dir), ("new", ROOT)):
            # each trainer is built right after its package is loaded: the imports Trainer does
            # at run time (the backend check) resolve to its own copy
            train_mod, synth_mod = load_package(code_dir)
            if not scene.exists():
                synth_mod.generate_scene(scene, "default", args.size, 0)
            torch.manual_seed(0)
            cfg = train_mod.TrainConfig(steps=10 ** 9, device="cpu", backend="torch", eval=False)
            tr = train_mod.Trainer(scene, Path(tmp) / name, cfg)
            for _ in range(args.start):
                tr.train_step()
            if args.no_grid:
                tr._update_grid = lambda: None
            trainers[name], rng[name] = tr, torch.get_rng_state()
        times: dict[str, list[float]] = {"base": [], "new": []}
        for s in range(args.steps):
            for name in (("base", "new") if s % 2 == 0 else ("new", "base")):
                torch.set_rng_state(rng[name])
                t0 = clock()
                trainers[name].train_step()
                times[name].append(clock() - t0)
                rng[name] = torch.get_rng_state()
    a, b = times["base"], times["new"]
    same = trainers["base"].last_loss == trainers["new"].last_loss
    res = {"base": args.base, "start": args.start, "steps": args.steps, "grid_updates": not args.no_grid,
           "threads": args.threads, "clock": args.clock,
           "base_median_ms": 1e3 * statistics.median(a), "new_median_ms": 1e3 * statistics.median(b),
           "base_mean_ms": 1e3 * statistics.fmean(a), "new_mean_ms": 1e3 * statistics.fmean(b),
           "median_paired_ratio": statistics.median(x / y for x, y in zip(a, b)), "total_ratio": sum(a) / sum(b),
           "same_loss": same, "load_average_1m": os.getloadavg()[0]}
    print(f"steps {args.start}-{args.start + args.steps}{'' if res['grid_updates'] else ' (no grid updates)'}: "
          f"{args.base} median {res['base_median_ms']:.1f} ms, mean {res['base_mean_ms']:.1f} -> this tree median "
          f"{res['new_median_ms']:.1f} ms, mean {res['new_mean_ms']:.1f}; per-step ratio x{res['median_paired_ratio']:.3f}, "
          f"total x{res['total_ratio']:.3f} ({args.clock} time, {args.threads} thread(s)); "
          f"training {'identical' if same else 'DIFFERS'} (last loss); "
          f"load average {res['load_average_1m']:.2f}")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
