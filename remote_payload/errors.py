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


class PayloadError(Exception):
    """Base of every error the payload raises on purpose."""

    exit_code: int = 1

    def __init__(self, message: str, *, phase: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.phase = phase

    def __str__(self) -> str:
        return self.message


class BadData(PayloadError):
    exit_code = 2


class TrainFailed(PayloadError):
    exit_code = 3


class OutOfMemory(PayloadError):
    exit_code = 4


class Interrupted(PayloadError):
    exit_code = 5


class StageFailed(PayloadError):
    exit_code = 6


class AlreadyRunning(PayloadError):
    exit_code = 7


USAGE_EXIT_CODE = 64   # bad command-line arguments (argparse), distinct from "bad data" (2)


class BadUsage(PayloadError):
    exit_code = USAGE_EXIT_CODE
