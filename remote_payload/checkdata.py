"""`check-data`: is this directory a usable NeRF-synthetic scene? Decided before any GPU work.

Wraps `ngp_train.data.validate_dataset` (transforms files, frame paths, sizes, results-only
copies) and adds what it leaves out: every referenced frame must really decode (a truncated
download passes a header check), and the test split must not be empty.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from .errors import BadData
from .frames import split_frames

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DataReport:
    path: str
    n_train: int
    n_val: int
    n_test: int
    width: int
    height: int


def _verify_decodes(data_dir: Path) -> None:
    from PIL import Image

    for split in ("train", "val", "test"):
        if not (data_dir / f"transforms_{split}.json").is_file():
            continue
        for path in split_frames(data_dir, split):
            try:
                with Image.open(path) as im:
                    im.load()
            except Exception as exc:   # PIL raises OSError, SyntaxError, ValueError... on bad data
                raise BadData(f"{path}: image does not decode ({' '.join(str(exc).split())}); "
                              "the download is probably truncated, fetch the scene again",
                              phase="check") from None


def check_data(data_dir: Path) -> DataReport:
    """Validate the scene at `data_dir`; raise BadData with a one-line reason."""
    data_dir = Path(data_dir).expanduser()
    from ngp_train.data import validate_dataset
    from ngp_train.errors import DatasetError

    try:
        info = validate_dataset(data_dir)
    except DatasetError as exc:
        raise BadData(" ".join(str(exc).split()) or "not a NeRF-synthetic scene", phase="check") from None
    if int(info.n_test) < 1:
        raise BadData(f"{data_dir}: transforms_test.json lists no frames; nothing to evaluate",
                      phase="check")
    _verify_decodes(data_dir)
    report = DataReport(path=str(info.path), n_train=int(info.n_train), n_val=int(info.n_val),
                        n_test=int(info.n_test), width=int(info.width), height=int(info.height))
    log.info("dataset ok: %s (%d train, %d val, %d test, %dx%d)", report.path, report.n_train,
             report.n_val, report.n_test, report.width, report.height)
    return report
