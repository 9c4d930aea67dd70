"""CPU cost of one occupancy-grid update against the chunk size of its density pass.

Builds the CPU-default model for a `--size`-pixel scene (no data needed: the grid update only
evaluates the field), then times `OccupancyGrid.update` -- a later, partial update (1/16
uniform + 1/16 occupied cells) and the first full pass -- with each chunk size in turn, rounds
alternating so all sizes see the same machine load. Process CPU time with one thread by
default: what to compare on a shared machine. Prints the median per chunk size and one JSON line.

    python bench/bench_grid_update.py
    python bench/bench_grid_update.py --chunks 65536 8192 --rounds 9
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ngp_train.defaults import device_defaults  # noqa: E402
from ngp_train.model import NerfModel  # noqa: E402
from ngp_train.train import TrainConfig, build_model_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=64, help="image size the CPU defaults are chosen for")
    ap.add_argument("--chunks", type=int, nargs="+", default=[65536, 32768, 16384, 8192, 4096])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.threads < 1 or min(args.chunks) < 1:
        print("error: --rounds, --threads and --chunks must be positive", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    dd = device_defaults("cpu", args.size)
    model = NerfModel(build_model_config(TrainConfig(device="cpu", backend="torch"), dd), "torch", seed=0)
    grid = model.grid

    def density(x: torch.Tensor) -> torch.Tensor:
        return model.density_unit(x)

    with torch.no_grad():
        grid.update(0, density)                          # a first full pass: some cells occupied
        partial_step = max(grid.warmup_steps, 1)
        times: dict[str, dict[int, list[float]]] = {"partial": {c: [] for c in args.chunks},
                                                   "full": {c: [] for c in args.chunks}}
        torch.set_flush_denormal(True)                   # as the trainer's CPU step runs
        try:
            for r in range(args.rounds):
                order = args.chunks if r % 2 == 0 else args.chunks[::-1]
                for kind, step in (("partial", partial_step), ("full", 0)):
                    for c in order:
                        t0 = time.process_time()
                        grid.update(step, density, chunk=c)
                        times[kind][c].append(time.process_time() - t0)
        finally:
            torch.set_flush_denormal(False)
    summary = {kind: {str(c): 1e3 * statistics.median(v) for c, v in per.items()} for kind, per in times.items()}
    for kind, per in summary.items():
        print(f"{kind:8s} update, cpu ms by chunk: " + ", ".join(f"{c}: {ms:.1f}" for c, ms in per.items()))
    print(f"load average {os.getloadavg()[0]:.2f}")
    print(json.dumps({"size": args.size, "threads": args.threads, "rounds": args.rounds, **summary}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
