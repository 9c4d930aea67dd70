"""`check-data`: is this directory a usable NeRF-synthetic scene? Decided before any GPU work.

Wraps `ngp_train.data.validate_dataset` (transforms files, frame paths, sizes from the image
headers, results-only copies) and adds what it leaves out: every frame must be complete (a
truncated download passes a header check; a PNG must end with its IEND chunk, a JPEG with the
end-of-image marker: a read of the file's last bytes, not a decode), a sample of frames per
split must really decode, and the test split must not be empty. Decoding all of lego's 400
800-px frames took longer than the check of everything else together.
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


PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"      # the IEND chunk: length 0, type, CRC
JPEG_END = b"\xff\xd9"
SAMPLE_PER_SPLIT = 3                                      # first, middle and last frame are decoded


def _complete(path: Path) -> bool:
    """The file ends as its format requires (formats other than PNG/JPEG: not checked)."""
    suffix = path.suffix.lower()
    tail = {".png": PNG_END, ".jpg": JPEG_END, ".jpeg": JPEG_END}.get(suffix)
    if tail is None:
        return True
    with open(path, "rb") as fh:
        fh.seek(0, 2)
        size = fh.tell()
        fh.seek(max(0, size - 64))
        end = fh.read().rstrip(b"\x00") if suffix != ".png" else fh.read()
    return end.endswith(tail)


def _sample(n: int, k: int = SAMPLE_PER_SPLIT) -> list[int]:
    return sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)}) if n else []


def _verify_frames(data_dir: Path) -> None:
    from PIL import Image

    for split in ("train", "val", "test"):
        if not (data_dir / f"transforms_{split}.json").is_file():
            continue
        paths = split_frames(data_dir, split)
        for path in paths:
            if not _complete(path):
                raise BadData(f"{path}: image is truncated (no end marker); the download is probably "
                              "incomplete, fetch the scene again", phase="check")
        for k in _sample(len(paths)):
            try:
                with Image.open(paths[k]) as im:
                    im.load()
            except Exception as exc:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError... on bad data
                raise BadData(f"{paths[k]}: image does not decode ({' '.join(str(exc).split())}); "
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
    _verify_frames(data_dir)
    report = DataReport(path=str(info.path), n_train=int(info.n_train), n_val=int(info.n_val),
                        n_test=int(info.n_test), width=int(info.width), height=int(info.height))
    log.info("dataset ok: %s (%d train, %d val, %d test, %dx%d)", report.path, report.n_train,
             report.n_val, report.n_test, report.width, report.height)
    return report
