"""Videos from frames through ffmpeg-python: render.mp4, gt.mp4 and a labelled compare.mp4.

Frames are piped as raw RGB to ffmpeg (system binary when on PATH, else imageio-ffmpeg's), so
order is exactly the list given and odd sizes are padded to even with white for yuv420p.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .errors import StageFailed
from .frames import composite_on_white

log = logging.getLogger(__name__)


def ffmpeg_exe() -> str:
    found = shutil.which("ffmpeg")
    if found:
        return found
    try:
        import imageio_ffmpeg
        return imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError) as exc:
        raise StageFailed(f"no ffmpeg on this host ({type(exc).__name__}); install it "
                          "(apt-get install ffmpeg) or `pip install imageio-ffmpeg`, then rerun: "
                          "finished stages are kept", phase="videos") from None


def _load_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return composite_on_white(img)


def _pad_even(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pad (white) or crop `frame` to exactly height × width."""
    out = np.full((height, width, 3), 255, dtype=np.uint8)
    h, w = min(height, frame.shape[0]), min(width, frame.shape[1])
    out[:h, :w] = frame[:h, :w]
    return out


def encode(frames: list[np.ndarray], out: Path, *, fps: float = 24.0, crf: int = 18) -> Path:
    """Encode RGB uint8 frames (all the same size) to an H.264 mp4 at `out`, atomically."""
    try:
        import ffmpeg
    except ImportError:
        raise StageFailed("ffmpeg-python is not installed on this host; `pip install "
                          "ffmpeg-python`, then rerun: finished stages are kept", phase="videos") from None

    if not frames:
        raise StageFailed(f"no frames to encode into {out.name}", phase="videos")
    h, w = frames[0].shape[:2]
    eh, ew = h + h % 2, w + w % 2
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.{os.getpid()}.tmp.mp4")
    stream = (ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{ew}x{eh}",
                           framerate=fps)
              .output(str(tmp), vcodec="libx264", pix_fmt="yuv420p", crf=crf,
                      movflags="+faststart", loglevel="error")
              .overwrite_output())
    proc = stream.run_async(cmd=ffmpeg_exe(), pipe_stdin=True, pipe_stderr=True, quiet=False)
    try:
        for f in frames:
            proc.stdin.write(_pad_even(f, eh, ew).tobytes())
        proc.stdin.close()
    except BrokenPipeError:
        pass
    err = proc.stderr.read().decode(errors="replace")
    code = proc.wait(timeout=600)
    if code != 0:
        tmp.unlink(missing_ok=True)
        raise StageFailed(f"ffmpeg failed making {out.name} (exit {code}): "
                          f"{err.strip().splitlines()[-1] if err.strip() else 'no output'}",
                          phase="videos")
    os.replace(tmp, out)
    log.info("wrote %s (%d frames, %dx%d)", out, len(frames), ew, eh)
    return out


def _font(size_px: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size_px)
    except TypeError:   # Pillow < 10.1: fixed bitmap font only
        return ImageFont.load_default()


def side_by_side(left: np.ndarray, right: np.ndarray, labels: tuple[str, str]) -> np.ndarray:
    """Two frames next to each other under a white band holding their labels."""
    h = max(left.shape[0], right.shape[0])
    band = max(14, h // 10)
    gap = max(2, left.shape[1] // 50)
    width = left.shape[1] + gap + right.shape[1]
    canvas = np.full((band + h, width, 3), 255, dtype=np.uint8)
    canvas[band:band + left.shape[0], :left.shape[1]] = left
    canvas[band:band + right.shape[0], left.shape[1] + gap:] = right
    img = Image.fromarray(canvas)
    draw = ImageDraw.Draw(img)
    font = _font(max(10, band - 4))
    for x0, text, room in ((0, labels[0], left.shape[1]), (left.shape[1] + gap, labels[1],
                                                             right.shape[1])):
        if draw.textlength(text, font=font) > room - 2:   # tiny frames: initials only
            text = "".join(word[0] for word in text.split()).upper()
        draw.text((x0 + 2, 1), text, fill=(0, 0, 0), font=font)
    return np.asarray(img)


def make_videos(render_paths: list[Path], gt_paths: list[Path], out_dir: Path, *,
                fps: float = 24.0) -> dict[str, Path]:
    """render.mp4, gt.mp4 and compare.mp4 in `out_dir`; each skipped when it already exists."""
    out_dir = Path(out_dir)
    done: dict[str, Path] = {}
    if len(render_paths) != len(gt_paths):
        raise StageFailed(f"{len(render_paths)} rendered frames but {len(gt_paths)} ground-truth "
                          "frames; cannot pair them", phase="videos")
    for name, paths in (("render", render_paths), ("gt", gt_paths)):
        target = out_dir / f"{name}.mp4"
        if not target.is_file():
            encode([_load_rgb(p) for p in paths], target, fps=fps)
        done[name] = target
    target = out_dir / "compare.mp4"
    if not target.is_file():
        pairs = []
        for r, g in zip(render_paths, gt_paths):
            gt = _load_rgb(g)
            pred = _load_rgb(r)
            if pred.shape != gt.shape:
                pred = np.asarray(Image.fromarray(pred).resize((gt.shape[1], gt.shape[0]),
                                                               Image.Resampling.BICUBIC))
            pairs.append(side_by_side(pred, gt, ("render", "ground truth")))
        encode(pairs, target, fps=fps)
    done["compare"] = target
    return done
