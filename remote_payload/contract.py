"""What the controller and the payload agree on (docs/contracts.md §2): `run` exit codes,
status.json keys and phases, file names in the job directory. Standard library only, so the
controller can read these without importing the payload's dependencies.
"""
from __future__ import annotations

# `run` exit codes (and those of the other commands where they apply).
EXIT_OK = 0
EXIT_ERROR = 1                 # any other error the payload raises on purpose
EXIT_BAD_DATA = 2
EXIT_TRAIN_FAILED = 3
EXIT_OUT_OF_MEMORY = 4
EXIT_INTERRUPTED = 5           # SIGINT/SIGTERM: snapshot kept, a rerun resumes
EXIT_STAGE_FAILED = 6          # render, ground truth, metrics, summary or videos failed
EXIT_ALREADY_RUNNING = 7       # another live pipeline owns the job directory: re-attach to it
EXIT_NO_MIRROR = 3             # `stage`: no mirror could serve the dataset
EXIT_USAGE = 64                # bad command-line arguments

# JOB_DIR/status.json
STATUS_NAME = "status.json"
STATUS_KEYS: tuple[str, ...] = ("phase", "step", "total_steps", "loss", "psnr", "eta_s", "updated_at", "pid",
                                "exit_code", "error", "cuda_visible_devices")
# the GPU(s) the controller gave the job (one per job on a multi-GPU instance); also in summary.json
VISIBLE_DEVICES_ENV = "CUDA_VISIBLE_DEVICES"
PHASES: tuple[str, ...] = ("check", "train", "render", "gt", "metrics", "summary", "videos", "done", "failed",
                           "interrupted")
END_PHASES: tuple[str, ...] = ("done", "failed", "interrupted")

# Other files in JOB_DIR
HEARTBEAT_NAME = "heartbeat"
LOG_NAME = "log.txt"
WATCHDOG_NAME = "watchdog.json"
OUT_DIR_NAME = "out"
