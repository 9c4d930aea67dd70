"""The payload's own subcommands: check-data, run, probe (time a few training steps), bootstrap, watchdog.

Each `add_*` registers a subparser whose `func(args) -> int` is the handler; handlers import
their heavy modules lazily so `--help` and argument errors stay instant.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path

from ngp_train.contract import BACKENDS, DEVICES

log = logging.getLogger(__name__)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return value


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key.strip(), value.strip()


def cmd_check_data(args: argparse.Namespace) -> int:
    from .checkdata import check_data

    report = check_data(Path(args.dir))
    sys.stdout.write(json.dumps(asdict(report)) + "\n")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .pipeline import RunOptions, run_pipeline

    job_dir = Path(args.job_dir).expanduser()
    job_dir.mkdir(parents=True, exist_ok=True)
    log_path = job_dir / "log.txt"
    handler: logging.Handler | None = None
    if not _stderr_is(log_path):   # started with 2>>log.txt (detached): lines are there already
        handler = logging.FileHandler(log_path, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.setLevel(logging.DEBUG)
        logging.getLogger().addHandler(handler)
    try:
        return run_pipeline(RunOptions(
            data_dir=Path(args.data), job_dir=job_dir, steps=args.steps,
            max_seconds=args.max_seconds, backend=args.backend, device=args.device,
            scene=args.scene, downscale=args.downscale, seed=args.seed, fps=args.fps,
            train_options=tuple(args.train_option), cpu_share=args.cpu_share))
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()


def _stderr_is(path: Path) -> bool:
    """True when this process's stderr already writes to `path` (same device and inode)."""
    try:
        err, target = os.fstat(sys.stderr.fileno()), os.stat(path)
    except (OSError, ValueError, AttributeError):
        return False
    return (err.st_dev, err.st_ino) == (target.st_dev, target.st_ino)


def cmd_bootstrap(args: argparse.Namespace) -> int:
    from .bootstrap import bootstrap

    env = bootstrap(Path(args.out).expanduser(), force=args.force)
    sys.stdout.write(json.dumps(env, indent=1) + "\n")
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    from .env import provision

    root = Path(args.root).expanduser().resolve()
    env = provision(root, configured=args.python, torch_mode=args.torch,
                    wheels=Path(args.wheels).expanduser() if args.wheels else None,
                    out=Path(args.out).expanduser(), plan_only=args.plan)
    sys.stdout.write(json.dumps(env) + "\n")
    return 0


def cmd_complete(args: argparse.Namespace) -> int:
    from .stages import complete

    summary = complete(Path(args.out).expanduser(), scene=args.scene, fps=args.fps)
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0


