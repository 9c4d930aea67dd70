"""The pipeline's stages after training. Each writes its output atomically (temp + rename) and is
skipped when that output already exists, so a rerun after a crash resumes where it stopped.

Rendering and scoring talk through files, like nerfbaselines: renders/ and gt/ are written
first, then metrics.csv is computed from them.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from .contract import VISIBLE_DEVICES_ENV
from .frames import has_frames, numeric_key, split_frames, write_gt_frames
from .status import write_json_atomic

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FrameScore:
    frame: str
    psnr: float
    ssim: float


def _fresh_tmp(path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _commit_dir(tmp: Path, final: Path) -> None:
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def drop_model_outputs(out: Path) -> None:
    """Remove what depends on the trained model (renders, scores, summary, videos)."""
    for name in ("renders", "videos"):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in ("metrics.csv", "metrics_black.csv", "summary.json"):
        (out / name).unlink(missing_ok=True)


def render_stage(snapshot: Path, data_dir: Path, out: Path, stems: list[str], device: str,
                 tick: Callable[..., None]) -> bool:
    """Render the test views into out/renders. Returns False when skipped (already complete)."""
    final = out / "renders"
    if has_frames(final, stems):
        return False
    from ngp_train.render import render_split

    tmp = _fresh_tmp(final)
    # RGBA (alpha kept): one render is scored on white and on black (metrics_stage)
    render_split(snapshot, data_dir, "test", tmp, device=device, progress=tick, rgba=True)
    missing = [s for s in stems if not (tmp / f"{s}.png").is_file()]
    if missing:
        raise RuntimeError(f"the renderer wrote no image for {len(missing)} test view(s), "
                           f"e.g. {missing[0]}")
    _commit_dir(tmp, final)
    return True


def gt_stage(data_dir: Path, out: Path, stems: list[str]) -> bool:
    final = out / "gt"
    if has_frames(final, stems):
        return False
    tmp = _fresh_tmp(final)
    write_gt_frames(data_dir, tmp)
    _commit_dir(tmp, final)
    return True


def write_metrics_csv(path: Path, scores: list[FrameScore]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["frame", "psnr", "ssim"])
        for s in scores:
            w.writerow([s.frame, f"{s.psnr:.6f}", f"{s.ssim:.6f}"])
    os.replace(tmp, path)


def read_metrics_csv(path: Path) -> list[FrameScore]:
    with open(path, newline="", encoding="utf-8") as fh:
        return [FrameScore(r["frame"], float(r["psnr"]), float(r["ssim"]))
                for r in csv.DictReader(fh)]


BLACK_METRICS = "metrics_black.csv"


def metrics_stage(out: Path, data_dir: Path | None = None) -> bool:
    """metrics.csv: renders vs gt/ on white (the NeRF-synthetic convention); with `data_dir`,
    also metrics_black.csv: the RGBA renders vs the dataset's RGBA test views on black
    (instant-ngp's --nerf_compatibility figures)."""
    path = out / "metrics.csv"
    if path.is_file():
        return False
    from ngp_train.metrics import evaluate_dirs

    rows = evaluate_dirs(out / "renders", out / "gt", background="white")
    scores = sorted((FrameScore(str(m.frame), float(m.psnr), float(m.ssim)) for m in rows),
                    key=lambda s: numeric_key(s.frame))
    if not scores:
        raise RuntimeError("no rendered frame matched a ground-truth frame")
    if data_dir is not None and _has_alpha(out / "renders"):
        test_dir = split_frames(data_dir, "test")[0].parent
        black = sorted((FrameScore(str(m.frame), float(m.psnr), float(m.ssim))
                        for m in evaluate_dirs(out / "renders", test_dir, background="black")),
                       key=lambda s: numeric_key(s.frame))
        write_metrics_csv(out / BLACK_METRICS, black)
    write_metrics_csv(path, scores)
    log.info("metrics: %d frames, mean PSNR %.3f dB", len(scores),
             sum(s.psnr for s in scores) / len(scores))
    return True


def _has_alpha(renders: Path) -> bool:
    from PIL import Image

    first = next(iter(sorted(renders.glob("*.png"))), None)
    if first is None:
        return False
    with Image.open(first) as im:
        return im.mode in ("RGBA", "LA")


def _means(scores: list[FrameScore]) -> dict[str, float]:
    n = len(scores)
    return {"psnr_mean": sum(s.psnr for s in scores) / n, "ssim_mean": sum(s.ssim for s in scores) / n}


def _ffmpeg_version() -> str | None:
    from .videos import ffmpeg_exe

    try:
        res = subprocess.run([ffmpeg_exe(), "-version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    first = res.stdout.splitlines()[0] if res.stdout else ""
    return first.split(" Copyright")[0].strip() or None


def versions() -> dict[str, str | None]:
    def dist(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    v: dict[str, str | None] = {"python": platform.python_version()}
    torch_mod = sys.modules.get("torch")
    v["torch"] = getattr(torch_mod, "__version__", None) or dist("torch")
    for name in ("numpy", "pillow", "imageio-ffmpeg", "ffmpeg-python", "tinycudann"):
        v[name] = dist(name)
    import ngp_train
    v["ngp_train"] = getattr(ngp_train, "__version__", None)
    v["ffmpeg"] = _ffmpeg_version()
    return v


def summary_stage(out: Path, *, scene: str, train: dict[str, Any], n_test: int,
                  data_dir: Path, train_options: dict[str, str] | None = None) -> bool:
    path = out / "summary.json"
    if path.is_file():
        return False
    scores = read_metrics_csv(out / "metrics.csv")
    n = len(scores)
    # psnr_mean/ssim_mean stay the white-background figures; `backgrounds` has both conventions
    backgrounds: dict[str, dict[str, float] | None] = {"white": _means(scores), "black": None}
    if (out / BLACK_METRICS).is_file():
        black = read_metrics_csv(out / BLACK_METRICS)
        backgrounds["black"] = _means(black) if black else None
    summary = {
        "scene": scene,
        "steps": train["steps"],
        "target_steps": train["target_steps"],
        "train_seconds": train["train_seconds"],
        "psnr_mean": sum(s.psnr for s in scores) / n,
        "ssim_mean": sum(s.ssim for s in scores) / n,
        "device": train["device"],
        "device_name": train["device_name"],
        "cuda_visible_devices": os.environ.get(VISIBLE_DEVICES_ENV),   # the GPU the controller gave it
        "backend": train["backend"],
        "final_loss": train.get("final_loss"),
        "resumed_from_step": train.get("resumed_from_step"),
        "n_test_images": n_test,
        "n_scored": n,
        "background": "white",
        "backgrounds": backgrounds,
        "data_dir": str(data_dir),
        "train_options": dict(train_options or {}),   # the --train-option values, as given
        "versions": versions(),
    }
    write_json_atomic(path, summary)
    return True


def video_stage(out: Path, stems: list[str], fps: float) -> bool:
    from .videos import make_videos

    vdir = out / "videos"
    if all((vdir / f"{n}.mp4").is_file() for n in ("render", "gt", "compare")):
        return False
    make_videos([out / "renders" / f"{s}.png" for s in stems],
                [out / "gt" / f"{s}.png" for s in stems], vdir, fps=fps)
    summary = read_json(out / "summary.json")
    if summary is not None:   # record the ffmpeg that made the videos (may differ from before)
        summary.setdefault("versions", {})["ffmpeg"] = _ffmpeg_version()
        summary.pop("videos_missing", None)      # an earlier run's failure is mended
        if "warnings" in summary:
            summary["warnings"] = [w for w in summary["warnings"] if not w.startswith("videos failed")]
        write_json_atomic(out / "summary.json", summary)
    return True


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


VIDEO_NAMES = ("render", "gt", "compare")
INJECT_ENV = "ORCHESTRATE_PAYLOAD_INJECT"


def inject(stage: str) -> None:
    """Test hook: `ORCHESTRATE_PAYLOAD_INJECT=videos,metrics` (host environment) makes those
    stages fail, so tests can show what a failure there costs. Never set it otherwise."""
    wanted = {w.strip() for w in os.environ.get(INJECT_ENV, "").split(",") if w.strip()}
    if stage in wanted:
        raise RuntimeError(f"injected failure in {stage} ({INJECT_ENV})")


def record_missing_videos(out: Path, reason: str) -> None:
    """summary.json names the videos that are missing and why (the job still succeeds)."""
    summary = read_json(out / "summary.json")
    if summary is None:
        return
    vdir = out / "videos"
    summary["videos_missing"] = {f"{n}.mp4": reason for n in VIDEO_NAMES
                                 if not (vdir / f"{n}.mp4").is_file()}
    summary.setdefault("warnings", []).append(f"videos failed: {reason}")
    write_json_atomic(out / "summary.json", summary)


def complete(out: Path, *, scene: str, fps: float = 24.0) -> dict[str, Any]:
    """metrics.csv, summary.json and the videos in `out` from its renders/ and gt/: a job whose
    metrics failed on its host, finished on the controller's machine (`orchestrate eval`)."""
    from .errors import StageFailed
    from .frames import numeric_key

    stems = sorted((p.stem for p in (out / "gt").glob("*.png")), key=numeric_key)
    if not stems:
        raise StageFailed(f"no ground-truth frames in {out / 'gt'}", phase="metrics")
    train = read_json(out / "train_result.json")
    if train is None:
        raise StageFailed(f"{out / 'train_result.json'} is missing: training did not finish", phase="metrics")
    metrics_stage(out)
    summary_stage(out, scene=scene, train=train, n_test=len(stems), data_dir=out / "gt")
    try:
        video_stage(out, stems, fps)
    except Exception as exc:  # noqa: BLE001 - videos are a convenience: metrics stand without them
        record_missing_videos(out, f"{type(exc).__name__}: {' '.join(str(exc).split())}")
    return read_json(out / "summary.json") or {}
