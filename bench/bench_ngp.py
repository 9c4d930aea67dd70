"""Benchmark: Instant-NGP vs a positional-encoding NeRF on the default generated scene, on CPU.

Both models use the same occupancy-grid marcher, volume renderer, samples per step, optimiser
settings and data; only the field differs (hash grid + tiny MLPs vs 4×128 MLP on sin/cos
features). Each trains for a wall-clock budget; test PSNR is measured on a fixed subset of test
views at growing intervals (evaluation time excluded), then on the full test set at the end.
Prints the curves, the final PSNRs, and how much sooner Instant-NGP reaches the baseline's final
PSNR. Targets (issue #2): ≥ 28 dB within 180 s on 2 cores, ≥ 10× faster than the baseline.

    python bench/bench_ngp.py                       # 180 s each, 64 px (the full benchmark)
    python bench/bench_ngp.py --seconds 30 --baseline-seconds 30 --size 32   # a quick look
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ngp_train.contract import PRECISIONS  # noqa: E402
from ngp_train.synth import generate_scene  # noqa: E402
from ngp_train.train import TrainConfig, Trainer  # noqa: E402


@dataclass(frozen=True, slots=True)
class Curve:
    name: str
    points: tuple[tuple[float, int, float], ...]     # (train seconds, step, subset test PSNR)
    final_psnr: float                                 # full test set
    steps: int
    seconds: float


def eval_times(budget_s: float) -> list[float]:
    """Every 2 s up to 24 s (where the baseline's final PSNR is usually crossed), 32, 45 s, then
    every 30 s, and the end of the budget."""
    ts = [t for t in (*(2.0 * k for k in range(1, 13)), 32.0, 45.0) if t < budget_s]
    t = 60.0
    while t < budget_s:
        ts.append(t)
        t += 30.0
    return sorted(set(ts + [budget_s]))


def run(name: str, scene: Path, cfg: TrainConfig, budget_s: float, eval_frames: int, clock=time.perf_counter  # noqa: ANN001
        ) -> Curve:
    out = Path(tempfile.mkdtemp(prefix=f"bench_ngp_{name}_"))
    tr = Trainer(scene, out, cfg)
    points = []
    marks = eval_times(budget_s)
    train_s = 0.0
    while marks:
        t0 = clock()
        tr.train_step()
        train_s += clock() - t0
        if train_s >= marks[0]:
            while marks and train_s >= marks[0]:
                marks.pop(0)
            p = tr.evaluate_psnr("test", eval_frames)
            points.append((train_s, tr.step, p))
            print(f"  {name:>8}  {train_s:7.1f} s  step {tr.step:6d}  test PSNR {p:6.2f} dB", flush=True)
    final = tr.evaluate_psnr("test", None)
    return Curve(name, tuple(points), final, tr.step, train_s)


def time_to_reach(curve: Curve, target: float) -> float | None:
    """First training time the curve reaches `target`, linearly interpolated between evaluations."""
    prev_t, prev_p = 0.0, None
    for t, _, p in curve.points:
        if p >= target:
            if prev_p is None or prev_p >= target:
                return t if prev_p is None else prev_t
            return prev_t + (t - prev_t) * (target - prev_p) / (p - prev_p)
        prev_t, prev_p = t, p
    return None


def matmul_gflops() -> float:
    """A machine-speed probe: float32 2048² matmuls on torch's threads. Printed at the start and
    the end, so a run on a machine that slowed down (a shared host) shows it."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    for _ in range(2):
        a @ b
    t0 = time.perf_counter()
    for _ in range(8):
        a @ b
    return 8 * 2 * 2048 ** 3 / (time.perf_counter() - t0) / 1e9


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=180.0, help="Instant-NGP training budget (wall s)")
    ap.add_argument("--baseline-seconds", type=float, default=None, help="baseline budget (default: --seconds)")
    ap.add_argument("--size", type=int, default=64, help="image size of the generated scene")
    ap.add_argument("--scene", default="default")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-frames", type=int, default=5, help="test views for the curves (full set at the end)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--precision", default="auto", choices=PRECISIONS,
                    help="TrainConfig.precision of both fields (default auto: fp32 on CPU)")
    ap.add_argument("--clock", choices=["wall", "process"], default="wall",
                    help="budget and curves in wall time (default) or this process's CPU time; with "
                         "--threads 1, process time approximates a quiet single core on a loaded machine")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    base_s = args.baseline_seconds if args.baseline_seconds is not None else args.seconds
    scene = generate_scene(Path(tempfile.mkdtemp(prefix="bench_ngp_scene_")) / args.scene, args.scene,
                           args.size, args.seed)
    load = os.getloadavg()
    gflops = matmul_gflops()
    print(f"scene {args.scene} {args.size}px, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} cpus, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
          f"matmul {gflops:.0f} GFLOPS")
    common = dict(steps=10 ** 9, device="cpu", backend="torch", seed=args.seed, eval=False, precision=args.precision)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    print(f"clock: {args.clock} time")
    ngp = run("ngp", scene, TrainConfig(**common), args.seconds, args.eval_frames, clock)
    print(f"ngp: {ngp.steps} steps in {ngp.seconds:.1f} s, full test PSNR {ngp.final_psnr:.2f} dB")
    result = {"size": args.size, "threads": torch.get_num_threads(), "clock": args.clock, "load_average_1m": load[0],
              "ngp_seconds": ngp.seconds, "ngp_steps": ngp.steps, "ngp_final_psnr": ngp.final_psnr,
              "ngp_curve": ngp.points}
    if not args.skip_baseline:
        pe = run("pe-nerf", scene, TrainConfig(**common, field_kind="pe", lr=5e-4), base_s, args.eval_frames, clock)
        print(f"pe-nerf: {pe.steps} steps in {pe.seconds:.1f} s, full test PSNR {pe.final_psnr:.2f} dB")
        target = pe.points[-1][2]
        t_pe, t_ngp = time_to_reach(pe, target), time_to_reach(ngp, target)
        ratio = (t_pe / t_ngp) if (t_pe and t_ngp) else None
        print(f"baseline's final PSNR {target:.2f} dB (test subset): baseline reached it at "
              f"{t_pe:.1f} s, Instant-NGP at {t_ngp if t_ngp is None else round(t_ngp, 1)} s"
              + (f" -> {ratio:.1f}x faster" if ratio else ""))
        result.update({"baseline_seconds": pe.seconds, "baseline_steps": pe.steps,
                       "baseline_final_psnr": pe.final_psnr, "baseline_curve": pe.points,
                       "time_to_baseline_psnr_ngp_s": t_ngp, "time_to_baseline_psnr_baseline_s": t_pe,
                       "speedup": ratio})
    load_end = os.getloadavg()
    result["load_average_1m_end"] = load_end[0]
    result["matmul_gflops_start"], result["matmul_gflops_end"] = gflops, matmul_gflops()
    print(f"machine speed probe: {result['matmul_gflops_start']:.0f} GFLOPS at the start, "
          f"{result['matmul_gflops_end']:.0f} at the end")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