def cmd_watchdog(args: argparse.Namespace) -> int:
    from .watchdog import watch

    if args.deadline < args.idle_timeout:
        log.warning("deadline (%g s) is shorter than the idle timeout (%g s)", args.deadline,
                    args.idle_timeout)
    watch(Path(args.job_dir).expanduser(), idle_timeout_s=args.idle_timeout,
          deadline_s=args.deadline, stop_command=args.stop_command, poll_s=args.poll_s,
          grace_s=args.grace_s)
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from .procs import ROLES, stop_marked

    roles = ROLES if args.role == "all" else (args.role,)
    n = stop_marked(args.job_dir, roles, grace_s=args.grace_s)
    sys.stdout.write(f"{n}\n")
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    """Time a few training steps with the job's settings; one JSON line: the measurements and
    the predicted training-loop seconds for each `--steps` (the controller's first estimate of a
    job on this machine, before any job has finished here)."""
    import time
    t0 = time.perf_counter()
    from ngp_train.probe import probe

    from .pipeline import RunOptions, build_train_config, share_cpus

    import_s = time.perf_counter() - t0
    steps = sorted(set(args.steps or [300]))
    opts = RunOptions(data_dir=Path("."), job_dir=Path("."), steps=max(steps), backend=args.backend,
                      device=args.device, seed=args.seed, train_options=tuple(args.train_option))
    cfg = build_train_config(opts)
    if args.cpu_share > 1:
        share_cpus(args.cpu_share)
    res = probe(cfg, size=args.size, scene=args.scene, seed=args.seed, budget_s=args.budget_s,
                import_s=import_s)
    out = asdict(res)
    out["predict"] = {str(n): round(res.train_seconds(n), 4) for n in steps}
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check-data", help="validate a NeRF-synthetic scene (exit 2 when unusable)")
    p.add_argument("dir", help="scene directory holding transforms_{train,test}.json")
    p.set_defaults(func=cmd_check_data, log_level=logging.WARNING)

    p = sub.add_parser("run", help="the scene pipeline: check, train, render, metrics, videos")
    p.add_argument("--data", required=True, help="scene directory")
    p.add_argument("--job-dir", required=True, help="job directory (status.json, log.txt, out/)")
    p.add_argument("--steps", type=_positive_int, default=None, help="training steps")
    p.add_argument("--max-seconds", type=_positive_float, default=None,
                   help="stop training after this many seconds")
    p.add_argument("--backend", choices=BACKENDS, default="auto")
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--scene", default=None, help="scene name for summary.json (default: dir name)")
    p.add_argument("--downscale", type=_positive_int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fps", type=_positive_float, default=24.0, help="video frame rate")
    p.add_argument("--train-option", action="append", default=[], type=_key_value,
                   metavar="KEY=VALUE", help="any other TrainConfig field, e.g. log2_hashmap_size=17")
    p.add_argument("--cpu-share", type=_positive_int, default=1, metavar="N",
                   help="N jobs share this machine's CPUs: torch uses cpu_count // N threads")
    p.set_defaults(func=cmd_run, log_level=logging.INFO)

    p = sub.add_parser("probe", help="time a few training steps on a tiny generated scene; predict "
                                     "the training time of --steps (JSON)")
    p.add_argument("--size", type=_positive_int, required=True, help="image size of the job's scene (px)")
    p.add_argument("--steps", type=_positive_int, action="append", default=[],
                   help="step counts to predict (repeatable)")
    p.add_argument("--budget-s", type=_positive_float, default=3.0, help="seconds of steps to time")
    p.add_argument("--backend", choices=BACKENDS, default="auto")
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--scene", default="default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-option", action="append", default=[], type=_key_value, metavar="KEY=VALUE")
    p.add_argument("--cpu-share", type=_positive_int, default=1, metavar="N")
    p.set_defaults(func=cmd_probe, log_level=logging.WARNING)

    p = sub.add_parser("bootstrap", help="detect CUDA/GPU/torch/tcnn, write env.json")
    p.add_argument("--out", default="env.json", help="where to write the record (default ./env.json)")
    p.add_argument("--force", action="store_true", help="probe again even when env.json is current")
    p.set_defaults(func=cmd_bootstrap, log_level=logging.WARNING)

    p = sub.add_parser("env", help="find the interpreter, build <root>/env/<key>/, write env.json")
    p.add_argument("--root", required=True, help="the work root (<root>/env/ holds the environments)")
    p.add_argument("--python", default=None, help="the interpreter to use (default: search)")
    p.add_argument("--torch", choices=("require", "install"), default="require")
    p.add_argument("--wheels", default=None, help="a directory of wheels the controller pushed")
    p.add_argument("--out", default="env.json", help="where to write the record")
    p.add_argument("--plan", action="store_true",
                   help="only find the interpreter and check torch; print the plan")
    p.set_defaults(func=cmd_env, log_level=logging.WARNING)

    p = sub.add_parser("complete", help="metrics, summary and videos of an out/ dir from its renders and gt")
    p.add_argument("--out", required=True, help="the job's out/ directory (renders/, gt/, train_result.json)")
    p.add_argument("--scene", required=True, help="scene name for summary.json")
    p.add_argument("--fps", type=_positive_float, default=24.0)
    p.set_defaults(func=cmd_complete, log_level=logging.WARNING)

    from . import tcnn
    p = sub.add_parser("tcnn-build", help="build a tiny-cuda-nn wheel for one compute capability")
    p.add_argument("--out", required=True, help="directory for the wheel, build.log and result.json")
    p.add_argument("--compute-capability", required=True, help="e.g. 9.0 (H100)")
    p.add_argument("--timeout-s", type=_positive_float, default=1800.0)
    p.add_argument("--python", default=None, help="the environment's python (default: this one)")
    p.add_argument("--max-jobs", type=_positive_int, default=None, help="parallel compile jobs")
    p.add_argument("--source", default=tcnn.TCNN_SOURCE, help="what pip builds (tests: a local package)")
    p.add_argument("--dry-run", action="store_true", help="print the exact build command, run nothing")
    p.set_defaults(func=tcnn.main_build, log_level=logging.WARNING)

    p = sub.add_parser("tcnn-install", help="install a tiny-cuda-nn wheel and check that it imports")
    p.add_argument("--wheel", required=True)
    p.add_argument("--python", default=None)
    p.add_argument("--import-name", default=tcnn.TCNN_IMPORT)
    p.set_defaults(func=tcnn.main_install, log_level=logging.WARNING)

    p = sub.add_parser("watchdog", help="stop the host when the controller is gone and nothing runs")
    p.add_argument("--job-dir", required=True)
    p.add_argument("--idle-timeout", type=_positive_float, required=True,
                   help="seconds without a heartbeat before the host may be stopped")
    p.add_argument("--deadline", type=_positive_float, required=True,
                   help="hard limit in seconds from now; the host is stopped then regardless")
    p.add_argument("--stop-command", required=True, help="shell command that stops the host")
    p.add_argument("--poll-s", type=_positive_float, default=5.0)
    p.add_argument("--grace-s", type=float, default=30.0,
                   help="seconds a running pipeline gets after SIGTERM before the stop")
    p.set_defaults(func=cmd_watchdog, log_level=logging.INFO)

    p = sub.add_parser("stop", help="end this job's own processes (found by their environment "
                                    "markers, never by a bare pid)")
    p.add_argument("--job-dir", required=True, help="the job directory, exactly as it was started")
    p.add_argument("--role", choices=("pipeline", "watchdog", "all"), default="all")
    p.add_argument("--grace-s", type=float, default=20.0,
                   help="seconds between SIGTERM and SIGKILL")
    p.set_defaults(func=cmd_stop, log_level=logging.WARNING)
