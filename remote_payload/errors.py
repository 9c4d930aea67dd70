"""The payload's exceptions, all under one base; each carries the process exit code.

    PayloadError            exit 1   anything the payload raises on purpose
    ├── BadData             exit 2   the dataset is not a usable NeRF-synthetic scene
    ├── TrainFailed         exit 3   training raised
    ├── OutOfMemory         exit 4   training (or rendering) ran out of GPU/host memory
    ├── Interrupted         exit 5   SIGINT/SIGTERM: the snapshot is kept, a rerun resumes
    ├── StageFailed         exit 6   render, ground truth, metrics, summary or videos failed
    ├── AlreadyRunning      exit 7   another live pipeline owns this job directory
    └── BadUsage            exit 64  bad command-line arguments or options

The CLI prints one line `error: <message>` on stderr and exits with `exit_code`.
"""
from __future__ import annotations

from . import contract as c


class PayloadError(Exception):
    """Base of every error the payload raises on purpose."""

    exit_code: int = c.EXIT_ERROR

    def __init__(self, message: str, *, phase: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.phase = phase

    def __str__(self) -> str:
        return self.message


class BadData(PayloadError):
    exit_code = c.EXIT_BAD_DATA


class TrainFailed(PayloadError):
    exit_code = c.EXIT_TRAIN_FAILED


class OutOfMemory(PayloadError):
    exit_code = c.EXIT_OUT_OF_MEMORY


class Interrupted(PayloadError):
    exit_code = c.EXIT_INTERRUPTED


class StageFailed(PayloadError):
    exit_code = c.EXIT_STAGE_FAILED


class AlreadyRunning(PayloadError):
    exit_code = c.EXIT_ALREADY_RUNNING


USAGE_EXIT_CODE = c.EXIT_USAGE  # bad command-line arguments (argparse), distinct from "bad data" (2)


class BadUsage(PayloadError):
    exit_code = USAGE_EXIT_CODE
