"""Frames on disk: numeric ordering, compositing on white, the ground-truth stage.

File stems like `r_2` and `r_10` sort numerically (r_2 before r_10), the order of the dataset's
test views, which is the order frames go into the videos.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

_NUM = re.compile(r"(\d+)")


def numeric_key(name: str) -> tuple[object, ...]:
    """Sort key splitting digits out: 'r_2' < 'r_10' < 's_1'."""
    parts = _NUM.split(name)
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts)


def sorted_pngs(directory: Path) -> list[Path]:
    return sorted(Path(directory).glob("*.png"), key=lambda p: numeric_key(p.stem))


def composite_on_white(img: Image.Image) -> np.ndarray:
    """RGB uint8 array of `img` composited over a white background (alpha respected)."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
        rgb = rgba[..., :3] * rgba[..., 3:4] + (1.0 - rgba[..., 3:4])
        return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def split_frames(data_dir: Path, split: str = "test") -> list[Path]:
    """Image files of a split in transforms order (`file_path` may omit the .png suffix)."""
    data_dir = Path(data_dir)
    meta = json.loads((data_dir / f"transforms_{split}.json").read_text(encoding="utf-8"))
    paths: list[Path] = []
    for frame in meta["frames"]:
        rel = Path(str(frame["file_path"]))
        p = data_dir / rel
        if p.suffix.lower() not in (".png", ".jpg", ".jpeg"):
            p = p.with_name(p.name + ".png")
        paths.append(p)
    return paths


def write_gt_frames(data_dir: Path, out_dir: Path) -> list[Path]:
    """Copy the test views composited on white to `out_dir/<stem>.png`; numeric order returned."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for src in sorted(split_frames(data_dir, "test"), key=lambda p: numeric_key(p.stem)):
        with Image.open(src) as img:
            rgb = composite_on_white(img)
        dst = out_dir / f"{src.stem}.png"
        Image.fromarray(rgb).save(dst)
        written.append(dst)
    log.info("wrote %d ground-truth frames to %s", len(written), out_dir)
    return written


def expected_stems(data_dir: Path, split: str = "test") -> list[str]:
    return sorted((p.stem for p in split_frames(data_dir, split)), key=numeric_key)


def has_frames(directory: Path, stems: list[str]) -> bool:
    """True when `directory` holds a PNG for every stem (a stage's output is complete)."""
    d = Path(directory)
    return bool(stems) and d.is_dir() and all((d / f"{s}.png").is_file() for s in stems)
