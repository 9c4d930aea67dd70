"""`orchestrate eval RUN JOB`: finish a job whose metrics (or videos) failed on the host.

The runner pulls what a failed job made (snapshot, renders, ground truth); this recomputes
metrics.csv, summary.json and the videos here, on the CPU, with the payload's own stages (the
same code the host runs), then records the result in the ledger. Needs the payload extra
(numpy, pillow, imageio-ffmpeg, ffmpeg-python) on this machine, no GPU.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import OrchestratorError
from ..ledger import Ledger


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="recompute metrics and videos of a pulled job here (no GPU)")
    p.add_argument("run_id", metavar="RUN", help="run id (see `orchestrate status`)")
    p.add_argument("job_id", metavar="JOB", help="job id within the run")
    p.add_argument("--fps", type=float, default=24.0, help="video frame rate")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    ledger = Ledger.open()
    try:
        rows = [j for j in ledger.jobs(args.run_id) if j.job_id == args.job_id]
        if not rows:
            raise OrchestratorError(f"no job {args.job_id!r} in run {args.run_id!r}",
                                    hint="`orchestrate status` lists runs and their jobs")
        job = rows[0]
        out = Path(job.out_dir) if job.out_dir else None
        if out is None or not (out / "renders").is_dir() or not (out / "gt").is_dir():
            raise OrchestratorError(f"{args.job_id}: nothing to evaluate: renders/ and gt/ did not "
                                    f"come home ({out or 'no results directory'})")
        summary = evaluate(out, scene=job.scene, fps=args.fps)
        ledger.add_result(args.run_id, args.job_id, summary, gpu=job.gpu, out_dir=str(out))
        ledger.update_job(args.run_id, args.job_id, status="succeeded", error=None)
        ledger.add_event("eval", f"metrics recomputed locally: PSNR {summary['psnr_mean']:.2f} dB over "
                         f"{summary['n_scored']} frames", args.run_id, args.job_id)
    finally:
        ledger.close()
    missing = summary.get("videos_missing") or {}
    sys.stdout.write(f"{args.job_id}: PSNR {summary['psnr_mean']:.2f} dB, SSIM {summary['ssim_mean']:.3f} "
                     f"over {summary['n_scored']} frames; videos "
                     + (f"missing: {', '.join(missing)}" if missing else "made") + f" in {out}\n")
    return 0


def evaluate(out: Path, *, scene: str, fps: float = 24.0) -> dict:
    """metrics.csv + summary.json + videos in `out` from its renders/ and gt/."""
    try:
        from remote_payload import stages
        from remote_payload.frames import numeric_key
    except ImportError as exc:
        raise OrchestratorError(f"eval needs the payload's packages here ({exc.name} is missing)",
                                hint="pip install 'orchestrate[payload]'") from None
    stems = sorted((p.stem for p in (out / "gt").glob("*.png")), key=numeric_key)
    if not stems:
        raise OrchestratorError(f"no ground-truth frames in {out / 'gt'}")
    train = stages.read_json(out / "train_result.json")
    if train is None:
        raise OrchestratorError(f"{out / 'train_result.json'} is missing: training did not finish")
    try:
        stages.metrics_stage(out)
        stages.summary_stage(out, scene=scene, train=train, n_test=len(stems), data_dir=out / "gt")
    except Exception as exc:  # noqa: BLE001 - any failure of the stage is one line for the user
        raise OrchestratorError(f"metrics failed here too: {type(exc).__name__}: {exc}") from None
    try:
        stages.video_stage(out, stems, fps)
    except Exception as exc:  # noqa: BLE001 - videos are a convenience: metrics stand without them
        stages.record_missing_videos(out, f"{type(exc).__name__}: {' '.join(str(exc).split())}")
    return json.loads((out / "summary.json").read_text())
