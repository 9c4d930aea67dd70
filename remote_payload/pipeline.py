"""`run`: check → train (or resume) → render → ground truth → metrics → summary → videos.

One pipeline per job directory: a non-blocking flock on JOB_DIR/.run.lock, plus the pid in
status.json, make a second `run` refuse (exit 7) while the first is alive, so a controller that
re-attaches can never start a second copy. status.json is rewritten at every phase change and
about once a second while training; its exit_code is set exactly when the process ends.
SIGINT/SIGTERM during training ask the trainer to stop (it saves its snapshot) and end with
exit 5; during the later stages they end the run at once (outputs are written atomically, so
a rerun redoes only the unfinished stage).
"""
from __future__ import annotations

import fcntl
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from . import stages
from .checkdata import check_data
from .errors import AlreadyRunning, BadData, BadUsage, Interrupted, OutOfMemory, PayloadError, StageFailed, TrainFailed
from .frames import expected_stems
from .status import StatusWriter, is_pipeline_process, read_status, write_json_atomic

log = logging.getLogger(__name__)

TRAIN_RESULT = "train_result.json"


@dataclass(frozen=True, slots=True)
class RunOptions:
    data_dir: Path
    job_dir: Path
    steps: int | None = None
    max_seconds: float | None = None
    backend: str = "auto"
    device: str = "auto"
    scene: str | None = None
    downscale: int = 1
    seed: int = 0
    fps: float = 24.0
    train_options: tuple[tuple[str, str], ...] = ()   # extra TrainConfig fields, as text
    cpu_share: int = 1             # jobs sharing this machine's CPUs: torch gets cpu_count // cpu_share threads


_NOT_OPTIONS = {"steps", "max_seconds", "backend", "device", "downscale", "seed", "eval"}


CUDA_PROGRESS_EVERY = 100


def _uses_cuda(device: str) -> bool:
    if device == "cpu":
        return False
    import torch

    return bool(torch.cuda.is_available())


