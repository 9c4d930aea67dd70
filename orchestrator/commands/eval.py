"""`orchestrate eval RUN JOB`: finish a job whose metrics (or videos) failed on the host.

The runner pulls what a failed job made (snapshot, renders, ground truth); this recomputes
metrics.csv, summary.json and the videos here, on the CPU, by running the payload's own
`remote_payload complete` (the same stages the host runs) as a process on this machine, then
records the result in the ledger. Needs the payload extra (numpy, pillow, imageio-ffmpeg,
ffmpeg-python) here, no GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from ..errors import OrchestratorError
from ..ledger import Ledger

SOURCE_ROOT = Path(__file__).resolve().parents[2]     # holds remote_payload/ and ngp_train/


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
        summary = complete(out, scene=job.scene, fps=args.fps)
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


def complete(out: Path, *, scene: str, fps: float = 24.0) -> dict[str, Any]:
    """Run `python -m remote_payload complete` here on `out`; the summary it wrote."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(SOURCE_ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))}
    res = subprocess.run([sys.executable, "-m", "remote_payload", "complete", "--out", str(out),
                          "--scene", scene, "--fps", f"{fps:g}"], capture_output=True, text=True,
                         env=env, timeout=3600, stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
        why = lines[-1].removeprefix("error: ") if lines else f"exit {res.returncode}"
        raise OrchestratorError(f"metrics failed here too: {why}",
                                hint="this machine needs the payload's packages: "
                                     "pip install 'orchestrate[payload]'"
                                if "ModuleNotFoundError" in why or "No module" in why else None)
    try:
        return dict(json.loads(res.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        raise OrchestratorError(f"remote_payload complete printed no summary: {res.stdout[-200:]!r}") from None
