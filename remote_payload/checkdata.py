"""`check-data`: is this directory a usable NeRF-synthetic scene? Decided before any GPU work.

Wraps `ngp_train.data.validate_dataset`; in front of it, a cheap look at the directory that names
the two commonest mistakes in words a user recognises: a path that does not exist, and a copy
that holds only results (renders, checkpoints) instead of the dataset.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from .errors import BadData

log = logging.getLogger(__name__)

_RESULT_SUFFIXES = {".pt", ".pth", ".ckpt", ".msgpack", ".ingp", ".mp4", ".npz", ".obj", ".ply"}
_RESULT_DIRS = {"renders", "render", "results", "checkpoints", "ckpt", "videos", "logs"}


@dataclass(frozen=True, slots=True)
class DataReport:
    path: str
    n_train: int
    n_val: int
    n_test: int
    width: int
    height: int


def _precheck(data_dir: Path) -> None:
    if not data_dir.exists():
        raise BadData(f"{data_dir}: no such directory; pass the scene directory that holds "
                      "transforms_train.json", phase="check")
    if not data_dir.is_dir():
        raise BadData(f"{data_dir}: not a directory; pass the scene directory that holds "
                      "transforms_train.json", phase="check")
    if any(data_dir.glob("transforms_*.json")):
        return
    names = {p.name.lower() for p in data_dir.iterdir()}
    looks_like_results = bool(names & _RESULT_DIRS) or any(
        p.suffix.lower() in _RESULT_SUFFIXES for p in data_dir.rglob("*") if p.is_file())
    if looks_like_results:
        raise BadData(f"{data_dir}: holds only results (renders/checkpoints) and no "
                      "transforms_*.json; this is not the dataset, fetch the original scene",
                      phase="check")


def check_data(data_dir: Path) -> DataReport:
    """Validate the scene at `data_dir`; raise BadData with a one-line reason."""
    data_dir = Path(data_dir).expanduser()
    _precheck(data_dir)
    from ngp_train.data import validate_dataset
    from ngp_train.errors import DatasetError

    try:
        info = validate_dataset(data_dir)
    except DatasetError as exc:
        line = " ".join(str(exc).split()) or type(exc).__name__
        raise BadData(line, phase="check") from None
    report = DataReport(path=str(info.path), n_train=int(info.n_train), n_val=int(info.n_val),
                        n_test=int(info.n_test), width=int(info.width), height=int(info.height))
    if report.n_test < 1:
        raise BadData(f"{data_dir}: transforms_test.json lists no frames; nothing to evaluate",
                      phase="check")
    log.info("dataset ok: %s (%d train, %d val, %d test, %dx%d)", report.path, report.n_train,
             report.n_val, report.n_test, report.width, report.height)
    return report
