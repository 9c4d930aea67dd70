"""Render a split of a scene from a snapshot: one PNG per frame, named like the dataset's frames."""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from .data import load_poses, validate_dataset
from .errors import SnapshotError
from .model import ModelConfig, NerfModel, composite_premultiplied
from .precision import precision_for
from .snapshot import load_snapshot
from .train import resolve_backend, resolve_device

log = logging.getLogger(__name__)

RenderProgress = Callable[[int, int], None]     # (frames done, frames total)


def load_model(snapshot_path: str | Path, device: str = "auto", backend: str = "auto") -> tuple[NerfModel, dict]:
    """Rebuild the model stored in a snapshot on `device`; returns (model in eval mode, snapshot dict)."""
    dev = resolve_device(device)
    state = load_snapshot(snapshot_path, dev)
    saved_backend = state.get("backend", "torch")
    use = resolve_backend("torch" if saved_backend == "torch" else backend, dev)
    if saved_backend != use:
        raise SnapshotError(f"{snapshot_path}: trained with backend {saved_backend!r}, which is not usable here")
    cfg = ModelConfig.from_dict(state["model_config"])
    model = NerfModel(cfg, use).to(dev)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise SnapshotError(f"{snapshot_path}: weights do not match the stored model ({str(e)[:80]})") from None
    model.eval()
    return model, state


def render_split(snapshot_path: str | Path, data_dir: str | Path, split: str, out_dir: str | Path,
                 device: str = "auto", progress: RenderProgress | None = None, *,
                 downscale: int | None = None, rgba: bool = False) -> list[Path]:
    """Render every frame of `split` into out_dir/<frame>.png: RGB on a white background, or with
    rgba=True straight-alpha RGBA (one render scores on white and on black). Poses come from the
    split's JSON; no dataset image is decoded."""
    from PIL import Image

    validate_dataset(data_dir)
    model, state = load_model(snapshot_path, device)
    dev = next(iter(model.buffers())).device
    amp = precision_for(dev.type, state.get("backend", "torch")).autocast_dtype
    poses = load_poses(data_dir, split, downscale if downscale is not None else int(state.get("downscale", 1)))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for k, name in enumerate(poses.names):
        img = model.render_image_rgba(torch.from_numpy(poses.c2w[k]), poses.width, poses.height, poses.focal,
                                      amp_dtype=amp)
        path = out / f"{name}.png"
        Image.fromarray(to_png_array(img, rgba)).save(path)
        written.append(path)
        if progress is not None:
            progress(k + 1, len(poses.names))
    log.info("rendered %d %s frames to %s", len(written), split, out)
    return written


def to_png_array(rgba: torch.Tensor, keep_alpha: bool):  # noqa: ANN201 - numpy uint8 (H, W, 3|4)
    """Premultiplied (H, W, 4) → 8-bit RGB on white, or straight-alpha RGBA."""
    if not keep_alpha:
        return (composite_premultiplied(rgba, 1.0) * 255).round().byte().cpu().numpy()
    from .train import png_rgba

    return png_rgba(rgba).cpu().numpy()
