"""Build finished runs without training anything: real ledger rows and real run directories.

For tests and demos of `orchestrate report` / `orchestrate costs`: the ledger is the real
SQLite ledger written through its own API (intent, create, state changes at given times), the
run directory holds the files the payload writes (summary.json, metrics.csv, train_log.csv)
and real H.264 videos made by imageio-ffmpeg's ffmpeg binary.
"""
from __future__ import annotations

import csv
import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..ledger import DESTROYED, RUNNING, Ledger


@dataclass(frozen=True, slots=True)
class FakeJob:
    job_id: str
    scene: str
    gpu: str = "cpu"
    backend: str = "torch"
    provider: str = "local"
    host_name: str = "here"
    steps: int = 50
    psnrs: tuple[float, ...] = (20.0, 22.0)
    ssims: tuple[float, ...] = (0.8, 0.9)
    train_seconds: float = 12.5
    price_per_hour: float = 3.6
    currency: str = "USD"
    granularity_s: float = 1.0
    billed_s: float = 60.0
    phases_s: dict[str, float] = field(default_factory=lambda: {"boot": 5.0, "train": 12.5,
                                                                 "eval": 4.0, "teardown": 1.0})
    estimate: dict[str, Any] | None = None
    status: str = "succeeded"
    video: bool = True
    video_seconds: float = 1.0
    train: dict[str, Any] | None = None     # the experiment's `train:` options, if any


def make_video(path: Path, *, width: int = 64, height: int = 32, seconds: float = 1.0,
               fps: int = 10) -> Path:
    """A real H.264 MP4 (yuv420p, faststart) from ffmpeg's test source."""
    import imageio_ffmpeg

    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "lavfi",
                    "-i", f"testsrc=size={width}x{height}:rate={fps}", "-t", str(seconds),
                    "-c:v", "libx264", "-pix_fmt", "yuv420p", "-movflags", "+faststart",
                    str(path)], check=True, timeout=60)
    return path


def write_job_dir(out_dir: Path, job: FakeJob) -> Path:
    """summary.json, metrics.csv, train_log.csv and videos/ as the payload leaves them."""
    if len(job.psnrs) != len(job.ssims) or not job.psnrs:
        raise ValueError(f"{job.job_id}: give one SSIM per PSNR ({len(job.psnrs)} vs {len(job.ssims)})")
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "metrics.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["frame", "psnr", "ssim"])
        for i, (p, s) in enumerate(zip(job.psnrs, job.ssims)):
            w.writerow([f"r_{i}", p, s])
    n = 5
    with (out_dir / "train_log.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["step", "seconds", "loss", "psnr"])
        final = sum(job.psnrs) / len(job.psnrs)
        for k in range(1, n + 1):
            step = job.steps * k // n
            psnr = "" if k % 2 == 0 and k != n else round(final * (0.6 + 0.4 * k / n), 3)
            w.writerow([step, round(job.train_seconds * k / n, 3), round(0.1 / k, 5), psnr])
    summary = {"scene": job.scene, "backend": job.backend, "steps": job.steps,
               "train_seconds": job.train_seconds, "device": "cpu",
               "psnr_mean": sum(job.psnrs) / len(job.psnrs),
               "ssim_mean": sum(job.ssims) / len(job.ssims), "n_test_images": len(job.psnrs)}
    (out_dir / "summary.json").write_text(json.dumps(summary))
    if job.video:
        for name in ("render", "gt", "compare"):
            make_video(out_dir / "videos" / f"{name}.mp4",
                       width=128 if name == "compare" else 64, seconds=job.video_seconds)
    return out_dir


def add_finished_job(ledger: Ledger, run_id: str, job: FakeJob, *, runs_root: Path,
                     start_epoch: float) -> Path:
    """Ledger rows (job, instance with billing from `start_epoch`, phases, result) and the
    run directory `runs_root/<run_id>/<job_id>/`. Returns the run directory."""
    out_dir = write_job_dir(runs_root / run_id / job.job_id, job)
    ledger.add_job(run_id, job.job_id, experiment="ngp", scene=job.scene,
                   host_name=job.host_name, provider=job.provider, gpu=job.gpu,
                   steps=job.steps, backend=job.backend, dataset="demo", estimate=job.estimate,
                   settings={"train": job.train} if job.train else None)
    row = ledger.record_intent(run_id=run_id, job_id=job.job_id, host_name=job.host_name,
                               provider=job.provider, label=f"orch-{run_id}-{job.job_id}",
                               gpu=job.gpu, price_per_hour=job.price_per_hour,
                               currency=job.currency, granularity_s=job.granularity_s)
    ledger.instance_created(row, f"i-{job.job_id}", at=start_epoch)
    ledger.set_instance_state(row, RUNNING, at=start_epoch + 1)
    ledger.set_instance_state(row, DESTROYED, at=start_epoch + job.billed_s)
    t = start_epoch
    for phase, secs in job.phases_s.items():
        ledger.record_phase(run_id, job.job_id, phase, t, t + secs)
        t += secs
    ledger.update_job(run_id, job.job_id, status=job.status, instance_row=row,
                      out_dir=str(out_dir))
    summary = json.loads((out_dir / "summary.json").read_text())
    ledger.add_result(run_id, job.job_id, summary, gpu=job.gpu, out_dir=str(out_dir))
    return out_dir