def build_train_config(opts: RunOptions) -> Any:
    """TrainConfig from the run options; `--train-option KEY=VALUE` values are typed from the
    field's default (None defaults: int, then float). Unknown keys name the closest field."""
    import dataclasses
    import difflib

    from ngp_train.train import TrainConfig

    # progress every step on CPU (overridable): status.json is then ~1 s fresh even at CPU
    # speeds, and the writer throttles the writes; train_log.csv gets a row per step. On CUDA a
    # progress step reads loss and counts back from the GPU (a synchronisation): every
    # CUDA_PROGRESS_EVERY steps, ~1 s at instant-ngp speeds.
    kw: dict[str, Any] = {"eval": False, "max_seconds": opts.max_seconds, "backend": opts.backend,
                          "device": opts.device, "downscale": opts.downscale, "seed": opts.seed,
                          "progress_every": CUDA_PROGRESS_EVERY if _uses_cuda(opts.device) else 1}
    if opts.steps is not None:
        kw["steps"] = opts.steps
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for key, text in opts.train_options:
        if key in _NOT_OPTIONS or key not in fields:
            close = difflib.get_close_matches(key, [k for k in fields if k not in _NOT_OPTIONS], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            why = "has its own flag" if key in _NOT_OPTIONS else "is not a training option"
            raise BadUsage(f"--train-option {key}={text}: {key!r} {why}{hint}")
        default = fields[key].default
        try:
            if isinstance(default, bool):
                if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(text)
                value: Any = text.lower() in ("true", "1", "yes")
            elif isinstance(default, (int, float, str)):
                value = type(default)(text)
            elif text.lower() == "none":
                value = None
            else:
                try:
                    value = int(text)
                except ValueError:
                    value = float(text)
        except ValueError:
            raise BadUsage(f"--train-option {key}={text}: not a valid "
                           f"{type(default).__name__ if default is not None else 'number'}") from None
        kw[key] = value
    from ngp_train import train as train_module
    from ngp_train.errors import NgpError

    try:
        cfg = TrainConfig(**kw)
        check = getattr(train_module, "check_config", None)
        if check is not None:
            check(cfg)
    except (TypeError, ValueError, NgpError) as exc:
        raise BadUsage(f"training options rejected: {' '.join(str(exc).split())}") from None
    return cfg


class _StopFlag:
    """Set by SIGINT/SIGTERM. While training it only asks; otherwise it raises at once."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.training = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        first = self.signal_name is None
        self.signal_name = signal.Signals(signum).name
        if self.training and first:
            log.warning("%s: asking training to stop after saving its snapshot", self.signal_name)
            return
        raise Interrupted(f"interrupted by {self.signal_name}")

    def requested(self) -> bool:
        return self.signal_name is not None


@contextmanager
def job_lock(job_dir: Path) -> Iterator[None]:
    """Hold JOB_DIR/.run.lock for the pipeline's life; refuse when a live pipeline holds it."""
    fd = os.open(job_dir / ".run.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AlreadyRunning(_running_message(job_dir)) from None
        current = read_status(job_dir)
        if (current is not None and current.exit_code is None and current.pid != os.getpid()
                and is_pipeline_process(current.pid)):
            raise AlreadyRunning(_running_message(job_dir))
        yield
    finally:
        os.close(fd)


def _running_message(job_dir: Path) -> str:
    st = read_status(job_dir)
    who = f"pid {st.pid}, phase {st.phase}, step {st.step}/{st.total_steps}" if st else "lock held"
    return (f"a pipeline is already running in {job_dir} ({who}); "
            "watch its status.json instead of starting another")


_OOM_WORDS = ("out of memory", "can't allocate memory", "cannot allocate memory",
              "not enough memory")


def _is_oom(exc: BaseException) -> bool:
    """CUDA OOM (torch.cuda.OutOfMemoryError), host allocation failures, MemoryError."""
    text = str(exc).lower()
    return (isinstance(exc, MemoryError) or "OutOfMemory" in type(exc).__name__
            or any(w in text for w in _OOM_WORDS))


def _one_line(exc: BaseException, limit: int = 400) -> str:
    text = " ".join(str(exc).split())
    if len(text) > limit:
        text = text[:limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Pipeline:
    def __init__(self, opts: RunOptions, writer: StatusWriter, stop: _StopFlag) -> None:
        self.opts = opts
        self.out = opts.job_dir / "out"
        self.writer = writer
        self.stop = stop
        self.timings: dict[str, dict[str, Any]] = {}

    def _timed(self, name: str, fn: Callable[[], bool]) -> None:
        self.writer.set_phase(name)
        t0 = time.monotonic()
        stages.inject(name)
        ran = fn()
        self.timings[name] = {"seconds": round(time.monotonic() - t0, 3), "skipped": not ran}
        log.info("stage %s %s in %.2f s", name, "done" if ran else "skipped (output exists)",
                 self.timings[name]["seconds"])
        write_json_atomic(self.out / "stages.json", self.timings)

    def run(self) -> None:
        o = self.opts
        self.writer.set_phase("check")
        cfg = build_train_config(o)   # bad options fail here, before any work
        t0 = time.monotonic()
        report = check_data(o.data_dir)
        self.timings["check"] = {"seconds": round(time.monotonic() - t0, 3), "skipped": False}
        stems = expected_stems(o.data_dir, "test")
        self.out.mkdir(parents=True, exist_ok=True)
        train_info: dict[str, Any] = {}

        def do_train() -> bool:
            ran, info = self._train(cfg)
            train_info.update(info)
            return ran

        self._timed("train", do_train)
        if not self.timings["train"]["skipped"]:
            stages.drop_model_outputs(self.out)   # a new model: older renders/scores are stale
        snapshot = Path(train_info["snapshot_path"])
        try:
            self._timed("render", lambda: stages.render_stage(
                snapshot, o.data_dir, self.out, stems, o.device, self._tick))
            self._timed("gt", lambda: stages.gt_stage(o.data_dir, self.out, stems))
            self._timed("metrics", lambda: stages.metrics_stage(self.out, o.data_dir))
            self._timed("summary", lambda: stages.summary_stage(
                self.out, scene=o.scene or Path(o.data_dir).name, train=train_info,
                n_test=report.n_test, data_dir=o.data_dir, train_options=dict(o.train_options)))
            self._videos(stems)
        except PayloadError:
            raise
        except Exception as exc:
            phase = self.writer.current.phase
            log.exception("stage %s failed", phase)
            if _is_oom(exc):
                raise OutOfMemory(f"{phase} ran out of memory: {_one_line(exc)}", phase=phase) from None
            raise StageFailed(f"{phase} failed: {_one_line(exc)}", phase=phase) from None

    def _videos(self, stems: list[str]) -> None:
        """Videos are a convenience: a failure here is a warning, the job keeps its metrics and
        summary.json says which videos are missing and why."""
        t0 = time.monotonic()
        try:
            self._timed("videos", lambda: stages.video_stage(self.out, stems, self.opts.fps))
        except Interrupted:
            raise
        except Exception as exc:  # noqa: BLE001 - a video failure is a warning: the metrics are the result
            reason = _one_line(exc)
            log.warning("videos failed, the job keeps its metrics: %s", reason)
            self.timings["videos"] = {"seconds": round(time.monotonic() - t0, 3), "skipped": False,
                                      "failed": reason}
            write_json_atomic(self.out / "stages.json", self.timings)
            stages.record_missing_videos(self.out, reason)

    def _tick(self, *args: Any, **kwargs: Any) -> None:
        self.writer.update()

    def _train(self, cfg: Any) -> tuple[bool, dict[str, Any]]:
        """Train or resume; eval=False in cfg: render, scores and summary are our own stages."""
        from ngp_train.train import train

        o = self.opts
        done = stages.read_json(self.out / TRAIN_RESULT)
        if (done is not None and done.get("target_steps") == cfg.steps
                and done.get("max_seconds") == cfg.max_seconds
                and Path(done.get("snapshot_path", "")).is_file()):
            self.writer.update(force=True, step=int(done["steps"]), total_steps=cfg.steps)
            return False, done
        (self.out / TRAIN_RESULT).unlink(missing_ok=True)   # recorded again only when training ends
        self.writer.update(force=True, step=0, total_steps=cfg.steps)
        rate = _Rate()

        def progress(step: int, total: int, loss: float, psnr: float | None, elapsed_s: float) -> None:
            cur = self.writer.current
            self.writer.update(step=int(step), total_steps=int(total),
                               loss=None if loss is None else float(loss),
                               psnr=cur.psnr if psnr is None else float(psnr),
                               eta_s=rate.eta_s(int(step), int(total)))

        self.stop.training = True
        try:
            result = train(o.data_dir, self.out, cfg, progress=progress,
                           should_stop=self.stop.requested)
        except PayloadError:
            raise
        except Exception as exc:
            name = type(exc).__name__
            if name == "DatasetError":
                raise BadData(" ".join(str(exc).split()), phase="train") from None
            if name == "ConfigError":
                raise BadUsage(" ".join(str(exc).split()), phase="train") from None
            log.exception("training failed")
            if _is_oom(exc):
                raise OutOfMemory(f"training ran out of memory: {_one_line(exc)}; "
                                  "try a smaller --steps/batch or a bigger GPU", phase="train") from None
            raise TrainFailed(f"training failed: {_one_line(exc)}", phase="train") from None
        finally:
            self.stop.training = False
        self.writer.update(force=True, step=int(result.steps), total_steps=cfg.steps,
                           loss=float(result.final_loss) if result.final_loss is not None else None)
        if self.stop.requested():
            raise Interrupted(f"interrupted by {self.stop.signal_name} at step {result.steps}; "
                              "snapshot kept, rerun to resume", phase="train")
        info = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(result).items()}
        info.update(target_steps=cfg.steps, max_seconds=cfg.max_seconds)
        write_json_atomic(self.out / TRAIN_RESULT, info)
        return True, info


class _Rate:
    """Steps per second over this session, for eta_s (None until two points are seen)."""

    def __init__(self) -> None:
        self.first: tuple[int, float] | None = None

    def eta_s(self, step: int, total: int) -> float | None:
        now = time.monotonic()
        if self.first is None:
            self.first = (step, now)
            return None
        d_step, d_t = step - self.first[0], now - self.first[1]
        if d_step <= 0 or d_t <= 0:
            return None
        return max(0.0, (total - step) * d_t / d_step)


def share_cpus(n_jobs: int) -> int:
    """Give torch cpu_count // n_jobs threads (at least 1) when n_jobs pipelines share this
    machine. Each torch process otherwise starts one thread per core, and two of them on two
    cores ran ~4x slower than one thread each (OpenMP threads spinning against each other)."""
    import torch

    threads = max(1, (os.cpu_count() or 1) // n_jobs)
    torch.set_num_threads(threads)
    log.info("%d jobs share this machine's %s CPUs: %d torch thread(s)", n_jobs, os.cpu_count(), threads)
    return threads


def run_pipeline(opts: RunOptions) -> int:
    """Run the whole pipeline in `opts.job_dir`; 0 on success, else raises the PayloadError
    (already recorded in status.json) whose exit_code the process ends with."""
    job_dir = Path(opts.job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    opts = RunOptions(**{**{f: getattr(opts, f) for f in RunOptions.__dataclass_fields__},
                         "job_dir": job_dir, "data_dir": Path(opts.data_dir).expanduser().resolve()})
    with job_lock(job_dir):
        writer = StatusWriter(job_dir)
        stop = _StopFlag()
        old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            log.info("pipeline start: pid %d, data %s, job %s", os.getpid(), opts.data_dir, job_dir)
            if opts.cpu_share > 1:
                share_cpus(opts.cpu_share)
            Pipeline(opts, writer, stop).run()
            writer.finish("done", 0)   # inside: a signal now still ends in a recorded state
        except PayloadError as exc:
            phase = "interrupted" if isinstance(exc, Interrupted) else "failed"
            (log.warning if phase == "interrupted" else log.error)("%s", exc)
            writer.finish(phase, exc.exit_code, str(exc))
            raise
        except Exception as exc:   # a bug of ours: still one line in status.json and a code
            log.exception("unexpected failure")
            failed = TrainFailed if writer.current.phase == "train" else StageFailed
            err = failed(f"{writer.current.phase} failed: {_one_line(exc)}")
            writer.finish("failed", err.exit_code, str(err))
            raise err from None
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        log.info("pipeline done")
        return 0
