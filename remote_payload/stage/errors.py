"""Staging errors, under the payload's one base (`remote_payload.errors.PayloadError`).

    PayloadError    1  anything else (bad arguments, no disk, lock not obtained)
    ├── BadData     2  the data is not a usable NeRF-synthetic scene (fake, broken, unsafe archive)
    └── NoMirror    3  no mirror could deliver the dataset (`stage` only; `run` uses 3 otherwise)
"""
from __future__ import annotations

from ..contract import EXIT_NO_MIRROR
from ..errors import BadData, PayloadError

StageError = PayloadError


class NoMirror(PayloadError):
    exit_code = EXIT_NO_MIRROR


__all__ = ["BadData", "NoMirror", "PayloadError", "StageError"]
