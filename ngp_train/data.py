"""NeRF-synthetic (Blender) scenes: validation and loading.

A scene directory holds `transforms_{train,val,test}.json` (`camera_angle_x`, `frames[*]` with
`file_path` without extension and a 4×4 camera-to-world `transform_matrix`) and the RGBA PNGs they
name. `validate_dataset` checks all of that cheaply (image headers only) and raises a one-line
`DatasetError`; `load_split` reads one split into arrays.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .cameras import focal_from_angle
from .errors import DatasetError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
REQUIRED_SPLITS = ("train", "test")
_RESULT_MARKERS = ("renders", "checkpoints", "snapshot.pt", "metrics.csv", "summary.json", "videos",
                   "results.json", "train_log.csv")


@dataclass(frozen=True, slots=True)
class DatasetInfo:
    path: Path
    n_train: int
    n_val: int
    n_test: int
    width: int
    height: int


@dataclass(frozen=True, slots=True)
class Frame:
    name: str            # file stem, e.g. "r_12"
    image_path: Path
    c2w: tuple[tuple[float, ...], ...]


@dataclass(frozen=True, slots=True)
class SplitMeta:
    split: str
    camera_angle_x: float
    frames: tuple[Frame, ...]


@dataclass(frozen=True, slots=True)
class SplitData:
    """One split in memory. images: (N, H, W, 4) uint8 RGBA, straight alpha (a quarter of float32's
    memory: 256 MB for lego's 100 training views at 800 px; converted to float per batch)."""

    split: str
    names: tuple[str, ...]
    images: np.ndarray
    c2w: np.ndarray          # (N, 4, 4) float32
    focal: float             # pixels, at this resolution
    width: int
    height: int


def _looks_like_results(d: Path) -> list[str]:
    found = [m for m in _RESULT_MARKERS if (d / m).exists()]
    found += sorted(p.name for p in d.glob("*.pt") if p.name not in found)[:3]
    found += sorted(p.name for p in d.glob("*.ckpt"))[:3]
    return found


def _image_path(data_dir: Path, file_path: str) -> Path:
    p = data_dir / file_path
    return p if p.suffix.lower() in (".png", ".jpg", ".jpeg") else p.with_name(p.name + ".png")


def read_split_meta(data_dir: str | Path, split: str) -> SplitMeta:
    """Parse transforms_<split>.json; raise DatasetError naming the file and key on any defect."""
    d = Path(data_dir)
    f = d / f"transforms_{split}.json"
    if not f.is_file():
        raise DatasetError(f"{d}: missing {f.name}; a NeRF-synthetic scene needs transforms_train.json "
                           "and transforms_test.json next to its train/ and test/ folders")
    try:
        meta = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or "camera_angle_x" not in meta:
        raise DatasetError(f"{f}: missing key 'camera_angle_x' (horizontal field of view in radians)")
    frames_raw = meta.get("frames")
    if not isinstance(frames_raw, list) or not frames_raw:
        raise DatasetError(f"{f}: key 'frames' must be a non-empty list")
    try:
        angle = float(meta["camera_angle_x"])
    except (TypeError, ValueError):
        raise DatasetError(f"{f}: 'camera_angle_x' must be a number") from None
    frames = []
    for k, fr in enumerate(frames_raw):
        if not isinstance(fr, dict) or "file_path" not in fr or "transform_matrix" not in fr:
            raise DatasetError(f"{f}: frames[{k}] needs 'file_path' and 'transform_matrix'")
        m = np.asarray(fr["transform_matrix"], dtype=np.float64) if _is_matrix(fr["transform_matrix"]) else None
        if m is None or m.shape != (4, 4) or not np.isfinite(m).all():
            raise DatasetError(f"{f}: frames[{k}].transform_matrix must be a 4x4 matrix of numbers")
        path = _image_path(d, str(fr["file_path"]))
        frames.append(Frame(path.stem, path, tuple(tuple(float(v) for v in row) for row in m)))
    return SplitMeta(split, angle, tuple(frames))


def _is_matrix(v: object) -> bool:
    return isinstance(v, list) and all(isinstance(r, list) and all(isinstance(x, (int, float)) for x in r)
                                       for r in v)


def validate_dataset(data_dir: str | Path) -> DatasetInfo:
    """Check that `data_dir` is a complete NeRF-synthetic scene without decoding the images."""
    from PIL import Image, UnidentifiedImageError

    d = Path(data_dir)
    if not d.is_dir():
        raise DatasetError(f"{d}: dataset directory does not exist")
    has_any = [s for s in SPLITS if (d / f"transforms_{s}.json").is_file()]
    if not has_any:
        results = _looks_like_results(d)
        if results:
            raise DatasetError(f"{d} holds results ({', '.join(results[:4])}) but no transforms_*.json: it is a "
                               "results-only copy, not a dataset; point to the scene with the training images")
        subdirs = sorted(p.name for p in d.iterdir() if p.is_dir() and (p / "transforms_train.json").is_file())
        hint = f" (scenes found in subfolders: {', '.join(subdirs[:5])})" if subdirs else ""
        raise DatasetError(f"{d}: no transforms_train.json/transforms_test.json; not a NeRF-synthetic scene{hint}")
    counts: dict[str, int] = {}
    size: tuple[int, int] | None = None
    first: Path | None = None
    for split in SPLITS:
        if split not in REQUIRED_SPLITS and not (d / f"transforms_{split}.json").is_file():
            counts[split] = 0
            continue
        meta = read_split_meta(d, split)
        for fr in meta.frames:
            if not fr.image_path.is_file():
                raise DatasetError(f"{d}: transforms_{split}.json names {fr.image_path.relative_to(d)}, "
                                   "which does not exist")
            try:
                with Image.open(fr.image_path) as im:
                    wh = im.size
            except (OSError, UnidentifiedImageError):
                raise DatasetError(f"{fr.image_path}: not a readable image") from None
            if size is None:
                size, first = wh, fr.image_path
            elif wh != size:
                raise DatasetError(f"{fr.image_path}: image is {wh[0]}x{wh[1]} but {first.name if first else '?'} "
                                   f"is {size[0]}x{size[1]}; all frames must have the same size")
        counts[split] = len(meta.frames)
    assert size is not None
    return DatasetInfo(d, counts["train"], counts["val"], counts["test"], size[0], size[1])


@dataclass(frozen=True, slots=True)
class SplitPoses:
    """One split's cameras, from its JSON and one image header: nothing decoded."""

    split: str
    names: tuple[str, ...]
    image_paths: tuple[Path, ...]
    c2w: np.ndarray          # (N, 4, 4) float32
    focal: float             # pixels, at this resolution
    width: int
    height: int


def load_poses(data_dir: str | Path, split: str, downscale: int = 1) -> SplitPoses:
    """Names, camera-to-world matrices and the focal length of `split` at 1/downscale, reading
    the JSON and the first image's header only."""
    from PIL import Image

    if downscale < 1:
        raise DatasetError(f"downscale must be >= 1, got {downscale}")
    meta = read_split_meta(data_dir, split)
    first = meta.frames[0].image_path
    try:
        with Image.open(first) as im:
            w0, h0 = im.size
    except (OSError, ValueError):
        raise DatasetError(f"{first}: not a readable image") from None
    w, h = w0 // downscale, h0 // downscale
    focal = focal_from_angle(w0, meta.camera_angle_x) * (w / w0)
    return SplitPoses(split, tuple(fr.name for fr in meta.frames), tuple(fr.image_path for fr in meta.frames),
                      np.stack([np.asarray(fr.c2w, dtype=np.float32) for fr in meta.frames]), focal, w, h)


def load_image(path: Path, downscale: int = 1, size: tuple[int, int] | None = None) -> np.ndarray:
    """One frame as (H, W, 4) uint8 RGBA, box-downscaled (premultiplied) by `downscale`; `size`
    (w, h) at full resolution, when given, must match."""
    from PIL import Image

    if not path.is_file():
        raise DatasetError(f"{path}: frame listed in the split's transforms file does not exist")
    with Image.open(path) as im:
        arr = np.array(im.convert("RGBA"), dtype=np.uint8)
    if size is not None and (arr.shape[1], arr.shape[0]) != size:
        raise DatasetError(f"{path}: image is {arr.shape[1]}x{arr.shape[0]}, expected {size[0]}x{size[1]}")
    if downscale > 1:
        small = _box_downscale(arr.astype(np.float32) / 255.0, downscale)
        arr = np.clip(np.rint(small * 255.0), 0, 255).astype(np.uint8)
    return arr


def load_split(data_dir: str | Path, split: str, downscale: int = 1) -> SplitData:
    """Read one split; images (uint8) are downscaled by an integer factor with box filtering of
    RGBA (premultiplied), the focal length with them."""
    from PIL import Image

    if downscale < 1:
        raise DatasetError(f"downscale must be >= 1, got {downscale}")
    meta = read_split_meta(data_dir, split)
    if not meta.frames[0].image_path.is_file():
        raise DatasetError(f"{meta.frames[0].image_path}: frame listed in transforms_{split}.json does not exist")
    with Image.open(meta.frames[0].image_path) as im:
        w0, h0 = im.size
    imgs = [load_image(fr.image_path, downscale, (w0, h0)) for fr in meta.frames]
    images = np.stack(imgs)
    h, w = images.shape[1:3]
    focal = focal_from_angle(w0, meta.camera_angle_x) * (w / w0)
    return SplitData(split, tuple(fr.name for fr in meta.frames), images,
                     np.stack([np.asarray(fr.c2w, dtype=np.float32) for fr in meta.frames]), focal, w, h)


def _box_downscale(rgba: np.ndarray, k: int) -> np.ndarray:
    h, w = (rgba.shape[0] // k) * k, (rgba.shape[1] // k) * k
    a = rgba[:h, :w].reshape(h // k, k, w // k, k, 4)
    alpha = a[..., 3].mean(axis=(1, 3))
    rgb = (a[..., :3] * a[..., 3:]).mean(axis=(1, 3)) / np.maximum(alpha, 1e-8)[..., None]
    return np.concatenate([rgb, alpha[..., None]], axis=-1).astype(np.float32)


def composite(rgba: np.ndarray, background: np.ndarray | float = 1.0) -> np.ndarray:
    """RGB = rgb·alpha + background·(1 − alpha) for straight-alpha RGBA (..., 4)."""
    return rgba[..., :3] * rgba[..., 3:] + np.asarray(background, dtype=rgba.dtype) * (1.0 - rgba[..., 3:])
