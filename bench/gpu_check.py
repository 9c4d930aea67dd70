"""The first check to run on a CUDA machine: ngp_train's GPU path, end to end, in one command.

No network. Generates an 800 px scene (100 train, 20 test views, rendered in parallel on the
CPUs), then for the torch backend, and tcnn when tinycudann imports: 3k training steps timed
with synchronisation (the first 100 counted apart as warm-up), PSNR on 5 test views at 1k steps
and on all 20 at 3k (on white and on black), evaluation seconds per frame, peak GPU memory, the
batch the sync-free path settled on (rays, compacted samples per step). Prints one line per
figure and one JSON line. Sized for ≤ 8 min on one H100/H200 (a backend is stopped at
--max-train-s). It has never run: no CUDA machine was at hand when it was written.

    python bench/gpu_check.py
    python bench/gpu_check.py --size 400 --steps 2000 --scene-dir /tmp/gpu_scene   # reuse a scene

Without CUDA it says so in one line and exits 2. `--device cpu` runs the same code on the CPU
with a tiny scene: a smoke test of this script (its figures mean nothing), which the test suite
runs so that the first GPU run does not fail on the script itself.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def check_backend(backend: str, scene: Path, out: Path, steps: int, max_train_s: float, device: str = "cuda",
                  warmup: int = 100, probe_step: int = 1000) -> dict:
    import torch

    from ngp_train.metrics import psnr_t, ssim_t
    from ngp_train.train import TrainConfig, Trainer, composite_straight, png_rgba

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    cfg = TrainConfig(steps=steps, device=device, backend=backend, eval=False, progress_every=100)
    t_setup = time.perf_counter()
    tr = Trainer(scene, out, cfg)
    _sync(device)
    setup_s = time.perf_counter() - t_setup
    res: dict = {"backend": tr.backend, "precision": tr.precision.name, "sync_free": tr.sync_free,
                 "setup_s": setup_s}
    train_s = warm_s = 0.0
    psnr_1k = None
    log_every = cfg.progress_every
    while tr.step < steps and train_s < max_train_s:
        t0 = time.perf_counter()
        read = (tr.step + 1) % log_every == 0 or tr.step + 1 == steps
        tr.train_step(read=read)
        if read:
            _sync(device)                     # the read already waited; this makes the timing exact
        train_s += time.perf_counter() - t0
        if tr.step == warmup:
            _sync(device)
            warm_s = train_s
        if tr.step == probe_step:
            _sync(device)
            psnr_1k = tr.evaluate_psnr("test", 5)
    tr.read_back()
    _sync(device)
    res.update({"steps": tr.step, "train_s": train_s, "warmup_s_first_100": warm_s,
                "steps_per_s": (tr.step - warmup) / max(train_s - warm_s, 1e-9) if tr.step > warmup else None,
                "psnr_1k_5views": psnr_1k, "n_rays": tr.n_rays, "target_samples": tr.target_samples,
                "capacity": tr.capacity, "final_loss": tr.last_loss})
    t0 = time.perf_counter()
    rows = []
    for _, pred, gt in tr.iter_views("test"):
        png = png_rgba(pred)
        color, alpha = png[..., :3].float() / 255, png[..., 3:].float() / 255
        row = []
        for bg in (1.0, 0.0):
            p = color * alpha + bg * (1 - alpha)
            g = (composite_straight(gt, bg) * 255).round() / 255
            row += [psnr_t(p, g), ssim_t(p, g)]
        rows.append(torch.stack(row))
    table = torch.stack(rows).mean(0).tolist()
    eval_s = time.perf_counter() - t0
    res.update({"psnr_white": table[0], "ssim_white": table[1], "psnr_black": table[2], "ssim_black": table[3],
                "eval_s_per_frame": eval_s / len(rows), "n_test": len(rows),
                "peak_mem_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else 0.0})
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=800)
    ap.add_argument("--n-train", type=int, default=100)
    ap.add_argument("--n-test", type=int, default=20)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--max-train-s", type=float, default=150.0, help="stop a backend's training after this")
    ap.add_argument("--scene-dir", type=Path, default=None, help="reuse (or create) the scene here")
    ap.add_argument("--backends", default="torch,tcnn", help="comma-separated; tcnn is skipped when absent")
    ap.add_argument("--warmup", type=int, default=100, help="steps timed apart as warm-up")
    ap.add_argument("--probe-step", type=int, default=1000, help="PSNR on 5 test views at this step")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cpu: a smoke test of this script on a tiny scene (figures meaningless)")
    args = ap.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("gpu_check: torch is not installed; nothing to check", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device (torch {torch.__version__} sees none); run it on a GPU machine",
              file=sys.stderr)
        return 2
    from ngp_train.synth import generate_scene
    from ngp_train.tcnn_backend import tcnn_available

    t_all = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    scene = args.scene_dir or root / "scene"
    t0 = time.perf_counter()
    if not (scene / "transforms_test.json").is_file():
        generate_scene(scene, "default", args.size, 0, n_train=args.n_train, n_val=1, n_test=args.n_test,
                       supersample=1, workers=os.cpu_count() or 1)
    scene_s = time.perf_counter() - t0
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu (smoke test)"
    print(f"device {gpu}, torch {torch.__version__}, CUDA {torch.version.cuda}; scene {args.size} px "
          f"({args.n_train} train, {args.n_test} test) ready in {scene_s:.1f} s", flush=True)
    results = []
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        if backend == "tcnn" and not tcnn_available():
            print("tcnn: tinycudann does not import; skipped", flush=True)
            continue
        r = check_backend(backend, scene, root / f"out_{backend}", args.steps, args.max_train_s, args.device,
                          args.warmup, args.probe_step)
        results.append(r)
        p1k = "n/a" if r["psnr_1k_5views"] is None else f"{r['psnr_1k_5views']:.2f} dB"
        sps = "n/a" if r["steps_per_s"] is None else f"{r['steps_per_s']:.1f}"
        print(f"{backend} ({r['precision']}): {r['steps']} steps in {r['train_s']:.1f} s, {sps} steps/s after "
              f"warm-up (first {args.warmup}: {r['warmup_s_first_100']:.1f} s); PSNR at {args.probe_step} {p1k} (5 views), at "
              f"{r['steps']} {r['psnr_white']:.2f} dB white / {r['psnr_black']:.2f} dB black "
              f"(SSIM {r['ssim_white']:.4f} / {r['ssim_black']:.4f}); eval {r['eval_s_per_frame']:.2f} s/frame; "
              f"peak {r['peak_mem_gib']:.1f} GiB; {r['n_rays']} rays/step for {r['target_samples']} compacted "
              f"samples (marched cap {r['capacity']})", flush=True)
    print(json.dumps({"device": gpu, "torch": torch.__version__, "size": args.size, "scene_s": scene_s,
                      "total_s": time.perf_counter() - t_all, "results": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
